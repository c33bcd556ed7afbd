"""POST /tokenize and POST /detokenize: vLLM's request and response shapes, answered by a tokenizer.

The gateway has no tokenizer: it validates the body, sends a ``tokenize_request`` or
``detokenize_request`` down ``{p}:requests`` like any completion, and waits for the one
answer on its own responses stream (registry.py's calls). The tokenizer encodes exactly
as it would for a completion, so /tokenize shows what the engine would get.

vLLM leaves these routes open; here they need an API key when keys are set, since each
one costs a tokenizer replica's time and can show the chat template.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic_core import from_json
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.admission import BacklogMonitor
from services.gateway.auth import ApiKeys
from services.gateway.errors import ApiError, bad_request, internal, overloaded, queue_full, shutting_down, timed_out
from services.gateway.http_io import error_response, read_body
from services.gateway.info_routes import ModelContext
from services.gateway.limits import RequestLimits
from services.gateway.pipeline_client import PipelineClient
from services.gateway.protocol import ChatMessageIn, check_continue_final_message, check_model, validation_error
from services.gateway.registry import RegistryClosed, RegistryFull
from services.gateway.request_context import request_record
from services.gateway.to_pipeline import template_kwargs_json
from services.gateway.tools.calls import tools_json
from services.gateway.tools.request import ToolIn
from services.gateway.unknown_fields import TracksUnknownFields, UnknownFieldLog
from shared.messages import DetokenizeRequest, DetokenizeResult, RequestFailed, TokenId, TokenizeRequest, TokenizeResult
from shared.settings import GatewaySettings

log = logging.getLogger("services.gateway")


class _TokenizeBase(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    return_token_strs: bool | None = False


class TokenizeCompletionBody(_TokenizeBase):
    prompt: str
    # As a completion's prompt: special tokens (BOS) added by default.
    add_special_tokens: bool | None = True


class TokenizeChatBody(_TokenizeBase):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    # The chat template writes the special tokens, so none are added by default.
    add_special_tokens: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused: the served model's template only
    tools: list[ToolIn] | None = None  # in the prompt as in a chat completion

    def tools_json(self) -> str | None:
        """The tools as the wire carries them; None without any."""
        return tools_json([t.model_dump(exclude_none=True) for t in self.tools]) if self.tools else None


class DetokenizeBody(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[TokenId]


def parse_tokenize(raw: bytes, limits: RequestLimits) -> TokenizeCompletionBody | TokenizeChatBody:
    """vLLM's two shapes: ``messages`` makes it a chat, else it is a prompt."""
    try:
        # pydantic's parser, as for completions: a bounded nesting depth (json.loads would raise
        # RecursionError on a deeply nested body).
        data = from_json(raw)
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    chat = isinstance(data, dict) and "messages" in data
    try:
        body = TokenizeChatBody.model_validate(data) if chat else TokenizeCompletionBody.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if isinstance(body, TokenizeChatBody):
        limits.check_chat_messages(len(body.messages))
        limits.check_prompt_chars(sum(len(m.content or "") for m in body.messages), "messages")
        check_continue_final_message(body.continue_final_message, body.add_generation_prompt)
        if body.chat_template is not None:
            raise bad_request(
                "chat_template is not supported: the served model's template is used.",
                "chat_template",
                "unsupported_parameter",
            )
        if body.tools:
            limits.check_prompt_chars(len(body.tools_json() or ""), "tools")
    else:
        limits.check_prompt_chars(len(body.prompt), "prompt")
    return body


def parse_detokenize(raw: bytes, limits: RequestLimits) -> DetokenizeBody:
    try:
        body = DetokenizeBody.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    # Decoding costs the tokenizer time per id; a token is at least a character of text.
    limits.check_prompt_chars(len(body.tokens), "tokens")
    return body


class TokenizeRoutes:
    def __init__(
        self,
        settings: GatewaySettings,
        client: PipelineClient,
        backlog: BacklogMonitor,
        *,
        keys: ApiKeys,
        limits: RequestLimits,
        known_models: set[str],
        context: ModelContext,
        unknown_fields: UnknownFieldLog,
    ) -> None:
        self.settings = settings
        self.client = client
        self.backlog = backlog
        self.keys = keys
        self.limits = limits
        self.known_models = known_models
        self.context = context
        self.unknown_fields = unknown_fields

    async def tokenize(self, request: Request) -> Response:
        try:
            self.keys.authorize(request)
            body = parse_tokenize(await read_body(request, self.settings.max_request_bytes), self.limits)
            self.unknown_fields.report("/tokenize", body.unknown_fields())
            check_model(body.model, self.known_models)
            message = TokenizeRequest(
                request_id=request_record(request).pipeline_id("tokn-"),
                gateway_id=self.client.gateway_id,
                deadline=time.time() + self.settings.request_timeout_s,
                return_token_strs=bool(body.return_token_strs),
                add_special_tokens=body.add_special_tokens,
            )
            if isinstance(body, TokenizeChatBody):
                message.messages = [m.to_message() for m in body.messages]
                message.add_generation_prompt = body.add_generation_prompt is not False
                message.continue_final_message = bool(body.continue_final_message)
                message.chat_template_kwargs = template_kwargs_json(body.chat_template_kwargs)
                message.tools = body.tools_json()
            else:
                message.prompt = body.prompt
            answer = await self._call(request, message)
        except ApiError as error:
            return error_response(error)
        if not isinstance(answer, TokenizeResult):
            return error_response(internal("The tokenizer answered with the wrong message."))
        self.context.learn(answer.max_model_len)
        request_record(request).prompt_tokens = len(answer.tokens)
        result: dict[str, Any] = {"count": len(answer.tokens), "max_model_len": answer.max_model_len}
        result["tokens"] = answer.tokens
        result["token_strs"] = answer.token_strs
        return JSONResponse(result)

    async def detokenize(self, request: Request) -> Response:
        try:
            self.keys.authorize(request)
            body = parse_detokenize(await read_body(request, self.settings.max_request_bytes), self.limits)
            self.unknown_fields.report("/detokenize", body.unknown_fields())
            check_model(body.model, self.known_models)
            message = DetokenizeRequest(
                request_id=request_record(request).pipeline_id("tokn-"),
                gateway_id=self.client.gateway_id,
                deadline=time.time() + self.settings.request_timeout_s,
                tokens=body.tokens,
            )
            answer = await self._call(request, message)
        except ApiError as error:
            return error_response(error)
        if not isinstance(answer, DetokenizeResult):
            return error_response(internal("The tokenizer answered with the wrong message."))
        return JSONResponse({"prompt": answer.prompt})

    async def _call(
        self, request: Request, message: TokenizeRequest | DetokenizeRequest
    ) -> TokenizeResult | DetokenizeResult:
        """Send the message to the tokenizers and wait for its answer; raises ApiError."""
        if self.backlog.full:
            raise queue_full(self.backlog.queued, self.backlog.limit)
        registry = self.client.registry
        try:
            answer = registry.open_call(message.request_id)
        except RegistryFull:
            raise overloaded(self.settings.max_inflight_requests) from None
        except RegistryClosed:
            raise shutting_down() from None
        timeout_s = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    await self.client.submit(message)
                except (TimeoutError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a Redis failure is the client's 500, not a crash
                    log.error("could not publish %s: %s", message.request_id, exc)
                    raise internal("The request could not be queued; try again.") from exc
                reply = await answer
        except TimeoutError:
            raise timed_out(timeout_s) from None
        finally:
            registry.release(message.request_id)
        if isinstance(reply, RequestFailed):
            raise ApiError.from_failure(reply)
        return reply
