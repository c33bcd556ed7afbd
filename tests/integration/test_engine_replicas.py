"""Several engine replicas on one stream share the load without a router."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from shared.messages import EngineStepOutput
from shared.settings import CommonSettings
from shared.transport import StreamTransport
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def two_engines(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), env={"SCALELLM_STREAM_PREFIX": "replicas"})
    try:
        pipeline.start("tokenizer")
        # Each engine takes at most 4 requests at a time, so 16 concurrent requests need both.
        for _ in range(2):
            pipeline.start("engine", engine_backend="echo", echo_step_delay_ms="20", max_running_requests="4")
        pipeline.start("detokenizer")
        pipeline.start_gateway()
        pipeline.wait_ready()
        yield pipeline
    finally:
        pipeline.stop_all()


async def engines_that_served(redis_url: str) -> set[str]:
    transport = StreamTransport(redis_url, "replicas", "test-reader")
    try:
        engines: set[str] = set()
        for shard in range(CommonSettings().detokenizer_shards):
            _, deliveries = await transport.read_stream(transport.names.generated(shard), "0", count=10_000, block_ms=0)
            engines.update(d.message.engine_id for d in deliveries if isinstance(d.message, EngineStepOutput))
        return engines
    finally:
        await transport.close()


def test_two_engine_replicas_both_serve(
    two_engines: Pipeline, redis_url: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = [f"replica test {i}" for i in range(16)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=two_engines.gateway_url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 10}) for p in prompts)
            )

    responses = asyncio.run(send_all())
    for prompt, response in zip(prompts, responses, strict=True):
        assert response.status_code == 200, response.text
        ids = tokenizer(prompt)["input_ids"]
        assert response.json()["choices"][0]["text"] == tokenizer.decode((ids * 10)[:10])
    assert len(asyncio.run(engines_that_served(redis_url))) == 2, two_engines.logs()
