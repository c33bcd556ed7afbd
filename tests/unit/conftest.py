"""Fixtures shared by several unit-test modules; the fakes behind them live in tests/fakes/."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


@pytest.fixture
def start_engine() -> Iterator[Callable[..., RunningEngine]]:
    """Starts engine services in-process (see tests.fakes.engine_service.engine_starter); stops them after the test."""
    yield from engine_starter()
