from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from tests.integration.harness import Pipeline


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def echo_pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    """gateway + 2 tokenizers + echo engine + 2 detokenizers, as real processes.

    Depends on ``tokenizer`` so the model cache exists before the services start.
    """
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")))
    try:
        pipeline.start("tokenizer")
        pipeline.start("tokenizer")
        pipeline.start("engine", engine_backend="echo", echo_step_delay_ms="5")
        pipeline.start("detokenizer")
        pipeline.start("detokenizer")
        pipeline.start_gateway(request_timeout_s="30")
        pipeline.wait_ready()
        yield pipeline
    finally:
        pipeline.stop_all()


@pytest.fixture
def show_logs_on_failure(request: pytest.FixtureRequest, echo_pipeline: Pipeline) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(echo_pipeline.logs())
