"""The engine's memory bounds: kernel cache capacities and the periodic malloc trim."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.engine.memory import KERNEL_CACHE_CAPACITY, MemoryTrimmer, _glibc_malloc_trim, bound_kernel_caches


def test_kernel_caches_are_capped_unless_the_operator_set_them() -> None:
    environ = {"LRU_CACHE_CAPACITY": "4096"}
    in_force = bound_kernel_caches(environ)
    assert in_force == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(KERNEL_CACHE_CAPACITY), "LRU_CACHE_CAPACITY": "4096"}
    assert environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY)


def test_the_engine_process_caps_them_before_torch_is_imported() -> None:
    # main() sets them before importing the backend: nothing before it may pull in torch.
    probe = "import sys, services.engine.service; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval() -> None:
    calls: list[int] = []
    clock = FakeClock()

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = MemoryTrimmer(interval_s=30.0, trim=trim, clock=clock)
    assert not trimmer.maybe_trim()
    clock.now += 29.9
    assert not trimmer.maybe_trim()
    clock.now += 0.2
    assert trimmer.maybe_trim()
    assert not trimmer.maybe_trim()
    clock.now += 30.0
    assert trimmer.maybe_trim()
    assert calls == [0, 0]


def test_glibcs_malloc_trim_is_found_and_called() -> None:
    if _glibc_malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim (not glibc): the engine skips trimming")
    trimmer = MemoryTrimmer(interval_s=0.0, clock=FakeClock())
    assert trimmer.maybe_trim()
