"""Running the choices of one request together (n > 1, batched prompts; choices.py plans them).

Each choice is an ordinary RequestSession; a ``SessionGroup`` owns them all, so that a client
that goes away, is cut off, or times out aborts every one. Non-streaming: the whole response is
each choice's body merged. Streaming: the first event of every choice is awaited before the
response begins, so that a prompt the pipeline refuses fails the whole request with its status
(as vLLM does); then each choice's chunks are relayed as they come, each with its ``index``,
through a queue of a few chunks (so an unread client still fills its sessions' buffers, which
the slow-client monitor watches), ending with one usage chunk for all choices, if asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from services.gateway.choices import Choice, merged_usage, name_prompt
from services.gateway.errors import ApiError, internal
from services.gateway.output_buffer import Event
from services.gateway.responses import SSE_DONE, CollectedOutput, ResponseBuilder, sse_error, usage_body
from services.gateway.session import RequestSession, collect, failure_of, stream_events
from shared.messages import CompletionRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class SessionGroup:
    """The sessions of one request's choices, ended together (an SSEResponse's OwnsRequests)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.sessions: list[RequestSession] = []
        self.evicted = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def evict(self) -> None:
        """The client stopped reading one choice's output: cut it off, abort every choice."""
        self.evicted.set()
        self.close()

    def close(self) -> None:
        """Synchronous, as RequestSession.close: safe from a cancelled task."""
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for session in self.sessions:
            session.close()

    def usage(self, plan: Sequence[Choice]) -> dict[str, int]:
        usages = [
            usage_body(s.final.usage if s.final is not None else None, s.completion_tokens) for s in self.sessions
        ]
        return merged_usage(plan, usages)


async def all_of(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result; on the first failure the others are cancelled and the failure raised."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def collect_all(
    group: SessionGroup,
    plan: Sequence[Choice],
    messages: Sequence[CompletionRequest],
    builders: Sequence[ResponseBuilder],
    batch: bool,
) -> list[CollectedOutput]:
    async def one(
        choice: Choice, session: RequestSession, message: CompletionRequest, builder: ResponseBuilder
    ) -> CollectedOutput:
        try:
            await session.publish(message)
            return await collect(session, builder.collector())
        except ApiError as error:
            raise name_prompt(error, choice, batch) from None

    return await all_of([one(*args) for args in zip(plan, group.sessions, messages, builders, strict=True)])


async def first_events(
    group: SessionGroup, plan: Sequence[Choice], messages: Sequence[CompletionRequest], batch: bool
) -> list[Event]:
    """Publishes every choice and waits for the first event of each; raises the first failure."""
    await all_of([s.publish(m) for s, m in zip(group.sessions, messages, strict=True)])

    async def first(choice: Choice, session: RequestSession) -> Event:
        event = await session.next_event()
        error = failure_of(event)
        if error is not None:  # at once: the other choices are not waited for
            raise name_prompt(error, choice, batch)
        return event

    return await all_of([first(c, s) for c, s in zip(plan, group.sessions, strict=True)])


async def stream_all(
    group: SessionGroup, plan: Sequence[Choice], builders: Sequence[ResponseBuilder], firsts: Sequence[Event]
) -> AsyncIterator[bytes]:
    """The merged SSE body; an error event of any choice ends the whole stream."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=len(plan))

    async def relay(session: RequestSession, builder: ResponseBuilder, first: Event) -> None:
        try:
            async for chunk in stream_events(session, builder, first, last=False):
                await queue.put(chunk)
        except Exception:  # noqa: BLE001 - the client gets an error event, not a hung stream
            log.exception("choice %s of %s failed", builder.index, group.request_id)
            await queue.put(sse_error(internal("Internal error in the gateway.")))
        await queue.put(None)

    for args in zip(group.sessions, builders, firsts, strict=True):
        group.tasks.append(asyncio.ensure_future(relay(*args)))
    running = len(group.tasks)
    try:
        while running:
            chunk = await queue.get()
            if chunk is None:
                running -= 1
                continue
            yield chunk
            if chunk.endswith(SSE_DONE):  # only an error event ends so (stream_events with last=False)
                return
        if builders[0].include_usage:
            yield builders[0].usage_chunk(group.usage(plan))
        yield SSE_DONE
    finally:
        for task in group.tasks:
            task.cancel()
