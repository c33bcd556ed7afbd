"""SIGKILL a tokenizer or an engine under 64 concurrent streams: nothing lost, hung or garbled,
and the requests it held are back within 2 s (noticed from its heartbeat, not from idle timeouts).

Real processes (echo engine) against a real redis-server. Each test first runs the same load with
no fault, for the texts every request must give and the latency the fault may add to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.transport import StreamNames
from tests.faults.streams import (
    Outcome,
    prompts,
    replica_id_in,
    run_load,
    summary,
    wait_until,
)
from tests.integration.harness import Pipeline, ServiceProcess

pytestmark = pytest.mark.integration

PREFIX = "faults-fo"
NAMES = StreamNames(PREFIX)
CONCURRENCY = 64
MAX_TOKENS = 64
# 20 ms per step: each request decodes for about 1.3 s.
ENGINE = {"engine_backend": "echo", "echo_step_delay_ms": "20"}
ADDED_LATENCY_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    """Two tokenizers, two engines, a detokenizer and a gateway; the idle-claim fallback is kept long
    (its default, 30 s), so a prompt recovery can only come from the heartbeats."""
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), env={"SCALELLM_STREAM_PREFIX": PREFIX})
    try:
        pipeline.start("tokenizer")
        pipeline.start("tokenizer")
        pipeline.start("engine", **ENGINE)
        pipeline.start("engine", **ENGINE)
        pipeline.start("detokenizer")
        pipeline.start_gateway(request_timeout_s="60")
        pipeline.wait_ready()
        yield pipeline
    finally:
        pipeline.stop_all()


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def live(pipeline: Pipeline, role: str) -> list[ServiceProcess]:
    return [s for s in pipeline.processes if s.name.startswith(role) and s.process.poll() is None]


def baseline(pipeline: Pipeline, tag: str) -> tuple[dict[str, str], float]:
    outcomes = asyncio.run(run_load(pipeline.gateway_url, prompts(CONCURRENCY, tag), max_tokens=MAX_TOKENS))
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    return {o.prompt: o.text for o in outcomes}, max(o.latency_s for o in outcomes)


def check(outcomes: list[Outcome], expected: dict[str, str], base_latency_s: float, pipeline: Pipeline) -> float:
    counts = summary(outcomes, expected)
    added = max(o.latency_s for o in outcomes) - base_latency_s
    print(f"\n{counts}; max latency {max(o.latency_s for o in outcomes):.2f} s, fault-free {base_latency_s:.2f} s")
    assert counts == {"ok": CONCURRENCY, "error": 0, "hung": 0, "differing": 0}, pipeline.logs()
    assert added < ADDED_LATENCY_LIMIT_S, f"added latency {added:.2f} s\n{pipeline.logs()}"
    return added


def test_sigkill_of_a_tokenizer_holding_requests(pipeline: Pipeline, redis_client: redis.Redis) -> None:
    expected, base_latency = baseline(pipeline, "tok")
    victim, survivor = live(pipeline, "tokenizer")[:2]
    victim_id = replica_id_in(victim.log(), "tokenizer")

    async def fault(progress: list[Outcome | None]) -> None:
        # Freeze the victim, then read entries in its name, as it would have just before
        # dying: killing a tokenizer in the few milliseconds it holds a batch is luck.
        os.kill(victim.process.pid, signal.SIGSTOP)
        held = 0
        deadline = time.monotonic() + 5
        while held < 8 and time.monotonic() < deadline:
            reply = redis_client.xreadgroup(NAMES.tokenizer_group, victim_id, {NAMES.requests: ">"}, count=8 - held)
            held += sum(len(entries) for _, entries in reply or [])
            await asyncio.sleep(0.005)
        assert held > 0, "the load never reached the requests stream"
        victim.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.process.wait)

    outcomes = asyncio.run(run_load(pipeline.gateway_url, list(expected), max_tokens=MAX_TOKENS, during=fault))
    added = check(outcomes, expected, base_latency, pipeline)
    print(f"tokenizer SIGKILL: added latency {added:.2f} s")
    assert f"from gone consumer {victim_id}" in survivor.log()
    assert redis_client.xpending(NAMES.requests, NAMES.tokenizer_group)["pending"] == 0
    # The gone replica has left the group and the registry.
    consumers = {c["name"].decode() for c in redis_client.xinfo_consumers(NAMES.requests, NAMES.tokenizer_group)}
    assert victim_id not in consumers
    poll(lambda: not redis_client.hexists(NAMES.registry("tokenizer"), victim_id), "the registry to forget it")
    pipeline.start("tokenizer")  # back to two, as the launcher would


def test_sigkill_of_an_engine_running_requests(pipeline: Pipeline, redis_client: redis.Redis) -> None:
    expected, base_latency = baseline(pipeline, "eng")
    engines = {replica_id_in(s.log(), "engine"): s for s in live(pipeline, "engine")}
    victims: list[tuple[str, int]] = []

    def held() -> dict[str, int]:
        """Requests each engine holds (pending entries by consumer = replica id)."""
        found = redis_client.xinfo_consumers(NAMES.tokenized, NAMES.engine_group)
        return {c["name"].decode(): int(c["pending"]) for c in found}

    async def fault(progress: list[Outcome | None]) -> None:
        # Once the engines hold most requests and have streamed a little, kill the busier.
        # (Watched in Redis: the client, parsing thousands of events, lags behind the engines.)
        await wait_until(lambda: sum(held().values()) >= CONCURRENCY * 3 // 4, 30, "the engines to take the load")
        await asyncio.sleep(0.2)
        holding = held()
        victim_id = max(engines, key=lambda rid: holding.get(rid, 0))
        victims.append((victim_id, holding.get(victim_id, 0)))
        engines[victim_id].process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(engines[victim_id].process.wait)

    outcomes = asyncio.run(run_load(pipeline.gateway_url, list(expected), max_tokens=MAX_TOKENS, during=fault))
    added = check(outcomes, expected, base_latency, pipeline)
    [(victim_id, running)] = victims
    print(f"engine SIGKILL holding {running} requests: added latency {added:.2f} s")
    assert running > 0, "the killed engine held no request: the test proved nothing"
    survivor = next(s for rid, s in engines.items() if rid != victim_id)
    assert f"from gone consumer {victim_id}" in survivor.log()
    assert "resuming" in survivor.log()  # continued after the published tokens, not re-run
    poll(lambda: redis_client.xpending(NAMES.tokenized, NAMES.engine_group)["pending"] == 0, "every entry's ack")
    poll(lambda: not redis_client.hexists(NAMES.registry("engine"), victim_id), "the registry to forget it")
    pipeline.start("engine", **ENGINE)
