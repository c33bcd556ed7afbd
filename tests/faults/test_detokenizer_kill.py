"""SIGKILL one of two detokenizers under 48 concurrent streams of non-ASCII text.

Every request's streamed text, joined, must equal byte for byte what the same
request gives with no fault (no U+FFFD from a character split at the takeover,
nothing held back for a stop string lost, nothing repeated), and the requests
the dead replica held must resume within 2 s (docs/architecture.md,
"Detokenizer takeover").

Real processes against a real redis-server; the echo engine replays each
prompt's tokens, so the output is non-ASCII wherever the prompt is. The slow
variant does the same with the torch engine and greedy chat completions.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.transport import StreamNames
from tests.faults.streams import CHAT_PROMPTS, sse_events
from tests.integration.harness import Pipeline, ServiceProcess

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CONCURRENCY = 48
ADDED_LATENCY_LIMIT_S = 2.0
# With the real model on 2 shared cores the engine's compute, not the takeover, sets the pace a
# reader sees; the 2 s target is held by the echo run, this bound only rules out a hang.
TORCH_ADDED_LATENCY_LIMIT_S = 10.0
WORDS = ["Открыться", "миру", "😀", "🎉🎉", "日本語", "中文", "한국어", "Ελληνικά", "👨‍👩‍👧", "ёжик", "żółw", "🙂"]


@dataclass
class Stream:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    started: float = 0.0
    chunk_times: list[float] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.chunk_times[-1] - self.started if self.chunk_times else 0.0

    @property
    def longest_gap_s(self) -> float:
        times = [self.started, *self.chunk_times]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def stream_one(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], result: Stream) -> None:
    result.started = time.monotonic()
    chat = path.endswith("chat/completions")
    async with client.stream("POST", f"{url}{path}", json={**body, "model": MODEL, "stream": True}) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}"
            return
        async for event in sse_events(response):
            if "error" in event:
                result.error = str(event["error"])
                continue
            choice = event["choices"][0]
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece:
                result.text += piece
                result.chunk_times.append(time.monotonic())
            result.finish_reason = choice.get("finish_reason") or result.finish_reason


async def run_load(url: str, path: str, bodies: list[dict[str, Any]], kill: ServiceProcess | None) -> list[Stream]:
    streams = [Stream() for _ in bodies]
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        tasks = [asyncio.create_task(stream_one(client, url, path, b, s)) for b, s in zip(bodies, streams)]
        if kill is not None:
            # Mid-stream: once every request has text (or has ended early, on a stop string).
            while not all(s.text or s.finish_reason or s.error for s in streams):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            kill.process.send_signal(signal.SIGKILL)
            kill.process.wait()
        await asyncio.gather(*tasks)
    return streams


def lease_holders(client: redis.Redis, names: StreamNames, shards: int) -> list[str | None]:
    values = client.mget([names.lease(f"generated:{s}") for s in range(shards)])
    return [v.decode() if v is not None else None for v in values]


def replica_id(service: ServiceProcess) -> str | None:
    for line in service.log().splitlines():
        if " serving " in line and "detokenizer " in line:
            return line.split("detokenizer ", 1)[1].split(" ", 1)[0]
    return None


def wait_for_split(client: redis.Redis, names: StreamNames, replicas: list[ServiceProcess]) -> None:
    """Until both replicas hold shards, so the killed one takes requests down with it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ids = {replica_id(r) for r in replicas}
        if None not in ids and set(lease_holders(client, names, 4)) == ids:
            return
        time.sleep(0.1)
    raise AssertionError(f"the shards were never split between {ids}: {lease_holders(client, names, 4)}")


def compare(
    clean: list[Stream], faulted: list[Stream], survivor: ServiceProcess, latency_limit_s: float
) -> dict[str, float]:
    assert all(s.error is None and s.finish_reason for s in clean), [s.error for s in clean]
    failed = [(i, s.error, s.finish_reason) for i, s in enumerate(faulted) if s.error or not s.finish_reason]
    assert not failed, failed
    differing = [
        (i, c.text, f.text) for i, (c, f) in enumerate(zip(clean, faulted)) if c.text.encode() != f.text.encode()
    ]
    assert not differing, f"{len(differing)} of {len(clean)} differ: {differing[:3]}"
    assert [c.finish_reason for c in clean] == [f.finish_reason for f in faulted]
    assert "continuing" in survivor.log(), "the survivor never restored a checkpoint: nothing was taken over"
    # Added latency two ways: how much longer each request took, and how much longer its
    # longest pause between chunks was (the stall a reader sees, whatever the run's pace).
    added = sorted(max(0.0, f.duration_s - c.duration_s) for c, f in zip(clean, faulted))
    stalls = sorted(max(0.0, f.longest_gap_s - c.longest_gap_s) for c, f in zip(clean, faulted))
    figures = {
        "added_p99_s": p99(added),
        "added_max_s": added[-1],
        "stall_p99_s": p99(stalls),
        "stall_max_s": stalls[-1],
        "stalled_over_0.5s": sum(s > 0.5 for s in stalls),
        "clean_median_s": statistics.median(c.duration_s for c in clean),
    }
    print(f"detokenizer kill: {figures}")
    assert figures["added_p99_s"] < latency_limit_s and figures["stall_p99_s"] < latency_limit_s, figures
    return figures


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def start(redis_url: str, tmp_path: Path, prefix: str, **engine: str) -> Pipeline:
    pipeline = Pipeline(redis_url, tmp_path, env={"SCALELLM_STREAM_PREFIX": prefix})
    pipeline.start("tokenizer")
    pipeline.start("engine", **engine)
    pipeline.start("detokenizer")
    pipeline.start("detokenizer")
    pipeline.start_gateway(request_timeout_s="120")
    pipeline.wait_ready()
    return pipeline


def kill_a_detokenizer_mid_stream(
    pipeline: Pipeline,
    redis_url: str,
    prefix: str,
    path: str,
    bodies: list[dict[str, Any]],
    latency_limit_s: float = ADDED_LATENCY_LIMIT_S,
) -> dict[str, float]:
    names = StreamNames(prefix)
    client = redis.Redis.from_url(redis_url)
    detokenizers = [p for p in pipeline.processes if p.name.startswith("detokenizer")]
    try:
        wait_for_split(client, names, detokenizers)
        asyncio.run(
            run_load(pipeline.gateway_url, path, [{**b, "max_tokens": 8} for b in bodies], kill=None)
        )  # warm-up
        clean = asyncio.run(run_load(pipeline.gateway_url, path, bodies, kill=None))
        victim, survivor = detokenizers
        faulted = asyncio.run(run_load(pipeline.gateway_url, path, bodies, kill=victim))
        assert victim.process.returncode == -signal.SIGKILL
        return compare(clean, faulted, survivor, latency_limit_s)
    finally:
        client.close()


def echo_bodies() -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for i in range(CONCURRENCY):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(5 + i % 7 + (20 if i % 3 == 2 else 0))]
        body: dict[str, Any] = {"prompt": " ".join(words), "max_tokens": 160 + 4 * i}
        if i % 3 == 1:
            # Never completed, often begun: text is held back at many points of the stream.
            body["stop"] = ["😀!", "миру?"]
        elif i % 3 == 2:
            # Completed where the echo wraps round from the prompt's end to its start.
            body["stop"] = [words[-1][-3:] + words[0][:3]]
        bodies.append(body)
    return bodies


def test_text_is_exact_across_a_detokenizer_kill_echo(
    redis_url: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    prefix = "faults-dk"
    pipeline = start(redis_url, tmp_path, prefix, engine_backend="echo", echo_step_delay_ms="10")
    try:
        kill_a_detokenizer_mid_stream(pipeline, redis_url, prefix, "/v1/completions", echo_bodies())
    except AssertionError:
        print(pipeline.logs())
        raise
    finally:
        pipeline.stop_all()


@pytest.mark.slow
def test_text_is_exact_across_a_detokenizer_kill_torch(
    redis_url: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    prefix = "faults-dk-torch"
    pipeline = start(redis_url, tmp_path, prefix, engine_backend="torch", dtype="float32")
    bodies: list[dict[str, Any]] = [
        {
            "messages": [{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)] + f" ({i})"}],
            "max_tokens": 96,
            "temperature": 0,
            **({"stop": ["."]} if i % 4 == 3 else {}),
        }
        for i in range(32)
    ]
    try:
        kill_a_detokenizer_mid_stream(
            pipeline, redis_url, prefix, "/v1/chat/completions", bodies, TORCH_ADDED_LATENCY_LIMIT_S
        )
    except AssertionError:
        print(pipeline.logs())
        raise
    finally:
        pipeline.stop_all()
