"""The detokenizer process: reads the shards it leases, sends text to the gateways.

Each loop reads up to ``batch_size`` engine steps from the held shards,
decodes them, and publishes one ResponseBatch per gateway, one AbortRequests
for requests ended by a stop string, a checkpoint of every request the batch
changed, and the acknowledgements: in one atomic script that runs only while
this replica still holds the batch's shards (``publish_fenced``). A request
this replica has no state for is restored from its checkpoint first, so a
shard taken over from a dead replica continues its requests exactly where
their text ends (docs/architecture.md, "Detokenizer takeover"). A request that
starts here (its first delta, at output 0) has no checkpoint to read: it is not
looked up, which spares the first token a Redis round trip; the script checks
instead that no checkpoint exists, and if one does the batch is redone after
reading them all.

Leases are renewed, and free shards looked for, every fifth of the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.detokenizer.leases import ShardLeases, lease_name
from services.detokenizer.state import DetokenizerState
from shared.fencing import StateExists
from shared.messages import (
    AbortRequests,
    DecodeCheckpoint,
    EngineStepOutput,
    Heartbeat,
    Message,
    ResponseBatch,
)
from shared.runtime import beat_until_stopped
from shared.transport import Ack, Delivery, StreamTransport, shard_of

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 10.0
# A request's checkpoint outlives any pause in its output the gateway would wait out.
CHECKPOINT_TTL_MS = 600_000
# A finished request's checkpoint only has to turn away output still in flight.
FINISHED_CHECKPOINT_TTL_MS = 60_000


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
        heartbeat_ttl_s: float | None = None,
    ) -> None:
        """heartbeat_ttl_s: how long a heartbeat lasts (default four intervals, as everywhere)."""
        self.transport = transport
        self.state = state
        self.leases = leases
        self.replica_id = replica_id
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s if heartbeat_ttl_s is not None else 4 * heartbeat_interval_s
        self.names = transport.names
        self.shards = leases.planner.total_shards
        self._shard_of_stream = {self.names.generated(s): s for s in range(self.shards)}
        lease_ttl_ms = leases.ttl_ms
        # Four renewals per TTL can fail before the lease lapses; free shards are
        # looked for as often, which bounds how long a dead replica's shard waits.
        self._lease_every_s = lease_ttl_ms / 5000
        # Short enough that leases are renewed in time while no output flows.
        self._read_block_ms = max(10, min(500, lease_ttl_ms // 10))
        self._backlog: list[Delivery] = []  # claimed entries, served before new ones

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; the batch in hand is finished and leases are given back."""
        # Beat first so that this replica counts itself when it sizes its share.
        await self._beat()
        heartbeat = asyncio.create_task(
            beat_until_stopped(
                self.transport,
                "detokenizer",
                self.replica_id,
                self.heartbeat_interval_s,
                stop,
                ttl_s=self.heartbeat_ttl_s,
            )
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
                        streams, self.names.detokenizer_group, count=self.batch_size, block_ms=self._read_block_ms
                    )
                if deliveries:
                    await self._handle(deliveries)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # Everything read was acknowledged: the next holder starts clean.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leave(), 2)

    async def _handle(self, deliveries: list[Delivery], *, look_up_new: bool = False) -> None:
        """``look_up_new``: read the checkpoints of requests that seem to start here too."""
        outputs: list[EngineStepOutput] = []
        for delivery in deliveries:
            if isinstance(delivery.message, EngineStepOutput):
                outputs.append(delivery.message)
            else:
                log.error("ignoring a %s on %s", type(delivery.message).__name__, delivery.stream)
        now = time.monotonic()
        starting = await self._restore_unknown(outputs, now, look_up_new=look_up_new)
        result = self.state.process(outputs, now)
        messages: list[tuple[str, Message]] = [
            (self.names.responses(gateway_id), ResponseBatch(deltas=deltas))
            for gateway_id, deltas in result.responses.items()
        ]
        if result.aborts:
            messages.append((self.names.aborts, AbortRequests(request_ids=result.aborts, reason="stop")))
        states = [
            (
                self.names.decode_state(c.request_id),
                c,
                FINISHED_CHECKPOINT_TTL_MS if c.finish_reason else CHECKPOINT_TTL_MS,
            )
            for c in result.checkpoints
        ]
        shards = sorted({self._shard_of_stream[d.stream] for d in deliveries if d.stream in self._shard_of_stream})
        acks = [Ack(d.stream, self.names.detokenizer_group, d.entry_id) for d in deliveries]
        try:
            published = await self.transport.publish_fenced(
                messages,
                leases=[lease_name(s) for s in shards],
                lease_ttl_ms=self.leases.ttl_ms,
                states=states,
                acks=acks,
                absent=[self.names.decode_state(r) for r in starting],
            )
        except StateExists:
            # A request taken for new had been decoded before (its first delta came again):
            # nothing was written; what this batch did goes, and it is redone from the checkpoints.
            log.warning("a request of a batch of %d entries had a checkpoint; redoing it from them", len(deliveries))
            self.state.forget(c.request_id for c in result.checkpoints)
            await self._handle(deliveries, look_up_new=True)
            return
        if published:
            return
        # A shard was taken over while this batch was decoded (this replica stalled
        # past its lease). Nothing was written; the decoding state ran ahead of the
        # checkpoints, so it goes, and the entries of shards still held are redone.
        holders = await self.transport.lease_holders([lease_name(s) for s in shards])
        lost = [s for s, holder in zip(shards, holders) if holder != self.transport.consumer]
        log.warning("lost shards %s during a batch of %d entries; redoing the rest", lost, len(deliveries))
        self.state.forget(c.request_id for c in result.checkpoints)
        self._backlog[:0] = deliveries
        self.leases.lost(lost)
        self._drop_shards(lost)

    async def _restore_unknown(self, outputs: list[EngineStepOutput], now: float, *, look_up_new: bool) -> list[str]:
        """Pick up requests decoded elsewhere before (or here, before a shard moved).

        Returns the requests that start in this batch, not looked up (unless ``look_up_new``):
        their checkpoints must not exist when the batch is published."""
        starting, unknown = self.state.starting_and_unknown(outputs)
        if look_up_new:
            starting, unknown = [], starting + unknown
        if not unknown:
            return starting
        found = await self.transport.read_states([self.names.decode_state(r) for r in unknown])
        checkpoints = [c for c in found if isinstance(c, DecodeCheckpoint)]
        if checkpoints:
            log.info("continuing %d requests from their checkpoints", len(checkpoints))
        self.state.restore(checkpoints, now)
        return starting

    async def _maintain_leases(self, now: float) -> None:
        busy = {shard_of(request_id, self.shards) for request_id in self.state.active_request_ids()}
        changes = await self.leases.maintain(busy, now)
        self._drop_shards(changes.lost)
        if changes.acquired:
            # Whoever held these shards before can no longer publish (the lease fences
            # it), so everything pending on them is ours to redo now, however recently
            # it was read; before any newer entry, to keep each request's output in order.
            known = {(d.stream, d.entry_id) for d in self._backlog}
            for shard in changes.acquired:
                claimed = await self.transport.claim_all_pending(
                    self.names.generated(shard), self.names.detokenizer_group, count=self.batch_size
                )
                self._backlog += [d for d in claimed if (d.stream, d.entry_id) not in known]

    async def _claim(self, shards: list[int], min_idle_ms: int) -> None:
        known = {(d.stream, d.entry_id) for d in self._backlog}
        for shard in shards:
            stream = self.names.generated(shard)
            while True:
                claimed = await self.transport.claim_stale(
                    stream, self.names.detokenizer_group, min_idle_ms=min_idle_ms, count=self.batch_size
                )
                fresh = [d for d in claimed if (d.stream, d.entry_id) not in known]
                known.update((d.stream, d.entry_id) for d in fresh)
                self._backlog += fresh
                if len(claimed) < self.batch_size or not fresh:
                    break

    def _drop_shards(self, shards: list[int]) -> None:
        """Their next holder advances the checkpoints: what this replica knows of them is stale."""
        if not shards:
            return
        lost = set(shards)
        self.state.forget(r for r in self.state.active_request_ids() if shard_of(r, self.shards) in lost)
        self._backlog = [d for d in self._backlog if self._shard_of_stream.get(d.stream) not in lost]

    def _take_backlog(self) -> list[Delivery]:
        taken, self._backlog = self._backlog[: self.batch_size], self._backlog[self.batch_size :]
        return taken

    async def _beat(self) -> None:
        beat = Heartbeat(role="detokenizer", replica_id=self.replica_id, time=time.time())
        await self.transport.beat(beat, ttl_s=self.heartbeat_ttl_s)

    async def _leave(self) -> None:
        await self.transport.delete(self.names.heartbeat("detokenizer", self.replica_id))
        await self.leases.release_all()
