"""One choice's life in the gateway: its pipeline request, its queue, its abort, its figures.

A ``ChoiceSession`` is one request in the pipeline (a response with n choices or a batch of
prompts has one per choice; request_handle.py owns them together). It ends in exactly one of
four ways: its final TextDelta, a RequestFailed, the deadline (504), or its client's eviction
for not reading (slow_clients.py). ``close()`` runs in every case (including client
disconnects, which arrive as task cancellation) and is synchronous on purpose: a cancelled
task cannot await, but it can still release its registry entry, queue an AbortRequests for the
engines, and record its metrics and access-log figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.errors import ApiError, internal, timed_out
from services.gateway.metrics import GatewayMetrics, TokenGaps
from services.gateway.output_buffer import OutputBuffer
from services.gateway.pipeline_client import PipelineClient
from services.gateway.request_context import RequestRecord
from services.gateway.responses import SSE_DONE, CollectedOutput, ResponseBuilder, sse_error, usage_body
from services.gateway.slow_clients import ABORT_CONNECTION, SlowClientMonitor
from shared.messages import CompletionRequest, RequestFailed, TextDelta
from shared.timeline import GATEWAY_FIRST_OUTPUT, GATEWAY_LAST_OUTPUT, GATEWAY_PUBLISHED, GATEWAY_SENT, Timeline, merge

log = logging.getLogger(__name__)
T = TypeVar("T")
GENERATION_FAILED = "Generation failed in the pipeline."


class ClientDisconnected(Exception):
    pass


class OwnsRequests(Protocol):
    """What an SSEResponse ends: a request's handle (request_handle.py)."""

    evicted: asyncio.Event

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session talks to: the pipeline, the metrics, the slow-client monitor."""

    client: PipelineClient
    metrics: GatewayMetrics
    slow_clients: SlowClientMonitor
    timeout_s: float


class ChoiceSession:
    def __init__(
        self,
        services: SessionServices,
        request_id: str,
        buffer: OutputBuffer,
        record: RequestRecord,
        *,
        counts_prompt: bool,
    ) -> None:
        """``record``: the HTTP request's access-log record, which gets this choice's tokens;
        ``counts_prompt``: the first choice of its prompt (the prompt's tokens count once)."""
        self.services = services
        self.request_id = request_id
        self.buffer = buffer
        self.record = record
        self.counts_prompt = counts_prompt
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.deadline = self.started + services.timeout_s
        self.first_event_at: float | None = None
        self.finished = False  # the pipeline has ended the request: nothing to abort
        self.closed = False
        self.final: TextDelta | None = None
        self.completion_tokens = 0
        self.token_gaps = TokenGaps()  # for the inter-token latency (services/gateway/metrics)
        # The hops this choice has passed (shared/timeline.py), the pipeline's as its messages bring them.
        self.timeline: Timeline = {}

    async def publish(self, request: CompletionRequest) -> None:
        request.timeline[GATEWAY_PUBLISHED] = time.time()
        merge(self.timeline, request.timeline)
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.services.client.submit(request)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Redis failure is the client's 500, not a crash
            log.error("could not publish %s: %s", self.request_id, exc)
            raise internal("The request could not be queued; try again.") from exc

    async def next_output(self) -> TextDelta:
        """The next output; ApiError if the pipeline failed the request, TimeoutError at the deadline.

        The one place that decides whether an event ends the request, and how."""
        event = self.buffer.take()
        if event is None:
            async with asyncio.timeout_at(self.deadline):
                event = await self.buffer.get()
        now = asyncio.get_running_loop().time()
        if self.first_event_at is None:
            self.first_event_at = now
            self.timeline[GATEWAY_FIRST_OUTPUT] = time.time()
        if not isinstance(event, RequestFailed):
            merge(self.timeline, event.timeline)
        if isinstance(event, RequestFailed):
            self.finished = True
            raise ApiError.from_failure(event)
        self.completion_tokens += len(event.token_ids)
        self.token_gaps.arrived(now, len(event.token_ids))
        if event.finish_reason is not None:
            self.finished = True
            self.final = event
            self.timeline[GATEWAY_LAST_OUTPUT] = time.time()
        if event.finish_reason == "error":
            raise internal(GENERATION_FAILED)
        return event

    def timeout_error(self) -> ApiError:
        return timed_out(self.services.timeout_s)

    def close(self) -> None:
        """Release the registry entry, abort the request unless it ended, record its figures."""
        if self.closed:
            return
        self.closed = True
        services = self.services
        services.client.registry.release(self.request_id)
        if not self.finished:
            services.client.abort([self.request_id])
        services.slow_clients.unwatch(self.request_id)
        self.timeline.setdefault(GATEWAY_SENT, time.time())  # unless its response said when
        services.metrics.request_closed(self, asyncio.get_running_loop().time())
        self._record_in_access_log()

    def _record_in_access_log(self) -> None:
        """The access log gives the sums over all choices, the prompt once per prompt."""
        record = self.record
        if self.counts_prompt and self.final is not None and self.final.usage:
            record.prompt_tokens = (record.prompt_tokens or 0) + self.final.usage.prompt_tokens
        record.completion_tokens = (record.completion_tokens or 0) + self.completion_tokens
        if self.first_event_at is not None:
            first = record.first_output_at
            record.first_output_at = self.first_event_at if first is None else min(first, self.first_event_at)


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``, or raise ClientDisconnected as soon as the client goes away."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    raise ClientDisconnected()


async def collect(session: ChoiceSession, output: CollectedOutput) -> CollectedOutput:
    """Wait for the whole output (non-streaming); raises ApiError on failure."""
    while not session.finished:
        output.add(await session.next_output())
    return output


async def stream_events(
    session: ChoiceSession, builder: ResponseBuilder, first: TextDelta, *, last: bool = True
) -> AsyncIterator[bytes]:
    """SSE body; once the stream has begun, errors are SSE error events (each ending in SSE_DONE).

    ``last``: this stream ends the response (its usage chunk and SSE_DONE); one choice of
    several (request_handle.py) leaves those to the merged stream."""
    if first.prompt_tokens is not None:
        builder.prompt_tokens = first.prompt_tokens  # for the continuous usage of the chunks before it
    if builder.chat:
        yield builder.role_chunk()
    if builder.echo:
        yield builder.echo_chunk(first)
    event = first
    try:
        while True:
            builder.observe(event)
            if event.text or event.finish_reason or (builder.logprobs and (event.named_logprobs or event.logprobs)):
                chunk = builder.text_chunk(event.text, event)
                if chunk is not None:
                    yield chunk
            if event.finish_reason is not None:
                if not last:
                    return
                if builder.include_usage:
                    yield builder.usage_chunk(usage_body(event.usage, session.completion_tokens))
                yield SSE_DONE
                return
            event = await session.next_output()
    except ApiError as error:
        yield sse_error(error)
    except TimeoutError:
        yield sse_error(session.timeout_error())


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its session, however the stream ends.

    Relying on the generator's ``finally`` is not enough: if the client goes
    away while the response is blocked in ``send``, the generator is never
    resumed and would only be finalised by the garbage collector. For the same
    reason an evicted session (a client that stopped reading) cannot end the
    stream from inside: the response races the stream against the eviction and
    the client's disconnect. It streams by itself rather than through
    StreamingResponse.__call__, whose anyio task group (to hear a disconnect on
    ASGI servers before spec 2.4, uvicorn's included) cost every stream ~0.4 ms
    before its first event here (docs/benchmarks.md, "Pipeline overhead").
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], session: OwnsRequests) -> None:
        # X-Accel-Buffering: a reverse proxy (nginx) must pass each event on at once.
        super().__init__(
            content,
            # X-Request-Id is set on every response by request_context.py.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        evicted = asyncio.ensure_future(self.session.evicted.wait())
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({streaming, evicted, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():
                abort_connection = (scope.get("extensions") or {}).get(ABORT_CONNECTION)
                if evicted.done() and abort_connection is not None:
                    abort_connection()  # drops what the client never read (slow_clients.py)
                streaming.cancel()
                await asyncio.wait({streaming})
        finally:
            evicted.cancel()
            disconnected.cancel()
            if not streaming.done():
                streaming.cancel()
            self.session.close()
        if not streaming.cancelled():
            exc = streaming.exception()
            if isinstance(exc, OSError):  # the client went away mid-send (an ASGI 2.4 server says so)
                raise ClientDisconnect() from exc
            streaming.result()  # the stream's own error, if it had one
