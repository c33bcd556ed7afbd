"""StreamTransport.publish_fenced: output, state and acks all at once, only under the lease, never twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import fakeredis

from shared.fencing import StateExists
from shared.messages import AbortRequests, DecodeCheckpoint, DetokenizeParams, ResponseBatch, TextDelta
from shared.transport import Ack, StreamTransport

GROUP = "g"
STREAM = "t:generated:0"


def run(scenario: Callable[[fakeredis.FakeServer], Awaitable[None]]) -> None:
    asyncio.run(scenario(fakeredis.FakeServer()))


def transport(server: fakeredis.FakeServer, consumer: str) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer)


async def pending_entry(producer: StreamTransport, reader: StreamTransport) -> Ack:
    await producer.ensure_group(STREAM, GROUP)
    await producer.publish([(STREAM, AbortRequests(request_ids=["x"]))])
    (delivery,) = await reader.read_group([STREAM], GROUP, count=10, block_ms=0)
    return Ack(STREAM, GROUP, delivery.entry_id)


CHECKPOINT = DecodeCheckpoint(
    request_id="r",
    gateway_id="gw",
    detokenize=DetokenizeParams(),
    num_tokens=3,
    window=[1, 2],
    read_offset=1,
    text_tail="Отк",
    sent=2,
)
OUTPUT = ("t:responses:gw", ResponseBatch(deltas=[TextDelta(request_id="r", text="От", offset=0)]))


def test_applied_while_the_lease_is_held() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "d1")
        ack = await pending_entry(me, me)
        assert await me.acquire_lease("generated:0", 1000)
        state_key = me.names.decode_state("r")
        applied = await me.publish_fenced(
            [OUTPUT], leases=["generated:0"], lease_ttl_ms=5000, states=[(state_key, CHECKPOINT, 60_000)], acks=[ack]
        )
        assert applied
        raw = fakeredis.FakeAsyncRedis(server=server)
        assert (await raw.xpending(STREAM, GROUP))["pending"] == 0
        assert await raw.xlen("t:responses:gw") == 1
        assert await me.read_states([state_key, me.names.decode_state("other")]) == [CHECKPOINT, None]
        assert 59_000 < await raw.pttl(state_key) <= 60_000
        assert await raw.pttl(me.names.lease("generated:0")) > 1000  # renewed to the TTL given
        assert await me.lease_holders(["generated:0", "generated:1"]) == ["d1", None]
        await raw.aclose()
        await me.close()

    run(scenario)


def test_refused_once_the_lease_is_someone_elses_and_nothing_is_written() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        stalled, successor = transport(server, "d1"), transport(server, "d2")
        ack = await pending_entry(stalled, stalled)
        assert await successor.acquire_lease("generated:0", 1000)  # d1's lease lapsed; d2 took it
        applied = await stalled.publish_fenced(
            [OUTPUT],
            leases=["generated:0"],
            lease_ttl_ms=1000,
            states=[(stalled.names.decode_state("r"), CHECKPOINT, 1000)],
            acks=[ack],
        )
        assert not applied
        raw = fakeredis.FakeAsyncRedis(server=server)
        assert (await raw.xpending(STREAM, GROUP))["pending"] == 1
        assert await raw.exists("t:responses:gw", stalled.names.decode_state("r")) == 0
        # Without a lease at all it is refused too: nobody may have taken over, but nobody vouches.
        await successor.release_lease("generated:0")
        assert not await stalled.publish_fenced([OUTPUT], leases=["generated:0"], lease_ttl_ms=1000, acks=[ack])
        await raw.aclose()
        for t in (stalled, successor):
            await t.close()

    run(scenario)


def test_refused_when_a_state_expected_absent_exists_and_nothing_is_written() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "d1")
        ack = await pending_entry(me, me)
        assert await me.acquire_lease("generated:0", 1000)
        new_key, old_key = me.names.decode_state("r"), me.names.decode_state("seen-before")
        raw = fakeredis.FakeAsyncRedis(server=server)
        await raw.set(old_key, b"a checkpoint")
        try:
            await me.publish_fenced(
                [OUTPUT],
                leases=["generated:0"],
                lease_ttl_ms=1000,
                states=[(new_key, CHECKPOINT, 60_000)],
                acks=[ack],
                absent=[new_key, old_key],
            )
        except StateExists:
            pass
        else:
            raise AssertionError("published although a state expected absent exists")
        assert (await raw.xpending(STREAM, GROUP))["pending"] == 1
        assert await raw.exists("t:responses:gw", new_key) == 0
        # Absent as expected: applied, state written.
        assert await me.publish_fenced(
            [OUTPUT],
            leases=["generated:0"],
            lease_ttl_ms=1000,
            states=[(new_key, CHECKPOINT, 60_000)],
            acks=[ack],
            absent=[new_key],
        )
        assert (await raw.xpending(STREAM, GROUP))["pending"] == 0
        assert await raw.xlen("t:responses:gw") == 1
        assert await me.read_states([new_key]) == [CHECKPOINT]
        await raw.aclose()
        await me.close()

    run(scenario)


def test_a_batch_sent_again_after_a_lost_reply_is_not_published_twice() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "d1")
        ack = await pending_entry(me, me)
        assert await me.acquire_lease("generated:0", 1000)
        for _ in range(2):  # the second is what a retry after a dropped connection sends
            assert await me.publish_fenced([OUTPUT], leases=["generated:0"], lease_ttl_ms=1000, acks=[ack])
        raw = fakeredis.FakeAsyncRedis(server=server)
        assert await raw.xlen("t:responses:gw") == 1
        await raw.aclose()
        await me.close()

    run(scenario)


def test_claim_all_pending_takes_every_entry_however_fresh() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        dead, me = transport(server, "d1"), transport(server, "d2")
        await dead.ensure_group(STREAM, GROUP)
        await dead.publish([(STREAM, AbortRequests(request_ids=[str(i)])) for i in range(7)])
        assert len(await dead.read_group([STREAM], GROUP, count=10, block_ms=0)) == 7
        claimed = await me.claim_all_pending(STREAM, GROUP, count=3)  # three pages
        assert [d.message.request_ids for d in claimed] == [[str(i)] for i in range(7)]  # type: ignore[attr-defined]
        raw = fakeredis.FakeAsyncRedis(server=server)
        consumers = {c["name"]: c["pending"] for c in await raw.xinfo_consumers(STREAM, GROUP)}
        assert consumers == {b"d1": 0, b"d2": 7} or consumers == {"d1": 0, "d2": 7}
        await raw.aclose()
        for t in (dead, me):
            await t.close()

    run(scenario)
