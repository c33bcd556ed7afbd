"""One request's output on its way from the gateway's reader task to its HTTP handler.

The reader task serves every request of the gateway, so it must never wait for
one of them: ``put`` never blocks. A handler whose client stops reading blocks
in uvicorn's ``send`` and stops taking, so what it has not taken must be bounded:

- Text deltas waiting together are coalesced into one (text joined, token ids
  and logprobs concatenated): a lagging reader holds its text and ids, not a
  message object per engine step, and when it reads again it gets every
  character in one chunk.
- The size of what waits is tracked (CPython object sizes, approximated) and,
  past ``max_bytes``, the buffer overflows: it drops what it holds, refuses
  further events, tells its owner (``on_overflow``) and from then on answers
  with a failure. Text is never silently dropped: a request that overflowed ends.
- ``stalled_for`` says how long output has waited without the handler taking
  any, so a watchdog can tell a client that has stopped reading from one that
  waits for a slow model (nothing pending: not stalled).

Pure logic: no I/O; ``get`` waits on an asyncio.Event, nothing else.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.messages import FinishReason, NamedToken, RequestFailed, TextDelta, TokenLogprobs, Usage
from shared.timeline import merge

Event = TextDelta | RequestFailed

# Rounded CPython sizes of what a pending delta keeps alive; the bound is on memory.
_POINTER = 8
_TOKEN_ID = 36  # an int object (28) and its list slot
_LOGPROB = 144  # (float, list) tuple, the float and the list
_ALTERNATIVE = 116  # (int, float) tuple, its int and float, and the list slot
_NAMED = 240  # a NamedToken: the 6-tuple, its int, offset, float and list, the list slot
_NAMED_ALTERNATIVE = 140  # (int, str, float) tuple, its int and float, the list slot


def _named_size(tokens: list[NamedToken]) -> int:
    return sum(
        _NAMED
        + sys.getsizeof(text)
        + sum(_NAMED_ALTERNATIVE + sys.getsizeof(alt_text) for _, alt_text, _ in alternatives)
        for _, text, _, _, _, alternatives in tokens
    )


def event_size(event: Event) -> int:
    """Approximate bytes an event's payload keeps in memory."""
    if isinstance(event, RequestFailed):
        return sys.getsizeof(event.message) + 256
    size = sys.getsizeof(event.text) + _POINTER + _TOKEN_ID * len(event.token_ids)
    if event.logprobs:
        size += sum(_LOGPROB + _ALTERNATIVE * len(alternatives) for _, alternatives in event.logprobs)
    if event.named_logprobs:
        size += _named_size(event.named_logprobs)
    # Not counted: the prompt's names and text, on a request's first delta only. They are bounded by
    # the prompt (which the request was admitted with), and the handler takes the first event as it
    # comes, before its client could have stopped reading (a long echoed prompt with logprobs would
    # otherwise pass the slow-client bound by itself).
    return size


@dataclass(slots=True)
class _Merged:
    """Several text deltas of one request, waiting as one."""

    request_id: str
    offset: int | None
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    named_logprobs: list[NamedToken] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    prompt_tokens: int | None = None
    # The prompt's, on a request's first delta only: kept from whichever part brought it.
    prompt_logprobs: list[NamedToken] | None = None
    prompt_text: str | None = None
    # Every part's hops (the first and the last delta carry some): none may be lost in the merge.
    timeline: dict[str, float] | None = None

    @classmethod
    def of(cls, first: TextDelta) -> _Merged:
        merged = cls(first.request_id, first.offset)
        merged.add(first)
        return merged

    def add(self, delta: TextDelta) -> None:
        if delta.text:
            self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.named_logprobs:
            if self.named_logprobs is None:
                self.named_logprobs = []
            self.named_logprobs.extend(delta.named_logprobs)
        self.finish_reason = delta.finish_reason
        self.usage = delta.usage
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        if self.prompt_text is None:
            self.prompt_text = delta.prompt_text
        if delta.timeline:
            if self.timeline is None:
                self.timeline = {}
            merge(self.timeline, delta.timeline)

    def delta(self) -> TextDelta:
        # Built from fields that were validated when each part was decoded.
        return TextDelta.model_construct(
            request_id=self.request_id,
            text="".join(self.parts),
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            usage=self.usage,
            logprobs=self.logprobs,
            named_logprobs=self.named_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            prompt_text=self.prompt_text,
            offset=self.offset,
            prompt_tokens=self.prompt_tokens,
            timeline=self.timeline,
        )


class OutputBuffer:
    """Pending events of one request: never blocks the producer, bounded, coalesced."""

    def __init__(
        self,
        request_id: str,
        *,
        max_bytes: int | None = None,
        on_overflow: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.request_id = request_id
        self.max_bytes = max_bytes
        self.on_overflow = on_overflow
        self._clock = clock
        # Usually one segment: text, coalesced. A failure (or text after one) starts another.
        self._segments: deque[TextDelta | _Merged | RequestFailed] = deque()
        self._sizes: deque[int] = deque()  # event_size of each segment's parts
        self._ready = asyncio.Event()
        self.pending_bytes = 0
        self.pending_since: float | None = None  # clock() since when output waits untaken
        self.peak_bytes = 0
        self.overflowed = False

    def __len__(self) -> int:
        """Pending events, as ``take`` would return them."""
        return len(self._segments) + (1 if self.overflowed else 0)

    def empty(self) -> bool:
        return not self._segments and not self.overflowed

    def put(self, event: Event) -> bool:
        """Add an event (never waits); False if it was refused because the buffer overflowed."""
        if self.overflowed:
            return False
        size = event_size(event)
        if isinstance(event, TextDelta) and self._join(event):
            self._sizes[-1] += size
        else:
            self._segments.append(event)
            self._sizes.append(size)
        if self.pending_since is None:
            self.pending_since = self._clock()
        self.pending_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
        if self.max_bytes is not None and self.pending_bytes > self.max_bytes:
            self._overflow()
            return False
        self._ready.set()
        return True

    def _join(self, delta: TextDelta) -> bool:
        """Coalesce ``delta`` into the newest pending text, if that text has not ended."""
        # A failed generation stays apart: its handler reports the error instead of its text.
        if not self._segments or delta.finish_reason == "error":
            return False
        last = self._segments[-1]
        if isinstance(last, RequestFailed) or last.finish_reason is not None:
            return False
        if isinstance(last, TextDelta):
            last = _Merged.of(last)
            self._segments[-1] = last
        last.add(delta)
        return True

    def take(self) -> Event | None:
        """The oldest pending event (coalesced text comes out as one delta), or None."""
        if not self._segments:
            return self._overflow_failure() if self.overflowed else None
        segment = self._segments.popleft()
        self.pending_bytes -= self._sizes.popleft()
        # The clock restarts at every take: a reader that keeps taking is not stalled,
        # however much keeps arriving.
        self.pending_since = self._clock() if self._segments else None
        if not self._segments and not self.overflowed:
            self._ready.clear()
        return segment.delta() if isinstance(segment, _Merged) else segment

    async def get(self) -> Event:
        """The next event, waiting for one if none is pending."""
        while True:
            event = self.take()
            if event is not None:
                return event
            await self._ready.wait()

    def stalled_for(self, now: float) -> float:
        """Seconds output has waited with no take; 0 when nothing waits."""
        return 0.0 if self.pending_since is None else max(0.0, now - self.pending_since)

    def _overflow(self) -> None:
        # Dropping everything frees the memory now; the request cannot be completed
        # correctly any more, so it ends (on_overflow disconnects its client).
        self.overflowed = True
        self._segments.clear()
        self._sizes.clear()
        self.pending_bytes = 0
        self.pending_since = None
        self._ready.set()  # a waiting taker sees the failure at once
        if self.on_overflow is not None:
            self.on_overflow()

    def _overflow_failure(self) -> RequestFailed:
        limit = self.max_bytes or 0
        return RequestFailed(
            request_id=self.request_id,
            status=503,
            error_type="server_error",
            message=f"The client read the stream too slowly: more than {limit} bytes of output "
            "waited to be sent, so the request was aborted.",
        )
