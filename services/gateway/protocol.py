"""OpenAI request bodies: parsing, validation and conversion to pipeline parameters.

Pure logic (no I/O). Every problem becomes an ``ApiError`` with status 400 and
``param`` naming the offending field (``messages[1].content``), like OpenAI.
Types are strict, as OpenAI's own API is: ``"0.5"`` is not a number and
``1.0`` is not an integer. Unknown fields are ignored, as vLLM does, so that
clients sending newer or vendor-specific options keep working; each model
notes them, and the server logs each name once (unknown_fields.py).

The models check what follows from the protocol: types, ranges, and that every
integer fits the 64 bits msgpack carries (a larger one could not be published,
and would fail the whole batch it was coalesced into). Policy bounds (how many
stop strings, how long a prompt) are settings, checked by limits.py. The JSON
schemas of these models are the request bodies of /openapi.json (openapi.py),
so fields validated by hand declare their accepted shapes with WithJsonSchema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, WithJsonSchema, field_validator

from services.gateway.errors import ApiError, bad_request, model_not_found
from services.gateway.limits import RequestLimits
from services.gateway.tools.calls import ToolUse
from services.gateway.tools.request import TOOL_CHOICE_SCHEMA, ToolCallIn, ToolIn, tool_use
from services.gateway.unknown_fields import TracksUnknownFields
from shared.messages import MAX_TOKEN_ID, ChatMessage, StructuredOutputs, TokenId

MAX_INT64 = 2**63 - 1
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
DEFAULT_LIMITS = RequestLimits.defaults()

Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what msgpack carries
Count = Annotated[int, Field(ge=0, le=MAX_INT64)]
PositiveCount = Annotated[int, Field(ge=1, le=MAX_INT64)]

_TOKEN_IDS_SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    "minItems": 1,
}
# What _check_prompt accepts: text, token ids, a batch of texts, a batch of lists of token ids.
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _TOKEN_IDS_SCHEMA,
        {"type": "array", "items": _TOKEN_IDS_SCHEMA, "minItems": 1},
    ]
}
STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}},
        {"type": "null"},
    ]
}
CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
        {"type": "null"},
    ]
}


class StreamOptions(TracksUnknownFields):
    """OpenAI's, with vLLM's continuous_usage_stats: usage in every chunk (with include_usage)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Body(TracksUnknownFields):
    """Fields shared by /v1/completions and /v1/chat/completions.

    ``None`` (JSON null) means "the default" everywhere, because OpenAI clients
    send explicit nulls for options the user did not set.
    """

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: PositiveCount | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT64)] | None = None  # -1 and 0: no limit
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Seed | None = None
    stop: Annotated[Any, WithJsonSchema(STOP_SCHEMA)] = None  # str | list[str]; checked below for a clear message
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = False
    min_tokens: Count | None = 0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    n: PositiveCount | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    # Special tokens (BOS) on top of the text; null: text yes, chat no (the template writes them).
    add_special_tokens: bool | None = None
    user: Any = None  # accepted and ignored
    logit_bias: dict[str, float] | None = None
    # vLLM's: the logprob of every prompt token after the first, with this many alternatives each
    # (bounded by limits.max_logprobs); not with stream, as in vLLM.
    prompt_logprobs: Count | None = None
    # vLLM's: logprobs name tokens "token_id:<id>" instead of by their text.
    return_tokens_as_token_ids: bool | None = False
    # Ours: each choice's stage timeline in the response (shared/timeline.py, docs/api.md).
    return_timeline: bool | None = False
    # Structured outputs (issue 10): OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* fields; at most one constraint in all (structured_output()).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None  # a JSON schema: an object, or its text
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_output(self) -> StructuredOutputs | None:
        """The one output constraint of the request, or None; raises ApiError for more than one or a
        malformed one. Whether it compiles is the tokenizer stage's check (a 400 from there)."""
        found: list[StructuredOutputs] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(StructuredOutputs(json_object=True, param="response_format"))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise bad_request(
                        "response_format.json_schema.schema must be a JSON schema (an object).",
                        "response_format.json_schema.schema",
                    )
                found.append(StructuredOutputs(json=json.dumps(spec["schema"]), param="response_format.json_schema"))
            elif kind != "text":
                raise bad_request(
                    "response_format type must be 'text', 'json_object' or 'json_schema'.", "response_format.type"
                )
        so = self.structured_outputs or {}
        sources: list[tuple[str, str, Any]] = [
            (key, f"structured_outputs.{key}", so.get(key)) for key in ("json", "regex", "choice", "grammar")
        ]
        if so.get("json_object"):
            found.append(StructuredOutputs(json_object=True, param="structured_outputs.json_object"))
        sources += [
            ("json", "guided_json", self.guided_json),
            ("regex", "guided_regex", self.guided_regex),
            ("choice", "guided_choice", self.guided_choice),
            ("grammar", "guided_grammar", self.guided_grammar),
        ]
        for key, param, value in sources:
            if value is None:
                continue
            if key == "json":
                if isinstance(value, str):
                    value = _json_text(value, param)
                elif isinstance(value, dict):
                    value = json.dumps(value)
                else:
                    raise bad_request(f"{param} must be a JSON schema (an object).", param)
            elif key == "choice":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                    raise bad_request(f"{param} must be a non-empty list of strings.", param)
            elif not isinstance(value, str):
                raise bad_request(f"{param} must be a string.", param)
            found.append(StructuredOutputs.model_validate({key: value, "param": param}))
        if len(found) > 1:
            names = ", ".join(c.param or "" for c in found)
            raise bad_request(
                f"Give at most one output constraint; this request has {len(found)}: {names}.", found[1].param
            )
        return found[0] if found else None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> str | list[str] | None:
        # Kept as sent: a limit's error names "stop" for one string, "stop[i]" for a list's item.
        if value is None:
            return None
        strings: list[str] = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in strings):
            raise ValueError("stop strings must not be empty")
        return strings[0] if isinstance(value, str) else strings

    @property
    def stop_strings(self) -> list[str]:
        if isinstance(self.stop, str):
            return [self.stop]
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk: vLLM's continuous_usage_stats, which needs include_usage."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Alternatives per token for SamplingParams.logprobs; None: no logprobs."""
        return None

    def requested_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token for SamplingParams.prompt_logprobs; None: no prompt logprobs."""
        return self.prompt_logprobs

    def check(self, limits: RequestLimits) -> None:
        """The limits, then cross-field rules; raises ApiError."""
        limits.check_n(self.n or 1)
        limits.check_stop(self.stop_strings, single=isinstance(self.stop, str))
        limits.check_stop_token_ids(len(self.stop_token_ids or ()))
        if self.top_k is not None:
            limits.check_top_k(self.top_k)
        if self.prompt_logprobs is not None:
            limits.check_logprobs(self.prompt_logprobs, "prompt_logprobs")
            if self.stream:
                raise bad_request("prompt_logprobs are not available when stream is true.", "prompt_logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server.", "logit_bias", "unsupported_parameter")
        self.structured_output()


class CompletionBody(_Body):
    """POST /v1/completions."""

    # str | [str, ...] | [int, ...] | [[int, ...], ...]; a batch of one is unwrapped.
    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)]
    # 0 only with echo: the prompt alone comes back (with its logprobs: how a text is scored).
    max_tokens: Count | None = None
    echo: bool | None = False
    logprobs: Count | None = None  # bounded by limits.max_logprobs
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> str | list[int] | list[str] | list[list[int]]:
        # A batch of one (a text, or a list of token ids) is unwrapped, so that it is an ordinary
        # request; anything else in a one-item list is checked as a batch below.
        if isinstance(value, list) and len(value) == 1:
            inner = value[0]
            if isinstance(inner, str) or (isinstance(inner, list) and inner and _token_ids(inner)):
                value = inner
        if isinstance(value, str):
            if not value:
                raise ValueError("the prompt must not be empty")
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if not value:
            raise ValueError("the prompt must not be empty")
        if all(isinstance(v, str) for v in value):
            for index, text in enumerate(value):
                if not text:
                    raise ValueError(f"prompt {index} of the batch is empty")
            return value
        if all(isinstance(v, list) for v in value):
            for index, ids in enumerate(value):
                if not ids or not _token_ids(ids):
                    raise ValueError(f"prompt {index} of the batch must be a non-empty list of token ids")
            return value
        if not _token_ids(value):
            raise ValueError("must be a string or a list of token ids (non-negative integers)")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, one for a single prompt."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        """prompt_logprobs, or with echo and logprobs as many as logprobs (the echoed prompt's
        tokens have logprobs too, as in vLLM), whichever is more."""
        counts = [self.prompt_logprobs, self.logprobs if self.echo else None]
        wanted = [count for count in counts if count is not None]
        return max(wanted) if wanted else None

    def check(self, limits: RequestLimits) -> None:
        super().check(limits)
        if self.logprobs is not None:
            limits.check_logprobs(self.logprobs, "logprobs")
        prompts = self.prompts
        limits.check_batch(len(prompts))
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                limits.check_prompt_chars(len(prompt), "prompt" if len(prompts) == 1 else f"prompt[{index}]")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request(
                "max_tokens must be at least 1, or 0 with echo (the prompt alone comes back, with its logprobs "
                "when logprobs is set).",
                "max_tokens",
            )
        if self.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise bad_request("Only best_of=1 is supported.", "best_of")


def _token_ids(values: list[Any]) -> bool:
    return all(type(v) is int and 0 <= v <= MAX_TOKEN_ID for v in values)


class ChatMessageIn(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Annotated[Any, WithJsonSchema(CONTENT_SCHEMA)] = None  # str | [{"type": "text", "text": str}, ...] | null
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # the call a "tool" turn answers
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in CHAT_ROLES:
            raise ValueError(f"must be one of {', '.join(sorted(CHAT_ROLES))}")
        return value

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        if value is None or isinstance(value, str):
            return value or ""
        if not isinstance(value, list):
            raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
            texts.append(part["text"])
        # vLLM joins text parts with newlines; so do we, for identical prompts.
        return "\n".join(texts)

    def to_message(self) -> ChatMessage:
        # "developer" is OpenAI's newer name for "system"; chat templates know the latter.
        role = "system" if self.role == "developer" else self.role
        calls = [call.to_wire() for call in self.tool_calls] if self.tool_calls else None
        return ChatMessage(
            role=role, content=self.content or "", tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name
        )


class ChatBody(_Body):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool | None = False
    top_logprobs: Count | None = None  # bounded by limits.max_logprobs
    add_generation_prompt: bool | None = True
    # vLLM's: the last message stays open (a prefill the model continues); needs add_generation_prompt false.
    continue_final_message: bool | None = False
    # Extra variables for the chat template (e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any] | None = None
    # Tool calling (tools/request.py).
    tools: list[ToolIn] | None = None
    tool_choice: Annotated[Any, WithJsonSchema(TOOL_CHOICE_SCHEMA)] = None
    parallel_tool_calls: bool | None = True
    # tool_use(), worked out once: check() and every choice's request and response builder ask.
    _tool_use: tuple[ToolUse | None] | None = PrivateAttr(default=None)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

    def tool_use(self) -> ToolUse | None:
        """The request's tools and tool_choice (raises ApiError); None without tools."""
        if self._tool_use is None:
            self._tool_use = (tool_use(self.tools, self.tool_choice, self.parallel_tool_calls),)
        return self._tool_use[0]

    def check(self, limits: RequestLimits) -> None:
        super().check(limits)
        limits.check_chat_messages(len(self.messages))
        limits.check_prompt_chars(sum(len(m.content or "") for m in self.messages), "messages")
        tools = self.tool_use()
        if tools is not None:
            limits.check_prompt_chars(len(tools.tools_json), "tools")
            forced = tools.mode in ("required", "named")
            if forced and self.structured_output() is not None:
                raise bad_request(
                    "A tool_choice that forces a call (required or a named function) cannot be combined "
                    "with another output constraint (response_format, structured_outputs, guided_*).",
                    "tool_choice",
                )
        if self.top_logprobs is not None:
            limits.check_logprobs(self.top_logprobs, "top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
        check_continue_final_message(self.continue_final_message, self.add_generation_prompt)


def _json_text(text: str, param: str) -> str:
    try:
        json.loads(text)
    except ValueError:
        raise bad_request(f"{param} is not valid JSON.", param) from None
    return text


def check_continue_final_message(continue_final: bool | None, add_generation_prompt: bool | None) -> None:
    if continue_final and add_generation_prompt is not False:
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True "
            "(add_generation_prompt defaults to true: set it to false).",
            "continue_final_message",
        )


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    kind = first["type"]
    if kind == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}", None, "invalid_json")
    param = _param_name(first["loc"])
    if param is None:
        return bad_request("The request body must be a JSON object.", None, "invalid_type")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {message}.", param, code)


_ParsedBody = TypeVar("_ParsedBody", bound=_Body)


def parse_completion(raw: bytes, limits: RequestLimits = DEFAULT_LIMITS) -> CompletionBody:
    return _parse(CompletionBody, raw, limits)


def parse_chat(raw: bytes, limits: RequestLimits = DEFAULT_LIMITS) -> ChatBody:
    return _parse(ChatBody, raw, limits)


def _parse(cls: type[_ParsedBody], raw: bytes, limits: RequestLimits) -> _ParsedBody:
    try:
        body = cls.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    body.check(limits)
    return body


def check_model(requested: str | None, known: set[str]) -> None:
    """A missing model means the served one (as vLLM); an unknown one is a 404."""
    if requested is not None and requested not in known:
        raise model_not_found(requested)
