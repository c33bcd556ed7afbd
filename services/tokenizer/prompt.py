"""Text requests to token ids: chat template, encoding, validation. No I/O.

Bad input becomes a ``RequestFailed`` with status 400, naming the offending
parameter, in the style of vLLM's OpenAI server, so the client learns what to
change. Context limits: a request may use at most ``max_model_len`` tokens,
prompt and completion together. A request without a ``max_tokens`` of its own
(``max_tokens_is_default``) gets what the context leaves after its prompt, as in
vLLM; only this stage knows the prompt's length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from services.tokenizer.errors import InvalidRequest, failure
from services.tokenizer.tool_prompt import hermes_conversation, native_conversation, parse_tools, template_knows_tools
from shared.messages import ChatMessage, CompletionRequest, RequestFailed, StructuredOutputs, TokenizedRequest

__all__ = ["InvalidRequest", "PromptEncoder", "PromptProcessor", "failure"]

log = logging.getLogger(__name__)

# Parameters of transformers' apply_chat_template (and the template's own name for the
# conversation): chat_template_kwargs may not set them, or a client could swap the
# template, ask for tensors, or collide with the conversation itself.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


class ChatTokenizer(Protocol):
    """The part of a transformers tokenizer the tokenizer stage uses."""

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    # transformers types these as str | list[str] (lists for batches): Any here, checked where used.
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> Any: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> Any: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


class PromptEncoder:
    """Prompt text or a chat to token ids, with the options vLLM's API offers. Raises InvalidRequest."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode_text(self, prompt: str, add_special_tokens: bool | None) -> list[int]:
        # The model's own default (add_special_tokens=None): Llama adds a BOS token, SmolLM2 adds none.
        return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens is not False))

    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        add_special_tokens: bool | None,
        chat_template_kwargs: str | None,
        tools: str | None = None,
    ) -> list[int]:
        if not messages:
            raise InvalidRequest("'messages' must contain at least one message.", "messages")
        if add_generation_prompt and continue_final_message:
            raise InvalidRequest(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                "continue_final_message",
            )
        extra = self._template_kwargs(chat_template_kwargs)
        tool_list = parse_tools(tools)
        if template_knows_tools(getattr(self.tokenizer, "chat_template", None)):
            conversation = native_conversation(messages)
            if tool_list:
                extra["tools"] = tool_list
        else:  # the template would drop the tools and the calls: they are written out for it
            conversation = hermes_conversation(messages, tool_list)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **extra,
            )
        except Exception as exc:
            # Templates reject conversations with raise_exception(), e.g. roles that do not
            # alternate; a model without a template, or a bad template variable, lands here too.
            raise InvalidRequest(f"Invalid chat messages for this model's chat template: {exc}", "messages") from exc
        if not isinstance(text, str):
            raise InvalidRequest("The chat template did not produce text.", "messages")
        # The template already writes the special tokens (BOS, role markers); more only on request.
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens is True))

    @staticmethod
    def _template_kwargs(raw: str | None) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            kwargs = json.loads(raw)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be a JSON object.", "chat_template_kwargs")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
        if reserved:
            raise InvalidRequest(
                f"chat_template_kwargs may not set {', '.join(reserved)}: give them as request fields "
                "where the API has them.",
                "chat_template_kwargs",
            )
        return kwargs

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(
                    f"Token id {token_id} is out of vocabulary (valid ids are 0 to {self.vocab_size - 1}).", param
                )


class PromptProcessor:
    """Turns a ``CompletionRequest`` into a ``TokenizedRequest`` or a 400 error."""

    def __init__(self, tokenizer: ChatTokenizer, max_model_len: int, eos_token_ids: Sequence[int]) -> None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer)
        self.max_model_len = max_model_len
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # unique, in order
        self.vocab_size = self.encoder.vocab_size
        self._llg_tokenizer: Any = None  # llguidance's view of the tokenizer, built on first use

    def process(self, request: CompletionRequest) -> TokenizedRequest | RequestFailed:
        try:
            prompt_ids = self._prompt_ids(request)
            max_tokens = self._max_tokens(request, len(prompt_ids))
            self.encoder.check_token_ids(request.sampling.stop_token_ids, "stop_token_ids")
            if request.sampling.structured is not None:
                self._check_constraint(request.sampling.structured)
        except InvalidRequest as exc:
            return failure(request.request_id, exc)
        update = {"eos_token_ids": list(self.eos_token_ids), "max_tokens": max_tokens}
        return TokenizedRequest(
            request_id=request.request_id,
            gateway_id=request.gateway_id,
            deadline=request.deadline,
            prompt_token_ids=prompt_ids,
            sampling=request.sampling.model_copy(update=update),
            detokenize=request.detokenize,
            timeline=dict(request.timeline),
        )

    def _check_constraint(self, constraint: StructuredOutputs) -> None:
        """A structured-output constraint that does not compile is a 400 naming the problem (issue 10)."""
        from shared.structured import InvalidConstraint, check_compiles, grammar_text, llg_tokenizer

        try:
            if self._llg_tokenizer is None:  # once per process, on first use (~0.5 s)
                self._llg_tokenizer = llg_tokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)
            check_compiles(self._llg_tokenizer, grammar_text(constraint), constraint)
        except InvalidConstraint as exc:
            raise InvalidRequest(str(exc), exc.param) from None

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        if request.messages is not None and request.prompt is not None:
            raise InvalidRequest("Give either 'prompt' or 'messages', not both.", "messages")
        if request.messages is not None:
            ids = self.encoder.encode_chat(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                add_special_tokens=request.add_special_tokens,
                chat_template_kwargs=request.chat_template_kwargs,
                tools=request.tools,
            )
            if not ids:
                raise InvalidRequest("The chat messages produce an empty prompt.", "messages")
            return ids
        prompt = request.prompt
        if prompt is None or len(prompt) == 0:
            raise InvalidRequest("The prompt cannot be empty.", "prompt")
        if isinstance(prompt, str):
            ids = self.encoder.encode_text(prompt, request.add_special_tokens)
            if not ids:
                raise InvalidRequest("The prompt encodes to no tokens.", "prompt")
            return ids
        self.encoder.check_token_ids(prompt, "prompt")
        return list(prompt)

    def _max_tokens(self, request: CompletionRequest, prompt_len: int) -> int:
        """The request's max_tokens once checked against the context (filled in when it gave none)."""
        limit = self.max_model_len
        param = "messages" if request.messages is not None else "prompt"
        if prompt_len >= limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input {param}.",
                param,
            )
        max_tokens = request.sampling.max_tokens
        if request.max_tokens_is_default:
            # vLLM's default: the rest of the context; the gateway's cap, when it has one, still holds.
            max_tokens = min(max_tokens, limit - prompt_len)
            min_tokens = request.sampling.min_tokens
            if min_tokens > max_tokens:
                raise InvalidRequest(
                    f"min_tokens ({min_tokens}) must not exceed max_tokens, which defaults to {max_tokens} here "
                    f"(the context of {limit} tokens less the prompt's {prompt_len}).",
                    "min_tokens",
                )
        if prompt_len + max_tokens > limit:
            name = "'max_tokens' or 'max_completion_tokens'" if request.messages is not None else "'max_tokens'"
            raise InvalidRequest(
                f"{name} is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
                f"and your request has {prompt_len} input tokens ({max_tokens} > {limit} - {prompt_len}).",
                "max_tokens",
            )
        return max_tokens
