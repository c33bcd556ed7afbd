"""OpenAI response bodies and SSE chunks, built from the pipeline's TextDeltas.

Pure logic. Logprobs: tokens are named by their text, which the detokenizer
gives with each token (TextDelta.named_logprobs; the gateway has no
tokenizer), with the offset of the token's text in the output, so
``text_offset`` is exact; docs/api.md, "Logprobs", says how a token that is
part of a character is named. ``return_tokens_as_token_ids`` (vLLM's) names
them ``"token_id:<id>"`` instead, which is also the name when a delta carries
ids only (from a detokenizer older than named logprobs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import ApiError
from services.gateway.protocol import ChatBody, CompletionBody
from services.gateway.tools.calls import ToolFormat
from services.gateway.tools.output import ToolCallOutput
from shared.messages import CompletionRequest, NamedToken, TextDelta, Usage
from shared.timeline import GATEWAY_SENT, Timeline, segments

SSE_DONE = b"data: [DONE]\n\n"
# JSON has no -inf; vLLM sends this value in its place.
_MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    return sse(error.body()) + SSE_DONE


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def timeline_body(timeline: Timeline) -> dict[str, dict[str, float]]:
    """A choice's ``timeline`` (return_timeline): its hops (unix seconds) in the order passed, and
    the segments between them in seconds; the response is sent now."""
    timeline.setdefault(GATEWAY_SENT, time.time())
    hops = dict(sorted(timeline.items(), key=lambda hop: hop[1]))
    return {"hops": hops, "segments": {name: round(span, 6) for name, span in segments(timeline).items()}}


def usage_body(usage: Usage | None, completion_tokens_seen: int) -> dict[str, int]:
    # The final delta should carry usage; if a stage forgot it, count what arrived.
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else completion_tokens_seen
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True, slots=True)
class LogprobsOptions:
    """What a request asked for: alternatives per output token (``top``, None: no logprobs), per
    prompt token (``prompt_top``: vLLM's prompt_logprobs, None: not asked), and token names by id."""

    top: int | None = None
    prompt_top: int | None = None
    as_token_ids: bool = False


def token_name(token_id: int, text: str, as_token_ids: bool = False) -> str:
    return f"token_id:{token_id}" if as_token_ids else text


def named_tokens(delta: TextDelta) -> list[NamedToken]:
    """The delta's tokens with their logprobs, named; a delta with ids only (an older
    detokenizer) names them "token_id:<id>", each at the offset of the delta's text."""
    if delta.named_logprobs is not None:
        return delta.named_logprobs
    if not delta.logprobs:
        return []
    offset = delta.offset or 0
    return [
        (token_id, f"token_id:{token_id}", offset, chosen, None, [(alt, f"token_id:{alt}", lp) for alt, lp in alts])
        for token_id, (chosen, alts) in zip(delta.token_ids, delta.logprobs)
    ]


@dataclass
class CompletionLogprobs:
    """The legacy /v1/completions logprobs object, built up delta by delta."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, tokens: Sequence[NamedToken], text_base: int, top: int, as_token_ids: bool = False) -> None:
        """``text_base``: where the text the offsets count in starts in the returned text (after
        the echoed prompt, for output tokens); ``top``: alternatives per token."""
        for token_id, text, offset, logprob, _rank, alternatives in tokens:
            name = token_name(token_id, text, as_token_ids)
            self.tokens.append(name)
            self.text_offset.append(text_base + offset)
            if logprob is None:  # an echoed prompt's first token: nothing predicts it
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            # The token itself first, then the alternatives (as vLLM: up to top + 1 entries).
            best = {name: _finite(logprob)}
            for alt_id, alt_text, alt_logprob in alternatives[:top]:
                best.setdefault(token_name(alt_id, alt_text, as_token_ids), _finite(alt_logprob))
            self.token_logprobs.append(_finite(logprob))
            self.top_logprobs.append(best)

    def body(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _utf8(name: str) -> list[int]:
    return list(name.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: Sequence[NamedToken], top: int, as_token_ids: bool = False) -> list[dict[str, Any]]:
    """Entries of a chat choice's ``logprobs.content``; ``bytes`` are the UTF-8 of each name."""
    content = []
    for token_id, text, _offset, logprob, _rank, alternatives in tokens:
        name = token_name(token_id, text, as_token_ids)
        alternative_entries = []
        for alt_id, alt_text, alt_logprob in alternatives[:top]:
            alt_name = token_name(alt_id, alt_text, as_token_ids)
            alternative_entries.append({"token": alt_name, "logprob": _finite(alt_logprob), "bytes": _utf8(alt_name)})
        content.append(
            {
                "token": name,
                "logprob": _finite(logprob if logprob is not None else -math.inf),
                "bytes": _utf8(name),
                "top_logprobs": alternative_entries,
            }
        )
    return content


def prompt_logprobs_body(tokens: Sequence[NamedToken], top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, else a map from token id
    to ``{logprob, rank, decoded_token}`` holding the prompt token, then ``top`` alternatives."""
    body: list[dict[str, dict[str, Any]] | None] = []
    for token_id, text, _offset, logprob, rank, alternatives in tokens:
        if logprob is None:
            body.append(None)
            continue
        entry = {str(token_id): {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}}
        for position, (alt_id, alt_text, alt_logprob) in enumerate(alternatives[:top], start=1):
            entry.setdefault(
                str(alt_id), {"logprob": _finite(alt_logprob), "rank": position, "decoded_token": alt_text}
            )
        body.append(entry)
    return body


class ResponseBuilder:
    """Builds every body of one request; holds what is constant across its chunks."""

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        chat: bool,
        logprobs: LogprobsOptions | None = None,
        include_usage: bool = False,
        continuous_usage: bool = False,
        echo: bool = False,
        prompt: str | None = None,
        index: int = 0,
        tool_calls: ToolCallOutput | None = None,
    ) -> None:
        """``index``: the choice's index (parallel sampling and batches, choices.py). ``echo``: the completion's text starts with the prompt: ``prompt`` when it was text,
        else the text the pipeline decoded (TextDelta.prompt_text)."""
        self.request_id = request_id
        self.model = model
        self.chat = chat
        self.options = logprobs or LogprobsOptions()
        self.include_usage = include_usage
        # vLLM's stream_options.continuous_usage_stats: every chunk has the usage so far.
        self.continuous_usage = continuous_usage and include_usage
        self.echo = echo
        self.prompt = prompt
        self.index = index
        # Chat with tools (tool_choice not "none"): calls are parsed out of the output.
        self.tool_calls = tool_calls
        # The choice's stage timeline (its session's), when the request asked for it (return_timeline).
        self.timeline: Timeline | None = None
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self._echo_len = 0  # characters of the echoed prompt, before the output's text offsets
        self.prompt_tokens = 0  # from the deltas (TextDelta.prompt_tokens), for continuous usage
        self.completion_tokens = 0  # tokens sent so far

    @property
    def logprobs(self) -> bool:
        """Whether the output tokens' logprobs are asked for."""
        return self.options.top is not None

    def echo_text(self, first: TextDelta) -> str:
        """The echoed prompt: the text prompt, or the prompt's text decoded by the pipeline."""
        return self.prompt if self.prompt is not None else (first.prompt_text or "")

    def observe(self, delta: TextDelta) -> None:
        """Count a delta's tokens (and learn the prompt's length) before its chunk, if any, is built."""
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += len(delta.token_ids)

    def _usage_so_far(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = {
            "id": self.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            # As OpenAI: present but null on all but the usage chunk; running counts with continuous usage.
            body["usage"] = self._usage_so_far() if self.continuous_usage else None
        return body

    def role_chunk(self) -> bytes:
        """The first chat chunk, announcing the assistant's turn."""
        return sse(
            self._chunk(
                {
                    "index": self.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        )

    def echo_chunk(self, first: TextDelta) -> bytes:
        """The echoed prompt (completions with echo), with its tokens' logprobs when asked."""
        text = self.echo_text(first)
        logprobs = None
        if self.logprobs and first.prompt_logprobs:
            echoed = CompletionLogprobs()
            echoed.add(first.prompt_logprobs, 0, self.options.top or 0, self.options.as_token_ids)
            logprobs = echoed.body()
        self._echo_len = len(text)
        return sse(self._chunk({"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}))

    def text_chunk(self, text: str, delta: TextDelta | None = None) -> bytes | None:
        """A chunk with new text; ``delta`` adds its logprobs and finish reason. None: nothing to
        send yet (text a tool-call parser holds until it knows what it is)."""
        finish: str | None = delta.finish_reason if delta else None
        logprobs = None
        tokens = named_tokens(delta) if self.logprobs and delta is not None else []
        if tokens:
            top, as_ids = self.options.top or 0, self.options.as_token_ids
            if self.chat:
                logprobs = {"content": chat_logprobs(tokens, top, as_ids)}
            else:
                partial = CompletionLogprobs()
                partial.add(tokens, self._echo_len, top, as_ids)
                logprobs = partial.body()
        if self.chat:
            message: dict[str, Any] = {"content": text} if text or not finish else {}
            if self.tool_calls is not None:
                message, finish = self._tool_call_delta(self.tool_calls, text, finish)
                if not message and finish is None and logprobs is None:
                    return None
            choice = {"index": self.index, "delta": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None and self.timeline is not None:
            choice["timeline"] = timeline_body(self.timeline)
        return sse(self._chunk(choice))

    @staticmethod
    def _tool_call_delta(
        tool_calls: ToolCallOutput, text: str, finish: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """The delta of a chat chunk whose text may hold tool calls, and its finish reason."""
        content, calls = tool_calls.feed(text)
        if finish is not None:
            rest, more, finish = tool_calls.finish(finish)
            content, calls = content + rest, calls + more
        message: dict[str, Any] = {"content": content} if content else {}
        if calls:
            message["tool_calls"] = calls
        return message, finish

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return sse(
            {
                "id": self.request_id,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
        )

    def collector(self) -> CollectedOutput:
        """Where a non-streaming request's output is gathered, for ``full_response``."""
        return CollectedOutput(self)

    def full_response(self, result: CollectedOutput) -> dict[str, Any]:
        usage = usage_body(result.usage, result.completion_tokens)
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        if self.chat:
            logprobs = {"content": result.chat_logprobs} if self.logprobs else None
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            finish = result.finish_reason
            if self.tool_calls is not None:
                message["content"], calls, finish = self.tool_calls.whole(result.text, finish)
                if calls:
                    message["tool_calls"] = calls
            choice = {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
            body["choices"] = [choice]
            if self.timeline is not None:
                choice["timeline"] = timeline_body(self.timeline)
            if self.options.prompt_top is not None:
                body["prompt_logprobs"] = result.prompt_logprobs  # vLLM: on the response, for chat
        else:
            completion_logprobs = result.completion_logprobs.body() if self.logprobs else None
            choice = {
                "index": self.index,
                "text": result.text,
                "logprobs": completion_logprobs,
                "finish_reason": result.finish_reason,
            }
            if self.options.prompt_top is not None:
                choice["prompt_logprobs"] = result.prompt_logprobs  # vLLM: on the choice, for completions
            if self.timeline is not None:
                choice["timeline"] = timeline_body(self.timeline)
            body["choices"] = [choice]
        body["usage"] = usage
        return body


def builder_for(
    body: CompletionBody | ChatBody,
    response_id: str,
    model: str,
    message: CompletionRequest,
    index: int = 0,
    tool_format: ToolFormat | None = None,
) -> ResponseBuilder:
    """The builder of one choice's bodies (``index``), for the pipeline request ``message``;
    ``tool_format``: how the model writes tool calls, for a chat with tools."""
    echo = isinstance(body, CompletionBody) and bool(body.echo)
    tools = body.tool_use() if isinstance(body, ChatBody) else None
    tool_calls = None
    if tools is not None and tools.parses_output and tool_format is not None:
        tool_calls = ToolCallOutput(tool_format.parser())
    return ResponseBuilder(
        response_id,
        model,
        chat=isinstance(body, ChatBody),
        logprobs=LogprobsOptions(
            top=message.sampling.logprobs,
            prompt_top=body.prompt_logprobs,
            as_token_ids=bool(body.return_tokens_as_token_ids),
        ),
        include_usage=body.include_usage,
        continuous_usage=body.continuous_usage,
        echo=echo,
        prompt=message.prompt if echo and isinstance(message.prompt, str) else None,
        index=index,
        tool_calls=tool_calls,
    )


class CollectedOutput:
    """A whole request's output, for non-streaming responses."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self._builder = builder
        self._parts: list[str] = []
        self._echo: str | None = None  # the echoed prompt, once the first delta has come
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.completion_logprobs = CompletionLogprobs()
        self.chat_logprobs: list[dict[str, Any]] = []
        self.prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None

    def add(self, delta: TextDelta) -> None:
        builder = self._builder
        options = builder.options
        top, as_ids = options.top or 0, options.as_token_ids
        first = self._echo is None
        if first:
            self._echo = builder.echo_text(delta) if builder.echo else ""
            if builder.echo and builder.logprobs and delta.prompt_logprobs:
                self.completion_logprobs.add(delta.prompt_logprobs, 0, top, as_ids)
        if options.prompt_top is not None and delta.prompt_logprobs and self.prompt_logprobs is None:
            self.prompt_logprobs = prompt_logprobs_body(delta.prompt_logprobs, options.prompt_top)
        if builder.logprobs:
            tokens = named_tokens(delta)
            if builder.chat:
                self.chat_logprobs.extend(chat_logprobs(tokens, top, as_ids))
            else:
                self.completion_logprobs.add(tokens, len(self._echo or ""), top, as_ids)
        if delta.text:
            self._parts.append(delta.text)
        self.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = delta.usage

    @property
    def text(self) -> str:
        return (self._echo or "") + "".join(self._parts)
