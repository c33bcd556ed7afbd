"""compose.yaml in a real Docker engine: built, started with 2 tokenizers and 2 detokenizers, streamed to, crashed.

The image is built from a local Debian base (debootstrap) and a local wheelhouse, since no
image registry is assumed reachable (host.py); the pipeline runs the default torch engine
and model. Greedy requests are streamed once without faults, and once while a detokenizer
(mid-stream) and a tokenizer (as more requests arrive) are SIGKILLed: every request must
end with the same text, and the restart policy must bring both containers back. The
requests go through the ``openai`` package, as a user's would.
Run with ``python -m pytest -m docker -s`` (docs/operations.md, "Docker").
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.docker.compose import ComposeProject, crash, inspect, wait_until
from tests.docker.host import (
    REPO,
    WHEELHOUSE,
    DockerUnavailable,
    base_image,
    install_missing_tools,
    machine_lock,
    running_dockerd,
)
from tests.docker.host import wheelhouse as make_wheelhouse

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

SCALE = {"tokenizer": 2, "detokenizer": 2}
# Multi-byte characters split over tokens are what a detokenizer's takeover could garble.
FIRST_WAVE = [
    "The capital of France is",
    "Напиши короткое стихотворение о море.",
    "Once upon a time, in a small village,",
    "日本の首都はどこですか？",
    "Write a haiku about containers:",
    "Écris une phrase sur la pluie à Paris.",
    "The three primary colours are",
    "Describe a sunrise using emoji 🌅 and words.",
]
SECOND_WAVE = ["List three uses of Redis streams:", "Расскажи сказку про ёжика и туман.", "def fibonacci(n):"]
MAX_TOKENS = 64


@dataclass
class Pipeline:
    project: ComposeProject
    url: str


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    if os.geteuid() != 0:
        pytest.skip("needs root: it installs and starts Docker when absent, and kills containers' processes")
    clock = Stopwatch()
    with ExitStack() as teardown:
        teardown.enter_context(machine_lock())
        try:
            install_missing_tools()
            clock.lap("tools")
            teardown.enter_context(running_dockerd(tmp_path_factory.mktemp("docker") / "dockerd.log"))
            clock.lap("dockerd")
            base = base_image()
            clock.lap("base image")
        except DockerUnavailable as exc:
            pytest.skip(f"no Docker engine to test in: {exc}")
        make_wheelhouse()
        clock.lap("wheelhouse")
        port = free_port()
        project = ComposeProject(
            f"scalellm-test-{os.getpid()}",
            {
                "SCALELLM_BASE_IMAGE": base,
                "SCALELLM_REDIS_IMAGE": base,  # its redis-server: Debian's Redis 7
                "SCALELLM_WHEELHOUSE": str(WHEELHOUSE.relative_to(REPO)),
                "SCALELLM_IMAGE": "scalellm-test:latest",
                "SCALELLM_GATEWAY_PORT": str(port),
                # Greedy text then does not depend on how requests were batched.
                "SCALELLM_DTYPE": "float32",
            },
        )
        project.run("build", "--force-rm", "gateway")  # every role's image: built once
        clock.lap("image build")
        teardown.callback(project.down)
        teardown.callback(lambda: print(project.logs()))  # shown when a test fails
        scale = [argument for role, count in SCALE.items() for argument in ("--scale", f"{role}={count}")]
        project.run("up", "--detach", *scale)  # returns once the roles are healthy and the gateway started
        wait_until(lambda: not project.unhealthy(), 120, "every container's health check")
        clock.lap("compose up")
        yield Pipeline(project, f"http://127.0.0.1:{port}")


def test_the_containers_are_as_compose_yaml_promises(pipeline: Pipeline) -> None:
    project = pipeline.project
    for role in ("redis", "gateway", "engine", *SCALE):
        assert len(project.containers(role)) == SCALE.get(role, 1), role
    for role in ("gateway", "engine", *SCALE):
        assert {exec_in(container, "id", "-u") for container in project.containers(role)} == {"10001"}, role
    gateway = project.containers("gateway")[0]
    published = inspect(gateway, template='{{json (index .NetworkSettings.Ports "8000/tcp")}}')
    assert {binding["HostIp"] for binding in json.loads(published)} == {"127.0.0.1"}
    redis = project.containers("redis")[0]
    assert exec_in(redis, "redis-cli", "config", "get", "appendonly").split() == ["appendonly", "yes"]
    assert f"{project.name}_redis-data" in inspect(redis, template="{{range .Mounts}}{{.Name}} {{end}}").split()
    body = health(pipeline.url)
    assert (body.get("status"), body.get("alive")) == ("ok", {**SCALE, "engine": 1})


def test_streams_complete_unchanged_while_a_detokenizer_and_a_tokenizer_crash(pipeline: Pipeline) -> None:
    project, clock = pipeline.project, Stopwatch()
    baseline = asyncio.run(stream_all(pipeline.url, FIRST_WAVE + SECOND_WAVE))
    assert all(stream.ok for stream in baseline), [stream.error for stream in baseline]
    clock.lap("fault-free streams")

    detokenizer, tokenizer = project.containers("detokenizer")[0], project.containers("tokenizer")[0]
    first, second, streaming_at_crash = asyncio.run(stream_through_crashes(pipeline.url, detokenizer, tokenizer))
    clock.lap(f"streams through the crashes ({streaming_at_crash} of {len(first)} mid-stream at the crash)")
    assert streaming_at_crash >= len(first) // 2, "the crash came too late to interrupt the streams"
    for expected, got in zip(baseline, first + second):
        assert got.ok, (got.prompt, got.error)
        assert got.text == expected.text, got.prompt

    def restarted_and_healthy(container: str) -> bool:
        state = inspect(container, template="{{.RestartCount}} {{.State.Health.Status}}")
        return int(state.split()[0]) >= 1 and state.endswith(" healthy")

    wait_until(lambda: restarted_and_healthy(detokenizer) and restarted_and_healthy(tokenizer), 180, "restarts")
    wait_until(lambda: health(pipeline.url).get("alive") == {**SCALE, "engine": 1}, 30, "all replicas in /ready")
    clock.lap("both containers restarted and healthy")


@dataclass
class Stream:
    prompt: str
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length") and self.error is None

    async def run(self, client: openai.AsyncOpenAI) -> None:
        # As users stream: through the official client, which raises on an HTTP error and on an
        # error event inside the stream.
        try:
            chunks = await client.completions.create(
                model="SmolLM2-135M-Instruct", prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            async for chunk in chunks:
                choice = chunk.choices[0]
                self.text += choice.text
                self.finish_reason = choice.finish_reason or self.finish_reason
                self.started.set()
        except openai.APIError as error:
            self.error = f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            self.started.set()  # a request that failed before its first token must not stall the crash


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180, max_retries=0)


async def stream_all(url: str, prompts: list[str]) -> list[Stream]:
    streams = [Stream(prompt) for prompt in prompts]
    async with openai_client(url) as client:
        await asyncio.gather(*(stream.run(client) for stream in streams))
    return streams


async def stream_through_crashes(url: str, detokenizer: str, tokenizer: str) -> tuple[list[Stream], list[Stream], int]:
    """The first wave is mid-stream when a detokenizer dies; the second is sent as a tokenizer dies."""
    first, second = [Stream(prompt) for prompt in FIRST_WAVE], [Stream(prompt) for prompt in SECOND_WAVE]
    async with openai_client(url) as client:
        running = [asyncio.create_task(stream.run(client)) for stream in first]
        await asyncio.wait_for(asyncio.gather(*(stream.started.wait() for stream in first)), 120)
        streaming_at_crash = sum(stream.finish_reason is None for stream in first)
        await asyncio.to_thread(crash, detokenizer)
        running += [asyncio.create_task(stream.run(client)) for stream in second]
        await asyncio.to_thread(crash, tokenizer)  # while the second wave is being sent
        await asyncio.gather(*running)
    return first, second, streaming_at_crash


def health(url: str) -> dict[str, object]:
    try:
        body: dict[str, object] = httpx.get(f"{url}/ready", timeout=5).json()
        return body
    except (httpx.HTTPError, ValueError):
        return {}


def exec_in(container: str, *command: str) -> str:
    return subprocess.run(
        ["docker", "exec", container, *command], capture_output=True, text=True, check=True
    ).stdout.strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Stopwatch:
    """Prints how long each step of the set-up took (seen with -s; docs/operations.md quotes them)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        print(f"[docker] {step}: {now - self.last:.1f} s")
        self.last = now
