"""Sharing the ``{p}:generated:{i}`` shards between detokenizer replicas.

Each shard is read by the one replica holding its lease (a Redis key with a
short TTL, renewed every fifth of it). Every replica aims at
``ceil(shards / live replicas)`` shards: it takes free shards while under that
and gives shards back while over it. A dead replica's leases expire within
one TTL and its shards go to the others: a free shard is taken even beyond a
replica's share once it has stayed free for two looks, because the replica
count (from heartbeats) may still include the dead one, and a shard nobody
reads stalls every request on it. After taking an orphan a replica gives
nothing back for ``orphan_hold_s`` (about a heartbeat TTL), or the count that
still includes the dead replica would have it give shards back to nobody.

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

# How long a replica leaves a shard it gave back to others before it would take it
# again as an orphan: time for the replica short of shards to pick it up.
RELEASE_COOLDOWN_S = 2.0
# The replica count changes rarely; counting heartbeats scans keys, so not every look.
COUNT_REPLICAS_EVERY_S = 1.0


def lease_name(shard: int) -> str:
    return f"generated:{shard}"


@dataclass
class LeasePlan:
    release: list[int] = field(default_factory=list)
    take: list[int] = field(default_factory=list)  # free shards to acquire, up to the share
    orphans: list[int] = field(default_factory=list)  # free shards to acquire beyond it


@dataclass
class LeaseChanges:
    acquired: list[int] = field(default_factory=list)
    # Given back or taken by another replica: the state of their requests here is stale.
    lost: list[int] = field(default_factory=list)


class ShardPlanner:
    """Which shards to take and which to give back. No I/O."""

    def __init__(
        self,
        total_shards: int,
        replica_id: str,
        *,
        release_grace_s: float,
        release_cooldown_s: float = RELEASE_COOLDOWN_S,
        orphan_hold_s: float = 0.0,
    ) -> None:
        if total_shards < 1:
            raise ValueError(f"there must be at least one shard, got {total_shards}")
        self.total_shards = total_shards
        self.release_grace_s = release_grace_s
        self.release_cooldown_s = release_cooldown_s
        self.orphan_hold_s = orphan_hold_s
        # Replicas start their search at different shards so they do not all
        # contend for shard 0 first.
        self._start = zlib.crc32(replica_id.encode()) % total_shards
        self.held: set[int] = set()
        self._over_since: float | None = None
        self._free_before: set[int] = set()  # shards free at the previous look
        self._given_back: dict[int, float] = {}  # shard -> when this replica released it
        self._orphaned: dict[int, float] = {}  # shard -> when this replica took it as an orphan

    def target(self, live_replicas: int) -> int:
        return math.ceil(self.total_shards / max(1, live_replicas))

    def plan(self, live_replicas: int, busy: Collection[int], now: float, free: Collection[int]) -> LeasePlan:
        """``busy``: held shards with requests being decoded here; ``free``: shards nobody holds.

        Idle shards are given back first: moving a busy one pauses its requests
        while the next holder restores their checkpoints. Busy ones go only after
        ``release_grace_s`` over target.
        """
        target = self.target(live_replicas)
        excess = len(self.held) - target
        free_now = [s for s in self._order() if s in free and s not in self.held]
        seen_free, self._free_before = self._free_before, set(free_now)
        if excess > 0:
            if self._over_since is None:
                self._over_since = now
            if any(now - taken < self.orphan_hold_s for taken in self._orphaned.values()):
                # Recently took a dead replica's shards: the count may still include it.
                return LeasePlan()
            idle = sorted((s for s in self.held if s not in busy), reverse=True)
            release = idle[:excess]
            if len(release) < excess and now - self._over_since >= self.release_grace_s:
                still_busy = sorted((s for s in self.held if s in busy), reverse=True)
                release += still_busy[: excess - len(release)]
            return LeasePlan(release=release)
        self._over_since = None
        wanted = -excess
        orphans = [s for s in free_now[wanted:] if s in seen_free and not self._cooling(s, now)]
        return LeasePlan(take=free_now[:wanted], orphans=orphans)

    def acquired(self, shard: int, *, orphan_at: float | None = None) -> None:
        """``orphan_at``: taken beyond the share, as an orphan, at that time."""
        self.held.add(shard)
        if orphan_at is not None:
            self._orphaned[shard] = orphan_at

    def released(self, shard: int, *, given_back_at: float | None = None) -> None:
        """``given_back_at``: released on purpose (not lost), so not taken back at once."""
        self.held.discard(shard)
        self._orphaned.pop(shard, None)
        if given_back_at is not None:
            self._given_back[shard] = given_back_at
        if len(self.held) == 0:
            self._over_since = None

    def _order(self) -> list[int]:
        return [(self._start + i) % self.total_shards for i in range(self.total_shards)]

    def _cooling(self, shard: int, now: float) -> bool:
        given_back = self._given_back.get(shard)
        return given_back is not None and now - given_back < self.release_cooldown_s


class ShardLeases:
    """Holds shard leases through the transport, as the planner decides."""

    def __init__(self, transport: StreamTransport, planner: ShardPlanner, *, ttl_ms: int) -> None:
        self.transport = transport
        self.planner = planner
        self.ttl_ms = ttl_ms
        self._live = 1
        self._counted_at: float | None = None

    @property
    def held(self) -> list[int]:
        return sorted(self.planner.held)

    async def maintain(self, busy: Collection[int], now: float) -> LeaseChanges:
        """Renew, rebalance, take orphaned shards; says which shards were acquired and lost."""
        changes = LeaseChanges()
        for shard in self.held:
            if not await self.transport.renew_lease(lease_name(shard), self.ttl_ms):
                log.warning("lost the lease of shard %d", shard)
                self.planner.released(shard)
                changes.lost.append(shard)
        shards = range(self.planner.total_shards)
        holders = await self.transport.lease_holders([lease_name(s) for s in shards])
        live = await self._count_live(now)
        plan = self.planner.plan(live, busy, now, free=[s for s, holder in zip(shards, holders) if holder is None])
        for shard in plan.release:
            await self.transport.release_lease(lease_name(shard))
            self.planner.released(shard, given_back_at=now)
            changes.lost.append(shard)
            log.info("released shard %d (%d live detokenizers)", shard, live)
        for shard in plan.take + plan.orphans:
            if await self.transport.acquire_lease(lease_name(shard), self.ttl_ms):
                orphan = shard in plan.orphans
                self.planner.acquired(shard, orphan_at=now if orphan else None)
                changes.acquired.append(shard)
                log.info("acquired shard %d%s (%d live detokenizers)", shard, " (orphaned)" if orphan else "", live)
        return changes

    def lost(self, shards: list[int]) -> None:
        """Shards found held by another replica (a fenced publish was refused)."""
        for shard in shards:
            log.warning("lost the lease of shard %d", shard)
            self.planner.released(shard)

    async def release_all(self) -> None:
        for shard in self.held:
            await self.transport.release_lease(lease_name(shard))
            self.planner.released(shard)

    async def _count_live(self, now: float) -> int:
        if self._counted_at is None or now - self._counted_at >= COUNT_REPLICAS_EVERY_S:
            self._live = max(1, len(await self.transport.live_replicas("detokenizer")))
            self._counted_at = now
        return self._live
