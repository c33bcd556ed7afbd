"""services/engine/priority.py: which threads are lowered, and by how much."""

from __future__ import annotations

import os

from services.engine.priority import lower_priority


class FakeThreads:
    def __init__(self, nice: dict[int, int]) -> None:
        self.nice = nice

    def get(self, which: int, tid: int) -> int:
        assert which == os.PRIO_PROCESS
        if tid not in self.nice:
            raise ProcessLookupError(tid)
        return self.nice[tid]

    def set(self, which: int, tid: int, value: int) -> None:
        assert which == os.PRIO_PROCESS
        self.nice[tid] = value


def test_every_thread_but_the_kept_ones_is_lowered_up_to_19() -> None:
    threads = FakeThreads({1: 0, 2: 0, 3: 15})
    lowered = lower_priority(10, keep=[2], threads=lambda: [1, 2, 3, 4], get=threads.get, set_=threads.set)
    assert lowered == [1, 3]  # 4 ended before it was reached
    assert threads.nice == {1: 10, 2: 0, 3: 19}


def test_nothing_changes_at_zero_or_without_per_thread_priorities() -> None:
    threads = FakeThreads({1: 0})
    assert lower_priority(0, keep=[], threads=lambda: [1], get=threads.get, set_=threads.set) == []

    def no_proc() -> list[int]:
        raise FileNotFoundError("/proc/self/task")

    assert lower_priority(5, keep=[], threads=no_proc, get=threads.get, set_=threads.set) == []
    assert threads.nice == {1: 0}
