"""A streaming client that stops reading, against the gateway app in-process (fakeredis, fake pipeline).

The stalled client is driven through raw ASGI: its ``send`` blocks for good once the
response has begun, as uvicorn's does when the client's TCP window is full, and its
``receive`` never reports a disconnect (the client is still connected, only silent).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from services.gateway.slow_clients import ABORT_CONNECTION
from shared.messages import CompletionRequest, ResponseBatch
from tests.fakes.gateway import FakePipeline, Harness, completion_scope, delta, running, sse_events

pytestmark = pytest.mark.anyio
CAP = 64 * 1024
CHUNK = "x" * 1000


async def floods_or_greets(pipeline: FakePipeline, request: CompletionRequest) -> None:
    """ "flood": 1 MB of text in 1 kB deltas, as fast as it goes; "slow": two words 0.45 s apart;
    anything else: five words, 50 ms apart."""
    if request.prompt == "flood":
        for i in range(0, 1000, 10):
            await pipeline.send(request, ResponseBatch(deltas=[delta(request, CHUNK, [i + j]) for j in range(10)]))
            await asyncio.sleep(0.001)
        await pipeline.send(request, ResponseBatch(deltas=[delta(request, "", [], "length")]))
        return
    words = ["one ", "two ", "three ", "four ", "five"] if request.prompt != "slow" else ["sl", "ow"]
    for i, word in enumerate(words):
        await asyncio.sleep(0.05 if request.prompt != "slow" else 0.45)
        finish = "stop" if i == len(words) - 1 else None
        await pipeline.send(request, ResponseBatch(deltas=[delta(request, word, [i], finish)]))


class StalledClient:
    """A client that sent its request and then stopped reading."""

    def __init__(self, prompt: str) -> None:
        self.body = json.dumps({"prompt": prompt, "stream": True, "max_tokens": 100_000}).encode()
        self.sent: list[dict[str, Any]] = []
        self.aborted = asyncio.Event()
        self._requested = False

    async def receive(self) -> dict[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.Event().wait()  # connected, silent: never a disconnect
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and len(self.sent) >= 2:
            await asyncio.Event().wait()  # the TCP window is full: send blocks for good

    def scope(self) -> dict[str, Any]:
        return completion_scope(**{ABORT_CONNECTION: self.aborted.set})


async def watch_buffered(h: Harness, peaks: list[int]) -> None:
    while True:
        peaks.append(h.gateway.registry.buffered_bytes())
        await asyncio.sleep(0.001)


async def metric(h: Harness, name: str) -> str:
    text = (await h.http.get("/metrics")).text
    return next(line for line in text.splitlines() if line.startswith(name))


async def test_a_stalled_reader_is_cut_off_at_the_buffer_bound_while_another_stream_runs_on_time() -> None:
    async with running(floods_or_greets, max_buffered_bytes_per_request=CAP, slow_client_timeout_s=30) as h:
        stalled = StalledClient("flood")
        peaks: list[int] = []
        watcher = asyncio.create_task(watch_buffered(h, peaks))
        started = time.monotonic()
        stalled_run = asyncio.create_task(h.app(stalled.scope(), stalled.receive, stalled.send))
        reply = await h.http.post("/v1/completions", json={"prompt": "hello", "stream": True})
        elapsed = time.monotonic() - started
        # The stalled stream ends: its connection aborted and its task done, not left blocked in send.
        await asyncio.wait_for(stalled_run, 5)
        watcher.cancel()
        assert stalled.aborted.is_set() and stalled.sent[0]["status"] == 200
        texts = [e["choices"][0]["text"] for e in sse_events(reply.text) if e != "[DONE]"]
        assert "".join(texts) == "one two three four five"
        assert elapsed < 1.0, f"the reading client took {elapsed:.2f} s"
        assert max(peaks) <= CAP + 2 * len(CHUNK) + 1024  # bounded: never the megabyte the pipeline sent
        await asyncio.sleep(0.05)  # the abort goes out through the batching writer
        flood = next(r.request_id for r in h.pipeline.requests if r.prompt == "flood")
        assert await h.pipeline.aborted_ids() == [flood]
        assert len(h.gateway.registry) == 0 and len(h.gateway.slow_clients) == 0
        assert (await metric(h, 'scalellm:gateway_slow_clients_total{reason="buffer"}')).endswith(" 1.0")


async def test_a_stalled_reader_with_output_under_the_bound_is_cut_off_after_the_timeout() -> None:
    async with running(floods_or_greets, max_buffered_bytes_per_request=CAP, slow_client_timeout_s=0.3) as h:
        stalled = StalledClient("hello")  # five words: far under the bound, but never read
        started = time.monotonic()
        await asyncio.wait_for(h.app(stalled.scope(), stalled.receive, stalled.send), 5)
        took = time.monotonic() - started
        # The first word is sent (and blocks); the rest waits from ~0.1 s; a sweep every 75 ms.
        assert 0.3 <= took < 1.0, took
        assert stalled.aborted.is_set()
        await asyncio.sleep(0.05)
        assert await h.pipeline.aborted_ids() == [h.pipeline.requests[0].request_id]
        assert (await metric(h, 'scalellm:gateway_slow_clients_total{reason="timeout"}')).endswith(" 1.0")
        # A reading client waiting on a slow model (nothing pending) is never timed out.
        reply = await h.http.post("/v1/completions", json={"prompt": "slow", "stream": True})
        texts = [e["choices"][0]["text"] for e in sse_events(reply.text) if e != "[DONE]"]
        assert "".join(texts) == "slow"
        assert (await metric(h, 'scalellm:gateway_slow_clients_total{reason="timeout"}')).endswith(" 1.0")
