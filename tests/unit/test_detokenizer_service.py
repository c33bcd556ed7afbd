"""The detokenizer process shell over fakeredis: shards in, text to the right gateway out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import fakeredis

from services.detokenizer.leases import ShardLeases, ShardPlanner, lease_name
from services.detokenizer.service import GROUP, DetokenizerService
from services.detokenizer.incremental import HFTokenDecoder
from services.detokenizer.state import DetokenizerState
from shared.messages import AbortRequests, DetokenizeParams, EngineStepOutput, ResponseBatch, TextDelta, TokenDelta
from shared.transport import StreamTransport, shard_of

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
            await client.ensure_group(generated(rid, client), GROUP)
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
                assert (await raw.xpending(generated(rid, client), GROUP))["pending"] == 0
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
        await dead.ensure_group(stream, GROUP)
        step = EngineStepOutput(engine_id="e", step=1, deltas=[first_delta(rid, tokenizer.encode("rescued"))])
        await dead.publish([(stream, step)])
        assert len(await dead.read_group([stream], GROUP, count=10, block_ms=0)) == 1
        await asyncio.sleep(0.4)  # it died a while ago: its lease has expired

        async with running_service(server, tokenizer):
            batches = await responses(dead, lambda ds: any(d.request_id == rid for d in ds))
            assert [d.text for b in batches for d in b.deltas] == ["rescued"]
            raw = fakeredis.FakeAsyncRedis(server=server)
            assert (await raw.xpending(stream, GROUP))["pending"] == 0
            await raw.aclose()
        await dead.close()

    asyncio.run(scenario())
