"""One request's life in the gateway: publish, wait for events, always clean up.

Every request ends in exactly one of four ways: its final TextDelta, a
RequestFailed, the deadline (504), or its client's eviction for not reading
(slow_clients.py). ``RequestSession.close()`` runs in every case (including
client disconnects, which arrive as task cancellation) and is
synchronous on purpose: a cancelled task cannot await, but it can still
release its registry entry and queue an AbortRequests for the engines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.errors import ApiError, internal, timed_out
from services.gateway.metrics import TokenGaps
from services.gateway.output_buffer import Event, OutputBuffer
from services.gateway.pipeline_client import PipelineClient
from services.gateway.responses import SSE_DONE, CollectedOutput, ResponseBuilder, sse_error, usage_body
from services.gateway.slow_clients import ABORT_CONNECTION
from shared.messages import CompletionRequest, RequestFailed, TextDelta

log = logging.getLogger(__name__)
T = TypeVar("T")
GENERATION_FAILED = "Generation failed in the pipeline."


class ClientDisconnected(Exception):
    pass


class OwnsRequests(Protocol):
    """What an SSEResponse ends: one RequestSession, or the sessions of all choices (fanout.py)."""

    evicted: asyncio.Event

    def close(self) -> None: ...


class RequestSession:
    def __init__(
        self,
        client: PipelineClient,
        request_id: str,
        buffer: OutputBuffer,
        timeout_s: float,
        on_close: Callable[[RequestSession], None] | None = None,
    ) -> None:
        self.client = client
        self.request_id = request_id
        self.buffer = buffer
        self.timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.deadline = self.started + timeout_s
        self.first_event_at: float | None = None
        self.finished = False  # the pipeline has ended the request: nothing to abort
        self.closed = False
        self.final: TextDelta | None = None
        self.completion_tokens = 0
        self.token_gaps = TokenGaps()  # for the inter-token latency (services/gateway/metrics)
        # Set when the client is cut off for not reading (services/gateway/slow_clients.py).
        self.evicted = asyncio.Event()
        self._on_close = on_close

    async def publish(self, request: CompletionRequest) -> None:
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.client.submit(request)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Redis failure is the client's 500, not a crash
            log.error("could not publish %s: %s", self.request_id, exc)
            raise internal("The request could not be queued; try again.") from exc

    async def next_event(self) -> Event:
        """The next event; TimeoutError at the deadline."""
        event = self.buffer.take()
        if event is None:
            async with asyncio.timeout_at(self.deadline):
                event = await self.buffer.get()
        now = asyncio.get_running_loop().time()
        if self.first_event_at is None:
            self.first_event_at = now
        if isinstance(event, RequestFailed):
            self.finished = True
        else:
            self.completion_tokens += len(event.token_ids)
            self.token_gaps.arrived(now, len(event.token_ids))
            if event.finish_reason is not None:
                self.finished = True
                self.final = event
        return event

    def evict(self) -> None:
        """Cut the client off: its response ends (SSEResponse) and the request is aborted."""
        self.evicted.set()
        self.close()

    def timeout_error(self) -> ApiError:
        return timed_out(self.timeout_s)

    def close(self) -> None:
        """Release the registry entry and, unless the request ended, abort it in the pipeline."""
        if self.closed:
            return
        self.closed = True
        self.client.registry.release(self.request_id)
        if not self.finished:
            self.client.abort([self.request_id])
        if self._on_close is not None:
            self._on_close(self)


def failure_of(event: Event) -> ApiError | None:
    """The error an event ends its request with, if any."""
    if isinstance(event, RequestFailed):
        return ApiError.from_failure(event)
    if event.finish_reason == "error":
        return internal(GENERATION_FAILED)
    return None


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


async def collect(session: RequestSession, output: CollectedOutput) -> CollectedOutput:
    """Wait for the whole output (non-streaming); raises ApiError on failure."""
    while True:
        event = await session.next_event()
        if isinstance(event, RequestFailed):
            raise ApiError.from_failure(event)
        if event.finish_reason == "error":
            raise internal(GENERATION_FAILED)
        output.add(event)
        if session.finished:
            return output


async def stream_events(
    session: RequestSession, builder: ResponseBuilder, first: Event, *, last: bool = True
) -> AsyncIterator[bytes]:
    """SSE body; once the stream has begun, errors are SSE error events (each ending in SSE_DONE).

    ``last``: this stream ends the response (its usage chunk and SSE_DONE); one choice of
    several (fanout.py) leaves those to the merged stream."""
    if isinstance(first, TextDelta) and first.prompt_tokens is not None:
        builder.prompt_tokens = first.prompt_tokens  # for the continuous usage of the chunks before it
    if builder.chat:
        yield builder.role_chunk()
    if builder.echo and isinstance(first, TextDelta):
        yield builder.echo_chunk(first)
    event = first
    try:
        while True:
            if isinstance(event, RequestFailed):
                yield sse_error(ApiError.from_failure(event))
                return
            if event.finish_reason == "error":
                yield sse_error(internal(GENERATION_FAILED))
                return
            builder.observe(event)
            if event.text or event.finish_reason or (builder.logprobs and (event.named_logprobs or event.logprobs)):
                yield builder.text_chunk(event.text, event)
            if event.finish_reason is not None:
                if not last:
                    return
                if builder.include_usage:
                    yield builder.usage_chunk(usage_body(event.usage, session.completion_tokens))
                yield SSE_DONE
                return
            event = await session.next_event()
    except TimeoutError:
        yield sse_error(session.timeout_error())


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its session, however the stream ends.

    Relying on the generator's ``finally`` is not enough: if the client goes
    away while the response is blocked in ``send``, the generator is never
    resumed and would only be finalised by the garbage collector. For the same
    reason an evicted session (a client that stopped reading) cannot end the
    stream from inside: the response races the stream against the eviction.
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
        streaming = asyncio.ensure_future(super().__call__(scope, receive, send))
        evicted = asyncio.ensure_future(self.session.evicted.wait())
        try:
            await asyncio.wait({streaming, evicted}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():
                abort_connection = (scope.get("extensions") or {}).get(ABORT_CONNECTION)
                if abort_connection is not None:
                    abort_connection()  # drops what the client never read (slow_clients.py)
                streaming.cancel()
                await asyncio.wait({streaming})
        finally:
            evicted.cancel()
            if not streaming.done():
                streaming.cancel()
            self.session.close()
        if not streaming.cancelled():
            streaming.result()  # the stream's own error, if it had one
