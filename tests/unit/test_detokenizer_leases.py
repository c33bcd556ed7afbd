"""Shard leases: the planner's decisions, and two replicas sharing shards through Redis."""

from __future__ import annotations

import asyncio

import fakeredis

from services.detokenizer.leases import ShardLeases, ShardPlanner, lease_name
from shared.messages import Heartbeat
from shared.transport import StreamTransport


def planner(shards: int = 4, held: set[int] | None = None, *, grace: float = 30.0, rid: str = "d1") -> ShardPlanner:
    p = ShardPlanner(shards, rid, release_grace_s=grace)
    for shard in held or ():
        p.acquired(shard)
    return p


def test_share_is_the_ceiling_of_shards_per_live_replica() -> None:
    p = planner(4)
    assert [p.target(n) for n in (0, 1, 2, 3, 4, 8)] == [4, 4, 2, 2, 1, 1]


ALL_FREE = range(16)


def test_alone_it_wants_every_shard() -> None:
    plan = planner(4).plan(live_replicas=1, busy=set(), now=0.0, free=ALL_FREE)
    assert sorted(plan.take) == [0, 1, 2, 3] and plan.release == []


def test_under_its_share_it_takes_free_shards_up_to_it() -> None:
    plan = planner(6, {1, 4}).plan(live_replicas=2, busy=set(), now=0.0, free=[0, 2, 3, 5])
    assert len(plan.take) == 1 and plan.take[0] in {0, 2, 3, 5}


def test_replicas_start_looking_at_different_shards() -> None:
    firsts = {planner(16, rid=f"detokenizer-{i}").plan(1, set(), 0.0, ALL_FREE).take[0] for i in range(8)}
    assert len(firsts) > 1


def test_over_its_share_it_gives_back_idle_shards_first() -> None:
    p = planner(4, {0, 1, 2, 3})
    plan = p.plan(live_replicas=2, busy={2, 3}, now=0.0, free=())
    assert sorted(plan.release) == [0, 1] and plan.take == []


def test_busy_shards_are_given_back_only_after_the_grace_period() -> None:
    p = planner(4, {0, 1, 2, 3}, grace=30.0)
    assert p.plan(live_replicas=2, busy={0, 1, 2, 3}, now=100.0, free=()).release == []
    assert p.plan(live_replicas=2, busy={0, 1, 2, 3}, now=120.0, free=()).release == []
    assert len(p.plan(live_replicas=2, busy={0, 1, 2, 3}, now=130.0, free=()).release) == 2


def test_at_its_share_it_neither_takes_nor_gives() -> None:
    plan = planner(4, {0, 1}).plan(live_replicas=2, busy=set(), now=0.0, free=())
    assert plan.release == [] and plan.take == []


def test_a_shard_free_for_two_looks_is_taken_beyond_the_share() -> None:
    # The other replica died: its leases expired, but its heartbeat still counts it.
    p = planner(4, {0, 1})
    assert p.plan(live_replicas=2, busy=set(), now=0.0, free=[2, 3]).take == []  # first look: maybe a newcomer's
    assert sorted(p.plan(live_replicas=2, busy=set(), now=0.2, free=[2, 3]).orphans) == [2, 3]


def test_a_shard_taken_between_looks_is_not_an_orphan() -> None:
    p = planner(4, {0, 1})
    p.plan(live_replicas=3, busy=set(), now=0.0, free=[2, 3])
    assert p.plan(live_replicas=3, busy=set(), now=0.2, free=[3]).orphans == [3]  # 2 was picked up meanwhile


def test_an_orphan_is_kept_while_the_dead_replica_still_counts() -> None:
    p = ShardPlanner(4, "d1", release_grace_s=30.0, orphan_hold_s=5.0)
    for shard in (0, 1):
        p.acquired(shard)
    p.plan(live_replicas=2, busy=set(), now=0.0, free=[2, 3])
    plan = p.plan(live_replicas=2, busy=set(), now=0.2, free=[2, 3])
    assert sorted(plan.orphans) == [2, 3] and plan.take == []
    for shard in plan.orphans:
        p.acquired(shard, orphan_at=0.2)
    # Its heartbeat has not expired yet: two replicas, so two over the share; nothing goes back.
    assert p.plan(live_replicas=2, busy=set(), now=1.0, free=[]).release == []
    assert len(p.plan(live_replicas=2, busy=set(), now=5.3, free=[]).release) == 2  # a newcomer, after all


def test_a_shard_given_back_is_left_for_others_a_while() -> None:
    p = planner(4, {0, 1, 2}, rid="d1")
    (given,) = p.plan(live_replicas=2, busy=set(), now=0.0, free=[3]).release
    p.released(given, given_back_at=0.0)
    p.plan(live_replicas=2, busy=set(), now=0.2, free=[given, 3])
    assert p.plan(live_replicas=2, busy=set(), now=0.4, free=[given, 3]).orphans == [3]
    assert given in p.plan(live_replicas=2, busy=set(), now=2.5, free=[given]).orphans


# -- two replicas through fakeredis -----------------------------------------------


def test_two_replicas_split_the_shards_and_take_over_a_lost_one() -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()

        def replica(rid: str) -> tuple[StreamTransport, ShardLeases]:
            transport = StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", rid)
            return transport, ShardLeases(transport, ShardPlanner(4, rid, release_grace_s=30.0), ttl_ms=60_000)

        async def beat(transport: StreamTransport, rid: str) -> None:
            await transport.beat(Heartbeat(role="detokenizer", replica_id=rid, time=0.0), ttl_s=60)

        ta, a = replica("a")
        tb, b = replica("b")
        await beat(ta, "a")
        assert sorted((await a.maintain(busy=set(), now=0.0)).acquired) == [0, 1, 2, 3]

        await beat(tb, "b")
        assert (await b.maintain(busy=set(), now=0.0)).acquired == []  # all taken; a is now over its share
        assert len((await a.maintain(busy=set(), now=1.0)).lost) == 2
        assert len(a.held) == 2
        assert len((await b.maintain(busy=set(), now=1.0)).acquired) == 2
        assert sorted(a.held + b.held) == [0, 1, 2, 3]

        # b dies: its leases expire (deleted here) though its heartbeat still counts it.
        await tb.delete(*(tb.names.lease(lease_name(s)) for s in b.held))
        assert (await a.maintain(busy=set(), now=4.0)).acquired == []
        assert len((await a.maintain(busy=set(), now=4.2)).acquired) == 2  # still free: orphans
        assert a.held == [0, 1, 2, 3]

        # a loses a lease it thought it held (e.g. it stalled past the TTL).
        await ta.delete(ta.names.lease(lease_name(0)))
        await tb.acquire_lease(lease_name(0), 60_000)
        assert 0 in (await a.maintain(busy=set(), now=5.0)).lost
        assert 0 not in a.held

        await a.release_all()
        assert a.held == []
        assert await tb.acquire_lease(lease_name(1), 60_000)  # free again
        for transport in (ta, tb):
            await transport.close()

    asyncio.run(scenario())
