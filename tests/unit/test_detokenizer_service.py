"""The detokenizer service over fakeredis: shards in, text to the right gateway out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import fakeredis

from services.detokenizer.incremental import HFTokenDecoder
from services.detokenizer.leases import ShardLeases, ShardPlanner, lease_name
from services.detokenizer.service import DetokenizerService
from services.detokenizer.state import DetokenizerState
from shared.messages import AbortRequests, DetokenizeParams, EngineStepOutput, ResponseBatch, TextDelta, TokenDelta
from shared.transport import Ack, StreamNames, StreamTransport, shard_of

SHARDS = 2
LEASE_TTL_MS = 600


def transport(server: fakeredis.FakeServer, consumer: str) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer)


@asynccontextmanager
async def running_service(server: fakeredis.FakeServer, tokenizer: Any) -> AsyncIterator[DetokenizerService]:
    rid = "detok-1"
    service_transport = transport(server, rid)
    service = DetokenizerService(
        service_transport,
        DetokenizerState(HFTokenDecoder(tokenizer)),
        ShardLeases(service_transport, ShardPlanner(SHARDS, rid, release_grace_s=30.0), ttl_ms=LEASE_TTL_MS),
        replica_id=rid,
        batch_size=8,
        claim_idle_ms=30_000,
        heartbeat_interval_s=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await service_transport.close()


def first_delta(request_id: str, ids: list[int], **params: Any) -> TokenDelta:
    return TokenDelta(
        request_id=request_id,
        gateway_id="gw-1",
        offset=0,
        token_ids=ids,
        prompt_tokens=5,
        detokenize=DetokenizeParams(**params),
        prompt_tail=[1, 2],
    )


def generated(request_id: str, client: StreamTransport) -> str:
    return client.names.generated(shard_of(request_id, SHARDS))


async def responses(client: StreamTransport, until: Callable[[list[TextDelta]], bool]) -> list[ResponseBatch]:
    deadline = time.monotonic() + 5
    while True:
        _, entries = await client.read_stream(client.names.responses("gw-1"), "0", count=100, block_ms=0)
        batches = [e.message for e in entries if isinstance(e.message, ResponseBatch)]
        if until([d for b in batches for d in b.deltas]):
            return batches
        if time.monotonic() > deadline:
            raise AssertionError(f"no such output in time: {batches}")
        await asyncio.sleep(0.02)


async def wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + 5
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def ends(request_id: str) -> Callable[[list[TextDelta]], bool]:
    return lambda deltas: any(d.request_id == request_id and d.finish_reason for d in deltas)


def test_engine_output_becomes_one_response_batch_per_gateway_and_is_acked(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        client = transport(server, "engine")
        a, b = "cmpl-a", "cmpl-b"
        for rid in (a, b):
            await client.ensure_group(generated(rid, client), StreamNames.detokenizer_group)
        ids_a, ids_b = tokenizer.encode("Hello, world"), tokenizer.encode("Bonjour 😀")
        await client.publish(
            [
                (generated(a, client), EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(a, ids_a)])),
                (generated(b, client), EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(b, ids_b)])),
            ]
        )
        async with running_service(server, tokenizer):
            (batch,) = await responses(client, lambda ds: len(ds) == 2)  # both in one batch
            assert sorted((d.request_id, d.text) for d in batch.deltas) == [(a, "Hello, world"), (b, "Bonjour 😀")]

            last = TokenDelta(
                request_id=a, gateway_id="gw-1", offset=len(ids_a), token_ids=[2], prompt_tokens=5, finish_reason="stop"
            )
            await client.publish([(generated(a, client), EngineStepOutput(engine_id="e", step=2, deltas=[last]))])
            batches = await responses(client, ends(a))
            final = batches[-1].deltas[0]
            assert (final.text, final.finish_reason) == ("", "stop")
            assert final.usage is not None and (final.usage.prompt_tokens, final.usage.completion_tokens) == (
                5,
                len(ids_a) + 1,
            )

            raw = fakeredis.FakeAsyncRedis(server=server)
            for rid in (a, b):
                assert (await raw.xpending(generated(rid, client), StreamNames.detokenizer_group))["pending"] == 0
            assert [h.replica_id for h in await client.live_replicas("detokenizer")] == ["detok-1"]
            await raw.aclose()
        # A clean stop hands the shards back and leaves /health at once.
        assert await client.live_replicas("detokenizer") == []
        assert all([await client.acquire_lease(lease_name(s), 1000) for s in range(SHARDS)])
        await client.close()

    asyncio.run(scenario())


def test_a_stop_string_sends_an_abort_to_the_engines(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        client = transport(server, "engine")
        rid = "cmpl-stop"
        async with running_service(server, tokenizer):
            step = EngineStepOutput(
                engine_id="e", step=1, deltas=[first_delta(rid, tokenizer.encode("Yes. No. Maybe."), stop=["No"])]
            )
            await client.publish([(generated(rid, client), step)])
            batches = await responses(client, ends(rid))
            assert "".join(d.text for b in batches for d in b.deltas) == "Yes. "

            async def aborted() -> bool:
                _, entries = await client.read_stream(client.names.aborts, "0", count=10, block_ms=0)
                return [e.message for e in entries] == [AbortRequests(request_ids=[rid], reason="stop")]

            await wait_for(aborted)
        await client.close()

    asyncio.run(scenario())


def test_a_dead_replicas_shard_and_pending_entries_are_taken_over(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        dead = transport(server, "detok-dead")
        rid = "cmpl-orphan"
        stream = generated(rid, dead)
        shard = shard_of(rid, SHARDS)
        # The dead replica held the shard and had read this entry, but never answered it.
        assert await dead.acquire_lease(lease_name(shard), 300)
        await dead.ensure_group(stream, StreamNames.detokenizer_group)
        step = EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, tokenizer.encode("rescued"))])
        await dead.publish([(stream, step)])
        assert len(await dead.read_group([stream], StreamNames.detokenizer_group, count=10, block_ms=0)) == 1
        await asyncio.sleep(0.4)  # it died a while ago: its lease has expired

        async with running_service(server, tokenizer):
            batches = await responses(dead, lambda ds: any(d.request_id == rid for d in ds))
            assert [d.text for b in batches for d in b.deltas] == ["rescued"]
            raw = fakeredis.FakeAsyncRedis(server=server)
            assert (await raw.xpending(stream, StreamNames.detokenizer_group))["pending"] == 0
            await raw.aclose()
        await dead.close()

    asyncio.run(scenario())


def test_a_successor_continues_from_the_checkpoint_without_repeating_or_garbling(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        dead = transport(server, "detok-dead")
        rid = "cmpl-takeover"
        stream, shard = generated(rid, dead), shard_of(rid, SHARDS)
        ids = tokenizer.encode("Открыться миру 😀 сейчас")
        cut = 1  # "О" is two tokens: the cut splits it
        assert tokenizer.decode(ids[:cut]).endswith("\ufffd")
        await dead.ensure_group(stream, StreamNames.detokenizer_group)
        assert await dead.acquire_lease(lease_name(shard), 300)

        # The dead replica answered the first entry (text, checkpoint and ack at once)...
        await dead.publish([(stream, EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, ids[:cut])]))])
        state = DetokenizerState(HFTokenDecoder(tokenizer))
        (answered,) = await dead.read_group([stream], StreamNames.detokenizer_group, count=10, block_ms=0)
        assert isinstance(answered.message, EngineStepOutput)
        result = state.process([answered.message], 0.0)
        assert result.responses == {}  # half a character: nothing to send yet
        (checkpoint,) = result.checkpoints
        assert await dead.publish_fenced(
            [],
            leases=[lease_name(shard)],
            lease_ttl_ms=300,
            acks=[Ack(stream, StreamNames.detokenizer_group, answered.entry_id)],
            states=[(dead.names.decode_state(rid), checkpoint, 60_000)],
        )
        # ...then read the second and died before answering it.
        rest = TokenDelta(
            request_id=rid, gateway_id="gw-1", offset=cut, token_ids=ids[cut:], prompt_tokens=5, finish_reason="length"
        )
        await dead.publish([(stream, EngineStepOutput(engine_id="e", step=2, deltas=[rest]))])
        assert len(await dead.read_group([stream], StreamNames.detokenizer_group, count=10, block_ms=0)) == 1
        await asyncio.sleep(0.4)  # its lease expires

        async with running_service(server, tokenizer):
            batches = await responses(dead, ends(rid))
            assert "".join(d.text for b in batches for d in b.deltas) == "Открыться миру 😀 сейчас"
            raw = fakeredis.FakeAsyncRedis(server=server)
            assert (await raw.xpending(stream, StreamNames.detokenizer_group))["pending"] == 0
            await raw.aclose()
        await dead.close()

    asyncio.run(scenario())


def test_a_replica_whose_shard_was_taken_mid_batch_publishes_nothing(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        other = transport(server, "detok-2")
        rid = "cmpl-fenced"
        stream, shard = generated(rid, other), shard_of(rid, SHARDS)
        raw = fakeredis.FakeAsyncRedis(server=server)
        async with running_service(server, tokenizer) as service:
            await wait_for(lambda: _holds(service, shard))
            process = service.state.process

            def stall_past_the_lease(*args: Any, **kwargs: Any) -> Any:
                # While it decodes, its lease lapses and another replica takes the shard.
                asyncio.get_running_loop().create_task(raw.set(other.names.lease(lease_name(shard)), "detok-2"))
                return process(*args, **kwargs)

            service.state.process = stall_past_the_lease  # type: ignore[method-assign]
            await raw.delete(other.names.lease(lease_name(shard)))
            await raw.set(other.names.lease(lease_name(shard)), "detok-1", px=60_000)
            step = EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, tokenizer.encode("never"))])
            await other.publish([(stream, step)])
            await wait_for(lambda: _lost(service, shard))
            await asyncio.sleep(0.2)
            assert await raw.exists(other.names.responses("gw-1")) == 0  # fenced off: no text
            assert (await raw.xpending(stream, StreamNames.detokenizer_group))[
                "pending"
            ] == 1  # left for the new holder
            assert service.state.unknown([rid]) == [rid]  # its state for the request is gone
        await raw.aclose()
        await other.close()

    asyncio.run(scenario())


async def _holds(service: DetokenizerService, shard: int) -> bool:
    return shard in service.leases.held


async def _lost(service: DetokenizerService, shard: int) -> bool:
    return shard not in service.leases.held


def test_a_new_request_is_decoded_without_looking_up_a_checkpoint(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        client = transport(server, "engine")
        rid = "cmpl-new"
        await client.ensure_group(generated(rid, client), StreamNames.detokenizer_group)
        async with running_service(server, tokenizer) as service:
            looked_up: list[list[str]] = []
            read_states = service.transport.read_states

            async def counting(keys: Any) -> Any:
                looked_up.append(list(keys))
                return await read_states(keys)

            service.transport.read_states = counting  # type: ignore[method-assign]
            ids = tokenizer.encode("Hello, world")
            first = EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, ids[:2])])
            await client.publish([(generated(rid, client), first)])
            await responses(client, lambda ds: len(ds) == 1)
            last = TokenDelta(
                request_id=rid, gateway_id="gw-1", offset=2, token_ids=ids[2:], prompt_tokens=5, finish_reason="length"
            )
            await client.publish([(generated(rid, client), EngineStepOutput(engine_id="e", step=2, deltas=[last]))])
            batches = await responses(client, ends(rid))
            assert "".join(d.text for b in batches for d in b.deltas) == "Hello, world"
            assert looked_up == []  # the first token went out without a Redis round trip for its state
        await client.close()

    asyncio.run(scenario())


def test_a_first_delta_delivered_again_after_it_was_decoded_is_redone_from_the_checkpoint(tokenizer: Any) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        dead = transport(server, "detok-dead")
        rid = "cmpl-again"
        stream, shard = generated(rid, dead), shard_of(rid, SHARDS)
        ids = tokenizer.encode("Открыться миру 😀 сейчас")
        cut = 3
        await dead.ensure_group(stream, StreamNames.detokenizer_group)
        assert await dead.acquire_lease(lease_name(shard), 300)
        # A replica, since dead, answered the first entry: its text, checkpoint and ack at once.
        first = EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, ids[:cut])])
        await dead.publish([(stream, first)])
        (answered,) = await dead.read_group([stream], StreamNames.detokenizer_group, count=10, block_ms=0)
        assert isinstance(answered.message, EngineStepOutput)
        result = DetokenizerState(HFTokenDecoder(tokenizer)).process([answered.message], 0.0)
        (checkpoint,) = result.checkpoints
        assert await dead.publish_fenced(
            [(dead.names.responses("gw-1"), ResponseBatch(deltas=result.responses["gw-1"]))],
            leases=[lease_name(shard)],
            lease_ttl_ms=300,
            acks=[Ack(stream, StreamNames.detokenizer_group, answered.entry_id)],
            states=[(dead.names.decode_state(rid), checkpoint, 60_000)],
        )
        sent_before = "".join(d.text for d in result.responses["gw-1"])
        # The engine publishes the first delta again (a retry after a lost reply), then the rest:
        # to the successor the request looks new, but its checkpoint says what was sent.
        rest = TokenDelta(
            request_id=rid, gateway_id="gw-1", offset=cut, token_ids=ids[cut:], prompt_tokens=5, finish_reason="length"
        )
        await dead.publish([(stream, first), (stream, EngineStepOutput(engine_id="e", step=2, deltas=[rest]))])
        await asyncio.sleep(0.4)  # the dead replica's lease expires

        async with running_service(server, tokenizer):
            batches = await responses(dead, ends(rid))
            assert "".join(d.text for b in batches for d in b.deltas) == "Открыться миру 😀 сейчас"
            assert batches[0].deltas[0].text == sent_before  # the dead replica's batch, not repeated
            raw = fakeredis.FakeAsyncRedis(server=server)
            assert (await raw.xpending(stream, StreamNames.detokenizer_group))["pending"] == 0
            await raw.aclose()
        await dead.close()

    asyncio.run(scenario())
