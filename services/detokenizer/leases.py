"""Sharing the ``{p}:generated:{i}`` shards between detokenizer replicas.

Each shard is read by the one replica holding its lease (a Redis key with a
TTL). Every replica aims at ``ceil(shards / live replicas)`` shards: it takes
free shards while under that and gives shards back while over it. A dead
replica's leases expire and its shards go to the others.

``ShardPlanner`` decides (pure logic); ``ShardLeases`` carries the decisions
out through the transport.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field

from shared.transport import StreamTransport

log = logging.getLogger(__name__)


def lease_name(shard: int) -> str:
    return f"generated:{shard}"


@dataclass
class LeasePlan:
    release: list[int] = field(default_factory=list)
    # Shards to try, in order, until ``wanted`` more are held (others may hold some).
    candidates: list[int] = field(default_factory=list)
    wanted: int = 0


class ShardPlanner:
    """Which shards to take and which to give back. No I/O."""

    def __init__(self, total_shards: int, replica_id: str, *, release_grace_s: float) -> None:
        if total_shards < 1:
            raise ValueError(f"there must be at least one shard, got {total_shards}")
        self.total_shards = total_shards
        self.release_grace_s = release_grace_s
        # Replicas start their search at different shards so they do not all
        # contend for shard 0 first.
        self._start = zlib.crc32(replica_id.encode()) % total_shards
        self.held: set[int] = set()
        self._over_since: float | None = None

    def target(self, live_replicas: int) -> int:
        return math.ceil(self.total_shards / max(1, live_replicas))

    def plan(self, live_replicas: int, busy: Collection[int], now: float) -> LeasePlan:
        """``busy``: held shards with requests still being decoded here.

        Giving such a shard away makes its new holder decode those requests
        without their start (no stop strings, no prompt context), so idle
        shards go first and busy ones only after ``release_grace_s`` over target.
        """
        target = self.target(live_replicas)
        excess = len(self.held) - target
        if excess <= 0:
            self._over_since = None
            order = [(self._start + i) % self.total_shards for i in range(self.total_shards)]
            return LeasePlan(candidates=[s for s in order if s not in self.held], wanted=-excess)
        if self._over_since is None:
            self._over_since = now
        idle = sorted((s for s in self.held if s not in busy), reverse=True)
        release = idle[:excess]
        if len(release) < excess and now - self._over_since >= self.release_grace_s:
            still_busy = sorted((s for s in self.held if s in busy), reverse=True)
            release += still_busy[: excess - len(release)]
        return LeasePlan(release=release)

    def acquired(self, shard: int) -> None:
        self.held.add(shard)

    def released(self, shard: int) -> None:
        self.held.discard(shard)
        if len(self.held) == 0:
            self._over_since = None


class ShardLeases:
    """Holds shard leases through the transport, as the planner decides."""

    def __init__(self, transport: StreamTransport, planner: ShardPlanner, *, ttl_ms: int) -> None:
        self.transport = transport
        self.planner = planner
        self.ttl_ms = ttl_ms

    @property
    def held(self) -> list[int]:
        return sorted(self.planner.held)

    async def maintain(self, busy: Collection[int], now: float) -> list[int]:
        """Renew, rebalance; returns the shards newly acquired (to claim their backlog)."""
        for shard in self.held:
            if not await self.transport.renew_lease(lease_name(shard), self.ttl_ms):
                log.warning("lost the lease of shard %d", shard)
                self.planner.released(shard)
        live = len(await self.transport.live_replicas("detokenizer"))
        plan = self.planner.plan(live, busy, now)
        for shard in plan.release:
            await self.transport.release_lease(lease_name(shard))
            self.planner.released(shard)
            log.info("released shard %d (%d live detokenizers)", shard, live)
        acquired: list[int] = []
        for shard in plan.candidates:
            if len(acquired) >= plan.wanted:
                break
            if await self.transport.acquire_lease(lease_name(shard), self.ttl_ms):
                self.planner.acquired(shard)
                acquired.append(shard)
                log.info("acquired shard %d (%d live detokenizers)", shard, live)
        return acquired

    async def release_all(self) -> None:
        for shard in self.held:
            await self.transport.release_lease(lease_name(shard))
            self.planner.released(shard)
