"""Work streams keep every entry a group still needs; poison entries are dead-lettered (fakeredis)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import fakeredis

from shared.messages import (
    AbortRequests,
    DetokenizeParams,
    EngineStepOutput,
    RequestFailed,
    SamplingParams,
    TokenDelta,
    TokenizedRequest,
    TokenizeRequest,
    decode,
)
from shared.transport import PAYLOAD_FIELD, Ack, Delivery, StreamNames, StreamTransport
from shared.work_streams import GroupProgress, StreamProgress, next_id, poison_notices, split_poisoned

GROUP = StreamNames.engine_group


def run(scenario: Callable[[fakeredis.FakeServer], Awaitable[None]]) -> None:
    asyncio.run(scenario(fakeredis.FakeServer()))


def transport(server: fakeredis.FakeServer, consumer: str, **kwargs: float) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer, **kwargs)


def tokenized(i: int, gateway: str = "gw") -> TokenizedRequest:
    return TokenizedRequest(
        request_id=f"r{i}",
        gateway_id=gateway,
        deadline=2e9,
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(),
        detokenize=DetokenizeParams(),
    )


async def ids_of(client: fakeredis.FakeAsyncRedis, stream: str) -> list[str]:
    return [raw.decode() for raw, _ in await client.xrange(stream)]


def test_a_backlog_beyond_maxlen_is_kept_whole_on_work_streams() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        producer = transport(server, "p", maxlen=10, trim_interval_s=0)
        client = fakeredis.FakeAsyncRedis(server=server)
        names = producer.names
        await producer.ensure_group(names.tokenized, GROUP)  # a consumer exists but reads nothing
        for start in range(0, 500, 50):
            await producer.publish([(names.tokenized, tokenized(i)) for i in range(start, start + 50)])
            await producer.publish([(names.aborts, AbortRequests(request_ids=[str(i)])) for i in range(50)])
        assert await client.xlen(names.tokenized) == 500
        assert await client.xlen(names.aborts) < 500  # broadcast streams still trim by length
        assert await producer.backlog([names.tokenized]) == 500

    run(scenario)


def test_trimming_stops_at_the_oldest_pending_entry() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        worker = transport(server, "w")
        client = fakeredis.FakeAsyncRedis(server=server)
        stream = worker.names.tokenized
        await worker.ensure_group(stream, GROUP)
        await worker.publish([(stream, tokenized(i)) for i in range(100)])
        taken = await worker.read_group([stream], GROUP, count=60, block_ms=0)
        await worker.ack([Ack(stream, GROUP, d.entry_id) for i, d in enumerate(taken) if i != 20])
        progress = await worker.trim_by_progress(stream)
        assert (await ids_of(client, stream))[0] == taken[20].entry_id
        assert progress.length == 80 and progress.backlog() == 41  # 40 undelivered + 1 pending
        await worker.ack([Ack(stream, GROUP, taken[20].entry_id)])
        await worker.trim_by_progress(stream)
        assert await client.xlen(stream) == 40  # everything delivered and acknowledged is gone

    run(scenario)


def test_the_slowest_group_decides_and_a_stream_without_groups_is_left_alone() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        fast, slow = transport(server, "fast"), transport(server, "slow")
        client = fakeredis.FakeAsyncRedis(server=server)
        stream = fast.names.requests
        await fast.publish([(stream, tokenized(i)) for i in range(30)])
        await fast.trim_by_progress(stream)
        assert await client.xlen(stream) == 30  # nobody read it yet: all of it is still to do
        await fast.ensure_group(stream, "a")
        await slow.ensure_group(stream, "b")
        got = await fast.read_group([stream], "a", count=30, block_ms=0)
        await fast.ack([Ack(stream, "a", d.entry_id) for d in got])
        got = await slow.read_group([stream], "b", count=10, block_ms=0)
        await slow.ack([Ack(stream, "b", d.entry_id) for d in got])
        await fast.trim_by_progress(stream)
        assert await client.xlen(stream) == 20
        assert await fast.backlog([stream]) == 20

    run(scenario)


def test_publish_trims_a_work_stream_once_its_entries_are_acknowledged() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        producer, consumer = transport(server, "p", trim_interval_s=0), transport(server, "c")
        client = fakeredis.FakeAsyncRedis(server=server)
        stream = producer.names.generated(0)
        await consumer.ensure_group(stream, StreamNames.detokenizer_group)
        await producer.publish([(stream, tokenized(i)) for i in range(10)])
        got = await consumer.read_group([stream], StreamNames.detokenizer_group, count=10, block_ms=0)
        await consumer.ack([Ack(stream, StreamNames.detokenizer_group, d.entry_id) for d in got])
        await producer.publish([(stream, tokenized(10))])
        assert await client.xlen(stream) == 1

    run(scenario)


def test_backlog_falls_back_to_the_length_where_redis_has_no_lag() -> None:
    group = GroupProgress("g", last_delivered="5-0", pending=2, lag=None, oldest_pending="3-0")
    assert StreamProgress("s", 12, (group,)).backlog() == 12
    assert StreamProgress("s", 12, (group,)).trim_point() == "3-0"
    done = GroupProgress("g", last_delivered="5-0", pending=0, lag=0)
    assert StreamProgress("s", 0, (done,)).trim_point() == next_id("5-0") == "5-1"
    assert StreamProgress("s", 7, ()).backlog() == 7 and StreamProgress("s", 7, ()).trim_point() is None


def test_split_poisoned_counts_the_claim_just_made() -> None:
    deliveries = [Delivery("t:tokenized", f"{i}-0", tokenized(i)) for i in range(3)]
    keep, poisoned = split_poisoned(deliveries, {"0-0": 2, "1-0": 4, "2-0": 9}, max_deliveries=3)
    assert [d.entry_id for d in keep] == ["0-0"]
    assert [(d.entry_id, failed) for d, failed in poisoned] == [("1-0", 3), ("2-0", 8)]


def test_an_entry_its_consumers_keep_dying_on_is_dead_lettered_and_its_request_fails() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        first = transport(server, "dies-1", max_deliveries=3)
        names = first.names
        await first.publish([(names.tokenized, tokenized(1)), (names.tokenized, tokenized(2))])
        assert len(await first.read_group([names.tokenized], GROUP, count=1, block_ms=0)) == 1
        for n in (2, 3):  # each claimer dies in turn without acknowledging
            claimed = await transport(server, f"dies-{n}", max_deliveries=3).claim_stale(
                names.tokenized, GROUP, min_idle_ms=0
            )
            assert [d.message for d in claimed] == [tokenized(1)]
        survivor = transport(server, "survivor", max_deliveries=3)
        assert await survivor.claim_stale(names.tokenized, GROUP, min_idle_ms=0) == []
        # The healthy entry behind it is still served.
        assert [d.message for d in await survivor.read_group([names.tokenized], GROUP, count=5, block_ms=0)] == [
            tokenized(2)
        ]

        [(_, fields)] = await client.xrange(names.deadletter)
        assert fields[b"reason"] == b"max_deliveries" and fields[b"deliveries"] == b"3"
        assert fields[b"stream"] == names.tokenized.encode() and decode(fields[PAYLOAD_FIELD]) == tokenized(1)
        [(_, response)] = await client.xrange(names.responses("gw"))
        failed = decode(response[PAYLOAD_FIELD])
        assert isinstance(failed, RequestFailed) and failed.request_id == "r1" and failed.status == 500
        assert "dead-lettered after 3 deliveries" in failed.message
        [(_, abort)] = await client.xrange(names.aborts)
        assert decode(abort[PAYLOAD_FIELD]) == AbortRequests(request_ids=["r1"], reason="dead-lettered")
        summary = await client.xpending(names.tokenized, GROUP)
        assert summary["pending"] == 1  # only the healthy entry, now the survivor's

    run(scenario)


def test_a_poisoned_engine_step_fails_every_request_in_it() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        dead = transport(server, "dead", max_deliveries=1)
        names = dead.names
        stream = names.generated(2)
        step = EngineStepOutput(
            engine_id="e",
            step=7,
            deltas=[
                TokenDelta(request_id="a", gateway_id="gw1", offset=0, token_ids=[5], prompt_tokens=2),
                TokenDelta(request_id="b", gateway_id="gw2", offset=3, token_ids=[6], prompt_tokens=2),
            ],
        )
        await dead.publish([(stream, step)])
        await dead.read_group([stream], StreamNames.detokenizer_group, count=1, block_ms=0)
        claimer = transport(server, "claimer", max_deliveries=1)
        assert await claimer.claim_stale(stream, StreamNames.detokenizer_group, min_idle_ms=0) == []
        for gateway, request_id in (("gw1", "a"), ("gw2", "b")):
            [(_, fields)] = await client.xrange(names.responses(gateway))
            message = decode(fields[PAYLOAD_FIELD])
            assert isinstance(message, RequestFailed) and message.request_id == request_id
            assert "detokenizer" in message.message

    run(scenario)


def test_a_stream_nobody_wrote_to_has_no_backlog() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        gateway = transport(server, "gw")
        assert await gateway.backlog([gateway.names.tokenized, gateway.names.requests]) == 0

    run(scenario)


def test_a_poisoned_tokenize_request_fails_at_its_gateway_without_an_abort() -> None:
    names = StreamNames("t")
    message = TokenizeRequest(request_id="tokn-1", gateway_id="gw", deadline=2e9, prompt="x")
    notices = poison_notices(names, Delivery(names.requests, "1-0", message), failed=3)
    [(stream, failed)] = notices  # nothing for the engines: it never reaches one
    assert stream == names.responses("gw")
    assert isinstance(failed, RequestFailed) and failed.request_id == "tokn-1" and "tokenizer" in failed.message
