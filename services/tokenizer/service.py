"""The tokenizer process: consumer group "tokenizers" on ``{p}:requests``.

Each loop takes up to ``batch_size`` requests, tokenizes them (in a worker
thread, so heartbeats keep flowing; a batch of short prompts on the loop itself,
sparing a lone request the thread's hand-offs), and publishes every result together with
the acknowledgements in one round trip. Entries left pending by a replica
whose heartbeat expired are claimed within a heartbeat interval of noticing
(shared/failover.py); those of a consumer that never beat, after
``claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

from services.tokenizer import tokenize_api
from services.tokenizer.prompt import PromptProcessor
from shared.failover import ConsumerTakeover, OwnPulse
from shared.messages import (
    CompletionRequest,
    DetokenizeRequest,
    Message,
    RequestFailed,
    TokenizedRequest,
    TokenizeRequest,
)
from shared.runtime import beat_until_stopped
from shared.timeline import TOKENIZER_DONE, TOKENIZER_READ
from shared.transport import Ack, Delivery, StreamNames, StreamTransport

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500  # also bounds how long a SIGTERM waits for an idle read
# A read batch is published in slices of about this much encoding work: long prompts go out one by
# one as they are done (a 2k-token chat takes ~8 ms), short ones still share a round trip
# (docs/benchmarks.md, "What a replica buys").
PUBLISH_AFTER_S = 0.005
# A batch estimated at no more than this many characters of text to encode (~1 ms here: a
# 2,000-character prompt takes ~0.7 ms, a chat template ~0.15 ms more) is handled on the loop
# itself: a worker thread costs a lone request two thread wake-ups and GIL hand-offs, ~0.2 ms
# of its first token (docs/benchmarks.md, "Pipeline overhead"), while blocking the loop for
# a millisecond delays nothing but a heartbeat by as much.
INLINE_MAX_CHARS = 3000
# What a chat template adds, as characters of plain text (measured: ~0.15 ms).
_CHAT_TEMPLATE_CHARS = 500


class TokenizerWorker:
    """A batch of deliveries -> what to publish and what to acknowledge. No I/O."""

    def __init__(
        self, processor: PromptProcessor, names: StreamNames, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.processor = processor
        self.names = names
        self._clock = clock  # wall clock, for the timeline's hops

    @staticmethod
    def light(deliveries: Sequence[Delivery], max_chars: int = INLINE_MAX_CHARS) -> bool:
        """Whether encoding ``deliveries`` is cheap enough to do on the event loop: at most
        ``max_chars`` characters of text, token ids counted a quarter each (they are only checked)."""
        chars = 0
        for delivery in deliveries:
            request = delivery.message
            if isinstance(request, (CompletionRequest, TokenizeRequest)):
                if isinstance(request.prompt, str):
                    chars += len(request.prompt)
                elif isinstance(request.prompt, list):
                    chars += len(request.prompt) // 4
                if request.messages is not None:
                    chars += _CHAT_TEMPLATE_CHARS + len(request.tools or "")
                    chars += sum(len(m.content) for m in request.messages)
            elif isinstance(request, DetokenizeRequest):
                chars += len(request.tokens)
            if chars > max_chars:
                return False
        return True

    def handle(self, deliveries: Sequence[Delivery], now: float) -> tuple[list[tuple[str, Message]], list[Ack]]:
        out, acks, _ = self.handle_for(deliveries, now, budget_s=math.inf)
        return out, acks

    def handle_for(
        self, deliveries: Sequence[Delivery], now: float, budget_s: float
    ) -> tuple[list[tuple[str, Message]], list[Ack], int]:
        """The leading deliveries that fit in ``budget_s`` of work (at least one): what to publish,
        what to acknowledge, and how many were handled. A read batch of long prompts is published
        a slice at a time, so the first is not held back until the last is encoded."""
        out: list[tuple[str, Message]] = []
        acks: list[Ack] = []
        started = self._clock()
        handled = 0
        for delivery in deliveries:
            if handled and self._clock() - started >= budget_s:
                break
            handled += 1
            acks.append(Ack(delivery.stream, self.names.tokenizer_group, delivery.entry_id))
            request = delivery.message
            if not isinstance(request, (CompletionRequest, TokenizeRequest, DetokenizeRequest)):
                log.error("ignoring a %s on %s (entry %s)", type(request).__name__, delivery.stream, delivery.entry_id)
                continue
            if request.deadline < now:
                log.info("dropping %s: its deadline passed before tokenization", request.request_id)
                continue
            result = self._process(request)
            if isinstance(result, TokenizedRequest):
                result.timeline.update({TOKENIZER_READ: now, TOKENIZER_DONE: self._clock()})
                out.append((self.names.tokenized, result))
            else:  # an error, or the answer to /tokenize or /detokenize: straight back to the gateway
                out.append((self.names.responses(request.gateway_id), result))
        return out, acks, handled

    def _process(self, request: CompletionRequest | TokenizeRequest | DetokenizeRequest) -> Message:
        try:
            if isinstance(request, TokenizeRequest):
                return tokenize_api.tokenize(self.processor, request)
            if isinstance(request, DetokenizeRequest):
                return tokenize_api.detokenize(self.processor, request)
            return self.processor.process(request)
        except Exception:
            # A tokenizer bug must end this request, not the replica or the batch.
            log.exception("tokenizing %s failed", request.request_id)
            return RequestFailed(
                request_id=request.request_id,
                status=500,
                error_type="server_error",
                message="The tokenizer stage failed on this request.",
            )


class TokenizerService:
    """The I/O loop around a TokenizerWorker."""

    def __init__(
        self,
        transport: StreamTransport,
        worker: TokenizerWorker,
        *,
        replica_id: str,
        batch_size: int,
        claim_idle_ms: int,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float | None = None,
    ) -> None:
        self.transport = transport
        self.worker = worker
        self.replica_id = replica_id
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.names = transport.names
        self.pulse = OwnPulse(4 * heartbeat_interval_s if heartbeat_ttl_s is None else heartbeat_ttl_s)
        # An entry touched within one beat has an owner that is not dead after all.
        self.takeover = ConsumerTakeover(
            transport,
            "tokenizer",
            self.names.requests,
            self.names.tokenizer_group,
            min_idle_ms=int(heartbeat_interval_s * 1000),
            pulse=self.pulse,
        )
        # Idle reads end this often, so a gone replica is noticed within an interval.
        self.read_block_ms = max(1, min(READ_BLOCK_MS, int(heartbeat_interval_s * 1000)))

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; the batch in hand is finished first."""
        await self.transport.ensure_group(self.names.requests, self.names.tokenizer_group)
        heartbeat = asyncio.create_task(
            beat_until_stopped(
                self.transport,
                "tokenizer",
                self.replica_id,
                self.heartbeat_interval_s,
                stop,
                ttl_s=self.heartbeat_ttl_s,
                pulse=self.pulse,
                # The gateway's model card shows the context length the tokenizers enforce.
                max_model_len=self.worker.processor.max_model_len,
            )
        )
        # Both at once at start: a predecessor may have died.
        next_takeover = next_claim = 0.0
        try:
            while not stop.is_set():
                deliveries: list[Delivery] = []
                now = time.monotonic()
                if now >= next_takeover:
                    deliveries = await self.takeover.claim(self.batch_size)
                    # A full batch may not be all a gone replica left: look again at once.
                    full = len(deliveries) >= self.batch_size
                    next_takeover = now if full else now + self.heartbeat_interval_s
                if not deliveries and now >= next_claim:
                    next_claim = now + self.claim_idle_ms / 2000
                    deliveries = await self.transport.claim_stale(
                        self.names.requests,
                        self.names.tokenizer_group,
                        min_idle_ms=self.claim_idle_ms,
                        count=self.batch_size,
                    )
                if not deliveries:
                    deliveries = await self.transport.read_group(
                        [self.names.requests],
                        self.names.tokenizer_group,
                        count=self.batch_size,
                        block_ms=self.read_block_ms,
                    )
                if deliveries:
                    await self._handle(deliveries)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # Leave /health promptly; if Redis is gone the key expires by itself.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.transport.delete(self.names.heartbeat("tokenizer", self.replica_id)), 2)

    async def _handle(self, deliveries: list[Delivery]) -> None:
        remaining = deliveries
        while remaining:
            if self.worker.light(remaining):
                out, acks, handled = self.worker.handle_for(remaining, time.time(), PUBLISH_AFTER_S)
            else:  # in a thread, so that heartbeats keep flowing while long prompts are encoded
                out, acks, handled = await asyncio.to_thread(
                    self.worker.handle_for, remaining, time.time(), PUBLISH_AFTER_S
                )
            await self.transport.publish(out, acks=acks)
            remaining = remaining[handled:]
