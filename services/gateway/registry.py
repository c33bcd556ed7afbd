"""Requests in flight: request_id -> the OutputBuffer its HTTP handler takes from.

Pure logic (no I/O). The response reader puts every TextDelta and
RequestFailed into the buffer of its request, never waiting (buffers are
bounded and coalesce text: output_buffer.py); a handler releases its entry
when it ends, for whatever reason, so nothing is left behind. Responses for a
released or unknown request (late output after an abort) are dropped, and so
is text a request already received (a delta published twice, told by its
``offset``).

Calls (POST /tokenize, /detokenize) have one answer, not a stream: each waits on a
future, resolved by its TokenizeResult, DetokenizeResult or RequestFailed. They count
towards the same capacity and end the same way on shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.gateway.output_buffer import Event, OutputBuffer
from shared.messages import DetokenizeResult, Message, RequestFailed, ResponseBatch, TextDelta, TokenizeResult

CallAnswer = TokenizeResult | DetokenizeResult | RequestFailed


class RegistryFull(Exception):
    """More requests in flight than allowed: admission control says no."""


class RegistryClosed(Exception):
    """The gateway is shutting down and takes no new requests."""


class RequestRegistry:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._buffers: dict[str, OutputBuffer] = {}
        self._calls: dict[str, asyncio.Future[CallAnswer]] = {}
        self._text_end: dict[str, int] = {}  # request id -> code points of text delivered
        self.closed = False
        self.dropped = 0  # events that arrived for no waiting request

    def __len__(self) -> int:
        return len(self._buffers) + len(self._calls)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._buffers or request_id in self._calls

    def ids(self) -> list[str]:
        return list(self._buffers)

    def open(self, request_id: str, *, max_buffered_bytes: int | None = None) -> OutputBuffer:
        """Admit a request; raises RegistryFull / RegistryClosed, ValueError for a reused id.

        ``max_buffered_bytes`` bounds the output waiting for its handler (None: unbounded,
        for handlers that never wait on a client).
        """
        self._admit(request_id)
        buffer = OutputBuffer(request_id, max_bytes=max_buffered_bytes)
        self._buffers[request_id] = buffer
        return buffer

    def open_call(self, request_id: str) -> asyncio.Future[CallAnswer]:
        """Admit a call with one answer; the future gets it. Raises as ``open``."""
        self._admit(request_id)
        future: asyncio.Future[CallAnswer] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = future
        return future

    def _admit(self, request_id: str) -> None:
        if self.closed:
            raise RegistryClosed()
        if request_id in self:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if len(self) >= self.capacity:
            raise RegistryFull()

    def release(self, request_id: str) -> bool:
        """Forget a request or call; True if it was in flight."""
        self._text_end.pop(request_id, None)
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()  # a no-op once answered
            return True
        return self._buffers.pop(request_id, None) is not None

    def dispatch(self, message: Message) -> int:
        """Route one message from the responses stream; returns the events delivered."""
        if isinstance(message, ResponseBatch):
            delivered = 0
            for delta in message.deltas:
                if self._unseen(delta):
                    delivered += self._put(delta.request_id, delta)
            return delivered
        if isinstance(message, (TokenizeResult, DetokenizeResult)) or (
            isinstance(message, RequestFailed) and message.request_id in self._calls
        ):
            return self._answer(message)
        if isinstance(message, RequestFailed):
            return self._put(message.request_id, message)
        self.dropped += 1  # no other message type belongs on a responses stream
        return 0

    def _answer(self, message: CallAnswer) -> int:
        call = self._calls.get(message.request_id)
        if call is None or call.done():  # released, or answered twice (a redelivery)
            self.dropped += 1
            return 0
        call.set_result(message)
        return 1

    def _unseen(self, delta: TextDelta) -> bool:
        """Cut text the request already has; False if nothing new is left.

        The detokenizer publishes each delta once (docs/architecture.md), but a
        client must never see text twice even if something upstream replays.
        """
        if delta.offset is None or delta.request_id not in self._buffers:
            return True
        delivered = self._text_end.get(delta.request_id, 0)
        end = delta.offset + len(delta.text)
        # The first delta may bring the prompt (its logprobs, its text) before any output text.
        brings_prompt = delta.prompt_logprobs is not None or delta.prompt_text is not None
        if end <= delivered and delta.finish_reason is None and not brings_prompt:
            self.dropped += 1
            return False
        if delta.offset < delivered:
            delta.text = delta.text[delivered - delta.offset :]
            delta.offset = delivered
        self._text_end[delta.request_id] = max(delivered, end)
        return True

    def _put(self, request_id: str, event: Event) -> int:
        buffer = self._buffers.get(request_id)
        if buffer is None or not buffer.put(event):
            self.dropped += 1
            return 0
        return 1

    def buffered_bytes(self) -> int:
        """Output waiting in every request's buffer (the gauge behind the slow-client bound)."""
        return sum(buffer.pending_bytes for buffer in self._buffers.values())

    def close(self, failure: Callable[[str], RequestFailed]) -> list[str]:
        """Refuse new requests and end every waiting one with ``failure(request_id)``."""
        self.closed = True
        return self.fail_all(failure)

    def fail_all(self, failure: Callable[[str], RequestFailed]) -> list[str]:
        """End every waiting request with ``failure(request_id)``; new ones are still admitted."""
        ids = self.ids()
        for request_id in ids:
            # A buffer that overflows here releases its request (on_overflow) midway.
            buffer = self._buffers.get(request_id)
            if buffer is not None:
                buffer.put(failure(request_id))
        for request_id in list(self._calls):
            self._answer(failure(request_id))
        return ids  # the calls never reach an engine: nothing to abort
