"""Admission by pipeline backlog: refuse new requests while too many wait in the work streams.

Work streams are never trimmed past unprocessed entries (shared/work_streams.py), so
without a bound a stalled stage would let them grow without limit, and requests queued
behind the backlog would only end at their deadline. The gateway refuses instead, with
503 and Retry-After, which a client or load balancer can act on at once.

The backlog is sampled in the background, not per request: admission stays a comparison
in memory. Between samples a burst can overshoot the bound by what arrives in one
interval; the bound is a guard against unbounded queues, not an exact quota.
"""

from __future__ import annotations

import asyncio
import logging

from services.gateway.pipeline_client import cancel_and_wait
from shared.transport import StreamTransport

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.25


class BacklogMonitor:
    """The number of requests waiting in ``{p}:requests`` and ``{p}:tokenized``, kept fresh."""

    def __init__(self, transport: StreamTransport, limit: int, *, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.transport = transport
        self.limit = limit
        self.interval_s = interval_s
        # Until the first sample: admit. Refusing on no evidence would make a gateway
        # whose Redis is slow to answer look overloaded.
        self.queued = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        return self.queued >= self.limit

    async def sample(self) -> int:
        names = self.transport.names
        # Downstream first: a request moving on between the two reads is then missed
        # once (admitting a few more), never counted twice (refusing too early).
        self.queued = await self.transport.backlog([names.tokenized, names.requests])
        return self.queued

    async def run(self) -> None:
        was_full = False
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the last sample: one failed read must not stop admission
                log.exception("sampling the pipeline backlog failed")
            if self.full != was_full:
                was_full = self.full
                log.warning(
                    "pipeline backlog %d, limit %d: %s new requests",
                    self.queued,
                    self.limit,
                    "refusing" if was_full else "accepting",
                )
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="gateway-backlog")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], 2.0)
            self._task = None
