"""The gateway's HTTP app (Starlette) and its entry point (uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (here; generation.py answers
them once parsed), GET /v1/models,
GET /v1/models/{model}, GET /health, GET /ready, GET /version (info_routes.py),
POST /tokenize, POST /detokenize (tokenize_routes.py), GET /metrics, GET /openapi.json.
Every response carries X-Request-Id and gets an access-log line (request_context.py);
CORS is Starlette's middleware, when configured. See docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway import protocol
from services.gateway.admission import BacklogMonitor
from services.gateway.auth import ApiKeys
from services.gateway.errors import ApiError, internal
from services.gateway.generation import Generation
from services.gateway.http_io import error_response, http_error, read_body
from services.gateway.info_routes import InfoRoutes, ModelContext
from services.gateway.limits import RequestLimits
from services.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi_document
from services.gateway.pipeline_client import PipelineClient, cancel_and_wait
from services.gateway.registry import RequestRegistry
from services.gateway.request_context import RequestContextMiddleware
from services.gateway.session import ClientDisconnected, SessionServices
from services.gateway.slow_clients import ClientConnections, SlowClientMonitor
from services.gateway.tokenize_routes import TokenizeRoutes
from services.gateway.unknown_fields import UnknownFieldLog
from shared.model_files import served_model_name
from shared.runtime import configure_logging
from shared.settings import GatewaySettings, load_settings, new_replica_id, split_list
from shared.transport import StreamTransport

log = logging.getLogger("services.gateway")

# On SIGTERM, running requests get this long to finish before they end with a 503.
DRAIN_S = 8


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
        self.metrics = GatewayMetrics(
            served_model_name(settings), transport, detokenizer_shards=settings.detokenizer_shards
        )
        self.slow_clients = SlowClientMonitor(settings.slow_client_timeout_s)
        self.model_name = served_model_name(settings)
        services = SessionServices(self.client, self.metrics, self.slow_clients, settings.request_timeout_s)
        self.generation = Generation(settings, services, self.backlog, self.model_name)
        self.keys = ApiKeys.from_settings(settings)
        self.limits = RequestLimits.from_settings(settings)
        self.unknown_fields = UnknownFieldLog()
        self._openapi = openapi_document(self.limits, auth=self.keys.enabled)
        context = ModelContext(transport, settings.max_model_len)
        self.info = InfoRoutes(
            transport=transport,
            registry=self.registry,
            gateway_id=gateway_id,
            keys=self.keys,
            model_name=self.model_name,
            root=settings.model,
            created=int(time.time()),
            context=context,
        )
        self.known_models = self.info.known_models
        self.tokenize = TokenizeRoutes(
            settings,
            self.client,
            self.backlog,
            keys=self.keys,
            limits=self.limits,
            known_models=self.known_models,
            context=context,
            unknown_fields=self.unknown_fields,
        )

    # -- generation ------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        endpoint = "chat_completions" if chat else "completions"
        try:
            self.keys.authorize(request)
            raw = await read_body(request, self.settings.max_request_bytes)
            body: protocol.CompletionBody | protocol.ChatBody = (
                protocol.parse_chat(raw, self.limits) if chat else protocol.parse_completion(raw, self.limits)
            )
            self.unknown_fields.report(request.url.path, body.unknown_fields())
            protocol.check_model(body.model, self.known_models)
            response = await self.generation.respond(request, body, chat=chat)
        except ApiError as error:
            response = error_response(error)
        except (ClientDisconnected, ClientDisconnect):
            response = Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception:  # noqa: BLE001 - the client gets a JSON 500, never a dropped connection
            log.exception("%s failed", endpoint)
            response = error_response(internal("Internal error in the gateway."))
        self.metrics.request_done(endpoint, response.status_code)
        return response

    # -- openapi, metrics -----------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def metrics_text(self, request: Request) -> Response:
        body = await self.metrics.scrape(len(self.registry), self.registry.buffered_bytes())
        return Response(body, media_type=METRICS_CONTENT_TYPE)


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
        Route("/v1/models", gateway.info.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.info.model, methods=["GET"]),
        Route("/tokenize", gateway.tokenize.tokenize, methods=["POST"]),
        Route("/detokenize", gateway.tokenize.detokenize, methods=["POST"]),
        Route("/health", gateway.info.health, methods=["GET"]),
        Route("/ready", gateway.info.ready, methods=["GET"]),
        Route("/version", gateway.info.version, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=middleware(settings),
    )
    app.state.gateway = gateway
    return app


def middleware(settings: GatewaySettings) -> list[Middleware]:
    """Outermost first: the request id and access log see every response, CORS preflights included."""
    stack = [Middleware(RequestContextMiddleware, access_log_enabled=settings.access_log)]
    if settings.cors_allow_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=split_list(settings.cors_allow_origins),
                allow_methods=split_list(settings.cors_allow_methods),
                allow_headers=split_list(settings.cors_allow_headers),
                allow_credentials=settings.cors_allow_credentials,
                expose_headers=["X-Request-Id"],  # so that browser code can read it
            )
        )
    return stack


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
