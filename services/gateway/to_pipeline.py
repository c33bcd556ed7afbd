"""A parsed request body (protocol.py) as the completion_request the pipeline gets. Pure logic.

Without ``max_tokens`` a request gets what its context leaves after the prompt, as in vLLM;
only the tokenizer knows the prompt's length, so the gateway sends the cap it has (or none)
with ``max_tokens_is_default`` and the tokenizer lowers it (services/tokenizer/prompt.py).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from services.gateway.errors import bad_request
from services.gateway.protocol import ChatBody, CompletionBody, validation_error
from services.gateway.tools.calls import ToolFormat
from shared.messages import MAX_TOKEN_ID, CompletionRequest, DetokenizeParams, SamplingParams

# sampling.max_tokens of a request without one when no SCALELLM_DEFAULT_MAX_TOKENS caps it.
NO_MAX_TOKENS_CAP = MAX_TOKEN_ID


def template_kwargs_json(kwargs: dict[str, Any] | None) -> str | None:
    """chat_template_kwargs as the wire carries it (JSON text; the tokenizer checks the names)."""
    return None if kwargs is None else json.dumps(kwargs, ensure_ascii=False)


def sampling_params(body: CompletionBody | ChatBody, default_max_tokens: int | None) -> SamplingParams:
    """Without max_tokens, max_tokens is a cap (``default_max_tokens``, if any) that the tokenizer
    lowers to the rest of the context: the request goes out with ``max_tokens_is_default``."""
    max_tokens = body.requested_max_tokens()  # 0 is a value here (echo scoring), not "unset"
    if max_tokens is None:
        max_tokens = default_max_tokens or NO_MAX_TOKENS_CAP
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens")
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": 0 if body.top_k == -1 else body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "min_tokens": min_tokens,
        "logprobs": body.requested_logprobs(),
        "prompt_logprobs": body.requested_prompt_logprobs(),
        "structured": body.structured_output(),
    }
    try:
        # Unset (None) options keep SamplingParams' own defaults.
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise validation_error(exc) from None


def detokenize_params(body: CompletionBody | ChatBody, prompt_index: int = 0) -> DetokenizeParams:
    """For prompt ``prompt_index`` of a batch (the only one, usually)."""
    echo_ids = isinstance(body, CompletionBody) and bool(body.echo) and not isinstance(body.prompts[prompt_index], str)
    return DetokenizeParams(
        stop=body.stop_strings,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        skip_special_tokens=body.skip_special_tokens is not False,
        spaces_between_special_tokens=body.spaces_between_special_tokens is not False,
        # The echo of token ids needs their text, which only the pipeline's tokenizer knows.
        decode_prompt=echo_ids,
    )


def pipeline_request(
    body: CompletionBody | ChatBody,
    request_id: str,
    gateway_id: str,
    deadline: float,
    default_max_tokens: int | None,
    *,
    prompt_index: int = 0,
    seed: int | None = None,
    tool_format: ToolFormat | None = None,
) -> CompletionRequest:
    """The completion_request a body becomes (raises ApiError for cross-field rules); for one
    choice of several (choices.py), of prompt ``prompt_index`` of a batch, with its own ``seed``.
    ``tool_format``: how the model writes tool calls, for the grammar of a forced call."""
    prompt = body.prompts[prompt_index] if isinstance(body, CompletionBody) else None
    sampling = sampling_params(body, default_max_tokens)
    if seed is not None:
        sampling.seed = seed
    message = CompletionRequest(
        request_id=request_id,
        gateway_id=gateway_id,
        deadline=deadline,
        sampling=sampling,
        detokenize=detokenize_params(body, prompt_index),
        max_tokens_is_default=body.requested_max_tokens() is None,
        add_special_tokens=body.add_special_tokens,
    )
    if isinstance(body, ChatBody):
        message.messages = body.chat_messages()
        message.add_generation_prompt = body.add_generation_prompt is not False
        message.continue_final_message = bool(body.continue_final_message)
        message.chat_template_kwargs = template_kwargs_json(body.chat_template_kwargs)
        tools = body.tool_use()
        if tools is not None:
            message.tools = tools.tools_json
            if tool_format is not None:
                message.sampling.structured = tools.constraint(tool_format) or message.sampling.structured
    else:
        message.prompt = prompt
    return message
