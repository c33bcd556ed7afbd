"""``scalellm bench stages``: saved runs' server histograms as the stage breakdown table."""

from __future__ import annotations

from typing import Any

import pytest

from bench.serving.stages import stage_table


def row(series: str, total_s: float, count: int, **labels: str) -> dict[str, Any]:
    return {"series": series, "labels": labels, "count": count, "total_s": total_s}


def test_each_segment_is_its_share_of_the_requests_time() -> None:
    run = {
        "server_metrics": [
            row("vllm:e2e_request_latency_seconds", 2.0, 4, model_name="m"),
            row("scalellm:request_stage_seconds", 0.5, 4, model_name="m", segment="decode"),
            row("scalellm:request_stage_seconds", 0.1, 4, model_name="m", segment="tokenizer"),
            row("vllm:time_to_first_token_seconds", 9.0, 4, model_name="m"),  # not a segment
        ]
    }
    table = stage_table([("ours c1", run)]).splitlines()
    assert table[0] == "| segment | ours c1 |"
    assert "| decode | 83.3% (125.00 ms) |" in table  # of the segments' sum, 0.6 s
    assert "| tokenizer | 16.7% (25.00 ms) |" in table
    assert "| gateway_in | - |" in table
    assert table[-2:] == [
        "| the segments together, mean | 150.00 ms |",
        "| vLLM's e2e latency (from the parsed body), mean | 500.00 ms (4 requests) |",
    ]
    # Segments in the order a request passes them.
    names = [line.split(" | ")[0].lstrip("| ") for line in table[2:-2]]
    assert names.index("tokenizer") < names.index("decode")


def test_runs_without_the_stage_series_are_refused() -> None:
    with pytest.raises(ValueError, match="request_stage_seconds"):
        stage_table([("vllm", {"server_metrics": [row("vllm:e2e_request_latency_seconds", 1.0, 1)]})])
