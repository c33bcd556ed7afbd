"""The gateway's OpenAPI document (GET /openapi.json), built from the models that validate requests.

Request bodies are the JSON schemas of protocol.py's models, so the document
cannot drift from what the server accepts; the configured limits (limits.py)
are written into them as maxima, so a schema-driven client (or fuzzer) learns
this server's bounds. Response bodies are described by the small models below;
tests check real responses against them.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel

from services.gateway.info_routes import package_version
from services.gateway.limits import RequestLimits
from services.gateway.protocol import ChatBody, CompletionBody
from services.gateway.request_context import HEADER, MAX_REQUEST_ID_CHARS, SAFE_ID_PATTERN
from services.gateway.tokenize_routes import DetokenizeBody, TokenizeChatBody, TokenizeCompletionBody

REF = "#/components/schemas/{model}"
JSON = "application/json"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body (errors.py)."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    # The context the tokenizers enforce; null while none has reported it (docs/api.md).
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    """GET /health: the process answers."""

    status: Literal["ok"]


class Version(BaseModel):
    version: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class Readiness(BaseModel):
    """GET /ready: whether this gateway can serve, and if not, what is missing."""

    status: Literal["ok", "unavailable"]
    redis: bool
    alive: dict[str, int]
    missing: list[str]
    # Names this gateway's host; left out when an API key is set (docs/api.md).
    gateway_id: str | None = None
    in_flight: int


# Before OpenAPI 3.2 (itemSchema), an event stream's schema describes each event.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "A JSON chunk, an error object, or [DONE] (the last)"}},
    "required": ["data"],
}
_ERRORS = {
    400: "Invalid request: JSON, type, range, a limit, or the tokenizer refused the prompt",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    413: "Request body larger than SCALELLM_MAX_REQUEST_BYTES",
    500: "A stage failed, or the request was dead-lettered",
    503: "Overloaded, queue full, or shutting down (Retry-After)",
    504: "No complete answer within SCALELLM_REQUEST_TIMEOUT_S",
}


def openapi_document(limits: RequestLimits, *, auth: bool) -> dict[str, Any]:
    """``auth``: an API key is configured, so the /v1 routes need a bearer token."""
    schemas: dict[str, Any] = {}
    completion = _component(schemas, CompletionBody, "CompletionRequest")
    chat = _component(schemas, ChatBody, "ChatCompletionRequest")
    _limit_common(completion, limits)
    _limit_common(chat, limits)
    _constrain(completion["properties"]["logprobs"], "integer", maximum=limits.max_logprobs)
    _limit_prompt(completion["properties"]["prompt"], limits.max_prompt_chars, limits.max_batch_prompts)
    _constrain(chat["properties"]["top_logprobs"], "integer", maximum=limits.max_logprobs)
    _constrain(chat["properties"]["messages"], "array", maxItems=limits.max_chat_messages)
    chat["properties"]["messages"]["description"] = (
        f"At most {limits.max_chat_messages} messages (SCALELLM_MAX_CHAT_MESSAGES), with at most "
        f"{limits.max_prompt_chars} characters of content in all (SCALELLM_MAX_PROMPT_CHARS)."
    )
    tokenize_prompt = _component(schemas, TokenizeCompletionBody, "TokenizeCompletionRequest")
    tokenize_chat = _component(schemas, TokenizeChatBody, "TokenizeChatRequest")
    detokenize = _component(schemas, DetokenizeBody, "DetokenizeRequest")
    _constrain(tokenize_prompt["properties"]["prompt"], "string", maxLength=limits.max_prompt_chars)
    _constrain(tokenize_chat["properties"]["messages"], "array", maxItems=limits.max_chat_messages)
    _constrain(detokenize["properties"]["tokens"], "array", maxItems=limits.max_prompt_chars)
    for model, name in (
        (ErrorResponse, "Error"),
        (ModelList, "ModelList"),
        (ModelCard, "ModelCard"),
        (Health, "Health"),
        (Readiness, "Readiness"),
        (Version, "Version"),
        (TokenizeResponse, "TokenizeResponse"),
        (DetokenizeResponse, "DetokenizeResponse"),
    ):
        _component(schemas, model, name)

    security = _security(auth)
    paths = {
        "/v1/completions": {"post": _generation("createCompletion", "CompletionRequest", auth)},
        "/v1/chat/completions": {"post": _generation("createChatCompletion", "ChatCompletionRequest", auth)},
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "responses": {"200": _json("The served model", "ModelList"), **_errors(auth, 401)},
                "security": security,
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json("The model", "ModelCard"), **_errors(auth, 401, 404)},
                "security": security,
            }
        },
        "/tokenize": {
            "post": {
                "operationId": "tokenize",
                "requestBody": _body("TokenizeCompletionRequest", "TokenizeChatRequest"),
                "responses": {
                    "200": _json("The prompt's token ids", "TokenizeResponse"),
                    **_errors(auth, 400, 401, 404, 413, 500, 503, 504),
                },
                "security": security,
            }
        },
        "/detokenize": {
            "post": {
                "operationId": "detokenize",
                "requestBody": _body("DetokenizeRequest"),
                "responses": {
                    "200": _json("The token ids' text", "DetokenizeResponse"),
                    **_errors(auth, 400, 401, 404, 413, 500, 503, 504),
                },
                "security": security,
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "responses": {"200": _json("The process answers (liveness; nothing else is checked)", "Health")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "responses": {
                    "200": _json("Redis answers and every stage has a live replica", "Readiness"),
                    "503": _json("Not ready: the body says what is missing", "Readiness"),
                },
            }
        },
        "/version": {
            "get": {
                "operationId": "version",
                "responses": {"200": _json("The server's version", "Version")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text", "content": {"text/plain": {}}}},
            }
        },
    }
    _with_request_ids(paths)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "scalellm gateway",
            "version": package_version(),
            "description": "OpenAI-compatible; docs/api.md",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return document


def _with_request_ids(paths: dict[str, Any]) -> None:
    """Every route takes a client's X-Request-Id and answers with the id used (request_context.py)."""
    header = {
        "name": HEADER,
        "in": "header",
        "required": False,
        # Any value is accepted (an unsafe one is replaced, never refused), so the rule is in words,
        # not a schema constraint that a client or fuzzer would expect a 400 from.
        "description": (
            f"The request's id: reused when it matches {SAFE_ID_PATTERN} (at most {MAX_REQUEST_ID_CHARS} "
            "characters), else replaced by a fresh one; the response's X-Request-Id is the id used"
        ),
        "schema": {"type": "string"},
    }
    echoed = {HEADER: {"description": "The id this request was given", "schema": {"type": "string"}}}
    for operations in paths.values():
        for operation in operations.values():
            operation.setdefault("parameters", []).append(header)
            for response in operation["responses"].values():
                response.setdefault("headers", {}).update(echoed)


def _component(schemas: dict[str, Any], model: type[BaseModel], name: str) -> dict[str, Any]:
    """Adds the model (and the models it nests) to ``schemas``; returns its own schema to adjust."""
    # Deep-copied: the shapes declared with WithJsonSchema are module constants of protocol.py.
    schema = copy.deepcopy(model.model_json_schema(ref_template=REF))
    schemas.update(schema.pop("$defs", {}))
    schema["title"] = name
    schemas[name] = schema
    return schema


def _limit_common(schema: dict[str, Any], limits: RequestLimits) -> None:
    properties = schema["properties"]
    _constrain(properties["n"], "integer", maximum=limits.max_n)
    _constrain(properties["top_k"], "integer", maximum=limits.max_top_k)
    _constrain(properties["prompt_logprobs"], "integer", maximum=limits.max_logprobs)
    _constrain(properties["stop"], "string", maxLength=limits.max_stop_string_chars)
    _constrain(properties["stop"], "array", maxItems=limits.max_stop_strings)
    _constrain(properties["stop_token_ids"], "array", maxItems=limits.max_stop_token_ids)
    for branch in properties["stop"]["anyOf"]:
        if branch.get("type") == "array":
            branch["items"]["maxLength"] = limits.max_stop_string_chars


def _limit_prompt(schema: dict[str, Any], max_chars: int, max_prompts: int) -> None:
    _constrain(schema, "string", maxLength=max_chars)
    for branch in schema["anyOf"]:
        items = branch.get("items", {})
        if items.get("type") == "string":
            items["maxLength"] = max_chars
        if items.get("type") in ("string", "array"):  # a batch of prompts
            branch["maxItems"] = max_prompts


def _constrain(schema: dict[str, Any], json_type: str, **constraints: int) -> None:
    """Adds constraints to the schema, or to its ``anyOf`` branches of that type (``X | None`` fields)."""
    branches = schema.get("anyOf", [schema])
    matched = [branch for branch in branches if branch.get("type") == json_type]
    if not matched:
        raise ValueError(f"no {json_type} branch in {schema}")  # a model changed: fail at start-up, not silently
    for branch in matched:
        branch.update(constraints)


def _body(*models: str) -> dict[str, Any]:
    refs = [{"$ref": REF.format(model=model)} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"required": True, "content": {JSON: {"schema": schema}}}


def _generation(operation_id: str, request: str, auth: bool) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "requestBody": _body(request),
        "responses": {
            "200": {
                "description": "The completion: a JSON body, or Server-Sent Events when stream is true",
                "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {"schema": _SSE_EVENT}},
            },
            **_errors(auth, 400, 401, 404, 413, 500, 503, 504),
        },
        "security": _security(auth),
    }


def _security(auth: bool) -> list[dict[str, list[str]]]:
    return [{"bearerAuth": []}] if auth else []


def _errors(auth: bool, *statuses: int) -> dict[str, Any]:
    return {str(status): _json(_ERRORS[status], "Error") for status in statuses if auth or status != 401}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": REF.format(model=schema)}}}}
