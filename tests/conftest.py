"""Session-wide test setup.

All tests share one model cache, so the GGUF default model is converted at
most once per run (and, on a developer machine, once ever: ``.cache/`` is
ignored by git). ``SCALELLM_MODEL_CACHE_DIR`` set by the caller wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure() -> None:
    os.environ.setdefault("SCALELLM_MODEL_CACHE_DIR", str(REPO / ".cache" / "models"))
    # Tests never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The default model's tokenizer (converted once into the shared cache), for
    tests that compute what the services must return."""
    from transformers import AutoTokenizer

    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    return AutoTokenizer.from_pretrained(resolve_model_dir(CommonSettings(), weights=False))


# Each phase's report on the test item (item.rep_setup / rep_call / rep_teardown), so that fixtures
# such as show_logs_on_failure can tell after the test whether it failed.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
