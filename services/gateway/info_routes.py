"""The routes about the server rather than a generation: models, health, readiness, version.

- ``GET /health``: liveness, the process answers. 200 at once, no Redis, no work: a probe
  that restarts the gateway must not do so because Redis or another stage is down.
- ``GET /ready``: readiness, this gateway can serve: Redis answers, every stage has a live
  replica (heartbeats), and it is not shutting down. 503 with what is missing otherwise.
- ``GET /version``: ``{"version": ...}`` from the installed package's metadata, as vLLM.
- ``GET /v1/models``: the model card, with the context length (``max_model_len``) the
  tokenizers enforce (from their heartbeats) or SCALELLM_MAX_MODEL_LEN.
"""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.auth import ApiKeys
from services.gateway.errors import ApiError, model_not_found
from services.gateway.http_io import error_response
from services.gateway.registry import RequestRegistry
from shared.messages import Role
from shared.transport import StreamTransport

log = logging.getLogger("services.gateway")

PIPELINE_ROLES: tuple[Role, ...] = ("tokenizer", "engine", "detokenizer")
READY_TIMEOUT_S = 3.0
# How long a max_model_len read from the tokenizers' heartbeats is reused.
MODEL_CONTEXT_TTL_S = 10.0


def package_version() -> str:
    try:
        return version("scalellm")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


class ModelContext:
    """The served model's context length for the model card: configured, or what tokenizers report."""

    def __init__(self, transport: StreamTransport, configured: int | None, *, ttl_s: float = MODEL_CONTEXT_TTL_S):
        self._transport = transport
        self._configured = configured
        self._ttl_s = ttl_s
        self._known: int | None = None
        self._read_at: float | None = None

    def learn(self, max_model_len: int) -> None:
        """A tokenizer said so (in a /tokenize answer)."""
        self._known = max_model_len

    async def max_model_len(self) -> int | None:
        if self._configured is not None:
            return self._configured
        now = asyncio.get_running_loop().time()
        if self._read_at is None or now - self._read_at >= self._ttl_s:
            self._read_at = now
            try:
                async with asyncio.timeout(1.0):
                    beats = await self._transport.live_replicas("tokenizer")
            except TimeoutError:
                return self._known  # Redis is slow: the last value, or none
            reported = [beat.max_model_len for beat in beats if beat.max_model_len]
            if reported:
                # Replicas configured differently: the smallest is what every request can rely on.
                self._known = min(reported)
        return self._known


class InfoRoutes:
    def __init__(
        self,
        *,
        transport: StreamTransport,
        registry: RequestRegistry,
        gateway_id: str,
        keys: ApiKeys,
        model_name: str,
        root: str,
        created: int,
        context: ModelContext,
    ) -> None:
        self.transport = transport
        self.registry = registry
        self.gateway_id = gateway_id
        self.keys = keys
        self.model_name = model_name
        self.root = root
        # The configured model id is accepted too, so clients may use either name.
        self.known_models = {model_name, root}
        self.created = created
        self.context = context

    async def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "scalellm",
            "root": self.root,
            "parent": None,
            "max_model_len": await self.context.max_model_len(),
        }

    async def models(self, request: Request) -> Response:
        try:
            self.keys.authorize(request)
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [await self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self.keys.authorize(request)
            name = request.path_params["model"]
            if name not in self.known_models:
                raise model_not_found(name)
        except ApiError as error:
            return error_response(error)
        return JSONResponse(await self._model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": package_version()})

    async def ready(self, request: Request) -> Response:
        alive = {role: 0 for role in PIPELINE_ROLES}
        redis_ok = False
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
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
        # /ready is open even when API keys are set; the id names this host (new_replica_id).
        if not self.keys.enabled:
            body["gateway_id"] = self.gateway_id
        return JSONResponse(body, status_code=200 if ready else 503)
