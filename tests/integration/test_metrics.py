"""GET /metrics against the real echo pipeline: vLLM's names, counts equal to what was sent, and the
engines' figures from their heartbeats (a running request, and its release when the client goes).

This module starts its own pipeline (the fixture is per module), so every count starts at zero.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

MODEL = "SmolLM2-135M-Instruct"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# Every series docs/api.md promises from a pipeline that has served requests.
VLLM_SERIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
}


def scrape(pipeline: Pipeline) -> tuple[dict[str, str], Samples]:
    """Family types by name, and every sample; the text must parse as Prometheus text."""
    text = httpx.get(f"{pipeline.gateway_url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    found = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name: f.type for f in families}, found


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` that has these labels (e.g. over engines)."""
    want = set(labels.items())
    return sum(v for (n, series), v in found.items() if n == name and want <= series)


def wait_for(pipeline: Pipeline, check: Callable[[Samples], bool], what: str, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        _, found = scrape(pipeline)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {what}")
        time.sleep(0.1)


def test_vllm_series_count_what_was_sent(echo_pipeline: Pipeline) -> None:
    url = echo_pipeline.gateway_url
    usages: list[dict[str, int]] = []
    reasons: list[str] = []
    for body in (
        {"prompt": "Hello world, this is a test", "max_tokens": 12},
        {"prompt": [5, 6, 7], "max_tokens": 9},
    ):
        reply = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=30).json()
        usages.append(reply["usage"])
        reasons.append(reply["choices"][0]["finish_reason"])
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
        timeout=30,
    ).json()
    usages.append(chat["usage"])
    reasons.append(chat["choices"][0]["finish_reason"])  # the echoed end-of-turn token: "stop"
    streamed = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": MODEL,
            "prompt": "one two three",
            "max_tokens": 20,
            "stream": True,
            "stream_options": {"include_usage": True},
        },  # fmt: skip
        timeout=30,
    )
    usages.append(json.loads(streamed.text.split("data: ")[-2])["usage"])  # the chunk before [DONE]
    reasons.append("length")

    types, found = scrape(echo_pipeline)
    for name, kind in VLLM_SERIES.items():
        assert types.get(name) == kind, name
        assert any(n.startswith(name) and ("model_name", MODEL) in labels for n, labels in found), name
    m = {"model_name": MODEL}
    assert total(found, "vllm:prompt_tokens_total", **m) == sum(u["prompt_tokens"] for u in usages)
    assert total(found, "vllm:generation_tokens_total", **m) == sum(u["completion_tokens"] for u in usages)
    for reason in ("stop", "length"):
        assert total(found, "vllm:request_success_total", **m, finished_reason=reason) == reasons.count(reason)
    assert total(found, "vllm:e2e_request_latency_seconds_count", **m) == 4
    assert total(found, "vllm:time_to_first_token_seconds_count", **m) == 4
    assert total(found, "vllm:request_generation_tokens_sum", **m) == sum(u["completion_tokens"] for u in usages)
    assert total(found, "vllm:inter_token_latency_seconds_count", **m) == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    # One engine: every request waited in its queue once (its heartbeat is up to 0.75 s old).
    wait_for(echo_pipeline, lambda f: total(f, "vllm:request_queue_time_seconds_count", **m) == 4, "4 queue waits")
    assert total(found, "scalellm:gateway_requests_total", endpoint="completions", status="200") == 3
    assert total(found, "scalellm:replicas", role="tokenizer") == 2
    assert total(found, "scalellm:replicas", role="detokenizer") == 2
    assert total(found, "scalellm:replicas", role="engine") == 1
    assert total(found, "scalellm:redis_up") == 1
    streams = {dict(labels)["stream"] for n, labels in found if n == "scalellm:stream_length"}
    assert streams == {
        "requests",
        "tokenized",
        "generated:0",
        "generated:1",
        "generated:2",
        "generated:3",
        "deadletter",
    }
    assert total(found, "scalellm:stream_pending", stream="tokenized", group="engines") == 0


def long_request(url: str, *, stream: bool, stop: threading.Event) -> threading.Thread:
    """A request that runs for a minute unless its client goes away (``stop``)."""

    def client() -> None:
        # Text that decodes to text (ids 5, 6, 7 are special tokens: an empty stream), so chunks flow.
        body = {"model": MODEL, "prompt": "one two three", "max_tokens": 8000, "stream": stream}
        try:
            # A non-streaming client cannot be interrupted: its read timeout closes the connection.
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=None if stream else 5) as reply:
                for _ in reply.iter_raw():
                    if stop.is_set():
                        return  # leaving the block closes the connection mid-stream
        except httpx.TimeoutException:
            pass

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_running_request_shows_in_the_engine_figures_and_a_gone_client_frees_it(
    echo_pipeline: Pipeline, stream: bool
) -> None:
    m = {"model_name": MODEL}
    stop = threading.Event()
    thread = long_request(echo_pipeline.gateway_url, stream=stream, stop=stop)

    def running(found: Samples) -> bool:
        # The gateway's figure too: the engine's come from a heartbeat up to 0.75 s old, which can
        # still count the module's previous request while this one is not in the gateway yet.
        return (
            total(found, "vllm:num_requests_running", **m) == 1
            and total(found, "vllm:kv_cache_usage_perc", **m) > 0
            and total(found, "scalellm:gateway_requests_in_flight") == 1
        )

    try:
        found = wait_for(echo_pipeline, running, "the request running in the engine and in the gateway")
        aborted = total(found, "vllm:request_success_total", **m, finished_reason="abort")
    finally:
        stop.set()  # the client goes away long before its 8000 tokens (40 s) are out

    def freed(found: Samples) -> bool:
        return (
            total(found, "vllm:num_requests_running", **m) == 0 and total(found, "vllm:kv_cache_usage_perc", **m) == 0
        )

    found = wait_for(echo_pipeline, freed, "the engine's slot and KV freed", timeout=10)
    thread.join(5)
    assert total(found, "vllm:request_success_total", **m, finished_reason="abort") == aborted + 1
    assert total(found, "scalellm:gateway_requests_in_flight") == 0
