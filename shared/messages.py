"""Every message that crosses a Redis stream, one typed class per kind.

Wire format: a msgpack map holding the message's fields plus ``"type"``, a tag
naming the class. Decoding looks the tag up in ``MESSAGE_TYPES``, an explicit
table, and validates the fields with pydantic, so bytes from the network can
only ever become one of these classes (never pickle, never a name lookup).
docs/protocol.md describes the same schema for writers of other stages.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FinishReason = Literal["stop", "length", "abort", "error"]
# Every kind of replica; each beats as one of these.
Role = Literal["gateway", "tokenizer", "engine", "detokenizer"]
# A token id is an int32 that is not negative: engines checkpoint output ids packed as int32
# (shared/output_checkpoints.py), so a larger one from the wire must fail decoding (and be
# dead-lettered), not crash the engine that packs it.
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
# Per generated token: (logprob of the chosen token, [(alternative id, logprob), ...]).
TokenLogprobs = tuple[float, list[tuple[TokenId, float]]]
# Per prompt token after the first (engine -> detokenizer): (logprob of the prompt token, its rank in
# the vocabulary, 1 for the most likely token, [(alternative id, logprob), ...]).
PromptTokenLogprobs = tuple[float, Annotated[int, Field(ge=1)], list[tuple[TokenId, float]]]
# A token and its logprobs as the detokenizer names them for the gateway (docs/api.md, "Logprobs"):
# (token id, its text, text offset, logprob, rank, [(alternative id, alternative's text, logprob), ...]).
# The text offset counts the code points before the token's text: in the output text for an output
# token, in the prompt's text for a prompt token. logprob is None for a prompt's first token (nothing
# comes before it to predict it); rank is given for prompt tokens only.
NamedToken = tuple[
    TokenId,
    str,
    Annotated[int, Field(ge=0)],
    float | None,
    Annotated[int, Field(ge=1)] | None,
    list[tuple[TokenId, str, float]],
]


class MessageError(ValueError):
    """Bytes that are not a known, well-formed message."""


class _Model(BaseModel):
    # Unknown fields are ignored so that a newer producer can add fields
    # without breaking older consumers.
    model_config = ConfigDict(extra="ignore", frozen=False)


class StructuredOutputs(_Model):
    """A constraint on the output (issue 10): exactly one of the fields is set. vLLM's names.

    Carried as text, so that any stage in any language can pass it on: ``json`` a JSON schema
    (JSON text), ``regex`` a regular expression (Rust regex syntax), ``choice`` the allowed
    outputs, ``grammar`` a Lark or GBNF grammar, ``json_object`` any JSON object. The tokenizer
    stage checks it compiles (a 400 otherwise); the engine compiles it again, from a cache.
    """

    json_schema: str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # The request field it came from (response_format, structured_outputs.json, guided_regex...):
    # a 400 names it.
    param: str | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)

    def kinds(self) -> list[str]:
        """The constraints set: one for a valid message."""
        set_ = [
            ("json", self.json_schema is not None),
            ("regex", self.regex is not None),
            ("choice", self.choice is not None),
            ("grammar", self.grammar is not None),
            ("json_object", self.json_object),
        ]
        return [name for name, present in set_ if present]


class SamplingParams(_Model):
    """How the engine chooses tokens; vLLM's names and meanings."""

    # 0: the prompt is only prefilled, no token is generated (echo scoring with prompt_logprobs).
    max_tokens: Annotated[int, Field(ge=0)] = 16
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: no limit
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    # Filled in by the tokenizer stage from the model's generation config.
    eos_token_ids: list[TokenId] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # top-N alternatives
    # vLLM's: the logprob of every prompt token after the first, with this many alternatives each.
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Constrained decoding (structured outputs); None: free text.
    structured: StructuredOutputs | None = None


class DetokenizeParams(_Model):
    """How the detokenizer turns tokens into text for one request."""

    stop: list[str] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's option; passed to the tokenizer's decode, which decides (docs/api.md).
    spaces_between_special_tokens: bool = True
    # Send the prompt's text with the first output: the echo of a prompt given as token ids
    # (the gateway has no tokenizer). The engine then sends the prompt's ids with its first delta.
    decode_prompt: bool = False


class ToolCall(_Model):
    """A function call an assistant made earlier in a chat (issue 10). ``arguments`` is JSON text,
    as OpenAI gives it; the tokenizer stage parses it for templates that want an object."""

    id: str
    name: str
    arguments: str


class ChatMessage(_Model):
    role: str
    content: str
    # An assistant turn's calls (its content may then be empty), and the call a "tool" turn answers.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Message(_Model):
    """Base of every top-level message; ``TYPE`` is its tag on the wire."""

    TYPE: ClassVar[str]


class CompletionRequest(Message):
    """gateway -> ``{p}:requests``: a request still in text form.

    Exactly one of ``prompt`` (text or token ids) and ``messages`` is set.
    """

    TYPE: ClassVar[str] = "completion_request"
    request_id: str
    gateway_id: str
    deadline: float  # unix time after which nobody waits for the answer
    prompt: str | list[TokenId] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    detokenize: DetokenizeParams = Field(default_factory=DetokenizeParams)
    # The client gave no max_tokens: ``sampling.max_tokens`` is only a cap, and the tokenizer
    # lowers it to what the context leaves after the prompt (only it knows the prompt's length).
    max_tokens_is_default: bool = False
    # Chat only: end on the last message, open, instead of a new turn (vLLM's name and meaning).
    continue_final_message: bool = False
    # Special tokens (BOS) added on top of the text; None: the default (text: yes, chat: no,
    # since the chat template writes them).
    add_special_tokens: bool | None = None
    # Chat only: extra variables for the chat template, a JSON object as text (JSON so that
    # any stage, in any language, carries it as an opaque string).
    chat_template_kwargs: str | None = None
    # Chat only: the functions the model may call, OpenAI's ``tools`` list as JSON text; the
    # tokenizer stage gives them to the chat template (or describes them itself, for a template
    # without tool support).
    tools: str | None = None
    # The hops passed so far, by name (shared/timeline.py): unix times in seconds.
    timeline: dict[str, float] = Field(default_factory=dict)


class TokenizedRequest(Message):
    """tokenizer -> ``{p}:tokenized``: ready for an engine."""

    TYPE: ClassVar[str] = "tokenized_request"
    request_id: str
    gateway_id: str
    deadline: float
    prompt_token_ids: list[TokenId]
    sampling: SamplingParams
    detokenize: DetokenizeParams
    timeline: dict[str, float] = Field(default_factory=dict)  # the gateway's and the tokenizer's hops


class TokenDelta(_Model):
    """One request's new tokens from one engine step."""

    request_id: str
    gateway_id: str
    offset: int  # index of token_ids[0] among the request's output tokens
    token_ids: list[TokenId]
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    # Per token: [chosen logprob, [[alt token id, alt logprob], ...]].
    logprobs: list[TokenLogprobs] | None = None
    # Set on a request's first delta only: what the detokenizer needs to start.
    detokenize: DetokenizeParams | None = None
    prompt_tail: list[TokenId] | None = None
    # On the first delta of a request whose sampling asks for prompt_logprobs or whose detokenize
    # asks for decode_prompt: the whole prompt, and per prompt token its logprobs (None for the first).
    prompt_token_ids: list[TokenId] | None = None
    prompt_logprobs: list[PromptTokenLogprobs | None] | None = None
    # On a request's first delta, the hops so far and the engine's; on its last, the engine's last.
    timeline: dict[str, float] | None = None


class EngineStepOutput(Message):
    """engine -> ``{p}:generated:{shard}``: one step's tokens for one shard."""

    TYPE: ClassVar[str] = "engine_step_output"
    engine_id: str
    step: int
    deltas: list[TokenDelta]


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int


class TextDelta(_Model):
    """One request's new text; the last one carries ``finish_reason``."""

    request_id: str
    text: str
    token_ids: list[TokenId] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Per token of ``token_ids``, the logprobs as the engine gave them (ids only): what a detokenizer
    # older than ``named_logprobs`` sends; the gateway then names tokens "token_id:<id>".
    logprobs: list[TokenLogprobs] | None = None
    # Per token of ``token_ids``, its text, offset in the output text and logprobs (NamedToken).
    named_logprobs: list[NamedToken] | None = None
    # On the request's first delta, when asked: every prompt token named (prompt_logprobs), and the
    # prompt's text (DetokenizeParams.decode_prompt).
    prompt_logprobs: list[NamedToken] | None = None
    prompt_text: str | None = None
    # Code points of the request's output text before ``text``: lets the gateway
    # drop text it already has if a delta is ever published twice.
    offset: int | None = None
    # The request's prompt length, on every delta: a stream with continuous usage
    # (stream_options.continuous_usage_stats) reports it in every chunk.
    prompt_tokens: int | None = None
    # The hops the token deltas carried, and on the last delta the detokenizer's (shared/timeline.py).
    timeline: dict[str, float] | None = None


class ResponseBatch(Message):
    """detokenizer -> ``{p}:responses:{gateway_id}``: text for many requests."""

    TYPE: ClassVar[str] = "response_batch"
    deltas: list[TextDelta]


class RequestFailed(Message):
    """any stage -> ``{p}:responses:{gateway_id}``: the request ends with an error.

    ``status`` is the HTTP status the client should see (400 for bad input,
    503 when no capacity, 500 for a stage's own fault).
    """

    TYPE: ClassVar[str] = "request_failed"
    request_id: str
    status: int
    error_type: str
    message: str
    param: str | None = None


class TokenizeRequest(Message):
    """gateway -> ``{p}:requests``: encode a prompt or a chat and answer with its token ids (POST /tokenize).

    Exactly one of ``prompt`` and ``messages`` is set; the chat fields mean what they mean in
    ``CompletionRequest``. Answered with a ``TokenizeResult`` or a ``RequestFailed``.
    """

    TYPE: ClassVar[str] = "tokenize_request"
    request_id: str
    gateway_id: str
    deadline: float
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    chat_template_kwargs: str | None = None
    tools: str | None = None
    return_token_strs: bool = False


class TokenizeResult(Message):
    """tokenizer -> ``{p}:responses:{gateway_id}``: the answer to a ``TokenizeRequest``."""

    TYPE: ClassVar[str] = "tokenize_result"
    request_id: str
    tokens: list[TokenId]
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(Message):
    """gateway -> ``{p}:requests``: decode token ids to text (POST /detokenize)."""

    TYPE: ClassVar[str] = "detokenize_request"
    request_id: str
    gateway_id: str
    deadline: float
    tokens: list[TokenId]


class DetokenizeResult(Message):
    """tokenizer -> ``{p}:responses:{gateway_id}``: the answer to a ``DetokenizeRequest``."""

    TYPE: ClassVar[str] = "detokenize_result"
    request_id: str
    prompt: str


class AbortRequests(Message):
    """gateway or detokenizer -> ``{p}:aborts`` (read by every engine)."""

    TYPE: ClassVar[str] = "abort_requests"
    request_ids: list[str]
    reason: str = "abort"


class DecodeCheckpoint(Message):
    """detokenizer -> key ``{p}:decode:{request_id}``: where a successor resumes decoding.

    Written atomically with the text it accounts for (docs/architecture.md,
    "Detokenizer takeover"), so a replica taking a shard over continues each
    request exactly where the client's text ends.
    """

    TYPE: ClassVar[str] = "decode_checkpoint"
    request_id: str
    gateway_id: str
    detokenize: DetokenizeParams
    num_tokens: int  # output tokens consumed: the offset the next delta should have
    # The decoder's window: token ids from its prefix offset on; ``read_offset``
    # indexes the first id whose text has not been produced yet.
    window: list[TokenId] = Field(default_factory=list)
    read_offset: int = 0
    text_offset: int = 0  # code points of output text before ``text_tail``
    # The end of the output text: everything not yet sent plus enough context to
    # find a stop string that straddles the next tokens.
    text_tail: str = ""
    sent: int = 0  # code points of ``text_tail`` already sent
    unsent_token_ids: list[TokenId] = Field(default_factory=list)
    # Their logprobs, named (what this version writes), or as ids (what older versions wrote).
    unsent_named: list[NamedToken] | None = None
    unsent_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None  # set: the request is over, later deltas are dropped
    stopped_by_string: bool = False


class Heartbeat(Message):
    """Every replica -> key ``{p}:heartbeat:{role}:{replica_id}`` with a TTL."""

    TYPE: ClassVar[str] = "heartbeat"
    role: Role
    replica_id: str
    time: float
    # The context length a tokenizer enforces (the model card's max_model_len); absent elsewhere.
    max_model_len: int | None = None
    # Engine load; zero elsewhere.
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    forward_share: float = 0.0
    # Engine counters since the engine started (the gateway exports them, docs/api.md):
    # prompt tokens looked up in the prefix cache and found there, and preemptions.
    prefix_cache_queries: Annotated[int, Field(ge=0)] = 0
    prefix_cache_hits: Annotated[int, Field(ge=0)] = 0
    preemptions: Annotated[int, Field(ge=0)] = 0
    # Seconds requests waited in the engine before they first ran: counts per bucket of
    # shared.histogram.REQUEST_LATENCY_BUCKETS (one more count, for above the last bound)
    # and their sum. Empty when the engine does not measure it.
    queue_time_counts: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    queue_time_sum: Annotated[float, Field(ge=0.0)] = 0.0
    # An engine's compute paths in words (dtype, kernels, the CPU flags that chose them); absent elsewhere.
    kernels: str | None = None


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        CompletionRequest,
        TokenizedRequest,
        EngineStepOutput,
        ResponseBatch,
        RequestFailed,
        AbortRequests,
        DecodeCheckpoint,
        Heartbeat,
        TokenizeRequest,
        TokenizeResult,
        DetokenizeRequest,
        DetokenizeResult,
    )
}


def encode(message: Message) -> bytes:
    fields = message.model_dump(mode="python", exclude_none=True)
    fields["type"] = message.TYPE
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def decode(data: bytes) -> Message:
    """Bytes -> message; raises MessageError for anything not in the table."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MessageError(f"not msgpack: {exc}") from exc
    if not isinstance(fields, dict):
        raise MessageError("a message must be a msgpack map")
    tag = fields.pop("type", None)
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {tag!r}")
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        raise MessageError(f"malformed {tag}: {exc}") from exc
