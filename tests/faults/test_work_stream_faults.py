"""Work streams under faults: a poison entry, and a backlog larger than the streams' MAXLEN.

Real processes (echo engine) against a real redis-server. The engine is started late in
each test, so that work can pile up (or be poisoned) before anyone serves it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.transport import StreamNames
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
PREFIX = "faults-ws"
MAX_DELIVERIES = 2
STREAM_MAXLEN = 5  # what every stream was trimmed to before work streams were trimmed by progress
MAX_QUEUED = 40
ENGINE = {"engine_backend": "echo", "echo_step_delay_ms": "5"}
NAMES = StreamNames(PREFIX)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        # Small stream nodes make "MAXLEN ~ 5" trim to about 5 entries instead of whole
        # 100-entry nodes, so a length-trimmed stream would visibly lose the backlog.
        redis.Redis.from_url(server.url).config_set("stream-node-max-entries", 4)
        yield server.url


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    """Gateway, tokenizer, detokenizer; no engine (each test starts its own)."""
    env = {
        "SCALELLM_STREAM_PREFIX": PREFIX,
        "SCALELLM_STREAM_MAXLEN": str(STREAM_MAXLEN),
        "SCALELLM_MAX_DELIVERIES": str(MAX_DELIVERIES),
        "SCALELLM_CLAIM_IDLE_MS": "500",
    }
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), env=env)
    try:
        pipeline.start("tokenizer")
        pipeline.start("detokenizer")
        pipeline.start_gateway(request_timeout_s="90", max_queued_requests=str(MAX_QUEUED))
        wait_until(lambda: missing_roles(pipeline) == ["engine"], 120, pipeline)
        yield pipeline
    finally:
        pipeline.stop_all()


def missing_roles(pipeline: Pipeline) -> list[str] | None:
    try:
        return list(httpx.get(f"{pipeline.gateway_url}/ready", timeout=2).json()["missing"])
    except httpx.HTTPError:
        return None


def wait_until(condition: Callable[[], Any], timeout_s: float, pipeline: Pipeline) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"condition not met within {timeout_s}s\n{pipeline.logs()}")


def completion(pipeline: Pipeline, prompt: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    return httpx.post(f"{pipeline.gateway_url}/v1/completions", json=body, timeout=90)


def test_a_poison_entry_fails_its_request_clearly_and_the_pipeline_keeps_serving(
    pipeline: Pipeline, client: redis.Redis
) -> None:
    client.xgroup_create(NAMES.tokenized, NAMES.engine_group, id="0", mkstream=True)
    answer: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answer.append(completion(pipeline, "a poison request")))
    caller.start()
    [(entry_id, _)] = wait_until(lambda: client.xrange(NAMES.tokenized), 30, pipeline)
    # Consumers that take the entry and die with it: one read, then claims by the next ones.
    assert client.xreadgroup(NAMES.engine_group, "ghost-1", {NAMES.tokenized: ">"}, count=1)
    for n in range(2, MAX_DELIVERIES + 1):
        assert client.xclaim(NAMES.tokenized, NAMES.engine_group, f"ghost-{n}", 0, [entry_id])

    engine = pipeline.start("engine", **ENGINE)  # claims it once idle: one delivery too many
    caller.join(60)
    assert answer, pipeline.logs()
    [response] = answer
    assert response.status_code == 500, response.text
    assert f"dead-lettered after {MAX_DELIVERIES} deliveries" in response.json()["error"]["message"]

    [(_, parked)] = client.xrange(NAMES.deadletter)
    assert parked[b"id"] == entry_id and parked[b"reason"] == b"max_deliveries"
    assert parked[b"stream"] == NAMES.tokenized.encode()
    assert client.xpending(NAMES.tokenized, NAMES.engine_group)["pending"] == 0
    assert "dead-lettering entry" in engine.log()

    healthy = completion(pipeline, "a healthy request")
    assert healthy.status_code == 200, healthy.text
    engine.stop()


async def burst(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=90) as http:
        body = {"model": MODEL, "max_tokens": 2}
        return list(
            await asyncio.gather(
                *(http.post("/v1/completions", json=body | {"prompt": f"queued {i}"}) for i in range(count))
            )
        )


def test_a_backlog_beyond_maxlen_is_kept_and_the_gateway_refuses_past_its_bound(
    pipeline: Pipeline, client: redis.Redis
) -> None:
    total = MAX_QUEUED + 20
    results: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(burst(pipeline.gateway_url, total))))
    sender.start()
    # With no engine, every request is either refused at once or waits in {p}:tokenized.
    wait_until(lambda: client.xlen(NAMES.tokenized) >= MAX_QUEUED, 60, pipeline)
    queued = -1
    while queued != client.xlen(NAMES.tokenized):  # until the last of the burst has been tokenized
        queued = int(client.xlen(NAMES.tokenized))
        time.sleep(1.0)
    assert queued >= MAX_QUEUED > STREAM_MAXLEN  # nothing dropped by length
    refused = completion(pipeline, "one too many")
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["code"] == "queue_full"

    engine = pipeline.start("engine", **ENGINE)
    sender.join(90)
    assert len(results) == total, pipeline.logs()
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == queued and statuses.count(503) == total - queued, statuses
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 503)

    # The backlog drains, the work streams are trimmed by progress, and requests are taken again.
    wait_until(lambda: completion(pipeline, "after the backlog").status_code == 200, 30, pipeline)
    assert client.xlen(NAMES.tokenized) < STREAM_MAXLEN
    assert client.xlen(NAMES.deadletter) == 1  # only the poison entry of the test before
    engine.stop()
