"""Every HTTP request's id and its access-log line, for every response the gateway sends.

``RequestContextMiddleware`` wraps the whole app, so errors that never reach a handler (a
404 route, a 405, a 413, a CORS preflight) carry the id too:

- A client's ``X-Request-Id`` becomes the request's id when it is safe to reuse: at most
  ``MAX_REQUEST_ID_CHARS`` characters of ``[A-Za-z0-9._:-]``. The id ends up in log lines, in
  Redis key names and in response bodies, so anything else is replaced by a fresh one (as
  vLLM, which otherwise takes the header as it is). The response's ``X-Request-Id`` is the id
  used.
- One line per request on the logger ``scalellm.access`` (logfmt, so it is greppable and
  parseable): id, method, path, status, tokens, time to first token and latency. Handlers
  add what only they know (tokens, first output) to the ``RequestRecord`` in the scope.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import internal

log = logging.getLogger("services.gateway")
access_log = logging.getLogger("scalellm.access")

HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
SAFE_ID_PATTERN = rf"^[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID_CHARS}}}$"
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
SCOPE_KEY = "scalellm.request"


def client_request_id(value: str | None) -> str | None:
    """The client's id if it may be used as it is, else None."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(slots=True)
class RequestRecord:
    """What the access log says of one request; handlers fill in the token counts and first output."""

    request_id: str
    from_client: bool  # the client chose the id (so it may not be unique)
    method: str
    path: str
    started: float  # event-loop time
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_output_at: float | None = None  # event-loop time of the first output from the pipeline
    extra: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)  # wall clock: the timeline's first hop

    def pipeline_id(self, prefix: str) -> str:
        """A unique id for the pipeline (Redis keys, aborts): a client's id may be reused, or sent to
        two gateways at once, so it gets a random suffix; the response body shows ``prefix + id``."""
        if self.from_client:
            return f"{prefix}{self.request_id}-{uuid.uuid4().hex[:12]}"
        return f"{prefix}{self.request_id}"

    def fields(self, now: float) -> dict[str, Any]:
        ttft = None if self.first_output_at is None else self.first_output_at - self.started
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "latency_ms": round((now - self.started) * 1000, 1),
            **self.extra,
        }


def logfmt(fields: dict[str, Any]) -> str:
    """``key=value`` pairs, None as ``-``; a value with a space, quote, ``=`` or anything unprintable is
    a JSON string, so a client's path can never forge another field or line."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isascii() or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def request_record(connection: HTTPConnection) -> RequestRecord:
    """The request's record (set by the middleware; a stand-in if the app runs without it)."""
    record = connection.scope.get(SCOPE_KEY)
    if isinstance(record, RequestRecord):
        return record
    record = RequestRecord(new_request_id(), False, connection.scope.get("method", ""), connection.url.path, 0.0)
    connection.scope[SCOPE_KEY] = record
    return record


class RequestContextMiddleware:
    """Pure ASGI (a BaseHTTPMiddleware would buffer streams): sets the id, echoes it, logs the line."""

    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        given = client_request_id(Headers(scope=scope).get(HEADER))
        record = RequestRecord(
            request_id=given or new_request_id(),
            from_client=given is not None,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            started=loop.time(),
        )
        scope[SCOPE_KEY] = record
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers[HEADER] = record.request_id  # replaces any a handler set
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Handlers answer their own errors; this is the backstop, so that even a bug's 500
            # carries the id (Starlette's own would answer without it).
            log.exception("request %s: unhandled error", record.request_id)
            if started:
                raise
            error = internal("Internal error in the gateway.")
            await _send_json(send_with_id, error.status, error.body())
        finally:
            if self.access_log_enabled:
                fields = record.fields(loop.time())
                access_log.info(logfmt(fields), extra={"access": fields})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
