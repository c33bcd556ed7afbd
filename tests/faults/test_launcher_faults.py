"""Faults through ``scalellm up``: a replica killed under load, and the launcher itself killed.

The real launcher with the real services (echo backend) and its own
redis-server, as a user would start it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.faults.launcher import Launcher, children_of, process_gone

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
UP_ARGS = ("--backend", "echo", "--tokenizers", "2", "--detokenizers", "2", "--engines", "2")
SERVICES = {"gateway", "tokenizer-1", "tokenizer-2", "engine-1", "engine-2", "detokenizer-1", "detokenizer-2"}
MAX_TOKENS = 48
WAVE = 32


@pytest.fixture
def launcher(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[Launcher]:
    """``scalellm up`` with 2 replicas of each stage; ``tokenizer``: the model cache exists first."""
    # A short claim time: what the killed tokenizer held moves on within about a second.
    up = Launcher(tmp_path / "up.log", *UP_ARGS, claim_idle_ms="1000", request_timeout_s="60")
    try:
        up.wait_for(r"^ready: ", timeout=120)
        yield up
    finally:
        up.stop()


def echo_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    ids = tokenizer(prompt)["input_ids"]
    return str(tokenizer.decode((ids * (MAX_TOKENS // len(ids) + 1))[:MAX_TOKENS], skip_special_tokens=True))


async def stream_completion(client: httpx.AsyncClient, prompt: str) -> tuple[int, str, str | None]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    pieces: list[str] = []
    finish: str | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                finish = choice.get("finish_reason") or finish
        return response.status_code, "".join(pieces), finish


async def two_waves_with_a_kill_between(url: str, prompts: list[str], victim: int) -> list[tuple[int, str, str | None]]:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        first = [asyncio.create_task(stream_completion(client, p)) for p in prompts[:WAVE]]
        await asyncio.sleep(0.1)  # the first wave is being tokenized and generated
        os.kill(victim, signal.SIGKILL)
        # The second wave arrives while the tokenizer is down and being restarted.
        second = [asyncio.create_task(stream_completion(client, p)) for p in prompts[WAVE:]]
        return await asyncio.wait_for(asyncio.gather(*first, *second), 60)


def test_a_tokenizer_killed_under_load_is_restarted_and_no_request_fails(
    launcher: Launcher, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Both tokenizers consuming (the gateway is ready with one of each stage).
    for name in ("tokenizer-1", "tokenizer-2"):
        launcher.wait_for(rf"^\[{name}\] .*\bserving\b", timeout=60)
    victim = launcher.pids()["tokenizer-1"]
    prompts = [f"Request number {i} asks about the number {i * 7}" for i in range(2 * WAVE)]
    killed_at = time.monotonic()
    results = asyncio.run(two_waves_with_a_kill_between(launcher.url, prompts, victim))

    log = launcher.log()
    failed = [(p, r) for p, r in zip(prompts, results, strict=True) if r != (200, echo_text(tokenizer, p), "length")]
    assert not failed, f"{len(failed)} of {len(prompts)} requests failed, e.g. {failed[:3]}; log:\n{log[-6000:]}"
    assert launcher.process.poll() is None, log[-6000:]
    launcher.wait_for(
        r"^\[launcher\] tokenizer-1 was killed by signal SIGKILL; restarting in 0\.2 s \(death 1 of 5 in 60 s\)$"
    )
    launcher.wait_for(r"^\[launcher\] restarted tokenizer-1 \(pid \d+\)$")
    assert launcher.pids()["tokenizer-1"] != victim
    assert time.monotonic() - killed_at < 30
    # Nobody else died for it.
    assert "was killed by signal" not in log.replace("tokenizer-1 was killed by signal SIGKILL", "")
    assert "exited with code" not in log


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_killing_the_launcher_leaves_no_service_and_no_redis_server_behind(launcher: Launcher) -> None:
    launched = launcher.pids()
    assert set(launched) == SERVICES | {"redis-server"}
    # Everything it started is its direct child, and nothing else is.
    assert children_of(launcher.process.pid) == set(launched.values())
    redis_port = int(launcher.wait_for(r"^started redis-server at redis://127\.0\.0\.1:(\d+)/").group(1))
    assert port_open(redis_port) and port_open(launcher.port)

    launcher.process.kill()  # SIGKILL: it gets no chance to stop anything
    launcher.process.wait()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(process_gone(pid) for pid in launched.values()):
        time.sleep(0.05)
    left = {name: pid for name, pid in launched.items() if not process_gone(pid)}
    for pid in left.values():  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the launcher was SIGKILLed: {left}"
    assert not port_open(redis_port) and not port_open(launcher.port)
