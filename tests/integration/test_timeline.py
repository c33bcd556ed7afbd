"""The stage timeline (issue 12) against the real echo pipeline: every hop, in the order a request
passes them, in the response that asks for it; the segments in the metrics."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from shared.timeline import GATEWAY_RECEIVED, GATEWAY_SENT, SEGMENTS
from tests.integration.harness import Pipeline
from tests.integration.test_metrics import scrape, total

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

CHAIN = [SEGMENTS[0][1], *(end for _, _, end in SEGMENTS)]  # every hop, in the order passed


def check_timeline(timeline: dict[str, Any]) -> None:
    hops, segments = timeline["hops"], timeline["segments"]
    assert set(hops) == {*CHAIN, "gateway_first_output"}
    times = [hops[hop] for hop in CHAIN]
    assert times == sorted(times), hops  # one host, one clock: each hop after the one before
    assert list(segments)[: len(SEGMENTS)] == [name for name, _, _ in SEGMENTS]
    chain = sum(segments[name] for name, _, _ in SEGMENTS)
    assert chain == pytest.approx(hops[GATEWAY_SENT] - hops[GATEWAY_RECEIVED], abs=1e-5)
    # The echo engine steps every 5 ms: 8 tokens take at least 7 steps after the first.
    assert segments["decode"] >= 7 * 0.005


def test_a_response_shows_each_choices_timeline_when_asked(echo_pipeline: Pipeline) -> None:
    url = echo_pipeline.gateway_url
    body = {"prompt": "one two three four", "max_tokens": 8, "ignore_eos": True, "n": 2, "return_timeline": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert len(reply["choices"]) == 2
    for choice in reply["choices"]:
        check_timeline(choice["timeline"])
    plain = httpx.post(f"{url}/v1/completions", json=body | {"return_timeline": False}, timeout=30).json()
    assert all("timeline" not in choice for choice in plain["choices"])


def test_a_stream_shows_the_timeline_in_its_last_chunk(echo_pipeline: Pipeline) -> None:
    body = {
        "messages": [{"role": "user", "content": "Say something long enough."}],
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "return_timeline": True,
    }
    reply = httpx.post(f"{echo_pipeline.gateway_url}/v1/chat/completions", json=body, timeout=30)
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    with_timeline = [c for c in chunks if "timeline" in c["choices"][0]]
    assert len(with_timeline) == 1 and with_timeline[0]["choices"][0]["finish_reason"] == "length"
    check_timeline(with_timeline[0]["choices"][0]["timeline"])


def test_every_segment_has_a_histogram(echo_pipeline: Pipeline) -> None:
    httpx.post(f"{echo_pipeline.gateway_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    types, found = scrape(echo_pipeline)
    assert types["scalellm:request_stage_seconds"] == "histogram"
    for name, _, _ in SEGMENTS:
        assert total(found, "scalellm:request_stage_seconds_count", segment=name) >= 1, name
