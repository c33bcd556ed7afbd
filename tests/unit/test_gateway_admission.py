"""The gateway refuses new requests while the pipeline's backlog is over its bound (fakeredis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from shared.messages import DetokenizeParams, SamplingParams, TokenizedRequest, encode
from shared.transport import PAYLOAD_FIELD, StreamNames
from tests.fakes.gateway import Harness, running

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def queue_tokenized(h: Harness, count: int) -> None:
    """Requests waiting for an engine: a group exists, nobody reads."""
    stream = h.gateway.transport.names.tokenized
    await h.redis.xgroup_create(stream, StreamNames.engine_group, id="0", mkstream=True)
    for i in range(count):
        message = TokenizedRequest(
            request_id=f"q{i}",
            gateway_id="other",
            deadline=2e9,
            prompt_token_ids=[1],
            sampling=SamplingParams(),
            detokenize=DetokenizeParams(),
        )
        await h.redis.xadd(stream, {PAYLOAD_FIELD: encode(message)})


async def drain_tokenized(h: Harness) -> None:
    stream = h.gateway.transport.names.tokenized
    reply = await h.redis.xreadgroup(StreamNames.engine_group, "engine-1", {stream: ">"}, count=1000)
    await h.redis.xack(stream, StreamNames.engine_group, *[entry_id for entry_id, _ in reply[0][1]])


async def test_a_backlog_over_the_bound_gives_503_with_retry_after_until_it_drains() -> None:
    async with running(max_queued_requests=5) as h:
        assert (await h.http.post("/v1/completions", json={"prompt": "before"})).status_code == 200
        await queue_tokenized(h, 6)
        await until(lambda: h.gateway.backlog.full)

        refused = await h.http.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error" and "limit of 5" in error["message"]
        assert len(h.pipeline.requests) == 1  # the refused request was never queued

        await drain_tokenized(h)
        await until(lambda: not h.gateway.backlog.full)
        assert (await h.http.post("/v1/completions", json={"prompt": "after"})).status_code == 200
