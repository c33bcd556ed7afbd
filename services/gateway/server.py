"""The gateway's HTTP app (Starlette) and its entry point (uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /v1/models/{model}, GET /health, GET /metrics, GET /openapi.json. See docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.gateway import protocol
from services.gateway.admission import BacklogMonitor
from services.gateway.errors import (
    ApiError,
    internal,
    model_not_found,
    overloaded,
    queue_full,
    shutting_down,
    too_large,
    unauthorized,
)
from services.gateway.limits import RequestLimits
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi_document
from services.gateway.output_buffer import Event
from services.gateway.pipeline_client import PipelineClient, cancel_and_wait
from services.gateway.registry import RegistryClosed, RegistryFull, RequestRegistry
from services.gateway.responses import CollectedOutput, ResponseBuilder
from services.gateway.session import (
    ClientDisconnected,
    RequestSession,
    SSEResponse,
    collect,
    failure_of,
    race_disconnect,
    stream_events,
)
from services.gateway.slow_clients import ClientConnections, SlowClientMonitor
from shared.messages import CompletionRequest, Role
from shared.model_files import served_model_name
from shared.runtime import configure_logging
from shared.settings import GatewaySettings, load_settings, new_replica_id
from shared.transport import StreamTransport

log = logging.getLogger("services.gateway")

PIPELINE_ROLES: tuple[Role, ...] = ("tokenizer", "engine", "detokenizer")
HEALTH_TIMEOUT_S = 3.0
# On SIGTERM, running requests get this long to finish before they end with a 503.
DRAIN_S = 8


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Gateway:
    """Route handlers and the state they share."""

    def __init__(self, settings: GatewaySettings, transport: StreamTransport, gateway_id: str) -> None:
        self.settings = settings
        self.transport = transport
        self.registry = RequestRegistry(settings.max_inflight_requests)
        self.backlog = BacklogMonitor(transport, settings.max_queued_requests)
        self.client = PipelineClient(
            transport,
            gateway_id,
            self.registry,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
        )
        self.metrics = GatewayMetrics()
        self.slow_clients = SlowClientMonitor(settings.slow_client_timeout_s)
        self.model_name = served_model_name(settings)
        # The configured model id is accepted too, so clients may use either name.
        self.known_models = {self.model_name, settings.model}
        self.created = int(time.time())
        self._api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.limits = RequestLimits.from_settings(settings)
        self._openapi = openapi_document(self.limits, auth=self._api_key is not None)

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise unauthorized()

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 once it passes the limit (never buffered whole first)."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- generation ------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        endpoint = "chat_completions" if chat else "completions"
        try:
            self._authorize(request)
            raw = await self._read_body(request)
            body: protocol.CompletionBody | protocol.ChatBody = (
                protocol.parse_chat(raw, self.limits) if chat else protocol.parse_completion(raw, self.limits)
            )
            protocol.check_model(body.model, self.known_models)
            response = await self._run(request, body, chat=chat)
        except ApiError as error:
            response = error_response(error)
        except (ClientDisconnected, ClientDisconnect):
            response = Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception:  # noqa: BLE001 - the client gets a JSON 500, never a dropped connection
            log.exception("%s failed", endpoint)
            response = error_response(internal("Internal error in the gateway."))
        self.metrics.request_done(endpoint, response.status_code)
        return response

    async def _run(
        self, request: Request, body: protocol.CompletionBody | protocol.ChatBody, *, chat: bool
    ) -> Response:
        sampling = protocol.sampling_params(body, self.settings.default_max_tokens)
        detokenize = protocol.detokenize_params(body)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if self.backlog.full:
            raise queue_full(self.backlog.queued, self.backlog.limit)
        # Only a streaming handler waits on its client; a non-streaming one takes at once.
        max_buffered = self.settings.max_buffered_bytes_per_request if body.stream else None
        try:
            buffer = self.registry.open(request_id, max_buffered_bytes=max_buffered)
        except RegistryFull:
            raise overloaded(self.settings.max_inflight_requests) from None
        except RegistryClosed:
            raise shutting_down() from None
        timeout_s = self.settings.request_timeout_s
        session = RequestSession(self.client, request_id, buffer, timeout_s, on_close=self._session_closed)
        if body.stream:
            self.slow_clients.watch(request_id, buffer, functools.partial(self._slow_client, session))
        handed_off = False  # once an SSEResponse owns the session, it closes it
        try:
            message = CompletionRequest(
                request_id=request_id,
                gateway_id=self.client.gateway_id,
                deadline=time.time() + timeout_s,
                sampling=sampling,
                detokenize=detokenize,
            )
            echo: str | None = None
            if isinstance(body, protocol.ChatBody):
                message.messages = body.chat_messages()
                message.add_generation_prompt = body.add_generation_prompt is not False
            else:
                message.prompt = body.prompt
                echo = body.prompt if body.echo else None
            builder = ResponseBuilder(
                request_id,
                self.model_name,
                chat=chat,
                logprobs=sampling.logprobs is not None,
                include_usage=body.include_usage,
            )
            if not body.stream:
                output = await race_disconnect(self._whole(session, message, echo, chat), request.receive)
                return JSONResponse(builder.full_response(output), headers={"X-Request-Id": request_id})
            first = await race_disconnect(self._first(session, message), request.receive)
            error = failure_of(first)
            if error is not None:
                raise error
            response = SSEResponse(stream_events(session, builder, first, echo), session)
            handed_off = True
            return response
        except TimeoutError:
            raise session.timeout_error() from None
        finally:
            if not handed_off:
                session.close()

    @staticmethod
    async def _whole(
        session: RequestSession, message: CompletionRequest, echo: str | None, chat: bool
    ) -> CollectedOutput:
        await session.publish(message)
        return await collect(session, CollectedOutput(echo or ""), chat=chat)

    @staticmethod
    async def _first(session: RequestSession, message: CompletionRequest) -> Event:
        await session.publish(message)
        return await session.next_event()

    def _slow_client(self, session: RequestSession, reason: str) -> None:
        """The client stopped reading: cut it off and abort its request (never awaits: may run in dispatch)."""
        if reason == "buffer":
            why = f"more than {self.settings.max_buffered_bytes_per_request} bytes of output waited for it"
        else:
            why = f"its output waited unread for {self.settings.slow_client_timeout_s:g} s"
        log.warning(
            "request %s: the client stopped reading (%s); disconnecting it and aborting the request",
            session.request_id,
            why,
        )
        self.metrics.slow_clients[reason] += 1
        session.evict()

    def _session_closed(self, session: RequestSession) -> None:
        self.slow_clients.unwatch(session.request_id)
        if not session.finished:
            self.metrics.aborted += 1
            return
        final = session.final
        if final is not None:
            prompt = final.usage.prompt_tokens if final.usage else 0
            completion = final.usage.completion_tokens if final.usage else session.completion_tokens
            loop_time = asyncio.get_running_loop().time()
            first = None if session.first_event_at is None else session.first_event_at - session.started
            self.metrics.output_done(prompt, completion, first, loop_time - session.started)

    # -- models, health, metrics ---------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "scalellm",
            "root": self.settings.model,
            "parent": None,
        }

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["model"]
            if name not in self.known_models:
                raise model_not_found(name)
        except ApiError as error:
            return error_response(error)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        alive = {role: 0 for role in PIPELINE_ROLES}
        redis_ok = False
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                redis_ok = await self.transport.ping()
                if redis_ok:
                    found = await asyncio.gather(*(self.transport.live_replicas(r) for r in PIPELINE_ROLES))
                    alive = {role: len(replicas) for role, replicas in zip(PIPELINE_ROLES, found)}
        except TimeoutError:
            redis_ok = False
        missing = [role for role, count in alive.items() if count == 0]
        ready = redis_ok and not missing and not self.registry.closed
        body: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "redis": redis_ok,
            "alive": alive,
            "missing": missing,
            "in_flight": len(self.registry),
        }
        # /health is open even when an API key is set; the id names this host (new_replica_id).
        if self._api_key is None:
            body["gateway_id"] = self.client.gateway_id
        return JSONResponse(body, status_code=200 if ready else 503)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def metrics_text(self, request: Request) -> Response:
        text = self.metrics.render(len(self.registry), self.registry.buffered_bytes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal error"
    # Kept: a 405 must say which methods the route allows (Allow, RFC 9110).
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None
    return error_response(ApiError(status, f"{detail}: {request.method} {request.url.path}", headers=headers))


def create_app(
    settings: GatewaySettings,
    transport: StreamTransport,
    *,
    gateway_id: str | None = None,
    close_transport: bool = True,
) -> Starlette:
    """The ASGI app; its lifespan starts and stops the Redis tasks (and closes ``transport``)."""
    gateway = Gateway(settings, transport, gateway_id or new_replica_id("gateway"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.client.start()
        gateway.backlog.start()
        sweeper = asyncio.create_task(gateway.slow_clients.run(), name="gateway-slow-clients")
        try:
            yield
        finally:
            await cancel_and_wait([sweeper], 1.0)
            await gateway.backlog.stop()
            await gateway.client.stop()
            if close_transport:
                await transport.close()

    routes = [
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.gateway = gateway
    return app


async def _drain_on_exit(server: uvicorn.Server, gateway: Gateway) -> None:
    """On SIGTERM, give running requests DRAIN_S to finish, then end them with a clean 503.

    uvicorn waits for open connections before the lifespan shutdown runs, so
    without this a long stream would be cut off without an error message.
    """
    while not server.should_exit:
        await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    while len(gateway.registry) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    gateway.client.fail_in_flight()


async def serve(settings: GatewaySettings) -> None:
    gateway_id = new_replica_id("gateway")
    transport = StreamTransport(
        settings.require_redis_url(), settings.stream_prefix, gateway_id, maxlen=settings.stream_maxlen
    )
    app = create_app(settings, transport, gateway_id=gateway_id)
    # A slow client's connection is reset, not left to flush, and its kernel buffer is bounded (slow_clients.py).
    outer = ClientConnections(app, send_buffer_bytes=settings.client_send_buffer_bytes)
    config = uvicorn.Config(
        outer,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=DRAIN_S + 2,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    drain = asyncio.create_task(_drain_on_exit(server, app.state.gateway))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        log.info("gateway ready on http://%s:%s (model %s, id %s)", host, port, served_model_name(settings), gateway_id)
    try:
        await task
    finally:
        drain.cancel()


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level, settings.secrets())
    settings.require_redis_url()
    asyncio.run(serve(settings))
