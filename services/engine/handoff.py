"""What the engine's two threads hand each other, and the one count of its capacity.

The I/O thread (io_thread.py) only reads Redis and publishes; every decision
about a request is the main thread's (requests.py, driven by service.py). So
the I/O thread passes on what it read as inbox items, and publishes the
``Publication``s the main thread hands it back.

How many entries to read is the one figure both threads need: ``PullBudget``
holds it, so that it is counted in one place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from shared.transport import Delivery


@dataclass(frozen=True, slots=True)
class Pulled:
    """Entries read from the tokenized stream, or claimed from a gone engine."""

    deliveries: list[Delivery]
    # Claimed entries: request id -> the output tokens the gone engine published (its checkpoint).
    done_tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AbortsRead:
    """Request ids read from the aborts stream (every engine's, not only this one's)."""

    request_ids: list[str]


@dataclass(frozen=True, slots=True)
class GatewaysGone:
    """The gateways whose heartbeats have expired, sent whenever the set changes."""

    gateway_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class EntriesLost:
    """Tokenized-stream entries that are no longer this engine's: another engine claimed them."""

    entry_ids: list[str]


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: makes a main loop blocked on the inbox look at its flags."""


InboxItem = Pulled | AbortsRead | GatewaysGone | EntriesLost | Wake


class PullBudget:
    """How many entries the I/O thread may read now: the backend's free slots minus the
    entries it has read that the main thread has not taken yet. Thread-safe.

    The main thread reports the free slots together with how many entries it took
    (``update``), after adding them to the backend, so an entry is never counted both
    as read and in the free slots, nor in neither.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_slots = 0
        self._unread_by_main = 0
        self._open = True

    def room(self) -> int:
        with self._lock:
            return self._free_slots - self._unread_by_main if self._open else 0

    def count_read(self, entries: int) -> None:
        """I/O thread: ``entries`` are on their way to the main thread."""
        with self._lock:
            self._unread_by_main += entries

    def update(self, free_slots: int, taken: int) -> bool:
        """Main thread: the backend's free slots, and the entries taken since the last update.
        Returns whether the room changed."""
        with self._lock:
            before = self._free_slots - self._unread_by_main
            self._free_slots = free_slots
            self._unread_by_main -= taken
            return self._free_slots - self._unread_by_main != before

    def close(self) -> None:
        """No more reading (the engine is draining)."""
        with self._lock:
            self._open = False
