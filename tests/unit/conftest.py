"""Fixtures shared by several unit-test modules; the fakes behind them live in tests/fakes/."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.engine_service import RunningEngine, engine_starter


@pytest.fixture
def anyio_backend() -> str:
    """The gateway's async tests (pytest.mark.anyio) run on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module of small ops: on the shared 2-core machine a second OpenMP
    thread only adds barrier waits. The native kernels' own OpenMP loops still run on both."""
    import torch  # here, not at the top: the gateway's and tokenizer's tests need no torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def kernel_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of compiled native kernels for the whole session (SCALELLM_KERNEL_CACHE_DIR's role),
    apart from the user's cache: each library is compiled once per -march and source text (native_build._build
    finds it there after), whichever module asks first. A test that needs a failed or fresh build takes
    its own tmp_path instead."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="session")
def qlinear_builds(kernel_cache_dir: Path) -> Callable[[str], ctypes.CDLL]:
    """The GGUF linear kernel's library for a -march target, built once per session (qlinear_builds.py)."""
    from tests.unit.qlinear_builds import build_qlinear  # imports torch: not at the top

    built: dict[str, ctypes.CDLL | BaseException] = {}

    def library(march: str) -> ctypes.CDLL:
        if march not in built:
            try:
                built[march] = build_qlinear(march, kernel_cache_dir)
            # A target this machine cannot run skips, and a failed build fails, every test that asks for it
            # without compiling again (as a fixture's error is kept for its scope).
            except (Exception, pytest.skip.Exception) as exc:
                built[march] = exc
        result = built[march]
        if isinstance(result, BaseException):
            raise result
        return result

    return library


@pytest.fixture
def march() -> str:
    """The -march target of qlinear_library: native unless the test parametrizes march."""
    return "native"


@pytest.fixture
def qlinear_library(march: str, qlinear_builds: Callable[[str], ctypes.CDLL]) -> ctypes.CDLL:
    """csrc/qlinear.c built for -march=<march> (parametrize march, e.g. over qlinear_builds.MARCH_PATHS)."""
    return qlinear_builds(march)


@pytest.fixture
def start_engine() -> Iterator[Callable[..., RunningEngine]]:
    """Starts engine services in-process (see tests.fakes.engine_service.engine_starter); stops them after the test."""
    yield from engine_starter()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A two-layer Llama with GQA (4 heads, 2 KV heads) saved to a folder, for the KV format tests' runners;
    one torch thread while the module runs."""
    import torch  # here, not at the top: most modules this conftest serves need neither
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(99)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(config)  # only saved: the runners load it
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(previous)
