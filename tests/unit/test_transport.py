"""The stream transport's delivery guarantees, against fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import fakeredis

from shared.messages import AbortRequests, Heartbeat, RequestFailed
from shared.transport import PAYLOAD_FIELD, Ack, StreamTransport

GROUP = "workers"


def run(scenario: Callable[[fakeredis.FakeServer], Awaitable[None]]) -> None:
    asyncio.run(scenario(fakeredis.FakeServer()))


def transport(server: fakeredis.FakeServer, consumer: str, **kwargs: float) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer, **kwargs)


def abort(i: int) -> AbortRequests:
    return AbortRequests(request_ids=[f"r{i}"])


def test_each_entry_goes_to_one_consumer_of_a_group() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        producer, a, b = transport(server, "p"), transport(server, "a"), transport(server, "b")
        stream = producer.names.requests
        await a.ensure_group(stream, GROUP)
        await a.ensure_group(stream, GROUP)  # idempotent
        await producer.publish([(stream, abort(i)) for i in range(10)])
        got_a = await a.read_group([stream], GROUP, count=4, block_ms=0)
        got_b = await b.read_group([stream], GROUP, count=100, block_ms=0)
        ids = [d.message.request_ids[0] for d in got_a + got_b]
        assert sorted(ids) == sorted(f"r{i}" for i in range(10))
        assert len(got_a) == 4

    run(scenario)


def test_unacknowledged_entries_are_claimed_by_another_consumer() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        dead, alive = transport(server, "dead"), transport(server, "alive")
        stream = dead.names.tokenized
        await dead.publish([(stream, abort(1)), (stream, abort(2))])
        taken = await dead.read_group([stream], GROUP, count=10, block_ms=0)
        await dead.ack([Ack(stream, GROUP, taken[0].entry_id)])  # finished one, then died
        await asyncio.sleep(0.02)
        claimed = await alive.claim_stale(stream, GROUP, min_idle_ms=10)
        assert [d.message for d in claimed] == [abort(2)]
        # Claimed entries are pending for the new owner until it acknowledges them.
        assert await alive.claim_stale(stream, GROUP, min_idle_ms=10_000) == []

    run(scenario)


def test_touch_keeps_entries_in_progress_from_being_claimed() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker, other = transport(server, "worker"), transport(server, "other")
        stream = worker.names.tokenized
        await worker.publish([(stream, abort(1))])
        taken = await worker.read_group([stream], GROUP, count=1, block_ms=0)
        await asyncio.sleep(0.05)
        await worker.touch(stream, GROUP, [taken[0].entry_id])
        assert await other.claim_stale(stream, GROUP, min_idle_ms=40) == []

    run(scenario)


def test_publish_acknowledges_inputs_only_together_with_outputs() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w")
        names = worker.names
        await worker.publish([(names.requests, abort(1))])
        [delivery] = await worker.read_group([names.requests], GROUP, count=1, block_ms=0)
        failed = RequestFailed(request_id="r1", status=400, error_type="invalid_request_error", message="bad")
        await worker.publish([(names.responses("gw"), failed)], acks=[Ack(names.requests, GROUP, delivery.entry_id)])
        _, [out] = await worker.read_stream(names.responses("gw"), "0", count=10, block_ms=0)
        assert out.message == failed
        assert await worker.claim_stale(names.requests, GROUP, min_idle_ms=0) == []

    run(scenario)


def test_undecodable_entries_are_dead_lettered_not_delivered() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w")
        client = fakeredis.FakeAsyncRedis(server=server)
        stream = worker.names.requests
        await client.xadd(stream, {PAYLOAD_FIELD: b"\x93\x01\x02\x03"})
        await client.xadd(stream, {b"other": b"field"})
        await worker.publish([(stream, abort(1))])
        got = await worker.read_group([stream], GROUP, count=10, block_ms=0)
        assert [d.message for d in got] == [abort(1)]
        assert await client.xlen(worker.names.deadletter) == 2
        # The bad entries were acknowledged, so nobody is handed them again.
        pending = await client.xpending(stream, GROUP)
        assert pending["pending"] == 1

    run(scenario)


def test_streams_stay_bounded() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w", maxlen=10)
        stream = worker.names.aborts
        for start in range(0, 500, 50):
            await worker.publish([(stream, abort(i)) for i in range(start, start + 50)])
        length = await fakeredis.FakeAsyncRedis(server=server).xlen(stream)
        assert length < 500

    run(scenario)


def test_group_is_recreated_when_redis_lost_its_data() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w")
        stream = worker.names.requests
        await worker.ensure_group(stream, GROUP)
        await fakeredis.FakeAsyncRedis(server=server).flushall()
        assert await worker.read_group([stream], GROUP, count=1, block_ms=0) == []
        await worker.publish([(stream, abort(1))])
        got = await worker.read_group([stream], GROUP, count=1, block_ms=0)
        assert [d.message for d in got] == [abort(1)]

    run(scenario)


def test_read_stream_follows_a_broadcast_from_a_position() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        a, b = transport(server, "a"), transport(server, "b")
        stream = a.names.aborts
        await a.publish([(stream, abort(0))])
        start = await b.last_entry_id(stream)
        await a.publish([(stream, abort(1)), (stream, abort(2))])
        last, got = await b.read_stream(stream, start, count=10, block_ms=0)
        assert [d.message for d in got] == [abort(1), abort(2)]
        assert (await b.read_stream(stream, last, count=10, block_ms=0))[1] == []

    run(scenario)


def test_heartbeats_expire() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        t = transport(server, "e")
        await t.beat(Heartbeat(role="engine", replica_id="e1", time=1.0, running=2), ttl_s=0.05)
        await t.beat(Heartbeat(role="tokenizer", replica_id="t1", time=1.0), ttl_s=10)
        assert [h.replica_id for h in await t.live_replicas("engine")] == ["e1"]
        await asyncio.sleep(0.1)
        assert await t.live_replicas("engine") == []

    run(scenario)


def test_a_lease_has_one_owner_until_released_or_expired() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        a, b = transport(server, "a"), transport(server, "b")
        assert await a.acquire_lease("shard:0", ttl_ms=10_000)
        assert not await b.acquire_lease("shard:0", ttl_ms=10_000)
        assert not await b.renew_lease("shard:0", ttl_ms=10_000)
        await b.release_lease("shard:0")  # not b's: no effect
        assert await a.renew_lease("shard:0", ttl_ms=50)
        await asyncio.sleep(0.1)
        assert await b.acquire_lease("shard:0", ttl_ms=10_000)

    run(scenario)


def test_operations_wait_for_redis_to_come_back() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w", max_backoff_s=0.02)
        server.connected = False
        publishing = asyncio.create_task(worker.publish([(worker.names.aborts, abort(1))]))
        await asyncio.sleep(0.1)
        assert not publishing.done()
        server.connected = True
        await asyncio.wait_for(publishing, timeout=2)
        _, got = await worker.read_stream(worker.names.aborts, "0", count=10, block_ms=0)
        assert [d.message for d in got] == [abort(1)]

    run(scenario)


def test_asking_for_zero_entries_reads_nothing() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w")
        assert await worker.read_group([worker.names.requests], GROUP, count=0, block_ms=0) == []

    run(scenario)
