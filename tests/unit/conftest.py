"""Fixtures shared by several unit-test modules; the fakes behind them live in tests/fakes/."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fakes.engine_service import RunningEngine, engine_starter


@pytest.fixture
def anyio_backend() -> str:
    """The gateway's async tests (pytest.mark.anyio) run on asyncio only."""
    return "asyncio"


@pytest.fixture
def start_engine() -> Iterator[Callable[..., RunningEngine]]:
    """Starts engine services in-process (see tests.fakes.engine_service.engine_starter); stops them after the test."""
    yield from engine_starter()
