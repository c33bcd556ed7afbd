"""GET /metrics: the pure parts (token gaps, heartbeats -> series, streams -> series, requests)
and the gateway app in-process (fakeredis and a scripted pipeline) scraped as Prometheus would."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics, TokenGaps
from services.gateway.metrics.engines import engine_families, engine_label
from services.gateway.metrics.pipeline import PipelineFigures, pipeline_families
from services.gateway.metrics.requests import TOKEN_GAP_BUCKETS
from shared.histogram import REQUEST_LATENCY_BUCKETS, BucketHistogram
from shared.messages import Heartbeat, TextDelta, Usage
from shared.transport import StreamNames
from shared.work_streams import GroupProgress, StreamProgress
from tests.fakes.gateway import running

MODEL = "SmolLM2-135M-Instruct"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text, by name and labels; the text must parse."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


# -- token gaps -----------------------------------------------------------------


def test_token_gaps_sum_to_first_to_last_token_and_count_every_token_after_the_first() -> None:
    gaps = TokenGaps()
    gaps.arrived(10.0, 3)  # the first delta: 2 tokens came with the first one, no gap
    gaps.arrived(10.0625, 1)
    gaps.arrived(10.25, 0)  # text without tokens changes nothing
    gaps.arrived(10.5625, 4)  # 0.5 s for 4 batched tokens: 4 gaps of 0.125 s
    counts = gaps.histogram.snapshot()
    assert counts.count == 3 - 1 + 1 + 4
    assert counts.total == pytest.approx(10.5625 - 10.0)
    bucket = dict(zip([*TOKEN_GAP_BUCKETS, float("inf")], counts.counts))
    assert (bucket[0.01], bucket[0.075], bucket[0.15]) == (2, 1, 4)


def test_bucket_histogram_puts_a_value_on_a_bound_in_that_bound_and_merges() -> None:
    a, b = BucketHistogram([1.0, 2.0]), BucketHistogram([1.0, 2.0])
    a.observe(1.0)
    a.observe(5.0, weight=2)
    b.observe(1.5)
    a.merge(b)
    assert a.snapshot().counts == (1, 1, 2) and a.snapshot().total == pytest.approx(12.5)
    with pytest.raises(ValueError):
        a.merge(BucketHistogram([1.0]))


# -- engines, from heartbeats -------------------------------------------------------


def beat(replica_id: str, **load: object) -> Heartbeat:
    return Heartbeat.model_validate({"role": "engine", "replica_id": replica_id, "time": 1.0, **load})


def render(families: list) -> str:  # type: ignore[type-arg]
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self) -> list:  # type: ignore[type-arg]
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())
    return generate_latest(registry).decode()


def test_engine_label_is_the_random_suffix_never_the_host_name() -> None:
    assert engine_label("engine-gpu-host-7.example-1a2b3c4d") == "1a2b3c4d"
    other = engine_label("my-own-engine")
    assert len(other) == 8 and "my" not in other and other == engine_label("my-own-engine")


def test_heartbeats_become_vllm_series_one_per_engine() -> None:
    queue = [0] * (len(REQUEST_LATENCY_BUCKETS) + 1)
    queue[0], queue[3] = 2, 1  # two waits up to 0.3 s, one between 0.8 and 1 s
    beats = [
        beat(
            "engine-h1-0000000a",
            running=3,
            waiting=2,
            kv_usage=0.5,
            forward_share=0.9,
            prefix_cache_queries=100,
            prefix_cache_hits=40,
            preemptions=2,
            queue_time_counts=queue,
            queue_time_sum=1.2,
            kernels="cpu: dtype bfloat16, linears: oneDNN prepacked",
        ),  # fmt: skip
        beat("engine-h2-0000000b", running=1),  # an engine that does not measure its queue time
        Heartbeat(role="tokenizer", replica_id="t", time=1.0),  # not an engine: ignored
    ]
    text = render(engine_families(beats, MODEL))
    found = samples(text)
    a, b = {"model_name": MODEL, "engine": "0000000a"}, {"model_name": MODEL, "engine": "0000000b"}
    assert value(found, "vllm:num_requests_running", **a) == 3 and value(found, "vllm:num_requests_running", **b) == 1
    assert value(found, "vllm:num_requests_waiting", **a) == 2
    assert value(found, "vllm:kv_cache_usage_perc", **a) == 0.5
    assert value(found, "vllm:prefix_cache_queries_total", **a) == 100
    assert value(found, "vllm:prefix_cache_hits_total", **a) == 40
    assert value(found, "vllm:num_preemptions_total", **a) == 2
    assert value(found, "vllm:num_preemptions_total", **b) == 0
    assert value(found, "scalellm:engine_forward_share", **a) == 0.9
    assert value(found, "scalellm:engine_kernels", **a, kernels="cpu: dtype bfloat16, linears: oneDNN prepacked") == 1
    assert not any(name == "scalellm:engine_kernels" and ("engine", "0000000b") in labels for name, labels in found)
    assert value(found, "vllm:request_queue_time_seconds_bucket", **a, le="0.3") == 2
    assert value(found, "vllm:request_queue_time_seconds_bucket", **a, le="1.0") == 3
    assert value(found, "vllm:request_queue_time_seconds_bucket", **a, le="+Inf") == 3
    assert value(found, "vllm:request_queue_time_seconds_count", **a) == 3
    assert value(found, "vllm:request_queue_time_seconds_sum", **a) == pytest.approx(1.2)
    assert not any(name.startswith("vllm:request_queue_time") and ("engine", "0000000b") in labels
                   for name, labels in found)  # fmt: skip
    assert types(text)["vllm:num_preemptions"] == "counter"
    assert types(text)["vllm:kv_cache_usage_perc"] == "gauge"


def test_stream_progress_and_replicas_become_scalellm_series() -> None:
    names = StreamNames("p")
    figures = PipelineFigures(
        ok=True,
        live={"engine": [beat("engine-h-0000000a", running=1)], "tokenizer": [], "gateway": []},
        streams=(
            StreamProgress("p:requests", 7, (GroupProgress("tokenizers", "1-0", pending=2, lag=5),)),
            StreamProgress("p:generated:1", 3, (GroupProgress("detokenizers", "1-0", pending=1, lag=None),)),
            StreamProgress("p:deadletter", 0, ()),
        ),
    )
    found = samples(render(pipeline_families(figures, names, MODEL)))
    assert value(found, "scalellm:redis_up") == 1
    assert value(found, "scalellm:replicas", role="engine") == 1
    assert value(found, "scalellm:replicas", role="detokenizer") == 0
    assert value(found, "scalellm:stream_length", stream="requests") == 7
    assert value(found, "scalellm:stream_lag", stream="requests", group="tokenizers") == 5
    assert value(found, "scalellm:stream_pending", stream="generated:1", group="detokenizers") == 1
    assert ("scalellm:stream_lag", frozenset({"stream": "generated:1", "group": "detokenizers"}.items())) not in found
    assert value(found, "scalellm:stream_length", stream="deadletter") == 0
    assert value(found, "vllm:num_requests_running", model_name=MODEL, engine="0000000a") == 1
    down = samples(render(pipeline_families(PipelineFigures(ok=False), names, MODEL)))
    assert down == {("scalellm:redis_up", frozenset()): 0}


# -- requests, as the gateway sees them ------------------------------------------------


@dataclass
class Ended:
    """A ChoiceSession's figures at its close."""

    started: float = 100.0
    first_event_at: float | None = None
    finished: bool = True
    final: TextDelta | None = None
    completion_tokens: int = 0
    token_gaps: TokenGaps = field(default_factory=TokenGaps)
    timeline: dict[str, float] = field(default_factory=dict)


def finished(prompt: int, completion: int, reason: str = "stop") -> Ended:
    """A request whose tokens came one per delta, 0.125 s apart, from 100.5 s on."""
    ended = Ended(first_event_at=100.5, completion_tokens=completion)
    for i in range(completion):
        ended.token_gaps.arrived(100.5 + 0.125 * i, 1)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    ended.final = TextDelta(request_id="r", text="", finish_reason=reason, usage=usage)  # type: ignore[arg-type]
    return ended


@pytest.mark.anyio
async def test_request_figures_follow_what_each_request_got() -> None:
    metrics = GatewayMetrics(MODEL)
    timed = finished(prompt=3, completion=5)
    # 2 ms in the tokenizer; the clock of the host beside it is 1 ms behind (its queue comes out -1 ms).
    timed.timeline = {
        "gateway_published": 10.0,
        "tokenizer_read": 10.5,
        "tokenizer_done": 10.502,
        "engine_pulled": 10.501,
    }
    metrics.request_closed(timed, now=101.0)
    metrics.request_closed(finished(prompt=4, completion=2, reason="length"), now=102.0)
    aborted = Ended(first_event_at=100.2, finished=False, completion_tokens=3)
    metrics.request_closed(aborted, now=103.0)
    metrics.request_closed(Ended(first_event_at=100.1), now=100.1)  # refused by a stage (RequestFailed)
    metrics.request_done("completions", 200)
    metrics.request_done("completions", 200)
    metrics.request_done("chat_completions", 400)
    metrics.slow_client("timeout")
    text = (await metrics.scrape(in_flight=4, buffered_bytes=10)).decode()
    found = samples(text)
    m = {"model_name": MODEL}
    assert value(found, "vllm:prompt_tokens_total", **m) == 3 + 4
    assert value(found, "vllm:generation_tokens_total", **m) == 5 + 2 + 3
    assert value(found, "vllm:request_success_total", **m, finished_reason="stop") == 1
    assert value(found, "vllm:request_success_total", **m, finished_reason="length") == 1
    assert value(found, "vllm:request_success_total", **m, finished_reason="abort") == 1
    assert value(found, "vllm:request_success_total", **m, finished_reason="error") == 0
    assert value(found, "vllm:time_to_first_token_seconds_count", **m) == 3  # not the refused one
    assert value(found, "vllm:time_to_first_token_seconds_sum", **m) == pytest.approx(0.5 + 0.5 + 0.2)
    assert value(found, "vllm:e2e_request_latency_seconds_count", **m) == 2
    assert value(found, "vllm:e2e_request_latency_seconds_sum", **m) == pytest.approx(1.0 + 2.0)
    assert value(found, "vllm:request_prompt_tokens_sum", **m) == 7
    assert value(found, "vllm:request_generation_tokens_bucket", **m, le="2.0") == 1
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(found, f"{name}_count", **m) == 4 + 1  # tokens after each request's first
        assert value(found, f"{name}_sum", **m) == pytest.approx(0.625)
        assert value(found, f"{name}_bucket", **m, le="0.15") == 5
        assert value(found, f"{name}_bucket", **m, le="0.1") == 0
    assert value(found, "vllm:request_time_per_output_token_seconds_count", **m) == 2
    assert value(found, "vllm:request_time_per_output_token_seconds_sum", **m) == pytest.approx(0.25)
    stage = {"model_name": MODEL, "segment": "tokenizer"}
    assert value(found, "scalellm:request_stage_seconds_count", **stage) == 1  # only the request with a timeline
    assert value(found, "scalellm:request_stage_seconds_sum", **stage) == pytest.approx(0.002)
    assert value(found, "scalellm:request_stage_seconds_sum", **stage | {"segment": "requests_queue"}) == 0.5
    assert value(found, "scalellm:request_stage_seconds_sum", **stage | {"segment": "tokenized_queue"}) == 0.0
    assert value(found, "scalellm:request_stage_seconds_count", **stage | {"segment": "decode"}) == 0
    assert value(found, "scalellm:gateway_requests_total", endpoint="completions", status="200") == 2
    assert value(found, "scalellm:gateway_requests_total", endpoint="chat_completions", status="400") == 1
    assert value(found, "scalellm:gateway_aborted_total") == 1
    assert value(found, "scalellm:gateway_slow_clients_total", reason="timeout") == 1
    assert value(found, "scalellm:gateway_slow_clients_total", reason="buffer") == 0
    assert value(found, "scalellm:gateway_requests_in_flight") == 4
    assert value(found, "scalellm:gateway_buffered_bytes") == 10
    assert not any(name.endswith("_created") for name, _ in found)
    assert types(text)["vllm:e2e_request_latency_seconds"] == "histogram"


@pytest.mark.anyio
async def test_two_gateways_in_one_process_count_apart() -> None:
    one, two = GatewayMetrics(MODEL), GatewayMetrics("other")
    one.request_closed(finished(prompt=3, completion=5), now=101.0)
    found = samples((await two.scrape(0, 0)).decode())
    assert value(found, "vllm:prompt_tokens_total", model_name="other") == 0


# -- the app, in-process ------------------------------------------------------------


@pytest.mark.anyio
async def test_scrape_has_vllm_names_the_requests_sent_and_an_engine_from_its_heartbeat() -> None:
    async with running() as h:
        for _ in range(2):
            assert (await h.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})).status_code == 200
        engine = Heartbeat(role="engine", replica_id="engine-host-0000abcd", time=1.0, running=2, kv_usage=0.25)
        await h.gateway.transport.beat(engine, ttl_s=30)
        reply = await h.http.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        found = samples(reply.text)
        m = {"model_name": MODEL}
        # tests/fakes/gateway.py: "Hello" [1], " world" [2], usage 3 + 2.
        assert value(found, "vllm:prompt_tokens_total", **m) == 6
        assert value(found, "vllm:generation_tokens_total", **m) == 4
        assert value(found, "vllm:request_success_total", **m, finished_reason="stop") == 2
        assert value(found, "vllm:e2e_request_latency_seconds_count", **m) == 2
        assert value(found, "vllm:num_requests_running", **m, engine="0000abcd") == 2
        assert value(found, "vllm:kv_cache_usage_perc", **m, engine="0000abcd") == 0.25
        assert value(found, "scalellm:redis_up") == 1
        assert value(found, "scalellm:replicas", role="engine") == 1
        assert value(found, "scalellm:replicas", role="gateway") == 1  # itself
        assert value(found, "scalellm:stream_length", stream="requests") == 2
        assert value(found, "scalellm:gateway_requests_total", endpoint="completions", status="200") == 2
        assert "engine-host" not in reply.text
