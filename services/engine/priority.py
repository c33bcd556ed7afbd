"""The decode loop's CPU priority: below the rest of the pipeline's, its I/O thread's kept.

On cores the engine shares with the gateway, the detokenizer and Redis (one host, as `scalellm
up` runs them), the model's threads are busy for the whole of each step. A stage that wakes to
pass a request's first token on then waits for the scheduler to take a core from them, at each
of the hops back to the client, while the next step runs. With a higher nice value the model's
threads weigh less, and the stages, which wake for short bursts, run at once. The engine loses
only what they use, which it had to give them anyway.

The I/O thread keeps the process's priority: it publishes each step's output and heartbeats.
Threads that the lowered ones start later (the model's thread pools) inherit their priority.
Linux only (per-thread priorities, /proc/self/task); elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection

log = logging.getLogger(__name__)


def _threads() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def lower_priority(
    nice: int,
    keep: Collection[int],
    *,
    threads: Callable[[], list[int]] = _threads,
    get: Callable[[int, int], int] | None = None,
    set_: Callable[[int, int, int], None] | None = None,
) -> list[int]:
    """Add ``nice`` to the nice value of every thread of this process but ``keep`` (native
    thread ids); returns the threads lowered."""
    get = get or getattr(os, "getpriority", None)
    set_ = set_ or getattr(os, "setpriority", None)
    if nice <= 0 or get is None or set_ is None:
        return []
    try:
        tids = threads()
    except OSError:
        log.info("per-thread priorities are not available here: the engine keeps its priority")
        return []
    lowered = []
    for tid in tids:
        if tid in keep:
            continue
        try:
            set_(os.PRIO_PROCESS, tid, min(19, get(os.PRIO_PROCESS, tid) + nice))
        except ProcessLookupError:
            continue  # the thread has ended
        except OSError as exc:
            log.warning("could not lower the priority of thread %d: %s", tid, exc)
            continue
        lowered.append(tid)
    return lowered
