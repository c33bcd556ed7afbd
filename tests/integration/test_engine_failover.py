"""An engine that dies mid-request loses nothing: another replica takes the request over."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline, ServiceProcess

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
# The idle-claim fallback keeps its default (30 s): the takeover must come from the heartbeat.
ENGINE = {"engine_backend": "echo", "echo_step_delay_ms": "25"}


@pytest.fixture
def pipeline(redis_url: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[Pipeline]:
    pipeline = Pipeline(redis_url, tmp_path, env={"SCALELLM_STREAM_PREFIX": "failover"})
    try:
        pipeline.start("tokenizer")
        pipeline.start("detokenizer")
        pipeline.start_gateway(request_timeout_s="60")
        yield pipeline
    finally:
        pipeline.stop_all()


def test_a_request_survives_its_engine_being_killed(pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase) -> None:
    first: ServiceProcess = pipeline.start("engine", **ENGINE)
    pipeline.wait_ready()
    prompt = "A request that outlives its engine"
    max_tokens = 120  # 3 s of echo steps: time to kill the engine half way
    chunks: list[str] = []
    first_text = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        with httpx.stream("POST", f"{pipeline.gateway_url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(line[6:])
                    first_text.set()

    client = threading.Thread(target=stream)
    client.start()
    assert first_text.wait(30), pipeline.logs()
    time.sleep(0.5)
    first.process.send_signal(signal.SIGKILL)  # no drain, no goodbye: its entry stays pending
    first.process.wait()
    second = pipeline.start("engine", **ENGINE)
    client.join(60)
    assert not client.is_alive(), pipeline.logs()

    events = [json.loads(chunk) for chunk in chunks]
    ids = tokenizer(prompt)["input_ids"]
    expected = tokenizer.decode((ids * (max_tokens // len(ids) + 1))[:max_tokens])
    # The second engine continues after the tokens the first one published (its output
    # checkpoint), so the text is whole and nothing is repeated.
    assert "".join(e["choices"][0]["text"] for e in events) == expected, pipeline.logs()
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "took over 1 entries" in second.log()
    assert "resuming 1 taken-over requests" in second.log()
