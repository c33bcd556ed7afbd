"""POST /v1/completions and /v1/chat/completions after parsing: plan, publish, respond.

``Generation.respond`` turns a parsed body into pipeline requests (one per choice), opens a
RequestHandle with a ChoiceSession for each, and answers: a JSON body, or an SSE stream once
every choice has a first output. Everything a request holds is released by the handle, on
every path (the SSEResponse closes it once the stream ends, however it ends).
"""

from __future__ import annotations

import functools
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway import protocol
from services.gateway.admission import BacklogMonitor
from services.gateway.choices import Choice, plan_choices
from services.gateway.errors import overloaded, queue_full, shutting_down, timed_out
from services.gateway.registry import RegistryClosed, RegistryFull
from services.gateway.request_context import RequestRecord, request_record
from services.gateway.request_handle import RequestHandle
from services.gateway.responses import builder_for
from services.gateway.session import ChoiceSession, SessionServices, SSEResponse, race_disconnect
from services.gateway.to_pipeline import pipeline_request
from services.gateway.tools import FORMATS
from shared.settings import GatewaySettings
from shared.timeline import GATEWAY_RECEIVED

log = logging.getLogger("services.gateway")


class Generation:
    def __init__(
        self, settings: GatewaySettings, services: SessionServices, backlog: BacklogMonitor, model_name: str
    ) -> None:
        self.settings = settings
        self.services = services
        self.backlog = backlog
        self.model_name = model_name
        self.tool_format = FORMATS[settings.tool_call_parser]

    async def respond(
        self, request: Request, body: protocol.CompletionBody | protocol.ChatBody, *, chat: bool
    ) -> Response:
        record = request_record(request)
        prefix = "chatcmpl-" if chat else "cmpl-"
        request_id = record.pipeline_id(prefix)  # unique in the pipeline
        prompts = len(body.prompts) if isinstance(body, protocol.CompletionBody) else 1
        plan = plan_choices(request_id, prompts, body.n or 1, body.seed)
        deadline = time.time() + self.settings.request_timeout_s
        messages = [
            pipeline_request(
                body,
                choice.request_id,
                self.services.client.gateway_id,
                deadline,
                self.settings.default_max_tokens,
                prompt_index=choice.prompt_index,
                seed=choice.seed,
                tool_format=self.tool_format,
            )
            for choice in plan
        ]
        for message in messages:
            message.timeline[GATEWAY_RECEIVED] = record.received_at
        if self.backlog.full:
            raise queue_full(self.backlog.queued, self.backlog.limit)
        response_id = prefix + record.request_id  # the body's id: the client's X-Request-Id, when it sent one
        builders = [
            builder_for(body, response_id, self.model_name, message, choice.index, self.tool_format)
            for choice, message in zip(plan, messages)
        ]
        handle = RequestHandle(request_id, plan, messages, builders, batch=prompts > 1)
        handed_off = False  # once an SSEResponse owns the handle, it closes it
        try:
            for choice, builder in zip(plan, builders, strict=True):
                session = self._open(handle, record, choice, stream=bool(body.stream))
                handle.sessions.append(session)
                if body.return_timeline:
                    builder.timeline = session.timeline
            if not body.stream:
                return JSONResponse(await race_disconnect(handle.whole_response(), request.receive))
            firsts = await race_disconnect(handle.first_outputs(), request.receive)
            response = SSEResponse(handle.stream(firsts), handle)
            handed_off = True
            return response
        except TimeoutError:
            raise timed_out(self.settings.request_timeout_s) from None
        finally:
            if not handed_off:
                handle.close()

    def _open(self, handle: RequestHandle, record: RequestRecord, choice: Choice, *, stream: bool) -> ChoiceSession:
        """A choice's session with its registry entry (and, streamed, the slow-client watch)."""
        # Only a streaming handler waits on its client; a non-streaming one takes at once.
        max_buffered = self.settings.max_buffered_bytes_per_request if stream else None
        try:
            buffer = self.services.client.registry.open(choice.request_id, max_buffered_bytes=max_buffered)
        except RegistryFull:
            raise overloaded(self.settings.max_inflight_requests) from None
        except RegistryClosed:
            raise shutting_down() from None
        session = ChoiceSession(self.services, choice.request_id, buffer, record, counts_prompt=choice.sample == 0)
        if stream:
            evict = functools.partial(self._slow_client, handle)
            self.services.slow_clients.watch(choice.request_id, buffer, evict)
        return session

    def _slow_client(self, handle: RequestHandle, reason: str) -> None:
        """The client stopped reading: cut it off and abort its request (never awaits: may run in dispatch)."""
        if reason == "buffer":
            why = f"more than {self.settings.max_buffered_bytes_per_request} bytes of output waited for it"
        else:
            why = f"its output waited unread for {self.settings.slow_client_timeout_s:g} s"
        log.warning(
            "request %s: the client stopped reading (%s); disconnecting it and aborting the request",
            handle.request_id,
            why,
        )
        self.services.metrics.slow_client(reason)
        handle.evict()
