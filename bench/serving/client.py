"""The HTTP part: one streaming request to an OpenAI-compatible server, timed (httpx).

``build_body`` and ``StreamReader`` are plain (tested without a server); ``send_request``
only moves bytes and reads the clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from bench.serving.datasets import RequestSpec
from bench.serving.metrics import RequestResult

EndpointType = Literal["completions", "chat"]
DEFAULT_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Endpoint:
    endpoint_type: EndpointType
    model: str
    path: str = ""  # default: /v1/completions or /v1/chat/completions
    ignore_eos: bool = True  # vLLM's ignore_eos and min_tokens, so every request makes exactly max_tokens
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return self.path or DEFAULT_PATHS[self.endpoint_type]


def build_body(endpoint: Endpoint, spec: RequestSpec) -> dict[str, Any]:
    """The request body: streaming, usage in the last chunk, greedy; extra_body last (it wins)."""
    body: dict[str, Any] = {"model": endpoint.model}
    if endpoint.endpoint_type == "chat":
        if not isinstance(spec.prompt, str):
            raise ValueError("chat requests need text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body.update(
        {
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    if endpoint.ignore_eos:
        body.update({"ignore_eos": True, "min_tokens": spec.output_len})
    body.update(endpoint.extra_body)
    return body


@dataclass
class StreamEvent:
    text: str = ""  # output text in this event (completions: text; chat: content or reasoning)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str = ""
    done: bool = False


class StreamReader:
    """Server-sent events, one line at a time, as OpenAI-compatible servers send them."""

    def __init__(self, endpoint_type: EndpointType) -> None:
        self.endpoint_type = endpoint_type

    def read(self, line: str) -> StreamEvent | None:
        """The event on this line, or None for blank lines, comments and other fields."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return StreamEvent(done=True)
        if not data:
            return None
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return StreamEvent(error=f"not JSON in the stream: {data[:120]!r}")
        if not isinstance(chunk, dict):
            return StreamEvent(error=f"not a JSON object in the stream: {data[:120]!r}")
        event = StreamEvent()
        if chunk.get("error"):
            error = chunk["error"]
            event.error = str(error.get("message", error)) if isinstance(error, dict) else str(error)
            return event
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            event.prompt_tokens = usage.get("prompt_tokens")
            event.completion_tokens = usage.get("completion_tokens")
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if self.endpoint_type == "chat":
                delta = choice.get("delta") or {}
                event.text = (delta.get("content") or "") + (
                    delta.get("reasoning_content") or delta.get("reasoning") or ""
                )
            else:
                event.text = choice.get("text") or ""
        return event


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, spec: RequestSpec, started_s: float = 0.0
) -> RequestResult:
    """One streaming request; failures are results with ok false and the error, never exceptions.

    A keep-alive connection the server closed while it idled (uvicorn after 5 s) fails the
    request before any response: that one is sent again once, on a new connection, as
    browsers and vLLM's client (aiohttp) do. Its time counts from the first try.
    """
    start = time.perf_counter()
    result, send_again = await _send_once(client, endpoint, spec, started_s, start)
    if send_again:
        result, _ = await _send_once(client, endpoint, spec, started_s, start)
    return result


async def _send_once(
    client: httpx.AsyncClient, endpoint: Endpoint, spec: RequestSpec, started_s: float, start: float
) -> tuple[RequestResult, bool]:
    """The result, and whether the server closed the connection before any response (send again)."""
    result = RequestResult(prompt_len=spec.prompt_len, started_s=started_s)
    reader = StreamReader(endpoint.endpoint_type)
    texts: list[str] = []
    last = start
    responded = False
    try:
        async with client.stream("POST", endpoint.url_path, json=build_body(endpoint, spec)) as response:
            responded = True
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result, False
            async for line in response.aiter_lines():
                event = reader.read(line)
                if event is None:
                    continue
                if event.error:
                    result.error = f"error in the stream: {event.error}"
                    return result, False
                if event.completion_tokens is not None:
                    result.output_tokens = event.completion_tokens
                if event.prompt_tokens is not None:
                    result.prompt_tokens = event.prompt_tokens
                if event.text:
                    now = time.perf_counter()
                    if result.chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.chunks += 1
                    texts.append(event.text)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result, isinstance(exc, httpx.RemoteProtocolError) and not responded
    result.latency_s = time.perf_counter() - start
    result.text = "".join(texts)
    if result.chunks == 0:
        result.error = "the stream ended without any output text"
        return result, False
    result.ok = True
    return result, False


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:200]
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:200]
        if isinstance(error, str):
            return error[:200]
    return body.strip()[:200]


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model GET /v1/models lists (vLLM's default when --model is not given)."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return str(models[0]["id"])
