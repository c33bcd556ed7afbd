"""Requests in flight: request_id -> the queue its HTTP handler waits on.

Pure logic (asyncio queues, no I/O). The response reader puts every TextDelta
and RequestFailed into the queue of its request; a handler releases its entry
when it ends, for whatever reason, so nothing is left behind. Responses for a
released or unknown request (late output after an abort) are dropped, and so
is text a request already received (a delta published twice, told by its
``offset``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.messages import Message, RequestFailed, ResponseBatch, TextDelta

Event = TextDelta | RequestFailed


class RegistryFull(Exception):
    """More requests in flight than allowed: admission control says no."""


class RegistryClosed(Exception):
    """The gateway is shutting down and takes no new requests."""


class RequestRegistry:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._text_end: dict[str, int] = {}  # request id -> code points of text delivered
        self.closed = False
        self.dropped = 0  # events that arrived for no waiting request

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._queues

    def ids(self) -> list[str]:
        return list(self._queues)

    def open(self, request_id: str) -> asyncio.Queue[Event]:
        """Admit a request; raises RegistryFull / RegistryClosed, ValueError for a reused id."""
        if self.closed:
            raise RegistryClosed()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if len(self._queues) >= self.capacity:
            raise RegistryFull()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def release(self, request_id: str) -> bool:
        """Forget a request; True if it was in flight."""
        self._text_end.pop(request_id, None)
        return self._queues.pop(request_id, None) is not None

    def dispatch(self, message: Message) -> int:
        """Route one message from the responses stream; returns the events delivered."""
        if isinstance(message, ResponseBatch):
            delivered = 0
            for delta in message.deltas:
                if self._unseen(delta):
                    delivered += self._put(delta.request_id, delta)
            return delivered
        if isinstance(message, RequestFailed):
            return self._put(message.request_id, message)
        self.dropped += 1  # no other message type belongs on a responses stream
        return 0

    def _unseen(self, delta: TextDelta) -> bool:
        """Cut text the request already has; False if nothing new is left.

        The detokenizer publishes each delta once (docs/architecture.md), but a
        client must never see text twice even if something upstream replays.
        """
        if delta.offset is None or delta.request_id not in self._queues:
            return True
        delivered = self._text_end.get(delta.request_id, 0)
        end = delta.offset + len(delta.text)
        if end <= delivered and delta.finish_reason is None:
            self.dropped += 1
            return False
        if delta.offset < delivered:
            delta.text = delta.text[delivered - delta.offset :]
            delta.offset = delivered
        self._text_end[delta.request_id] = max(delivered, end)
        return True

    def _put(self, request_id: str, event: Event) -> int:
        queue = self._queues.get(request_id)
        if queue is None:
            self.dropped += 1
            return 0
        queue.put_nowait(event)
        return 1

    def close(self, failure: Callable[[str], RequestFailed]) -> list[str]:
        """Refuse new requests and end every waiting one with ``failure(request_id)``."""
        self.closed = True
        return self.fail_all(failure)

    def fail_all(self, failure: Callable[[str], RequestFailed]) -> list[str]:
        """End every waiting request with ``failure(request_id)``; new ones are still admitted."""
        ids = self.ids()
        for request_id in ids:
            self._queues[request_id].put_nowait(failure(request_id))
        return ids
