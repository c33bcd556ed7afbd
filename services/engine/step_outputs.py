"""Turns a backend step's outputs into stream messages: pure bookkeeping, no I/O.

One engine step becomes one EngineStepOutput per detokenizer shard that has
deltas in it. The router remembers, per request, the tokenized-stream entry to
acknowledge when it ends, how many output tokens were published (each delta's
``offset``), and whether its first delta (with the detokenize parameters and
prompt tail) has gone out. With each delta goes an output checkpoint of its
tokens, and with each end the checkpoint's deletion (shared/output_checkpoints.py),
so that an engine taking the request over continues after what was published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from services.engine.contract import RequestOutput
from shared.messages import DetokenizeParams, EngineStepOutput, Message, RequestFailed, TokenDelta, TokenizedRequest
from shared.output_checkpoints import OutputCheckpoint
from shared.timeline import ENGINE_FINISHED, ENGINE_FIRST_TOKEN, ENGINE_PULLED, ENGINE_SCHEDULED
from shared.transport import Ack, StreamNames, shard_of

log = logging.getLogger(__name__)

# Prompt tokens sent with a request's first delta: decoding context for the detokenizer.
PROMPT_TAIL_TOKENS = 8
# Requests let go of (lost to another engine, or left for one), whose late outputs are dropped quietly.
RECENTLY_FORGOTTEN = 10_000


@dataclass(slots=True)
class TrackedRequest:
    request_id: str
    gateway_id: str
    entry_id: str  # the tokenized-stream entry, acknowledged when the request ends
    shard: int
    prompt_tokens: int
    prompt_tail: list[int]
    detokenize: DetokenizeParams
    emitted: int = 0  # output tokens published so far
    first_sent: bool = False
    # Stop strings and the like ride on every delta, not only the first, so that a
    # detokenizer taking the shard over mid-request still applies them. Requests
    # with default parameters (most) send them once.
    resend_detokenize: bool = False
    # The whole prompt, for the first delta of a request whose prompt the detokenizer names
    # (prompt logprobs) or decodes (echo of token ids); None for the others, and once sent.
    prompt_token_ids: list[int] | None = None
    # The hops so far (shared/timeline.py), sent with the first delta.
    timeline: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Publication:
    """What to publish, checkpoint and acknowledge, in one call."""

    messages: list[tuple[str, Message]] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    checkpoints: list[OutputCheckpoint] = field(default_factory=list)
    # Every request this publication touches -> its tokenized-stream entry, which this
    # engine must still own for the publication to be written (the fence).
    entries: dict[str, str] = field(default_factory=dict)
    # Requests whose first token this publication carries.
    first_tokens: int = 0
    # Set by the I/O thread once the publication is in Redis (for a caller that waits on it).
    published: list[threading.Event] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.messages or self.acks or self.checkpoints)

    def extend(self, other: Publication) -> None:
        self.messages.extend(other.messages)
        self.acks.extend(other.acks)
        self.checkpoints.extend(other.checkpoints)
        self.entries.update(other.entries)
        self.first_tokens += other.first_tokens
        self.published.extend(other.published)

    def requests_of(self, entry_ids: Collection[str]) -> list[str]:
        return [request_id for request_id, entry_id in self.entries.items() if entry_id in entry_ids]

    def without(self, request_ids: Collection[str]) -> Publication:
        """The same minus everything of ``request_ids`` (requests this engine no longer owns)."""
        lost_entries = {self.entries[r] for r in request_ids if r in self.entries}
        messages: list[tuple[str, Message]] = []
        for stream, message in self.messages:
            if isinstance(message, EngineStepOutput):
                deltas = [d for d in message.deltas if d.request_id not in request_ids]
                if deltas:
                    messages.append((stream, message.model_copy(update={"deltas": deltas})))
            elif getattr(message, "request_id", None) not in request_ids:
                messages.append((stream, message))
        return Publication(
            messages=messages,
            acks=[ack for ack in self.acks if ack.entry_id not in lost_entries],
            checkpoints=[c for c in self.checkpoints if c.request_id not in request_ids],
            entries={r: e for r, e in self.entries.items() if r not in request_ids},
        )


class OutputRouter:
    def __init__(
        self, names: StreamNames, engine_id: str, shards: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock``: the wall clock of the timeline's hops."""
        if shards < 1:
            raise ValueError(f"the number of detokenizer shards must be at least 1, got {shards}")
        self._names = names
        self._engine_id = engine_id
        self._shards = shards
        self._requests: dict[str, TrackedRequest] = {}
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._step = 0
        self._clock = clock
        # Bumped whenever a request starts or stops being tracked: whoever keeps a copy
        # of pending_entry_ids() knows by it when the copy is stale.
        self.changes = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def track(
        self,
        request: TokenizedRequest,
        entry_id: str,
        done_token_ids: Sequence[int] = (),
        pulled_at: float | None = None,
    ) -> None:
        """``done_token_ids``: output a previous engine published (a takeover); deltas continue after
        it. ``pulled_at``: when the request was read (its timeline's engine_pulled)."""
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already tracked")
        self._forgotten.pop(request.request_id, None)
        self.changes += 1
        # The decoding context of the first delta is what precedes it: for a takeover, the last outputs.
        context = [*request.prompt_token_ids[-PROMPT_TAIL_TOKENS:], *done_token_ids[-PROMPT_TAIL_TOKENS:]]
        self._requests[request.request_id] = TrackedRequest(
            request_id=request.request_id,
            gateway_id=request.gateway_id,
            entry_id=entry_id,
            shard=shard_of(request.request_id, self._shards),
            prompt_tokens=len(request.prompt_token_ids),
            prompt_tail=context[-PROMPT_TAIL_TOKENS:],
            detokenize=request.detokenize,
            emitted=len(done_token_ids),
            resend_detokenize=request.detokenize != DetokenizeParams(),
            timeline={**request.timeline, ENGINE_PULLED: pulled_at if pulled_at is not None else self._clock()},
        )
        wants_prompt = request.sampling.prompt_logprobs is not None or request.detokenize.decode_prompt
        if wants_prompt and not done_token_ids:
            # (A taken-over request's first delta went out from the engine before.)
            self._requests[request.request_id].prompt_token_ids = list(request.prompt_token_ids)

    def entry_of(self, request_id: str) -> str | None:
        tracked = self._requests.get(request_id)
        return None if tracked is None else tracked.entry_id

    def requests_of_entries(self, entry_ids: Collection[str]) -> list[str]:
        return [rid for rid, tracked in self._requests.items() if tracked.entry_id in entry_ids]

    def pending_entry_ids(self) -> list[str]:
        return [tracked.entry_id for tracked in self._requests.values()]

    def started_ids(self) -> list[str]:
        """Requests whose output has begun reaching the detokenizer."""
        return [rid for rid, tracked in self._requests.items() if tracked.first_sent]

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def requests_of_gateways(self, gateway_ids: Collection[str]) -> list[str]:
        if not gateway_ids:
            return []
        return [rid for rid, tracked in self._requests.items() if tracked.gateway_id in gateway_ids]

    def route(self, outputs: Sequence[RequestOutput]) -> Publication:
        publication = Publication()
        by_shard: dict[int, list[TokenDelta]] = {}
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:
                if output.request_id not in self._forgotten:
                    log.warning("output for unknown request %s dropped", output.request_id)
                continue
            publication.entries[tracked.request_id] = tracked.entry_id
            if output.finish_reason == "abort":
                # Whoever aborted (a gone client, a stop string) expects nothing more.
                self._finish(tracked, publication)
            elif output.finish_reason == "error":
                message = output.error or "the engine refused the request"
                failure = RequestFailed(
                    request_id=tracked.request_id, status=400, error_type="invalid_request_error", message=message
                )
                publication.messages.append((self._names.responses(tracked.gateway_id), failure))
                self._finish(tracked, publication)
            else:
                by_shard.setdefault(tracked.shard, []).append(self._delta(tracked, output, publication))
                if output.finish_reason is not None:
                    self._finish(tracked, publication)
        if by_shard:
            self._step += 1
            shard_messages: list[tuple[str, Message]] = [
                (
                    self._names.generated(shard),
                    EngineStepOutput(engine_id=self._engine_id, step=self._step, deltas=deltas),
                )
                for shard, deltas in sorted(by_shard.items())
            ]
            # Deltas before the failures and acks of the same step, as produced.
            publication.messages[:0] = shard_messages
        return publication

    def fail(self, request_ids: Iterable[str], *, status: int, error_type: str, message: str) -> Publication:
        """End requests with an error the client sees, acknowledging their entries."""
        publication = Publication()
        for request_id in list(request_ids):
            tracked = self._requests.get(request_id)
            if tracked is None:
                continue
            failure = RequestFailed(request_id=request_id, status=status, error_type=error_type, message=message)
            publication.messages.append((self._names.responses(tracked.gateway_id), failure))
            publication.entries[request_id] = tracked.entry_id
            self._finish(tracked, publication)
        return publication

    def forget(self, request_ids: Iterable[str]) -> None:
        """Stop tracking without acknowledging: the entries stay for another engine."""
        for request_id in list(request_ids):
            if self._requests.pop(request_id, None) is not None:
                self.changes += 1
                self._forgotten[request_id] = None
                if len(self._forgotten) > RECENTLY_FORGOTTEN:
                    self._forgotten.popitem(last=False)

    def _delta(self, tracked: TrackedRequest, output: RequestOutput, publication: Publication) -> TokenDelta:
        delta = TokenDelta(
            request_id=tracked.request_id,
            gateway_id=tracked.gateway_id,
            offset=tracked.emitted,
            token_ids=list(output.new_token_ids),
            prompt_tokens=tracked.prompt_tokens,
            finish_reason=output.finish_reason,
            logprobs=output.logprobs,
            prompt_logprobs=output.prompt_logprobs,
        )
        if not tracked.first_sent:
            delta.detokenize = tracked.detokenize
            delta.prompt_tail = tracked.prompt_tail
            delta.prompt_token_ids, tracked.prompt_token_ids = tracked.prompt_token_ids, None
            tracked.first_sent = True
            delta.timeline = tracked.timeline
            if output.scheduled_at is not None:
                delta.timeline[ENGINE_SCHEDULED] = output.scheduled_at
            delta.timeline[ENGINE_FIRST_TOKEN] = self._clock()
            publication.first_tokens += 1
        elif tracked.resend_detokenize:
            delta.detokenize = tracked.detokenize
        if output.new_token_ids and output.finish_reason is None:
            # An ending request's checkpoint is deleted instead (_finish), with its ack.
            checkpoint = OutputCheckpoint(tracked.request_id, tracked.emitted, tuple(output.new_token_ids))
            publication.checkpoints.append(checkpoint)
        tracked.emitted += len(output.new_token_ids)
        if output.finish_reason is not None:
            delta.timeline = {**(delta.timeline or {}), ENGINE_FINISHED: self._clock()}
        return delta

    def _finish(self, tracked: TrackedRequest, publication: Publication) -> None:
        del self._requests[tracked.request_id]
        self.changes += 1
        publication.acks.append(Ack(self._names.tokenized, self._names.engine_group, tracked.entry_id))
        publication.checkpoints.append(OutputCheckpoint(tracked.request_id, done=True))
