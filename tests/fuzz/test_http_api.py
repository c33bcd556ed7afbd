"""Schemathesis against the running gateway: every operation of /openapi.json, valid and invalid data.

Target: no 5xx, no hang (every request ends within SCALELLM_REQUEST_TIMEOUT_S, or the gateway
answers 504, itself a failure here), responses as documented, and the pipeline healthy afterwards.

The schemathesis CLI runs in a subprocess: the same command docs/api.md gives for a longer run,
and independent of pytest's internals (schemathesis's pytest plugin does not work on pytest 9).
CI runs SCALELLM_FUZZ_EXAMPLES (default 25) examples per operation and generation phase.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fuzz.conftest import REQUEST_TIMEOUT_S, FuzzPipeline

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SCALELLM_FUZZ_EXAMPLES", "25"))
# Every check but positive_data_acceptance: schema-valid bodies are still refused when a cross-field
# rule says so (stream_options without stream, min_tokens above max_tokens), when the prompt and
# max_tokens pass the model's context (only the tokenizer knows it), or for 1.0 as an integer,
# which JSON Schema allows and this API, like OpenAI's, does not (docs/api.md).
SCHEMATHESIS = [
    "run",
    "--checks=all",
    "--exclude-checks=positive_data_acceptance",
    "--mode=all",
    "--phases=examples,coverage,fuzzing",
    f"--max-examples={EXAMPLES}",
    f"--request-timeout={REQUEST_TIMEOUT_S + 10}",
    "--workers=1",
    "--generation-database=none",
    "--no-color",
]


def requests_by_status(url: str) -> dict[str, int]:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    counts: dict[str, int] = {}
    for status, count in re.findall(r'_requests_total\{endpoint="[^"]+",status="(\d+)"\} (\d+)', metrics):
        counts[status] = counts.get(status, 0) + int(count)
    return counts


def test_schemathesis_finds_no_server_error_hang_or_undocumented_response(
    fuzz_pipeline: FuzzPipeline, tmp_path: Path, show_logs_on_failure: None
) -> None:
    logs_before = {p.name: len(p.log()) for p in fuzz_pipeline.pipeline.processes}
    started = time.monotonic()
    command = [str(Path(sys.executable).with_name("schemathesis")), *SCHEMATHESIS, f"{fuzz_pipeline.url}/openapi.json"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {elapsed:.1f} s, responses by status {requests_by_status(fuzz_pipeline.url)}")
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]

    # Still serving, exactly, with nothing left behind.
    assert all(p.process.poll() is None for p in fuzz_pipeline.pipeline.processes)
    health = httpx.get(f"{fuzz_pipeline.url}/ready", timeout=5)
    assert health.status_code == 200 and health.json()["in_flight"] == 0, health.text
    assert fuzz_pipeline.complete("Hello world", max_tokens=2) == "Hello world"
    assert fuzz_pipeline.redis.xlen(fuzz_pipeline.names.deadletter) == 0
    for p in fuzz_pipeline.pipeline.processes:
        assert "Traceback" not in p.log()[logs_before[p.name] :], f"{p.name} logged an exception"
