"""Concurrent streaming clients for the fault tests, and what to look at in Redis meanwhile.

Each request is classified the way the fault suite reports it: ok (a finish
reason and no error), error (an HTTP error or an SSE error event: a clear
error the client sees), or hung (no end within the timeout). A request that
ends "ok" but with text that differs from the fault-free run is garbled.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from shared.messages import Heartbeat, decode
from shared.transport import StreamNames

MODEL = "SmolLM2-135M-Instruct"
# Non-ASCII chat prompts for the runs with the real model: multi-byte characters split over tokens.
CHAT_PROMPTS = [
    "Напиши короткое стихотворение о море.",
    "Объясни, что такое гравитация, простыми словами.",
    "Écris une phrase sur la pluie à Paris.",
    "Расскажи сказку про ёжика и туман.",
    "日本の首都はどこですか？一文で答えてください。",
    "Wie spät ist es auf dem Mond? Antworte kurz.",
    "Назови три цвета радуги и опиши каждый.",
    "Describe a sunrise using emoji 🌅 and words.",
]


@dataclass
class Outcome:
    prompt: str
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    hung: bool = False
    first_chunk_s: float | None = None  # since the request was sent
    latency_s: float = 0.0  # end to end

    @property
    def ok(self) -> bool:
        return self.finish_reason is not None and self.error is None and not self.hung


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI-style SSE response, up to (not including) ``[DONE]``."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, timeout_s: float) -> Outcome:
    outcome = Outcome(prompt)
    started = time.monotonic()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return outcome
                async for event in sse_events(response):
                    if "error" in event:
                        outcome.error = str(event["error"])
                        continue
                    if outcome.first_chunk_s is None:
                        outcome.first_chunk_s = time.monotonic() - started
                    choice = event["choices"][0]
                    outcome.text += choice["text"]
                    outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
    except TimeoutError:
        outcome.hung = True
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.latency_s = time.monotonic() - started
    return outcome


async def run_load(
    url: str,
    prompts: Sequence[str],
    *,
    max_tokens: int,
    timeout_s: float = 60.0,
    during: Callable[[list[Outcome | None]], Awaitable[None]] | None = None,
) -> list[Outcome]:
    """All prompts at once, streaming; ``during`` runs beside them (the fault)."""
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    progress: list[Outcome | None] = [None] * len(prompts)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:

        async def one(i: int) -> Outcome:
            progress[i] = Outcome(prompts[i])
            result = await stream_one(client, url, prompts[i], max_tokens, timeout_s)
            progress[i] = result
            return result

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        if during is not None:
            await during(progress)
        return list(await asyncio.gather(*tasks))


def prompts(count: int, tag: str) -> list[str]:
    # Different lengths and words, so that a text moved to the wrong request shows.
    return [f"{tag} request {i}: " + " ".join(f"word{i * 7 + j}" for j in range(3 + i % 5)) for i in range(count)]


def summary(outcomes: Sequence[Outcome], expected: dict[str, str]) -> dict[str, int]:
    return {
        "ok": sum(o.ok for o in outcomes),
        "error": sum(o.error is not None for o in outcomes),
        "hung": sum(o.hung for o in outcomes),
        "differing": sum(o.ok and o.text != expected.get(o.prompt) for o in outcomes),
    }


# -- what the fault tests watch in Redis ------------------------------------------------


def heartbeats(client: redis.Redis, names: StreamNames, role: str) -> dict[str, Heartbeat]:
    found: dict[str, Heartbeat] = {}
    for key in client.scan_iter(match=names.heartbeat_pattern(role)):
        payload = client.get(key)
        if payload is not None:
            beat = decode(payload)
            assert isinstance(beat, Heartbeat)
            found[beat.replica_id] = beat
    return found


def replica_id_in(log: str, role: str) -> str:
    """A service's replica id, from the line it logs when it starts serving."""
    found = re.search(rf"{role} ({role}-\S+) serving", log)
    assert found is not None, f"no '{role} ... serving' line in:\n{log[-3000:]}"
    return found.group(1)


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds it took for ``condition`` to hold (polled every 20 ms)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started
