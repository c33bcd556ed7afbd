"""One generation request's handle: the sessions of all its choices, ended together.

A request becomes one pipeline request per choice (choices.py plans them: one for n=1 and a
single prompt, ``prompts * n`` otherwise), each an ordinary ChoiceSession. The handle owns them
all, so that a client that goes away, is cut off for not reading, or times out aborts every
one. Not streamed, the response is each choice's body merged. Streamed, the first output of
every choice is awaited before the response begins, so that a prompt the pipeline refuses fails
the whole request with its status (as vLLM does); then each choice's chunks are relayed as they
come, each with its ``index``, through a queue of a few chunks (so an unread client still fills
its sessions' buffers, which the slow-client monitor watches), ending with one usage chunk for
all choices, if asked. A single choice streams straight from its session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from services.gateway.choices import Choice, merged_response, merged_usage, name_prompt
from services.gateway.errors import ApiError, internal
from services.gateway.responses import SSE_DONE, ResponseBuilder, sse_error, usage_body
from services.gateway.session import ChoiceSession, collect, stream_events
from shared.messages import CompletionRequest, TextDelta

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestHandle:
    """The choices of one request: their plan, pipeline messages, response builders and sessions
    (in the same order); an SSEResponse's OwnsRequests."""

    def __init__(
        self,
        request_id: str,
        plan: Sequence[Choice],
        messages: Sequence[CompletionRequest],
        builders: Sequence[ResponseBuilder],
        *,
        batch: bool,
    ) -> None:
        self.request_id = request_id
        self.plan = plan
        self.messages = messages
        self.builders = builders
        self.batch = batch  # several prompts: an error names the prompt
        self.sessions: list[ChoiceSession] = []  # opened by the caller, one per choice
        self.evicted = asyncio.Event()
        self._relays: list[asyncio.Task[None]] = []

    def evict(self) -> None:
        """The client stopped reading some choice's output: cut it off, abort every choice."""
        self.evicted.set()
        self.close()

    def close(self) -> None:
        """Synchronous, as ChoiceSession.close: safe from a cancelled task."""
        for task in self._relays:
            task.cancel()
        for session in self.sessions:
            session.close()

    async def whole_response(self) -> dict[str, Any]:
        """Publish every choice and wait for all of them (not streamed): the response body."""

        async def one(
            choice: Choice, session: ChoiceSession, message: CompletionRequest, builder: ResponseBuilder
        ) -> dict[str, Any]:
            try:
                await session.publish(message)
                return builder.full_response(await collect(session, builder.collector()))
            except ApiError as error:
                raise name_prompt(error, choice, self.batch) from None

        bodies = await _all_of(
            [one(*args) for args in zip(self.plan, self.sessions, self.messages, self.builders, strict=True)]
        )
        return bodies[0] if len(bodies) == 1 else merged_response(self.plan, bodies)

    async def first_outputs(self) -> list[TextDelta]:
        """Publish every choice and wait for the first output of each; raises the first failure."""
        await _all_of([s.publish(m) for s, m in zip(self.sessions, self.messages, strict=True)])

        async def first(choice: Choice, session: ChoiceSession) -> TextDelta:
            try:
                return await session.next_output()
            except ApiError as error:  # at once: the other choices are not waited for
                raise name_prompt(error, choice, self.batch) from None

        return await _all_of([first(c, s) for c, s in zip(self.plan, self.sessions, strict=True)])

    def stream(self, firsts: Sequence[TextDelta]) -> AsyncIterator[bytes]:
        """The SSE body, from each choice's first output (first_outputs)."""
        if len(self.sessions) == 1:
            return stream_events(self.sessions[0], self.builders[0], firsts[0])
        return self._merged_stream(firsts)

    async def _merged_stream(self, firsts: Sequence[TextDelta]) -> AsyncIterator[bytes]:
        """Every choice's chunks as they come; an error event of any choice ends the whole stream."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=len(self.plan))

        async def relay(session: ChoiceSession, builder: ResponseBuilder, first: TextDelta) -> None:
            try:
                async for chunk in stream_events(session, builder, first, last=False):
                    await queue.put(chunk)
            except Exception:  # noqa: BLE001 - the client gets an error event, not a hung stream
                log.exception("choice %s of %s failed", builder.index, self.request_id)
                await queue.put(sse_error(internal("Internal error in the gateway.")))
            await queue.put(None)

        for args in zip(self.sessions, self.builders, firsts, strict=True):
            self._relays.append(asyncio.ensure_future(relay(*args)))
        running = len(self._relays)
        try:
            while running:
                chunk = await queue.get()
                if chunk is None:
                    running -= 1
                    continue
                yield chunk
                if chunk.endswith(SSE_DONE):  # only an error event ends so (stream_events with last=False)
                    return
            if self.builders[0].include_usage:
                yield self.builders[0].usage_chunk(self._usage())
            yield SSE_DONE
        finally:
            for task in self._relays:
                task.cancel()

    def _usage(self) -> dict[str, int]:
        usages = [
            usage_body(s.final.usage if s.final is not None else None, s.completion_tokens) for s in self.sessions
        ]
        return merged_usage(self.plan, usages)


async def _all_of(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result; on the first failure the others are cancelled and the failure raised."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
