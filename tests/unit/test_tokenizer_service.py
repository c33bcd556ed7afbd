"""The tokenizer service: batches from the group, results and acks, claims, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import pytest

from services.tokenizer import service as tokenizer_service
from services.tokenizer.prompt import PromptProcessor
from services.tokenizer.service import TokenizerService, TokenizerWorker
from shared.messages import (
    AbortRequests,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    Heartbeat,
    Message,
    RequestFailed,
    SamplingParams,
    TokenizedRequest,
)
from shared.model_files import resolve_model_dir
from shared.settings import CommonSettings
from shared.transport import Ack, Delivery, StreamNames, StreamTransport

NAMES = StreamNames("t")


@pytest.fixture(scope="module")
def processor() -> PromptProcessor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(CommonSettings(), weights=False))
    return PromptProcessor(tokenizer, max_model_len=128, eos_token_ids=[2])


def completion(request_id: str, *, deadline_in: float = 60.0, **fields: Any) -> CompletionRequest:
    return CompletionRequest(
        request_id=request_id, gateway_id="gw-1", deadline=time.time() + deadline_in, **({"prompt": "Hi"} | fields)
    )


def delivery(message: Message, entry_id: str = "1-0") -> Delivery:
    return Delivery(NAMES.requests, entry_id, message)


# -- the pure worker ---------------------------------------------------------------


def test_worker_routes_results_and_acks_everything(processor: PromptProcessor) -> None:
    worker = TokenizerWorker(processor, NAMES)
    batch = [
        delivery(completion("good"), "1-0"),
        delivery(completion("bad", prompt=""), "2-0"),
        delivery(completion("late", deadline_in=-1), "3-0"),
        delivery(AbortRequests(request_ids=["x"]), "4-0"),  # wrong stream: acknowledged, not fatal
    ]
    out, acks = worker.handle(batch, time.time())

    assert [(stream, type(m).__name__, m.request_id) for stream, m in out] == [  # type: ignore[attr-defined]
        (NAMES.tokenized, "TokenizedRequest", "good"),
        (NAMES.responses("gw-1"), "RequestFailed", "bad"),
    ]
    assert acks == [Ack(NAMES.requests, NAMES.tokenizer_group, f"{i}-0") for i in range(1, 5)]


def test_a_batch_is_handled_a_budget_at_a_time_and_stamped(processor: PromptProcessor) -> None:
    ticks = iter(float(t) for t in range(100, 200))
    worker = TokenizerWorker(processor, NAMES, clock=lambda: next(ticks))  # every look at the clock: 1 s later
    batch = [delivery(completion(f"r{i}", timeline={"gateway_published": 1.0}), f"{i}-0") for i in range(3)]
    out, acks, handled = worker.handle_for(batch, now=50.0, budget_s=2.5)
    assert handled == 2  # the budget ran out after the second: publish these, then the rest
    assert [ack.entry_id for ack in acks] == ["0-0", "1-0"] and len(out) == 2
    first = out[0][1]
    assert isinstance(first, TokenizedRequest)
    assert first.timeline["gateway_published"] == 1.0 and first.timeline["tokenizer_read"] == 50.0
    assert first.timeline["tokenizer_done"] > 50.0
    assert worker.handle_for(batch[2:], now=60.0, budget_s=0.0)[2] == 1  # always at least one


def test_a_batch_is_light_while_its_text_to_encode_is_short() -> None:
    light = TokenizerWorker.light
    short = [delivery(completion("a", prompt="x" * 1000)), delivery(completion("b", prompt=list(range(4000))))]
    assert light(short, max_chars=2000)  # token ids count a quarter each: they are only checked
    assert not light([*short, delivery(completion("c", prompt="x" * 1001))], max_chars=2000)
    chat = completion("d", prompt=None, messages=[ChatMessage(role="user", content="x" * 10)])
    assert light([delivery(chat)], max_chars=600) and not light([delivery(chat)], max_chars=400)  # the template counts
    assert not light([delivery(DetokenizeRequest(request_id="e", gateway_id="g", deadline=0, tokens=[1] * 50))], 49)


def test_light_batches_are_encoded_on_the_loop_and_heavy_ones_in_a_thread(
    processor: PromptProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    threaded: list[int] = []
    to_thread = asyncio.to_thread

    async def counting_to_thread(func: Callable[..., Any], /, *args: Any) -> Any:
        threaded.append(len(args[0]))
        return await to_thread(func, *args)

    monkeypatch.setattr(tokenizer_service.asyncio, "to_thread", counting_to_thread)

    async def scenario() -> None:
        server = fakeredis.FakeServer()
        client = transport(server, "test")
        raw = fakeredis.FakeAsyncRedis(server=server)
        async with running_service(server, processor):
            await client.publish([(NAMES.requests, completion("light", prompt="Hi"))])
            await wait_for(lambda: _pending_is(raw, 0, expect_delivered=1))
            assert threaded == []
            heavy = "word " * (tokenizer_service.INLINE_MAX_CHARS // 5 + 1)
            await client.publish([(NAMES.requests, completion("heavy", prompt=heavy))])
            await wait_for(lambda: _pending_is(raw, 0, expect_delivered=2))
            assert threaded == [1]
            _, tokenized = await client.read_stream(NAMES.responses("gw-1"), "0", count=10, block_ms=0)
        assert [d.message.request_id for d in tokenized] == ["heavy"]  # type: ignore[attr-defined]
        await client.close()
        await raw.aclose()

    asyncio.run(scenario())


def test_worker_turns_a_tokenizer_crash_into_a_500_for_that_request_only(processor: PromptProcessor) -> None:
    class Exploding(PromptProcessor):
        def process(self, request: CompletionRequest) -> TokenizedRequest | RequestFailed:
            if request.request_id == "boom":
                raise RuntimeError("tokenizer bug")
            return super().process(request)

    worker = TokenizerWorker(Exploding(processor.tokenizer, 128, [2]), NAMES)
    out, acks = worker.handle([delivery(completion("boom"), "1-0"), delivery(completion("fine"), "2-0")], time.time())
    failure = out[0][1]
    assert isinstance(failure, RequestFailed) and failure.status == 500 and failure.request_id == "boom"
    assert isinstance(out[1][1], TokenizedRequest)
    assert len(acks) == 2


# -- the service over fakeredis -------------------------------------------------------


def transport(server: fakeredis.FakeServer, consumer: str) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer)


@asynccontextmanager
async def running_service(
    server: fakeredis.FakeServer, processor: PromptProcessor, *, claim_idle_ms: int = 30_000
) -> AsyncIterator[tuple[asyncio.Task[None], asyncio.Event]]:
    service = TokenizerService(
        transport(server, "tok-1"),
        TokenizerWorker(processor, NAMES),
        replica_id="tok-1",
        batch_size=8,
        claim_idle_ms=claim_idle_ms,
        heartbeat_interval_s=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield task, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await service.transport.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_requests_in_tokenized_and_errors_out_all_acknowledged(processor: PromptProcessor) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        client = transport(server, "test")
        raw = fakeredis.FakeAsyncRedis(server=server)
        async with running_service(server, processor):
            await client.publish(
                [
                    (NAMES.requests, completion("cmpl-a", sampling=SamplingParams(max_tokens=4))),
                    (NAMES.requests, completion("cmpl-b", prompt=[1, 99999])),
                    (NAMES.requests, completion("cmpl-late", deadline_in=-5)),
                ]
            )
            await wait_for(lambda: _pending_is(raw, 0, expect_delivered=3))
            assert [b.role for b in await client.live_replicas("tokenizer")] == ["tokenizer"]

            _, tokenized = await client.read_stream(NAMES.tokenized, "0", count=10, block_ms=0)
            _, responses = await client.read_stream(NAMES.responses("gw-1"), "0", count=10, block_ms=0)
        assert [d.message.request_id for d in tokenized] == ["cmpl-a"]  # type: ignore[attr-defined]
        tokenized_request = tokenized[0].message
        assert isinstance(tokenized_request, TokenizedRequest)
        assert tokenized_request.prompt_token_ids == processor.tokenizer.encode("Hi")
        assert tokenized_request.sampling.eos_token_ids == [2]
        failure = responses[0].message
        assert isinstance(failure, RequestFailed) and failure.request_id == "cmpl-b" and failure.param == "prompt"
        assert len(responses) == 1  # the expired request produced nothing
        # A clean stop takes the replica out of /health at once.
        assert await client.live_replicas("tokenizer") == []
        await client.close()
        await raw.aclose()

    asyncio.run(scenario())


async def _pending_is(raw: fakeredis.FakeAsyncRedis, pending: int, *, expect_delivered: int) -> bool:
    groups = await raw.xinfo_groups(NAMES.requests)
    if not groups:
        return False
    group = groups[0]
    return group["pending"] == pending and group["entries-read"] == expect_delivered


def test_entries_left_by_a_dead_replica_are_claimed_and_served(processor: PromptProcessor) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        dead = transport(server, "tok-dead")
        await dead.ensure_group(NAMES.requests, NAMES.tokenizer_group)
        await dead.publish([(NAMES.requests, completion("cmpl-orphan"))])
        assert (
            len(await dead.read_group([NAMES.requests], NAMES.tokenizer_group, count=10, block_ms=0)) == 1
        )  # then it died
        await asyncio.sleep(0.05)

        async with running_service(server, processor, claim_idle_ms=20):
            client = transport(server, "test")

            async def served() -> bool:
                _, out = await client.read_stream(NAMES.tokenized, "0", count=10, block_ms=0)
                return [d.message.request_id for d in out] == ["cmpl-orphan"]  # type: ignore[attr-defined]

            await wait_for(served)
            pending = await fakeredis.FakeAsyncRedis(server=server).xpending(NAMES.requests, NAMES.tokenizer_group)
            assert pending["pending"] == 0
            await client.close()
        await dead.close()

    asyncio.run(scenario())


def test_entries_of_a_replica_whose_heartbeat_expired_are_taken_over_at_once(processor: PromptProcessor) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        gone = transport(server, "tok-gone")
        await gone.beat(Heartbeat(role="tokenizer", replica_id="tok-gone", time=time.time()), ttl_s=0.05)
        await gone.ensure_group(NAMES.requests, NAMES.tokenizer_group)
        await gone.publish([(NAMES.requests, completion("cmpl-orphan"))])
        assert (
            len(await gone.read_group([NAMES.requests], NAMES.tokenizer_group, count=10, block_ms=0)) == 1
        )  # then it died
        started = time.monotonic()
        # claim_idle_ms is long: only the expired heartbeat can explain a prompt takeover.
        async with running_service(server, processor, claim_idle_ms=60_000):
            client = transport(server, "test")

            async def served() -> bool:
                _, out = await client.read_stream(NAMES.tokenized, "0", count=10, block_ms=0)
                return [d.message.request_id for d in out] == ["cmpl-orphan"]  # type: ignore[attr-defined]

            await wait_for(served)
            # The service judges others once its own beats have been steady for a TTL (0.8 s).
            assert time.monotonic() - started < 2.5
            pending = await fakeredis.FakeAsyncRedis(server=server).xpending(NAMES.requests, NAMES.tokenizer_group)
            assert pending["pending"] == 0
            assert "tok-gone" not in (await client.replica_census("tokenizer")).gone
            await client.close()
        await gone.close()

    asyncio.run(scenario())


def test_stop_lets_the_service_exit_promptly_when_idle(processor: PromptProcessor) -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        async with running_service(server, processor) as (task, stop):
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(asyncio.shield(task), timeout=2)
            assert task.done() and task.exception() is None

    asyncio.run(scenario())
