"""The contract between the engine service (service.py) and a backend (echo, torch, hf).

The service owns all I/O; a backend is plain in-process Python driven by
``step()``. Types here are small dataclasses, not wire messages, so that the
decode loop never builds or parses a stream message.

What every backend must decide the same way lives here too, so that a client
cannot tell the backends apart by it: which requests are refused and in what
words (``refusal``), which tokens end a request (``stop_token_ids``), and how
the share of time in model forward is measured (``ForwardTime``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from shared.histogram import REQUEST_LATENCY_BUCKETS, BucketHistogram, HistogramCounts
from shared.messages import FinishReason, PromptTokenLogprobs, SamplingParams, TokenLogprobs

# EngineLoad.forward_share covers this many recent seconds, so an idle engine drifts to 0.
FORWARD_SHARE_WINDOW_S = 10.0


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # A request taken over from an engine that died: the output tokens it had already
    # published. The backend continues after them (they count toward max_tokens,
    # min_tokens and the penalties) and reports only the tokens that follow.
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None
    # With finish_reason "error": why, in words a client can act on.
    error: str | None = None
    # On a request's first output, when its sampling asks for prompt_logprobs (and it was not taken
    # over: then the engine before had sent them): per prompt token, None for the first.
    prompt_logprobs: list[PromptTokenLogprobs | None] | None = None
    # On a request's first output, from a backend that knows: when (unix time) the request was first
    # in a batch, its prefill starting (the timeline's engine_scheduled, shared/timeline.py). A
    # timing, not part of what was produced: outputs that differ only in it are equal.
    scheduled_at: float | None = field(default=None, compare=False)


@dataclass(slots=True)
class EngineLoad:
    """What the engine's heartbeat reports (the gateway exports it, docs/api.md "Metrics")."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of KV blocks in use, 0..1
    forward_share: float = 0.0  # share of wall time spent in model forward, 0..1
    # Counters since the backend was built: prompt tokens looked up in the prefix cache and
    # found there, and preemptions. Counters, not rates: a heartbeat that is lost loses nothing.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    # Seconds requests waited in the backend before they first ran (QueueTime); empty: not measured.
    queue_time: HistogramCounts = field(default_factory=HistogramCounts)
    # The compute paths in use, in words (dtype, linear and attention kernels, the CPU flags that
    # chose them): constant for a backend, in every heartbeat so a dashboard shows each engine's.
    kernels: str = ""


class EngineBackend(Protocol):
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it starts in a later step(). One whose ``output_token_ids``
        already end it (a stop token, max_tokens) finishes in the next step with no tokens;
        one that can never run (``refusal``) finishes in the next step with "error".
        max_tokens 0 means prefill only: the request finishes "length" with no tokens once its
        prompt logprobs are computed (at once when it asks for none).

        The id of a request still in the backend is ignored: the running copy answers
        for both (at-least-once delivery and takeovers can bring a request twice)."""

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop requests at once; the next step() reports each as finish_reason "abort"
        (unknown ids are ignored). Their KV blocks are free, and their ids may be added anew."""

    def step(self) -> list[RequestOutput]:
        """Run one iteration: schedule, forward, sample. Returns outputs only for
        requests that produced tokens or finished in this step."""

    def has_unfinished(self) -> bool: ...

    def free_slots(self) -> int:
        """How many more requests to pull from the stream now; 0 = no KV room."""

    def load(self) -> EngineLoad: ...


def refusal(request: EngineRequest, *, max_model_len: int | None = None, vocab_size: int | None = None) -> str | None:
    """Why ``request`` can never run on a backend with this context length and vocabulary, in
    words the client sees (as a 400), or None. ``None`` limits are not checked."""
    prompt = request.prompt_token_ids
    if not prompt:
        return "the prompt is empty: at least one token is needed"
    if max_model_len is not None and len(prompt) > max_model_len:
        return f"the prompt has {len(prompt)} tokens, more than this model's context length of {max_model_len} tokens"
    if vocab_size is not None:
        # Output tokens too: a request taken over brings the ones its engine produced.
        for part, token_ids in (("prompt", prompt), ("output", request.output_token_ids)):
            bad = next((t for t in token_ids if t < 0 or t >= vocab_size), None)
            if bad is not None:
                return f"{part} token id {bad} is outside this model's vocabulary (0..{vocab_size - 1})"
    return None


def unconstrained_only(request: EngineRequest, backend: str) -> str | None:
    """The refusal of a backend that cannot apply structured-output masks, for a request that has one."""
    if request.sampling.structured is None:
        return None
    return f"the {backend} backend cannot constrain its output; structured outputs need the torch backend"


def wants_prompt_logprobs(request: EngineRequest) -> bool:
    """Whether the backend computes ``request``'s prompt logprobs: asked for, and not taken over
    (the engine that published the request's first output has sent them)."""
    return request.sampling.prompt_logprobs is not None and not request.output_token_ids


def stop_token_ids(sampling: SamplingParams, default_eos_token_ids: Iterable[int] = ()) -> frozenset[int]:
    """The tokens that end a request once ``min_tokens`` are out: its stop tokens and, unless
    ``ignore_eos``, its EOS tokens (the model's, ``default_eos_token_ids``, when it names none).
    The ending token is part of the output, as in transformers and vLLM."""
    if sampling.ignore_eos:
        return frozenset(sampling.stop_token_ids)
    return frozenset(sampling.stop_token_ids).union(sampling.eos_token_ids or default_eos_token_ids)


class QueueTime:
    """Seconds from ``add_request`` to a request's first step: EngineLoad.queue_time, exported as
    vllm:request_queue_time_seconds. Observed once per request, never per token."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._waited = BucketHistogram(REQUEST_LATENCY_BUCKETS)

    def started(self, queued_at: float) -> None:
        """A request queued at ``queued_at`` (a reading of ``clock``) runs for the first time."""
        self._waited.observe(max(0.0, self.clock() - queued_at))

    def snapshot(self) -> HistogramCounts:
        return self._waited.snapshot()


class ForwardTime:
    """Time spent in model forward over the last ``window_s`` seconds: EngineLoad.forward_share."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, window_s: float = FORWARD_SHARE_WINDOW_S
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._started = clock()
        self._forwards: deque[tuple[float, float]] = deque()  # (end time, seconds in forward)

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Around one forward pass; one that raises is not counted."""
        started = self._clock()
        yield
        ended = self._clock()
        self._forwards.append((ended, ended - started))
        self._forget_before(ended - self._window_s)

    def share(self) -> float:
        """0..1; over the time since construction while that is shorter than the window."""
        now = self._clock()
        self._forget_before(now - self._window_s)
        span = min(self._window_s, now - self._started)
        if span <= 0:
            return 0.0
        return min(1.0, sum(seconds for _, seconds in self._forwards) / span)

    def _forget_before(self, horizon: float) -> None:
        while self._forwards and self._forwards[0][0] < horizon:
            self._forwards.popleft()
