"""A replica whose process is gone but whose heartbeat has not expired yet, against a real redis-server.

A killed process's sockets close at once; its heartbeat key lives on for up to a TTL. Every
connection is named after its replica (CLIENT SETNAME), so a survivor sees the heartbeat
without a connection and takes the work over in two censuses instead of a TTL
(shared/failover.py, ``Disconnections``). fakeredis has no CLIENT LIST, hence a real server.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from shared.failover import ConsumerTakeover, OwnPulse
from shared.messages import AbortRequests, Heartbeat
from shared.transport import StreamTransport

GROUP = "workers"
# Far longer than the test: anything taken over was taken from the missing connection.
TTL_S = 60.0


def steady_pulse() -> OwnPulse:
    pulse = OwnPulse(ttl_s=1.0)
    pulse.record(True, time.monotonic() - 5)
    pulse.record(True, time.monotonic())
    return pulse


async def replica(redis_url: str, prefix: str, name: str, *pending: int) -> StreamTransport:
    """A tokenizer replica that beat once and holds ``pending`` requests unacknowledged."""
    t = StreamTransport(redis_url, prefix, name)
    stream = t.names.requests
    await t.ensure_group(stream, GROUP)
    if pending:
        await t.publish([(stream, AbortRequests(request_ids=[f"r{i}"])) for i in pending])
        await t.read_group([stream], GROUP, count=len(pending), block_ms=0)
    await t.beat(Heartbeat(role="tokenizer", replica_id=name, time=time.time()), ttl_s=TTL_S)
    return t


def test_work_of_a_replica_with_a_heartbeat_but_no_connection_moves_within_two_censuses(redis_url: str) -> None:
    async def scenario() -> None:
        prefix = f"disc-{uuid.uuid4().hex[:6]}"
        dead = await replica(redis_url, prefix, "tok-dead", 1, 2)
        live = await replica(redis_url, prefix, "tok-live", 3)
        me = await replica(redis_url, prefix, "tok-me")
        await dead.close()  # as a SIGKILL would: the connection goes, the heartbeat stays
        takeover = ConsumerTakeover(me, "tokenizer", me.names.requests, GROUP, min_idle_ms=0, pulse=steady_pulse())
        try:
            assert await takeover.claim(10) == []  # one census without a connection proves little
            await asyncio.sleep(0.05)
            claimed = await takeover.claim(10)
            assert sorted(d.message.request_ids[0] for d in claimed) == ["r1", "r2"]  # type: ignore[attr-defined]
            census = await me.replica_census("tokenizer")
            assert "tok-dead" not in census.live | set(census.gone)  # removed from group and registry
            # The replica that still has its connection keeps its work however often we look.
            assert await takeover.claim(10) == [] and await takeover.claim(10) == []
            pending = await me._redis.xpending_range(me.names.requests, GROUP, "-", "+", 10)
            assert {p["consumer"].decode() for p in pending} == {"tok-live", "tok-me"}
        finally:
            await live.close()
            await me.close()

    asyncio.run(scenario())


def test_a_replica_that_cannot_see_its_own_connection_judges_by_heartbeats_alone(redis_url: str) -> None:
    async def scenario() -> None:
        prefix = f"disc-{uuid.uuid4().hex[:6]}"
        dead = await replica(redis_url, prefix, "tok-dead", 1)
        # A name CLIENT SETNAME refuses: this replica's connections stay unnamed, as behind a
        # proxy that hides names, so the listing cannot be trusted to show the others either.
        me = await replica(redis_url, prefix, "tok me")
        await dead.close()
        takeover = ConsumerTakeover(me, "tokenizer", me.names.requests, GROUP, min_idle_ms=0, pulse=steady_pulse())
        try:
            for _ in range(3):
                assert await takeover.claim(10) == []
                await asyncio.sleep(0.05)
        finally:
            await me.close()

    asyncio.run(scenario())
