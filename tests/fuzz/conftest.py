"""One small echo pipeline (real processes, real redis-server on 127.0.0.1) for the fuzz tests.

A short context (SCALELLM_MAX_MODEL_LEN) bounds what any generated request can cost: the
tokenizer refuses max_tokens past it, so no example runs long, and a request that still takes
SCALELLM_REQUEST_TIMEOUT_S ends with a 504, which the HTTP fuzzer counts as a failure (a hang).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import settings
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from shared.transport import StreamNames
from tests.integration.harness import Pipeline

# No example database: it would be written into the checkout, and CI starts from a fresh clone.
# No per-example deadline: an example that goes through the pipeline takes what the machine gives it.
settings.register_profile("scalellm-fuzz", database=None, deadline=None)
settings.load_profile("scalellm-fuzz")

PREFIX = "fuzz"
MAX_MODEL_LEN = 256
REQUEST_TIMEOUT_S = 20
# Poison entries are dead-lettered after this many deliveries (docs/protocol.md).
MAX_DELIVERIES = 2


@dataclass
class FuzzPipeline:
    pipeline: Pipeline
    redis: redis.Redis
    names: StreamNames

    @property
    def url(self) -> str:
        return self.pipeline.gateway_url

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200

    def complete(self, prompt: str, max_tokens: int = 4) -> str:
        """A completion through the whole pipeline; the echo engine replays the prompt's tokens."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        reply = httpx.post(f"{self.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S + 10)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["text"])


@pytest.fixture(scope="package")
def fuzz_pipeline(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[FuzzPipeline]:
    """Gateway, tokenizer, echo engine, detokenizer; stopped (with Redis) after the package's tests.

    Depends on ``tokenizer`` so the model cache exists before the services start.
    """
    env = {
        "SCALELLM_STREAM_PREFIX": PREFIX,
        "SCALELLM_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "SCALELLM_MAX_DELIVERIES": str(MAX_DELIVERIES),
        # Entries of a consumer that died on a poison message are claimed after this.
        "SCALELLM_CLAIM_IDLE_MS": "500",
    }
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        pipeline = Pipeline(server.url, Path(tmp_path_factory.mktemp("logs")), env=env)
        client = redis.Redis.from_url(server.url)
        try:
            pipeline.start("tokenizer")
            pipeline.start("engine", engine_backend="echo", echo_step_delay_ms="1")
            pipeline.start("detokenizer")
            # The default max_tokens must fit the short context, or every request without one is refused.
            pipeline.start_gateway(request_timeout_s=str(REQUEST_TIMEOUT_S), default_max_tokens="16")
            pipeline.wait_ready()
            yield FuzzPipeline(pipeline, client, StreamNames(PREFIX))
        finally:
            client.close()
            pipeline.stop_all()


@pytest.fixture
def show_logs_on_failure(request: pytest.FixtureRequest, fuzz_pipeline: FuzzPipeline) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(fuzz_pipeline.pipeline.logs())
