"""All requests a detokenizer replica is decoding: engine steps in, text out. No I/O.

Each batch also yields a checkpoint of every request it touched; the service
writes them together with the text (docs/architecture.md, "Detokenizer
takeover"), and a replica that finds a request it does not know restores it
from its checkpoint before decoding its tokens.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.detokenizer.incremental import IncrementalDetokenizer, TokenDecoder
from services.detokenizer.token_names import TokenNamer
from shared.messages import DecodeCheckpoint, DetokenizeParams, EngineStepOutput, TextDelta, TokenDelta, Usage
from shared.timeline import DETOKENIZER_READ, DETOKENIZER_SENT, merge

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one batch of engine output produced."""

    responses: dict[str, list[TextDelta]] = field(default_factory=dict)  # gateway id -> deltas
    aborts: list[str] = field(default_factory=list)  # requests the engines should stop
    # The state after this batch of every request it changed, to write with its text.
    checkpoints: list[DecodeCheckpoint] = field(default_factory=list)


@dataclass
class _Tracked:
    detokenizer: IncrementalDetokenizer
    gateway_id: str
    last_seen: float
    # Hops the token deltas brought (shared/timeline.py), until a text delta carries them on.
    timeline: dict[str, float] = field(default_factory=dict)


class DetokenizerState:
    """request_id -> IncrementalDetokenizer, forgotten when finished or idle too long.

    Finished requests are remembered for a while (``finished_ttl_s``) so that
    deltas arriving after the end (an engine still running until our abort
    reaches it, or an entry delivered twice) are dropped, not decoded again.
    """

    def __init__(
        self,
        decoder: TokenDecoder,
        *,
        idle_timeout_s: float = 600.0,
        finished_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the wall clock of the timeline's hops (``now`` in the methods may be monotonic)."""
        self._decoder = decoder
        self._clock = clock
        self._namer = TokenNamer(decoder)  # logprobs' token names, cached for every request
        self._idle_timeout_s = idle_timeout_s
        self._finished_ttl_s = finished_ttl_s
        self._active: OrderedDict[str, _Tracked] = OrderedDict()  # least recently seen first
        self._finished: OrderedDict[str, float] = OrderedDict()  # request id -> when it finished

    def __len__(self) -> int:
        return len(self._active)

    def active_request_ids(self) -> list[str]:
        return list(self._active)

    def process(self, outputs: Iterable[EngineStepOutput], now: float) -> StepResult:
        result = StepResult()
        touched: dict[str, _Tracked] = {}
        for output in outputs:
            for delta in output.deltas:
                tracked = self._add(delta, now, result)
                if tracked is not None:
                    touched[delta.request_id] = tracked
        result.checkpoints = [t.detokenizer.checkpoint(t.gateway_id) for t in touched.values()]
        return result

    def unknown(self, request_ids: Iterable[str]) -> list[str]:
        """Requests this replica has no state for: their checkpoints must be looked up first."""
        return [r for r in dict.fromkeys(request_ids) if r not in self._active and r not in self._finished]

    def starting_and_unknown(self, outputs: Iterable[EngineStepOutput]) -> tuple[list[str], list[str]]:
        """The requests this replica has no state for, in two: those whose first delta here is
        their first (output 0, with its parameters), which normally have no checkpoint, and the
        others, whose checkpoints must be looked up first."""
        firsts: dict[str, TokenDelta] = {}
        for output in outputs:
            for delta in output.deltas:
                firsts.setdefault(delta.request_id, delta)
        starting: list[str] = []
        unknown: list[str] = []
        for request_id in self.unknown(firsts):
            delta = firsts[request_id]
            (starting if delta.offset == 0 and delta.detokenize is not None else unknown).append(request_id)
        return starting, unknown

    def restore(self, checkpoints: Iterable[DecodeCheckpoint], now: float) -> None:
        """Continue requests another replica (or this one, earlier) was decoding."""
        for checkpoint in checkpoints:
            request_id = checkpoint.request_id
            if checkpoint.finish_reason is not None:
                self._finish(request_id, now)
                continue
            detokenizer = IncrementalDetokenizer.restore(self._decoder, checkpoint, self._namer)
            self._active[request_id] = _Tracked(detokenizer, checkpoint.gateway_id, now)
            self._active.move_to_end(request_id)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop local state that may be stale: the checkpoints in Redis are the truth again."""
        for request_id in request_ids:
            self._active.pop(request_id, None)
            self._finished.pop(request_id, None)

    def expire(self, now: float) -> list[str]:
        """Forget requests without output for too long (their engine is gone); returns their ids."""
        expired: list[str] = []
        while self._active:
            request_id, tracked = next(iter(self._active.items()))
            if now - tracked.last_seen < self._idle_timeout_s:
                break
            del self._active[request_id]
            expired.append(request_id)
        while self._finished:
            request_id, finished_at = next(iter(self._finished.items()))
            if now - finished_at < self._finished_ttl_s:
                break
            del self._finished[request_id]
        if expired:
            log.warning("forgot %d requests idle for %.0f s", len(expired), self._idle_timeout_s)
        return expired

    def _add(self, delta: TokenDelta, now: float, result: StepResult) -> _Tracked | None:
        """Decode one delta; returns the request's tracking if its state changed."""
        request_id = delta.request_id
        if request_id in self._finished:
            return None  # late or repeated output of a request already answered
        tracked = self._active.get(request_id)
        if tracked is None:
            tracked = self._start(delta, now)
        else:
            tracked.last_seen = now
            self._active.move_to_end(request_id)
        merge(tracked.timeline, delta.timeline)
        if delta.finish_reason is not None:
            tracked.timeline[DETOKENIZER_READ] = self._clock()
        try:
            text = tracked.detokenizer.add(delta)
        except Exception:
            # A token the tokenizer cannot decode must end this request, not the replica.
            log.exception("decoding %s failed", request_id)
            text = TextDelta(
                request_id=request_id,
                text="",
                finish_reason="error",
                usage=Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=tracked.detokenizer.num_tokens),
            )
            tracked.detokenizer.finish_reason = "error"  # so its checkpoint says it is over
            result.aborts.append(request_id)
            self._finish(request_id, now)
        else:
            if tracked.detokenizer.finished:
                if tracked.detokenizer.stopped_by_string and delta.finish_reason is None:
                    result.aborts.append(request_id)  # the engine is still generating
                self._finish(request_id, now)
        if text is not None:
            if tracked.timeline:
                if text.finish_reason is not None:
                    tracked.timeline[DETOKENIZER_SENT] = self._clock()
                text.timeline, tracked.timeline = tracked.timeline, {}
            result.responses.setdefault(tracked.gateway_id, []).append(text)
        return tracked

    def _start(self, delta: TokenDelta, now: float) -> _Tracked:
        if delta.offset > 0 or delta.detokenize is None:
            # Normally a request starts with offset 0 and its parameters, or is
            # restored from its checkpoint. Without either (its first entries
            # were lost), decode from here on with defaults rather than drop the output.
            log.warning("%s: first seen at output token %d; decoding from there", delta.request_id, delta.offset)
        tracked = _Tracked(
            detokenizer=IncrementalDetokenizer(
                self._decoder,
                delta.request_id,
                delta.detokenize or DetokenizeParams(),
                delta.prompt_tail or (),
                start_offset=delta.offset,
                namer=self._namer,
            ),
            gateway_id=delta.gateway_id,
            last_seen=now,
        )
        self._active[delta.request_id] = tracked
        return tracked

    def _finish(self, request_id: str, now: float) -> None:
        self._active.pop(request_id, None)
        self._finished[request_id] = now
        self._finished.move_to_end(request_id)
