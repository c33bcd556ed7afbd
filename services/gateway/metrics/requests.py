"""What the gateway itself observes of each request, under vLLM's names, and its HTTP counters.

vLLM measures a request in its API server process; so does this: the time to the first
token, the gaps between tokens and the end-to-end latency are taken when the request's
handler receives its output (services/gateway/session.py), and the token counts are the
``usage`` the client got. Engine-side figures come from heartbeats instead (engines.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric

from services.gateway.metrics.engines import cumulative_buckets
from shared.histogram import REQUEST_LATENCY_BUCKETS, BucketHistogram
from shared.messages import FinishReason, TextDelta
from shared.timeline import SEGMENT_NAMES, Timeline, segments

MODEL_LABEL = ["model_name"]
# vLLM's bounds, so that its dashboards read the same buckets.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM stops its 1-2-5 series at the model's context length, which the gateway does not know:
# up to a million tokens.
# From a fraction of a millisecond (a queue hop) to minutes (a long decode).
SEGMENT_BUCKETS = tuple(m * 10.0**e for e in range(-4, 3) for m in (1, 2.5, 5)) + (1000.0,)
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000)
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort", "error")
SLOW_CLIENT_REASONS = ("buffer", "timeout")


class TokenGaps:
    """One request's gaps between output tokens, as its handler receives them.

    A delta of k tokens that arrives t seconds after the one before counts as k gaps of
    t / k: the pipeline batches tokens (a detokenizer that is behind, a client that reads
    slowly), and this keeps the sum the time from the first token to the last and the count
    the tokens after the first, as vLLM's inter-token latency does. Tokens that come with
    the first delta count as gaps of 0. Fixed size (one count per bucket), whatever the length.
    """

    __slots__ = ("_last", "histogram")

    def __init__(self) -> None:
        self._last: float | None = None
        self.histogram = BucketHistogram(TOKEN_GAP_BUCKETS)

    def arrived(self, now: float, tokens: int) -> None:
        if tokens <= 0:
            return
        if self._last is None:
            self.histogram.observe(0.0, tokens - 1)
        else:
            self.histogram.observe((now - self._last) / tokens, tokens)
        self._last = now


class ClosedRequest(Protocol):
    """What the metrics read of a request that ended (services.gateway.session.ChoiceSession)."""

    @property
    def started(self) -> float: ...
    @property
    def first_event_at(self) -> float | None: ...
    @property
    def finished(self) -> bool: ...
    @property
    def final(self) -> TextDelta | None: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def token_gaps(self) -> TokenGaps: ...
    @property
    def timeline(self) -> Timeline: ...


class _TokenGapCollector:
    """Exports the merged token gaps under vLLM's two names for them (prometheus_client's
    Histogram cannot take a whole request's counts at once)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.gaps = BucketHistogram(TOKEN_GAP_BUCKETS)

    def collect(self) -> Iterator[Metric]:
        counts = self.gaps.snapshot()
        buckets = cumulative_buckets(counts, TOKEN_GAP_BUCKETS)
        assert buckets is not None  # same bounds by construction
        for name, help_text in (
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
            # vLLM's older name for the same figure (deprecated there in 0.11); old dashboards use it.
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds."),
        ):
            family = HistogramMetricFamily(name, help_text, labels=MODEL_LABEL)
            family.add_metric([self.model_name], buckets, counts.total)
            yield family


class RequestMetrics:
    """The gateway-side series, registered in ``registry`` (one per app, never the global one)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help_text, MODEL_LABEL, buckets=buckets, registry=registry).labels(model_name)

        def counter(name: str, help_text: str) -> Counter:
            return Counter(name, help_text, MODEL_LABEL, registry=registry).labels(model_name)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            TOKEN_GAP_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", TOKEN_COUNT_BUCKETS
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*MODEL_LABEL, "finished_reason"],
            registry=registry,
        )
        # Every reason from the start, as vLLM does, so that a rate() has a series before the first.
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._gaps = _TokenGapCollector(model_name)
        registry.register(self._gaps)

        # Our own: HTTP answers, and what the gateway holds for its clients.
        self.responses = Counter(
            "scalellm:gateway_requests",
            "Answers of the completion endpoints, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.aborted = Counter(
            "scalellm:gateway_aborted",
            "Requests the gateway aborted in the pipeline: client gone, timed out or cut off.",
            registry=registry,
        )
        slow = Counter(
            "scalellm:gateway_slow_clients",
            "Streaming clients cut off for not reading, by bound.",
            ["reason"],
            registry=registry,
        )
        self.slow_clients = {reason: slow.labels(reason) for reason in SLOW_CLIENT_REASONS}
        stage = Histogram(
            "scalellm:request_stage_seconds",
            "Time a finished request spent in each segment of the pipeline (shared/timeline.py): the "
            "stages, the queues between them, and the first output's way back.",
            [*MODEL_LABEL, "segment"],
            buckets=SEGMENT_BUCKETS,
            registry=registry,
        )
        self.segments = {name: stage.labels(model_name, name) for name in SEGMENT_NAMES}
        self.in_flight = Gauge("scalellm:gateway_requests_in_flight", "Requests in the gateway now.", registry=registry)
        self.buffered_bytes = Gauge(
            "scalellm:gateway_buffered_bytes", "Output waiting in the gateway for its clients.", registry=registry
        )

    def request_closed(self, request: ClosedRequest, now: float) -> None:
        """Once per request, whatever ended it (``now`` on the clock of ``request.started``)."""
        self._gaps.gaps.merge(request.token_gaps.histogram)
        tokens = request.completion_tokens
        self.generation_tokens.inc(tokens)
        final = request.final
        if request.first_event_at is not None and (tokens or final is not None):
            self.time_to_first_token.observe(request.first_event_at - request.started)
        if not request.finished:  # its client went, it timed out or was cut off: aborted here
            self.aborted.inc()
            self.success["abort"].inc()
            return
        if final is None:
            return  # a stage refused it (RequestFailed): counted in scalellm:gateway_requests by status
        if final.finish_reason in self.success:
            self.success[final.finish_reason].inc()
        prompt = final.usage.prompt_tokens if final.usage else 0
        completion = final.usage.completion_tokens if final.usage else tokens
        self.prompt_tokens.inc(prompt)
        # The usage is what the client is told; what arrived is already counted.
        self.generation_tokens.inc(max(0, completion - tokens))
        self.request_prompt_tokens.observe(prompt)
        self.request_generation_tokens.observe(completion)
        self.e2e_latency.observe(now - request.started)
        for name, span in segments(request.timeline).items():
            self.segments[name].observe(max(0.0, span))  # hosts' clocks may disagree a little
        if completion > 1 and request.first_event_at is not None:
            decode = request.token_gaps.histogram.snapshot().total
            self.time_per_output_token.observe(decode / (completion - 1))
