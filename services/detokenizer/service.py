"""The detokenizer process: reads the shards it leases, sends text to the gateways.

Each loop reads up to ``batch_size`` engine steps from the held shards,
decodes them, and publishes one ResponseBatch per gateway, one AbortRequests
for requests ended by a stop string, and the acknowledgements, in one round
trip. Leases are renewed and rebalanced every ``lease_ttl / 3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.detokenizer.leases import ShardLeases
from services.detokenizer.state import DetokenizerState
from shared.messages import (
    AbortRequests,
    EngineStepOutput,
    Heartbeat,
    Message,
    ResponseBatch,
)
from shared.runtime import beat_until_stopped
from shared.transport import Ack, Delivery, StreamTransport, shard_of

log = logging.getLogger(__name__)

GROUP = "detokenizers"
EXPIRE_EVERY_S = 10.0


class DetokenizerService:
    def __init__(
        self,
        transport: StreamTransport,
        state: DetokenizerState,
        leases: ShardLeases,
        *,
        replica_id: str,
        batch_size: int,
        claim_idle_ms: int,
        heartbeat_interval_s: float,
    ) -> None:
        self.transport = transport
        self.state = state
        self.leases = leases
        self.replica_id = replica_id
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_interval_s = heartbeat_interval_s
        self.names = transport.names
        self.shards = leases.planner.total_shards
        lease_ttl_ms = leases.ttl_ms
        self._lease_every_s = lease_ttl_ms / 3000
        # Short enough that leases are renewed in time while no output flows.
        self._read_block_ms = max(10, min(500, lease_ttl_ms // 6))
        self._backlog: list[Delivery] = []  # claimed entries, served before new ones

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; the batch in hand is finished and leases are given back."""
        # Beat first so that this replica counts itself when it sizes its share.
        await self._beat()
        heartbeat = asyncio.create_task(
            beat_until_stopped(self.transport, "detokenizer", self.replica_id, self.heartbeat_interval_s, stop)
        )
        next_lease = next_claim = next_expire = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_lease:
                    next_lease = now + self._lease_every_s
                    await self._maintain_leases(now)
                if now >= next_claim:
                    next_claim = now + self.claim_idle_ms / 2000
                    await self._claim(self.leases.held, self.claim_idle_ms)
                if now >= next_expire:
                    next_expire = now + EXPIRE_EVERY_S
                    self.state.expire(now)
                deliveries = self._take_backlog()
                if not deliveries:
                    streams = [self.names.generated(s) for s in self.leases.held]
                    deliveries = await self.transport.read_group(
                        streams, GROUP, count=self.batch_size, block_ms=self._read_block_ms
                    )
                if deliveries:
                    await self._handle(deliveries)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # Everything read was acknowledged: the next holder starts clean.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leave(), 2)

    async def _handle(self, deliveries: list[Delivery]) -> None:
        outputs: list[EngineStepOutput] = []
        for delivery in deliveries:
            if isinstance(delivery.message, EngineStepOutput):
                outputs.append(delivery.message)
            else:
                log.error("ignoring a %s on %s", type(delivery.message).__name__, delivery.stream)
        result = self.state.process(outputs, time.monotonic())
        messages: list[tuple[str, Message]] = [
            (self.names.responses(gateway_id), ResponseBatch(deltas=deltas))
            for gateway_id, deltas in result.responses.items()
        ]
        if result.aborts:
            messages.append((self.names.aborts, AbortRequests(request_ids=result.aborts, reason="stop")))
        acks = [Ack(d.stream, GROUP, d.entry_id) for d in deliveries]
        await self.transport.publish(messages, acks=acks)

    async def _maintain_leases(self, now: float) -> None:
        busy = {shard_of(request_id, self.shards) for request_id in self.state.active_request_ids()}
        acquired = await self.leases.maintain(busy, now)
        if acquired:
            # The lease expiring is the evidence that the previous holder is
            # gone, so its pending entries are taken now, before any newer entry
            # of the shard is read (keeping each request's output in order).
            # It renewed every ttl/3 between batches, so whatever it read before
            # dying has been idle for at least about 2/3 of the TTL by now.
            await self._claim(acquired, min(self.claim_idle_ms, self.leases.ttl_ms // 2))

    async def _claim(self, shards: list[int], min_idle_ms: int) -> None:
        known = {(d.stream, d.entry_id) for d in self._backlog}
        for shard in shards:
            stream = self.names.generated(shard)
            while True:
                claimed = await self.transport.claim_stale(stream, GROUP, min_idle_ms=min_idle_ms, count=self.batch_size)
                fresh = [d for d in claimed if (d.stream, d.entry_id) not in known]
                known.update((d.stream, d.entry_id) for d in fresh)
                self._backlog += fresh
                if len(claimed) < self.batch_size or not fresh:
                    break

    def _take_backlog(self) -> list[Delivery]:
        taken, self._backlog = self._backlog[: self.batch_size], self._backlog[self.batch_size :]
        return taken

    async def _beat(self) -> None:
        beat = Heartbeat(role="detokenizer", replica_id=self.replica_id, time=time.time())
        await self.transport.beat(beat, ttl_s=3 * self.heartbeat_interval_s)

    async def _leave(self) -> None:
        await self.transport.delete(self.names.heartbeat("detokenizer", self.replica_id))
        await self.leases.release_all()
