"""A scripted fake pipeline (tokenizer + engine + detokenizer) and a harness that runs the
gateway's HTTP app in-process against it, over fakeredis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import httpx

from services.gateway.pipeline_client import cancel_and_wait
from services.gateway.server import create_app
from shared.messages import (
    AbortRequests,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResult,
    Message,
    RequestFailed,
    ResponseBatch,
    TextDelta,
    TokenizeRequest,
    TokenizeResult,
    Usage,
)
from shared.settings import GatewaySettings
from shared.transport import StreamTransport

GATEWAY_ID = "gw-test"
Behaviour = Callable[["FakePipeline", CompletionRequest], Awaitable[None]]


@dataclass
class FakePipeline:
    """Stands in for tokenizer + engine + detokenizer: answers each request per ``behaviour``."""

    transport: StreamTransport
    behaviour: Behaviour
    requests: list[CompletionRequest] = field(default_factory=list)
    calls: list[TokenizeRequest | DetokenizeRequest] = field(default_factory=list)
    answer_calls: bool = True  # False: tokenize/detokenize calls are never answered
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        last_id = "0-0"
        tasks = set()
        while True:
            last_id, deliveries = await self.transport.read_stream(
                self.transport.names.requests, last_id, count=100, block_ms=20
            )
            for delivery in deliveries:
                request = delivery.message
                if isinstance(request, CompletionRequest):
                    self.requests.append(request)
                    task = asyncio.create_task(self.behaviour(self, request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(request, (TokenizeRequest, DetokenizeRequest)):
                    self.calls.append(request)
                    if self.answer_calls:
                        stream = self.transport.names.responses(request.gateway_id)
                        await self.transport.publish([(stream, answer(request))])

    async def send(self, request: CompletionRequest, *messages: ResponseBatch | RequestFailed) -> None:
        stream = self.transport.names.responses(request.gateway_id)
        await self.transport.publish([(stream, m) for m in messages])

    async def wait_for_requests(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.requests) < count:
                await asyncio.sleep(0.01)

    async def aborted_ids(self) -> list[str]:
        _, deliveries = await self.transport.read_stream(self.transport.names.aborts, "0-0", count=100, block_ms=0)
        return [rid for d in deliveries if isinstance(d.message, AbortRequests) for rid in d.message.request_ids]


def answer(request: TokenizeRequest | DetokenizeRequest) -> Message:
    """A tokenizer stand-in: one token per character (its code point); ids over 1000 are out of vocabulary."""
    if isinstance(request, DetokenizeRequest):
        if any(t > 1000 for t in request.tokens):
            return RequestFailed(
                request_id=request.request_id,
                status=400,
                error_type="invalid_request_error",
                message="Token id out of vocabulary.",
                param="tokens",
            )
        return DetokenizeResult(request_id=request.request_id, prompt="".join(chr(t) for t in request.tokens))
    text = request.prompt if request.prompt is not None else "".join(m.content for m in request.messages or [])
    tokens = [ord(c) for c in text]
    strs = list(text) if request.return_token_strs else None
    return TokenizeResult(request_id=request.request_id, tokens=tokens, max_model_len=2048, token_strs=strs)


def delta(request: CompletionRequest, text: str, ids: list[int], finish: str | None = None, **kw: Any) -> TextDelta:
    usage = Usage(prompt_tokens=3, completion_tokens=2) if finish else None
    return TextDelta(request_id=request.request_id, text=text, token_ids=ids, finish_reason=finish, usage=usage, **kw)


async def hello_world(pipeline: FakePipeline, request: CompletionRequest) -> None:
    await pipeline.send(request, ResponseBatch(deltas=[delta(request, "Hello", [1])]))
    await pipeline.send(request, ResponseBatch(deltas=[delta(request, " world", [2], "stop")]))


async def prompt_too_long(pipeline: FakePipeline, request: CompletionRequest) -> None:
    await pipeline.send(
        request,
        RequestFailed(
            request_id=request.request_id,
            status=400,
            error_type="invalid_request_error",
            message="prompt too long",
            param="prompt",
        ),
    )


async def fails_mid_stream(pipeline: FakePipeline, request: CompletionRequest) -> None:
    await pipeline.send(request, ResponseBatch(deltas=[delta(request, "Hel", [1])]))
    await pipeline.send(
        request,
        RequestFailed(request_id=request.request_id, status=500, error_type="server_error", message="engine crashed"),
    )


async def silent(pipeline: FakePipeline, request: CompletionRequest) -> None:
    return None


async def one_delta_then_silent(pipeline: FakePipeline, request: CompletionRequest) -> None:
    await pipeline.send(request, ResponseBatch(deltas=[delta(request, "Hel", [1])]))


async def waits_for_release(pipeline: FakePipeline, request: CompletionRequest) -> None:
    await pipeline.release.wait()
    await hello_world(pipeline, request)


@dataclass
class Harness:
    app: Any
    http: httpx.AsyncClient
    pipeline: FakePipeline
    redis: fakeredis.FakeAsyncRedis

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway


@contextlib.asynccontextmanager
async def running(behaviour: Behaviour = hello_world, **overrides: Any) -> AsyncIterator[Harness]:
    server = fakeredis.FakeServer()
    fields: dict[str, Any] = {"redis_url": "redis://fake", "stream_prefix": "t", "heartbeat_interval_s": 0.05}
    settings = GatewaySettings(**(fields | overrides))
    gateway_transport = StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", GATEWAY_ID)
    pipeline = FakePipeline(
        StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", "fake"), behaviour
    )
    app = create_app(settings, gateway_transport, gateway_id=GATEWAY_ID)
    pipeline_task = asyncio.create_task(pipeline.run())
    redis = fakeredis.FakeAsyncRedis(server=server)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
        ):
            yield Harness(app, http, pipeline, redis)
    finally:
        await cancel_and_wait([pipeline_task], 5.0)
        await pipeline.transport.close()
        await redis.aclose()


def completion_scope(**extensions: Any) -> dict[str, Any]:
    """The ASGI scope of a POST /v1/completions, for tests that drive the app without a server."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "server": ("gw", 80),
        "client": None,
        "root_path": "",
        **({"extensions": extensions} if extensions else {}),
    }


def sse_events(body: str) -> list[Any]:
    """The data payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    assert body.endswith("\n\n")
    payloads = [block.removeprefix("data: ") for block in body.strip().split("\n\n")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]
