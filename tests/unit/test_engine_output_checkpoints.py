"""Output checkpoints written with the outputs, and publishing fenced by entry ownership (fakeredis)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import fakeredis

from services.engine.contract import RequestOutput
from services.engine.ownership import OwnedPublisher
from services.engine.step_outputs import OutputRouter, Publication
from shared.messages import DetokenizeParams, EngineStepOutput, SamplingParams, TokenizedRequest, decode
from shared.output_checkpoints import pack_token_ids, unpack_token_ids
from shared.transport import PAYLOAD_FIELD, StreamNames, StreamTransport

PREFIX = "t"


def run(scenario: Callable[[fakeredis.FakeServer], Awaitable[None]]) -> None:
    asyncio.run(scenario(fakeredis.FakeServer()))


def transport(server: fakeredis.FakeServer, consumer: str) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), PREFIX, consumer)


def tokenized(request_id: str, prompt: list[int]) -> TokenizedRequest:
    return TokenizedRequest(
        request_id=request_id,
        gateway_id="gw",
        deadline=1e12,
        prompt_token_ids=prompt,
        sampling=SamplingParams(),
        detokenize=DetokenizeParams(),
    )


async def engine_with(
    server: fakeredis.FakeServer, consumer: str, *request_ids: str
) -> tuple[StreamTransport, OutputRouter, OwnedPublisher, list[list[str]]]:
    """An engine's transport, router and publisher, having read ``request_ids`` from the tokenized stream."""
    engine = transport(server, consumer)
    names = engine.names
    await engine.ensure_group(names.tokenized, StreamNames.engine_group)
    await engine.publish([(names.tokenized, tokenized(rid, [1, 2, 3])) for rid in request_ids])
    router = OutputRouter(names, consumer, shards=1)
    for delivery in await engine.read_group([names.tokenized], StreamNames.engine_group, count=100, block_ms=0):
        assert isinstance(delivery.message, TokenizedRequest)
        router.track(delivery.message, delivery.entry_id)
    lost: list[list[str]] = []
    return engine, router, OwnedPublisher(engine, on_lost=lost.append), lost


async def published(engine: StreamTransport) -> dict[str, list[tuple[int, list[int], str | None]]]:
    """Per request: (offset, token ids, finish reason) of every delta on the generated stream."""
    found: dict[str, list[tuple[int, list[int], str | None]]] = {}
    for _, fields in await engine._redis.xrange(engine.names.generated(0)):
        message = decode(fields[PAYLOAD_FIELD])
        assert isinstance(message, EngineStepOutput)
        for delta in message.deltas:
            found.setdefault(delta.request_id, []).append((delta.offset, delta.token_ids, delta.finish_reason))
    return found


async def checkpoint(engine: StreamTransport, request_id: str) -> list[int] | None:
    [tokens] = await engine.read_output_checkpoints([request_id])
    return tokens


def test_the_checkpoint_holds_exactly_the_published_tokens_and_goes_with_the_ack() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        engine, router, publisher, lost = await engine_with(server, "e1", "a", "b")
        await publisher.publish(router.route([RequestOutput("a", [5]), RequestOutput("b", [7])]))
        # Two steps in one publication, as the I/O thread batches a backlog.
        batch = Publication()
        batch.extend(router.route([RequestOutput("a", [6]), RequestOutput("b", [8])]))
        batch.extend(router.route([RequestOutput("a", [9, 10])]))
        await publisher.publish(batch)
        assert await checkpoint(engine, "a") == [5, 6, 9, 10]
        assert await checkpoint(engine, "b") == [7, 8]
        ttl = await engine._redis.pttl(engine.names.output_checkpoint("a"))
        assert 0 < ttl <= 600_000

        await publisher.publish(router.route([RequestOutput("a", [11], "length")]))
        assert await checkpoint(engine, "a") is None  # deleted with the last delta and the ack
        assert await checkpoint(engine, "b") == [7, 8]
        pending = await engine._redis.xpending(engine.names.tokenized, StreamNames.engine_group)
        assert pending["pending"] == 1  # b's entry only
        assert (await published(engine))["a"] == [
            (0, [5], None),
            (1, [6], None),
            (2, [9, 10], None),
            (4, [11], "length"),
        ]
        assert lost == []

    run(scenario)


def test_a_publish_repeated_after_a_lost_reply_does_not_grow_the_checkpoint() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        engine, router, publisher, _ = await engine_with(server, "e1", "a")
        await publisher.publish(router.route([RequestOutput("a", [5, 6])]))
        step = router.route([RequestOutput("a", [7])])
        await publisher.publish(step)
        await publisher.publish(step)  # what a retry sends
        assert await checkpoint(engine, "a") == [5, 6, 7]

    run(scenario)


def test_an_engine_publishes_nothing_for_a_request_another_engine_claimed() -> None:
    """The stalled engine taken for dead: its entry was claimed, so its tokens must not mix in."""

    async def scenario(server: fakeredis.FakeServer) -> None:
        stalled, router, publisher, lost = await engine_with(server, "stalled", "a", "b")
        await publisher.publish(router.route([RequestOutput("a", [5]), RequestOutput("b", [7])]))
        survivor = transport(server, "survivor")
        entry_a = router.entry_of("a")
        assert entry_a is not None
        claimed = await survivor.take_over(
            stalled.names.tokenized, StreamNames.engine_group, "stalled", count=1, min_idle_ms=0
        )
        assert [d.entry_id for d in claimed.deliveries] == [entry_a]
        assert await survivor.read_output_checkpoints(["a"]) == [[5]]

        # The stalled engine wakes up with a step for both, and a's end.
        await publisher.publish(router.route([RequestOutput("a", [6], "length"), RequestOutput("b", [8])]))
        assert lost == [[entry_a]]
        deltas = await published(stalled)
        assert deltas["a"] == [(0, [5], None)]  # nothing more of a
        assert deltas["b"] == [(0, [7], None), (1, [8], None)]
        assert await checkpoint(stalled, "a") == [5]  # left for the survivor
        # a's entry is still pending, now for the survivor: the stalled engine did not acknowledge it.
        [entry] = await stalled._redis.xpending_range(
            stalled.names.tokenized, StreamNames.engine_group, "-", "+", 10, "survivor"
        )
        assert entry["message_id"].decode() == entry_a
        # Keeping entries fresh never takes a back.
        await publisher.touch([entry_a, *router.pending_entry_ids()])
        assert lost == [[entry_a], [entry_a]]
        [entry] = await stalled._redis.xpending_range(
            stalled.names.tokenized, StreamNames.engine_group, "-", "+", 10, "survivor"
        )
        assert entry["message_id"].decode() == entry_a

    run(scenario)


def test_touch_lets_go_of_entries_another_engine_took_and_keeps_the_rest_fresh() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        engine, router, publisher, lost = await engine_with(server, "e1", "a", "b")
        entry_b = router.entry_of("b")
        assert entry_b is not None
        await engine._redis.xclaim(engine.names.tokenized, StreamNames.engine_group, "other", 0, [entry_b], justid=True)
        await asyncio.sleep(0.05)
        await publisher.touch(router.pending_entry_ids())
        assert lost == [[entry_b]]
        [entry] = await engine._redis.xpending_range(
            engine.names.tokenized, StreamNames.engine_group, "-", "+", 10, "e1"
        )
        assert entry["time_since_delivered"] < 50

    run(scenario)


def test_a_claimed_request_is_tracked_from_its_checkpoint() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        engine, router, publisher, _ = await engine_with(server, "e1")
        names = engine.names
        await engine.publish([(names.tokenized, tokenized("a", [1, 2, 3])), (names.tokenized, tokenized("b", [4]))])
        await engine._redis.set(names.output_checkpoint("a"), pack_token_ids([9, 8, 7]))
        deliveries = await engine.read_group([names.tokenized], StreamNames.engine_group, count=10, block_ms=0)
        done = await publisher.done_tokens(deliveries)
        assert done == {"a": [9, 8, 7]}
        for delivery in deliveries:
            assert isinstance(delivery.message, TokenizedRequest)
            router.track(delivery.message, delivery.entry_id, done.get(delivery.message.request_id, []))
        await publisher.publish(router.route([RequestOutput("a", [6]), RequestOutput("b", [5])]))
        deltas = await published(engine)
        assert deltas == {"a": [(3, [6], None)], "b": [(0, [5], None)]}
        assert await checkpoint(engine, "a") == [9, 8, 7, 6]

    run(scenario)


def test_the_first_delta_after_a_takeover_carries_the_last_output_tokens_as_context() -> None:
    router = OutputRouter(StreamTransport.from_client(fakeredis.FakeAsyncRedis(), PREFIX, "x").names, "e", 1)
    router.track(tokenized("a", [1, 2, 3]), "1-0", [4, 5, 6, 7, 8, 9, 10])
    [(_, message)] = router.route([RequestOutput("a", [11])]).messages
    assert isinstance(message, EngineStepOutput)
    [delta] = message.deltas
    assert (delta.offset, delta.prompt_tail) == (7, [3, 4, 5, 6, 7, 8, 9, 10])


def test_packed_token_ids_round_trip_and_garbage_is_refused() -> None:
    ids = [0, 1, 49_151, 2**31 - 1]
    assert unpack_token_ids(pack_token_ids(ids)) == ids
    assert unpack_token_ids(b"") == []
    assert unpack_token_ids(b"abc") is None
