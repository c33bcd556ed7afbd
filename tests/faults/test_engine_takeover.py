"""SIGKILL the busier of two torch engines mid-stream: its requests continue on the other one.

24 concurrent streams of non-ASCII chat prompts (sent as token ids to /v1/completions, so the
test knows them exactly), a third each greedy, seeded random and unseeded random (temperature
1), all with ``ignore_eos`` so each must end with exactly ``MAX_TOKENS`` tokens:

- greedy and seeded requests stream the same text (and token ids) as with no fault, byte for byte;
- every request's token ids (named in its logprobs) number ``MAX_TOKENS``, match its usage, and
  decode to its streamed text: nothing repeated or missing;
- every token's reported logprob is the model's, recomputed here by transformers on the prompt
  plus the tokens the client received before it. A survivor that continued an unseeded request
  from anything but the client's own prefix (a re-run from the start) reports logprobs of another
  context, and fails this.

The time from the kill to each taken-over request's next text is the takeover latency.
docs/architecture.md, "Engine takeover".
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.messages import TokenizedRequest, decode
from shared.transport import PAYLOAD_FIELD, StreamNames
from tests.faults.streams import CHAT_PROMPTS, replica_id_in, sse_events
from tests.integration.harness import Pipeline, ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
PREFIX = "faults-et"
NAMES = StreamNames(PREFIX)
CONCURRENCY = 24
MAX_TOKENS = 48
KINDS = ("greedy", "seeded", "random")
# Kill once every stream has this many tokens: each taken-over request has output to continue from.
KILL_AFTER_TOKENS = 8
ENGINE = {"engine_backend": "torch", "dtype": "float32", "kv_cache_bytes": str(256 << 20)}
LOGPROB_TOLERANCE = 0.02


@dataclass
class Stream:
    kind: str
    prompt_ids: list[int]
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)


def bodies(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, list[int], dict[str, Any]]]:
    found = []
    for i in range(CONCURRENCY):
        messages = [{"role": "user", "content": f"{CHAT_PROMPTS[i % len(CHAT_PROMPTS)]} ({i})"}]
        prompt_ids = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        )
        kind = KINDS[i % len(KINDS)]
        sampling: dict[str, Any] = {"temperature": 0.0} if kind == "greedy" else {"temperature": 1.0}
        if kind == "seeded":
            sampling.update(seed=1000 + i, top_p=0.95)
        body = {
            "model": MODEL,
            "prompt": prompt_ids,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,  # the token ids, read back from the logprobs' names
            "stream": True,
            "stream_options": {"include_usage": True},
            **sampling,
        }
        found.append((kind, prompt_ids, body))
    return found


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], result: Stream) -> None:
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return
        async for event in sse_events(response):
            if "error" in event:
                result.error = str(event["error"])
                continue
            result.request_id = event.get("id", result.request_id)
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
            if not event["choices"]:
                continue
            choice = event["choices"][0]
            result.text += choice["text"]
            logprobs = choice.get("logprobs") or {}
            result.token_ids += [int(name.removeprefix("token_id:")) for name in logprobs.get("tokens", [])]
            result.logprobs += logprobs.get("token_logprobs", [])
            result.finish_reason = choice["finish_reason"] or result.finish_reason
            if choice["text"] or logprobs:
                result.chunk_times.append(time.monotonic())


@dataclass
class Kill:
    victim: ServiceProcess
    victim_id: str
    at: float = 0.0
    wall_at: float = 0.0  # time.time() of the kill, to compare with log timestamps
    held: list[str] = field(default_factory=list)  # request ids the victim had pending


def held_by(client: redis.Redis, consumer: str) -> list[str]:
    """The request ids of the tokenized entries pending for ``consumer``."""
    request_ids = []
    for entry in client.xpending_range(NAMES.tokenized, NAMES.engine_group, "-", "+", 1000, consumer):
        for _, fields in client.xrange(NAMES.tokenized, entry["message_id"], entry["message_id"]):
            message = decode(fields[PAYLOAD_FIELD])
            assert isinstance(message, TokenizedRequest)
            request_ids.append(message.request_id)
    return request_ids


async def run_load(
    url: str,
    load: list[tuple[str, list[int], dict[str, Any]]],
    engines: dict[str, ServiceProcess] | None,
    client: redis.Redis,
) -> tuple[list[Stream], Kill | None]:
    streams = [Stream(kind, prompt_ids) for kind, prompt_ids, _ in load]
    kill: Kill | None = None
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(load) + 4), timeout=300) as http:
        tasks = [asyncio.create_task(stream_one(http, url, body, s)) for (_, _, body), s in zip(load, streams)]
        if engines is not None:
            while not all(len(s.token_ids) >= KILL_AFTER_TOKENS or s.error or s.finish_reason for s in streams):
                await asyncio.sleep(0.01)
            holding = {engine_id: held_by(client, engine_id) for engine_id in engines}
            victim_id = max(holding, key=lambda engine_id: len(holding[engine_id]))
            kill = Kill(engines[victim_id], victim_id, time.monotonic(), time.time(), holding[victim_id])
            kill.victim.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(kill.victim.process.wait)
        await asyncio.gather(*tasks)
    return streams, kill


def recomputed_logprobs(model: torch.nn.Module, stream: Stream) -> list[float]:
    """The model's logprob of each output token given the prompt and the outputs before it."""
    ids = torch.tensor([stream.prompt_ids + stream.token_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(stream.prompt_ids) - 1 : -1].float()
    chosen = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(stream.token_ids)[:, None])
    return chosen.squeeze(1).tolist()


def claimed_after(log: str, victim_id: str, since: float) -> float | None:
    """Seconds from ``since`` (unix time) to the survivor's log line saying it took the victim's entries."""
    for line in log.splitlines():
        if f"from gone consumer {victim_id}" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return round(stamp - since, 3)
    return None


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def test_requests_continue_exactly_or_coherently_across_an_engine_kill(
    redis_url: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # One thread per engine: two engines share this machine's cores with everything else.
    pipeline = Pipeline(redis_url, tmp_path, env={"SCALELLM_STREAM_PREFIX": PREFIX, "OMP_NUM_THREADS": "1"})
    client = redis.Redis.from_url(redis_url)
    try:
        pipeline.start("tokenizer")
        engines = [pipeline.start("engine", **ENGINE), pipeline.start("engine", **ENGINE)]
        pipeline.start("detokenizer")
        pipeline.start_gateway(request_timeout_s="300")
        pipeline.wait_ready(timeout=300)
        load = bodies(tokenizer)
        asyncio.run(run_load(pipeline.gateway_url, [(k, p, {**b, "max_tokens": 4}) for k, p, b in load], None, client))
        clean, _ = asyncio.run(run_load(pipeline.gateway_url, load, None, client))
        by_id = {replica_id_in(engine.log(), "engine"): engine for engine in engines}
        faulted, kill = asyncio.run(run_load(pipeline.gateway_url, load, by_id, client))
        assert kill is not None
        survivor = next(engine for engine in engines if engine is not kill.victim)
        check(tokenizer, clean, faulted, kill, survivor)
    except AssertionError:
        print(pipeline.logs())
        raise
    finally:
        client.close()
        pipeline.stop_all()


def check(
    tokenizer: PreTrainedTokenizerBase, clean: list[Stream], faulted: list[Stream], kill: Kill, survivor: ServiceProcess
) -> None:
    from transformers import AutoModelForCausalLM

    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    for run in (clean, faulted):
        bad = [
            (s.request_id, s.error, s.finish_reason, s.completion_tokens) for s in run if s.error or not s.finish_reason
        ]
        assert not bad, bad
        for s in run:
            assert s.finish_reason == "length" and s.completion_tokens == MAX_TOKENS, (
                s.request_id,
                s.completion_tokens,
            )
            assert len(s.token_ids) == MAX_TOKENS == len(s.logprobs), (s.request_id, len(s.token_ids))
            assert tokenizer.decode(s.token_ids, skip_special_tokens=True) == s.text, s.request_id
    exact = [(c.text, f.text) for c, f in zip(clean, faulted) if c.kind != "random"]
    differing = [pair for pair in exact if pair[0].encode() != pair[1].encode()]
    assert not differing, f"{len(differing)} of {len(exact)} greedy/seeded texts differ: {differing[:2]}"
    assert [c.token_ids for c in clean if c.kind != "random"] == [f.token_ids for f in faulted if f.kind != "random"]

    taken = [s for s in faulted if s.request_id in kill.held]
    kinds = {s.kind for s in taken}
    assert kinds == set(KINDS), f"the victim held {len(taken)} requests, of kinds {kinds}: the test proves too little"

    # Takeover latency: from the kill to each taken-over request's next text, and the pause
    # its reader sees (last text before the kill to first after), against its usual pace.
    resumed = [min(t for t in s.chunk_times if t > kill.at) - kill.at for s in taken]
    pauses = [
        min(t for t in s.chunk_times if t > kill.at) - max((t for t in s.chunk_times if t <= kill.at), default=kill.at)
        for s in taken
    ]
    gaps = [b - a for c in clean for a, b in zip(c.chunk_times, c.chunk_times[1:])]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(CommonSettings(), weights=True), dtype=torch.float32)
    model.eval()
    diffs = {id(s): [abs(a - b) for a, b in zip(recomputed_logprobs(model, s), s.logprobs)] for s in faulted}
    figures = {
        "taken_over": len(taken),
        "claimed_after_kill_s": claimed_after(survivor.log(), kill.victim_id, kill.wall_at),
        "resumed_after_kill_median_s": round(statistics.median(resumed), 3),
        "resumed_after_kill_max_s": round(max(resumed), 3),
        "pause_p99_s": round(p99(pauses), 3),
        "clean_gap_median_s": round(statistics.median(gaps), 3),
        "worst_logprob_diff": round(max(max(d) for d in diffs.values()), 5),
    }
    print(f"engine kill (torch): {figures}")
    for s in faulted:
        assert max(diffs[id(s)]) < LOGPROB_TOLERANCE, (
            s.kind,
            s.request_id in kill.held,
            [round(d, 4) for d in diffs[id(s)]],
        )
    assert "resuming" in survivor.log(), "the survivor never continued from a checkpoint"
