"""OpenAI response bodies and SSE chunks, built from the pipeline's TextDeltas.

Pure logic. Logprobs: the gateway never sees token strings (it has no
tokenizer), so tokens are named ``"token_id:<id>"`` throughout, which is the
format vLLM uses with ``--return-tokens-as-token-ids``. A client holding the
tokenizer can decode them exactly; decoded text per step would be ambiguous
whenever one character spans several tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import ApiError
from shared.messages import TextDelta, TokenLogprobs, Usage

SSE_DONE = b"data: [DONE]\n\n"
# JSON has no -inf; vLLM sends this value in its place.
_MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    return sse(error.body()) + SSE_DONE


def token_name(token_id: int | None) -> str:
    return "token_id:?" if token_id is None else f"token_id:{token_id}"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def usage_body(usage: Usage | None, completion_tokens_seen: int) -> dict[str, int]:
    # The final delta should carry usage; if a stage forgot it, count what arrived.
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else completion_tokens_seen
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class CompletionLogprobs:
    """The legacy /v1/completions logprobs object, built up delta by delta."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token_ids: list[int], logprobs: list[TokenLogprobs], text_offset: int) -> None:
        # Without token strings the exact per-token offset is unknown; every
        # token of a delta gets the offset where that delta's text starts.
        for i, (chosen, alternatives) in enumerate(logprobs):
            name = token_name(token_ids[i] if i < len(token_ids) else None)
            top = {token_name(alt_id): _finite(alt_lp) for alt_id, alt_lp in alternatives}
            top.setdefault(name, _finite(chosen))  # vLLM lists the sampled token too
            self.tokens.append(name)
            self.token_logprobs.append(_finite(chosen))
            self.top_logprobs.append(top)
            self.text_offset.append(text_offset)

    def body(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """Entries of a chat choice's ``logprobs.content``."""
    content = []
    for i, (chosen, alternatives) in enumerate(logprobs):
        content.append(
            {
                "token": token_name(token_ids[i] if i < len(token_ids) else None),
                "logprob": _finite(chosen),
                "bytes": None,
                "top_logprobs": [
                    {"token": token_name(alt_id), "logprob": _finite(alt_lp), "bytes": None}
                    for alt_id, alt_lp in alternatives
                ],
            }
        )
    return content


class ResponseBuilder:
    """Builds every body of one request; holds what is constant across its chunks."""

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        chat: bool,
        logprobs: bool,
        include_usage: bool,
        continuous_usage: bool = False,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.chat = chat
        self.logprobs = logprobs
        self.include_usage = include_usage
        # vLLM's stream_options.continuous_usage_stats: every chunk has the usage so far.
        self.continuous_usage = continuous_usage and include_usage
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self._text_len = 0  # characters sent so far, for completion text offsets
        self.prompt_tokens = 0  # from the deltas (TextDelta.prompt_tokens), for continuous usage
        self.completion_tokens = 0  # tokens sent so far

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
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        )

    def text_chunk(self, text: str, delta: TextDelta | None = None) -> bytes:
        """A chunk with new text; ``delta`` adds its logprobs and finish reason."""
        finish = delta.finish_reason if delta else None
        logprobs = None
        if self.logprobs and delta is not None and delta.logprobs:
            if self.chat:
                logprobs = {"content": chat_logprobs(delta.token_ids, delta.logprobs)}
            else:
                partial = CompletionLogprobs()
                partial.add(delta.token_ids, delta.logprobs, self._text_len)
                logprobs = partial.body()
        self._text_len += len(text)
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text} if text or not finish else {},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse(self._chunk(choice))

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

    def full_response(self, result: CollectedOutput) -> dict[str, Any]:
        usage = usage_body(result.usage, result.completion_tokens)
        if self.chat:
            logprobs = {"content": result.chat_logprobs} if self.logprobs else None
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": logprobs,
                "finish_reason": result.finish_reason,
            }
            obj = "chat.completion"
        else:
            logprobs = result.completion_logprobs.body() if self.logprobs else None
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            obj = "text_completion"
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }


class CollectedOutput:
    """A whole request's output, for non-streaming responses."""

    def __init__(self, prefix: str = "") -> None:
        self._parts: list[str] = [prefix] if prefix else []
        self._length = len(prefix)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.completion_logprobs = CompletionLogprobs()
        self.chat_logprobs: list[dict[str, Any]] = []

    def add(self, delta: TextDelta, *, chat: bool) -> None:
        if delta.logprobs:
            if chat:
                self.chat_logprobs.extend(chat_logprobs(delta.token_ids, delta.logprobs))
            else:
                self.completion_logprobs.add(delta.token_ids, delta.logprobs, self._length)
        if delta.text:
            self._parts.append(delta.text)
            self._length += len(delta.text)
        self.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = delta.usage

    @property
    def text(self) -> str:
        return "".join(self._parts)
