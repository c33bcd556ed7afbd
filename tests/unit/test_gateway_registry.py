"""In-flight request registry and the batching writer: pure logic, no Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.gateway.pipeline_client import BatchingWriter, PipelineClient, cancel_and_wait, merge_aborts
from services.gateway.registry import RegistryClosed, RegistryFull, RequestRegistry
from shared.messages import (
    AbortRequests,
    CompletionRequest,
    Heartbeat,
    Message,
    RequestFailed,
    ResponseBatch,
    SamplingParams,
    TextDelta,
    encode,
)
from shared.transport import Delivery, StreamNames

pytestmark = pytest.mark.anyio


def failed(request_id: str) -> RequestFailed:
    return RequestFailed(request_id=request_id, status=400, error_type="invalid_request_error", message="bad")


async def test_dispatch_routes_each_delta_to_its_request() -> None:
    registry = RequestRegistry(capacity=4)
    a, b = registry.open("a"), registry.open("b")
    batch = ResponseBatch(
        deltas=[
            TextDelta(request_id="a", text="x"),
            TextDelta(request_id="b", text="y"),
            TextDelta(request_id="a", text="z"),
        ]
    )
    assert registry.dispatch(batch) == 3
    first = a.take()
    assert isinstance(first, TextDelta) and first.text == "xz"  # waiting text is coalesced
    assert a.take() is None
    second = b.take()
    assert isinstance(second, TextDelta) and second.text == "y"
    assert registry.dispatch(failed("b")) == 1
    assert isinstance(b.take(), RequestFailed)


async def test_a_first_delta_bringing_the_prompt_is_kept_even_without_text() -> None:
    registry = RequestRegistry(capacity=4)
    buffer = registry.open("a")
    prompt = [(5, "Hi", 0, None, None, [])]
    assert registry.dispatch(ResponseBatch(deltas=[TextDelta(request_id="a", text="", offset=0)])) == 0
    first = TextDelta(request_id="a", text="", offset=0, prompt_logprobs=prompt, prompt_text="Hi")
    assert registry.dispatch(ResponseBatch(deltas=[first, TextDelta(request_id="a", text="!", offset=0)])) == 2
    taken = buffer.take()
    # Coalesced with the text after it, the prompt's names and text are kept.
    assert isinstance(taken, TextDelta) and taken.text == "!"
    assert taken.prompt_logprobs == prompt and taken.prompt_text == "Hi"


async def test_events_for_released_or_unknown_requests_are_dropped() -> None:
    registry = RequestRegistry(capacity=4)
    registry.open("a")
    assert registry.release("a") and not registry.release("a")
    assert registry.dispatch(ResponseBatch(deltas=[TextDelta(request_id="a", text="late")])) == 0
    assert registry.dispatch(failed("ghost")) == 0
    assert registry.dispatch(Heartbeat(role="engine", replica_id="e", time=0.0)) == 0
    assert registry.dropped == 3 and len(registry) == 0


async def test_a_buffer_over_its_bound_refuses_events_and_counts_them_dropped() -> None:
    registry = RequestRegistry(capacity=4)
    bounded = registry.open("a", max_buffered_bytes=1000)
    unbounded = registry.open("b")
    for _ in range(20):
        registry.dispatch(
            ResponseBatch(deltas=[TextDelta(request_id="a", text="x" * 100), TextDelta(request_id="b", text="y" * 100)])
        )
    assert bounded.overflowed and bounded.pending_bytes == 0
    assert registry.dropped > 0
    assert unbounded.pending_bytes > 2000 and registry.buffered_bytes() == unbounded.pending_bytes


async def test_capacity_is_enforced_and_freed_on_release() -> None:
    registry = RequestRegistry(capacity=2)
    registry.open("a")
    registry.open("b")
    with pytest.raises(RegistryFull):
        registry.open("c")
    registry.release("a")
    registry.open("c")
    with pytest.raises(ValueError):
        registry.open("c")


async def test_close_fails_every_waiter_and_refuses_new_requests() -> None:
    registry = RequestRegistry(capacity=4)
    buffers = {rid: registry.open(rid) for rid in ("a", "b")}
    assert sorted(registry.close(failed)) == ["a", "b"]
    for rid, buffer in buffers.items():
        event = buffer.take()
        assert isinstance(event, RequestFailed) and event.request_id == rid
    with pytest.raises(RegistryClosed):
        registry.open("c")


def test_merge_aborts_folds_aborts_per_stream_and_reason() -> None:
    request = CompletionRequest(request_id="r", gateway_id="g", deadline=0.0, prompt="x")
    merged = merge_aborts(
        [
            ("aborts", AbortRequests(request_ids=["a"])),
            ("requests", request),
            ("aborts", AbortRequests(request_ids=["b", "c"])),
            ("aborts", AbortRequests(request_ids=["d"], reason="gateway shutdown")),
        ]
    )
    assert [(stream, type(m).__name__) for stream, m in merged] == [
        ("aborts", "AbortRequests"),
        ("requests", "CompletionRequest"),
        ("aborts", "AbortRequests"),
    ]
    assert merged[0][1].request_ids == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert merged[2][1].request_ids == ["d"]  # type: ignore[attr-defined]


class RecordingTransport:
    """Records publish calls; optionally fails them."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[list[tuple[str, Message]]] = []
        self.error = error

    async def publish(self, messages: Sequence[tuple[str, Message]], *, acks: object = ()) -> None:
        self.calls.append(list(messages))
        if self.error is not None:
            raise self.error


async def test_concurrent_sends_coalesce_into_one_publish() -> None:
    transport = RecordingTransport()
    writer = BatchingWriter(transport)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    requests = [CompletionRequest(request_id=f"r{i}", gateway_id="g", deadline=0.0, prompt="x") for i in range(5)]

    async def handler(request: CompletionRequest) -> None:
        await writer.send("requests", request)

    await asyncio.gather(*(handler(r) for r in requests))
    writer.send_nowait("aborts", AbortRequests(request_ids=["r0"]))
    writer.stop()
    await asyncio.wait_for(task, 1)
    assert len(transport.calls) == 2
    assert [m.request_id for _, m in transport.calls[0]] == ["r0", "r1", "r2", "r3", "r4"]  # type: ignore[attr-defined]
    assert transport.calls[1][0][0] == "aborts"


async def test_a_failed_publish_reaches_the_waiting_handler_and_the_writer_survives() -> None:
    transport = RecordingTransport(error=RuntimeError("redis said no"))
    writer = BatchingWriter(transport)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    with pytest.raises(RuntimeError, match="redis said no"):
        await asyncio.wait_for(writer.send("requests", AbortRequests(request_ids=["x"])), 1)
    transport.error = None
    await asyncio.wait_for(writer.send("requests", AbortRequests(request_ids=["y"])), 1)
    await cancel_and_wait([task], 1)
    assert task.done()


class EncodingTransport(RecordingTransport):
    """Encodes what it publishes, as the real transport does before its single round trip."""

    async def publish(self, messages: Sequence[tuple[str, Message]], *, acks: object = ()) -> None:
        for _, message in messages:
            encode(message)  # raises for a message that cannot go on the wire
        self.calls.append(list(messages))


async def test_an_unencodable_message_fails_only_its_own_sender_not_its_batch() -> None:
    transport = EncodingTransport()
    writer = BatchingWriter(transport)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    good = [CompletionRequest(request_id=f"r{i}", gateway_id="g", deadline=0.0, prompt="x") for i in range(3)]
    # msgpack carries 64-bit integers; the gateway refuses larger ones, this stands for any bad message.
    bad = CompletionRequest(
        request_id="bad", gateway_id="g", deadline=0.0, prompt="x", sampling=SamplingParams(max_tokens=2**70)
    )
    results = await asyncio.wait_for(
        asyncio.gather(*(writer.send("requests", m) for m in [good[0], bad, *good[1:]]), return_exceptions=True), 1
    )
    assert [type(r) for r in results] == [type(None), OverflowError, type(None), type(None)]
    published = [m.request_id for call in transport.calls for _, m in call]  # type: ignore[attr-defined]
    assert published == ["r0", "r1", "r2"]
    await cancel_and_wait([task], 1)


class ReadingTransport:
    """Answers the reader's first read with one text delta; every later read blocks."""

    def __init__(self, order: list[str]) -> None:
        self.names = StreamNames("t")
        self.order = order
        self.reads = 0

    async def read_stream(self, stream: str, last_id: str, *, count: int, block_ms: int) -> tuple[str, list[Delivery]]:
        self.reads += 1
        if self.reads == 1:
            return "1-0", [Delivery(stream, "1-0", ResponseBatch(deltas=[TextDelta(request_id="a", text="x")]))]
        self.order.append("next read")
        await asyncio.sleep(3600)
        return last_id, []


async def test_the_reader_lets_woken_handlers_run_before_it_sends_its_next_read() -> None:
    order: list[str] = []
    registry = RequestRegistry(capacity=4)
    buffer = registry.open("a")

    async def handler() -> None:
        await buffer.get()
        order.append("handler")

    waiting = asyncio.create_task(handler())
    await asyncio.sleep(0)  # the handler waits on its buffer
    client = PipelineClient(ReadingTransport(order), "gw", registry, heartbeat_interval_s=60)  # type: ignore[arg-type]
    reader = asyncio.create_task(client._read_loop("0-0"))
    await asyncio.wait_for(waiting, 1)
    while not order[1:]:
        await asyncio.sleep(0)
    await cancel_and_wait([reader], 1)
    assert order == ["handler", "next read"]
