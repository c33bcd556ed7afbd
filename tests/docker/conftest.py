"""tests/docker: compose.yaml in a real Docker engine (host.py provides one when it can).

Opt-in: on a fresh machine (as CI's are) the set-up alone takes about 6 minutes on the
project's 2 cores (debootstrap, the image, the model converted on first start), CI's whole
budget for one test (docs/operations.md, "Docker"), so these tests run only when ``-m``
names the marker: ``python -m pytest -m docker -s``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: builds the image and runs compose.yaml in a real Docker engine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "docker" in (config.getoption("markexpr") or ""):
        return
    opt_in = pytest.mark.skip(reason="opt-in (minutes of image building): python -m pytest -m docker -s")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(opt_in)
