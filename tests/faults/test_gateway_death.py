"""SIGKILL a gateway with requests in flight: the engines stop its requests within 2 s of its
heartbeat expiring and its response stream is deleted, while another gateway's requests carry on.

Real processes (echo engine) against a real redis-server.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.transport import StreamNames
from tests.faults.streams import heartbeats, prompts, stream_one, wait_until
from tests.integration.harness import Pipeline, ServiceProcess

pytestmark = pytest.mark.integration

PREFIX = "faults-gw"
NAMES = StreamNames(PREFIX)
DOOMED = 48  # streams through the gateway that dies: long enough to run for a minute
DOOMED_TOKENS = 3000
KEPT = 8  # streams through the gateway that lives: still running when the other dies
KEPT_TOKENS = 200
ENGINE = {"engine_backend": "echo", "echo_step_delay_ms": "20"}
ABORT_LIMIT_S = 2.0  # after the heartbeat expired


@pytest.fixture
def pipeline(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[Pipeline, redis.Redis, ServiceProcess, str, str]]:
    """Tokenizer, engine, detokenizer, and two gateways: (pipeline, redis, doomed gateway, its url, other url)."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        pipeline = Pipeline(server.url, tmp_path, env={"SCALELLM_STREAM_PREFIX": PREFIX})
        try:
            pipeline.start("tokenizer")
            pipeline.start("engine", **ENGINE)
            pipeline.start("detokenizer")
            doomed = pipeline.start_gateway(request_timeout_s="120")
            doomed_url = pipeline.gateway_url
            pipeline.wait_ready()
            pipeline.start_gateway(request_timeout_s="120")
            pipeline.wait_ready()
            yield pipeline, client, doomed, doomed_url, pipeline.gateway_url
        finally:
            pipeline.stop_all()
            client.close()


def echoed(tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    return str(tokenizer.decode((ids * (max_tokens // len(ids) + 1))[:max_tokens]))


def test_a_dead_gateways_requests_stop_in_the_engines_and_its_stream_goes(
    pipeline: tuple[Pipeline, redis.Redis, ServiceProcess, str, str], tokenizer: PreTrainedTokenizerBase
) -> None:
    services, client, doomed, doomed_url, kept_url = pipeline
    doomed_id = httpx.get(f"{doomed_url}/ready", timeout=5).json()["gateway_id"]
    responses = NAMES.responses(doomed_id)
    kept_prompts = prompts(KEPT, "kept")

    def pending() -> int:
        return int(client.xpending(NAMES.tokenized, NAMES.engine_group)["pending"])

    def engine_running() -> int:
        return sum(beat.running for beat in heartbeats(client, NAMES, "engine").values())

    async def scenario() -> dict[str, float]:
        limits = httpx.Limits(max_connections=DOOMED + KEPT + 8)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            doomed_tasks = [
                asyncio.create_task(stream_one(http, doomed_url, p, DOOMED_TOKENS, 120))
                for p in prompts(DOOMED, "doomed")
            ]
            kept_tasks = [asyncio.create_task(stream_one(http, kept_url, p, KEPT_TOKENS, 120)) for p in kept_prompts]
            await wait_until(lambda: pending() == DOOMED + KEPT and client.exists(responses) == 1, 30, "all to run")
            await asyncio.sleep(0.5)
            doomed.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.to_thread(doomed.process.wait)
            timings = {
                "heartbeat expired": await wait_until(
                    lambda: not client.exists(NAMES.heartbeat("gateway", doomed_id)), 10, "the heartbeat to expire"
                )
            }
            expired = time.monotonic()
            # Its requests are aborted: their entries acknowledged, and the engine reports them gone.
            await wait_until(lambda: pending() <= KEPT, 10, "the dead gateway's requests to stop")
            timings["requests stopped"] = time.monotonic() - expired
            await wait_until(lambda: client.exists(responses) == 0, 10, "its response stream to go")
            timings["stream deleted"] = time.monotonic() - expired
            await wait_until(lambda: engine_running() <= KEPT, 10, "the engine's running count to drop")
            timings["engine heartbeat shows it"] = time.monotonic() - expired
            timings["killed to stopped"] = timings["requests stopped"] + expired - killed
            doomed_outcomes = await asyncio.gather(*doomed_tasks)
            kept_outcomes = await asyncio.gather(*kept_tasks)
        assert all(o.error is not None and not o.hung for o in doomed_outcomes)  # their client saw it die
        for outcome in kept_outcomes:
            assert outcome.ok, outcome
            assert outcome.text == echoed(tokenizer, outcome.prompt, KEPT_TOKENS)
        return timings

    timings = asyncio.run(scenario())
    print("\n" + ", ".join(f"{what}: {seconds:.2f} s" for what, seconds in timings.items()))
    assert timings["requests stopped"] < ABORT_LIMIT_S, services.logs()
    assert timings["stream deleted"] < ABORT_LIMIT_S, services.logs()
    time.sleep(0.5)
    assert client.exists(responses) == 0  # late output did not bring it back
    assert pending() == 0
