"""Text requests to token ids: chat template, encoding, validation. No I/O.

Bad input becomes a ``RequestFailed`` with status 400, naming the offending
parameter, in the style of vLLM's OpenAI server, so the client learns what to
change. Context limits: a request may use at most ``max_model_len`` tokens,
prompt and completion together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from shared.messages import CompletionRequest, RequestFailed, TokenizedRequest

log = logging.getLogger(__name__)

BAD_REQUEST = "invalid_request_error"


class ChatTokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class PromptProcessor:
    """Turns a ``CompletionRequest`` into a ``TokenizedRequest`` or a 400 error."""

    def __init__(self, tokenizer: ChatTokenizer, max_model_len: int, eos_token_ids: Sequence[int]) -> None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # unique, in order
        self.vocab_size = len(tokenizer)

    def process(self, request: CompletionRequest) -> TokenizedRequest | RequestFailed:
        try:
            prompt_ids = self._prompt_ids(request)
            self._check_lengths(request, len(prompt_ids))
            self._check_token_ids(request.sampling.stop_token_ids, "stop_token_ids")
        except InvalidRequest as exc:
            return RequestFailed(
                request_id=request.request_id,
                status=400,
                error_type=BAD_REQUEST,
                message=str(exc),
                param=exc.param,
            )
        sampling = request.sampling.model_copy(update={"eos_token_ids": list(self.eos_token_ids)})
        return TokenizedRequest(
            request_id=request.request_id,
            gateway_id=request.gateway_id,
            deadline=request.deadline,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            detokenize=request.detokenize,
        )

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        if request.messages is not None and request.prompt is not None:
            raise InvalidRequest("Give either 'prompt' or 'messages', not both.", "messages")
        if request.messages is not None:
            return self._chat_ids(request)
        prompt = request.prompt
        if prompt is None or len(prompt) == 0:
            raise InvalidRequest("The prompt cannot be empty.", "prompt")
        if isinstance(prompt, str):
            # The model's own default: Llama adds a BOS token, SmolLM2 adds none.
            return list(self.tokenizer.encode(prompt))
        self._check_token_ids(prompt, "prompt")
        return list(prompt)

    def _chat_ids(self, request: CompletionRequest) -> list[int]:
        messages = request.messages or []
        if not messages:
            raise InvalidRequest("'messages' must contain at least one message.", "messages")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=request.add_generation_prompt, tokenize=False
            )
        except Exception as exc:
            # Templates reject conversations with raise_exception(), e.g. roles
            # that do not alternate; a model without a template lands here too.
            raise InvalidRequest(f"Invalid chat messages for this model's chat template: {exc}", "messages") from exc
        if not isinstance(text, str):
            raise InvalidRequest("The chat template did not produce text.", "messages")
        # The template already holds the special tokens (BOS, role markers).
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise InvalidRequest("The chat messages produce an empty prompt.", "messages")
        return ids

    def _check_lengths(self, request: CompletionRequest, prompt_len: int) -> None:
        limit = self.max_model_len
        param = "messages" if request.messages is not None else "prompt"
        if prompt_len >= limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input {param}.",
                param,
            )
        max_tokens = request.sampling.max_tokens
        if prompt_len + max_tokens > limit:
            name = "'max_tokens' or 'max_completion_tokens'" if request.messages is not None else "'max_tokens'"
            raise InvalidRequest(
                f"{name} is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
                f"and your request has {prompt_len} input tokens ({max_tokens} > {limit} - {prompt_len}).",
                "max_tokens",
            )

    def _check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(
                    f"Token id {token_id} is out of vocabulary (valid ids are 0 to {self.vocab_size - 1}).", param
                )
