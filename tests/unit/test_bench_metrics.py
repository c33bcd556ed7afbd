"""scalellm bench's figures: metric math, the result file, the tables, the server's histograms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.serving import report
from bench.serving.metrics import (
    RequestResult,
    compute_metrics,
    describe,
    error_key,
    peak_concurrency,
    percentile,
    percentile_label,
    resolve_output_tokens,
)
from bench.serving.runner import RunResult
from bench.serving.server_metrics import parse_histograms, stage_breakdown


def ok(
    ttft: float, latency: float, tokens: int, itl: list[float], prompt: int = 10, started: float = 0.0
) -> RequestResult:
    return RequestResult(
        ok=True,
        prompt_len=prompt,
        prompt_tokens=prompt,
        output_tokens=tokens,
        chunks=tokens,
        ttft_s=ttft,
        latency_s=latency,
        itl_s=itl,
        started_s=started,
    )


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)  # numpy.percentile([1,2,3,4], 99)
    assert percentile([5.0], 99) == 5.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)
    assert percentile_label(99) == "p99" and percentile_label(99.9) == "p99.9" and percentile_label(50.0) == "p50"


def test_describe_gives_mean_median_std_and_chosen_percentiles() -> None:
    stats = describe([1.0, 2.0, 3.0, 4.0, 10.0], [50, 90])
    assert stats["mean"] == 4.0 and stats["median"] == 3.0
    assert stats["std"] == pytest.approx(math.sqrt(10.0))  # population std, as numpy.std
    assert stats["p50"] == 3.0 and stats["p90"] == pytest.approx(7.6)
    empty = describe([], [99])
    assert all(math.isnan(v) for v in empty.values())


def test_compute_metrics_counts_throughput_and_latencies() -> None:
    results = [
        ok(ttft=0.1, latency=1.0, tokens=10, itl=[0.1] * 9, prompt=20),
        ok(ttft=0.3, latency=0.5, tokens=3, itl=[0.1, 0.1], prompt=30),
        ok(ttft=0.2, latency=0.2, tokens=1, itl=[], prompt=40),  # one token: no TPOT
        RequestResult(prompt_len=50, error="HTTP 503: the server is busy"),
        RequestResult(prompt_len=50, error="HTTP 503: the server is busy"),
        RequestResult(prompt_len=50, error="ConnectError: refused"),
    ]
    m = compute_metrics(results, duration_s=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"]) == (3, 3)
    assert m["errors"] == {"HTTP 503: the server is busy": 2, "ConnectError: refused": 1}
    assert m["total_input_tokens"] == 90  # failed requests count for nothing
    assert m["total_output_tokens"] == 14
    assert m["request_throughput"] == 1.5
    assert m["output_throughput"] == 7.0
    assert m["total_token_throughput"] == 52.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT: (1.0 - 0.1) / 9 = 100 ms and (0.5 - 0.3) / 2 = 100 ms; the one-token request has none.
    assert m["mean_tpot_ms"] == pytest.approx(100.0) and m["p99_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)  # 11 gaps
    assert m["median_e2el_ms"] == pytest.approx(500.0) and m["p50_e2el_ms"] == pytest.approx(500.0)
    assert m["p99_e2el_ms"] == pytest.approx(500 + 0.98 * 500)  # between 500 and 1000 ms
    assert m["std_e2el_ms"] == pytest.approx(
        1000 * math.sqrt(((1.0 - 17 / 30) ** 2 + (0.5 - 17 / 30) ** 2 + (0.2 - 17 / 30) ** 2) / 3)
    )


def test_every_request_failing_leaves_no_latency_figures() -> None:
    m = compute_metrics([RequestResult(error="HTTP 401: bad key")] * 4, duration_s=0.5)
    assert (m["completed"], m["failed"], m["errors"]) == (0, 4, {"HTTP 401: bad key": 4})
    assert m["request_throughput"] == 0.0 and math.isnan(m["mean_ttft_ms"]) and math.isnan(m["p99_itl_ms"])


def test_output_tokens_without_usage_come_from_the_tokenizer_or_the_chunks() -> None:
    with_usage = ok(0.1, 0.5, tokens=7, itl=[])
    no_usage = RequestResult(ok=True, chunks=3, text="one two three four")
    resolve_output_tokens([with_usage, no_usage], lambda text: len(text.split()))
    assert (with_usage.output_tokens, no_usage.output_tokens) == (7, 4)
    bare = RequestResult(ok=True, chunks=3, text="x")
    resolve_output_tokens([bare], None)
    assert bare.output_tokens == 3


def test_peak_concurrency_from_send_and_end_times() -> None:
    results = [
        ok(0.1, 1.0, 2, [0.1], started=0.0),
        ok(0.1, 1.0, 2, [0.1], started=0.5),
        ok(0.1, 0.2, 2, [0.1], started=1.0),
    ]
    assert peak_concurrency(results) == 2  # the first ends at 1.0 as the third starts
    assert peak_concurrency([]) == 0


def test_errors_are_grouped_by_first_line_and_cut() -> None:
    assert error_key("HTTP 500: boom\ntraceback...") == "HTTP 500: boom"
    assert error_key("") == "unknown error"
    assert len(error_key("x" * 500)) == 160


def run_result(limit: int | None, completed: int = 4) -> RunResult:
    results = [ok(0.1, 0.5, 5, [0.1] * 4) for _ in range(completed)] + [RequestResult(error="HTTP 503: busy")]
    return RunResult(limit, compute_metrics(results, 1.0, [99]), None, results)


def test_result_file_has_config_runs_and_strict_json(tmp_path: Path) -> None:
    runs = [run_result(1), run_result(4, completed=0)]
    result = report.build_result({"label": "x", "request_rate": "inf"}, runs, detailed=True)
    path = tmp_path / "out" / "r.json"
    report.save_result(path, result)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = report.load_result(path)
    assert loaded["kind"] == "scalellm-bench" and loaded["config"]["label"] == "x"
    assert loaded["client"]["cpu"] and loaded["client"]["cpus"]
    assert [r["max_concurrency"] for r in loaded["runs"]] == [1, 4]
    assert loaded["runs"][1]["metrics"]["mean_ttft_ms"] is None  # nan -> null
    assert len(loaded["runs"][0]["requests"]) == 5 and loaded["runs"][0]["requests"][-1]["error"] == "HTTP 503: busy"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="not a scalellm bench result"):
        report.load_result(bad)


def test_run_table_names_every_figure_and_the_errors() -> None:
    text = report.format_run(run_result(8), [99, 90], ["ttft", "e2el"], "inf")
    for label in ("Successful requests:", "Failed requests:", "Output token throughput (tok/s):", "P90 TTFT (ms):"):
        assert label in text
    assert "Maximum request concurrency:" in text and "Time to First Token" in text
    assert "TPOT" not in text  # not chosen
    assert "1 x HTTP 503: busy" in text
    sweep = report.format_sweep([run_result(1), run_result(4)])
    assert len(sweep.splitlines()) == 4 and sweep.splitlines()[2].split()[0] == "1"


METRICS_BEFORE = """\
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 2.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_count{model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.2
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_count{model_name="m"} 2.0
vllm:request_prompt_tokens_sum{model_name="m"} 50.0
# TYPE other:latency_seconds histogram
other:latency_seconds_count 1.0
other:latency_seconds_sum 1.0
"""
METRICS_AFTER = (
    METRICS_BEFORE.replace('_count{model_name="m"} 2.0', '_count{model_name="m"} 6.0')
    .replace(
        'e2e_request_latency_seconds_sum{model_name="m"} 1.0', 'e2e_request_latency_seconds_sum{model_name="m"} 9.0'
    )
    .replace(
        'time_to_first_token_seconds_sum{model_name="m"} 0.2', 'time_to_first_token_seconds_sum{model_name="m"} 2.2'
    )
    + """\
# TYPE scalellm:stage_seconds histogram
scalellm:stage_seconds_count{stage="tokenizer"} 4.0
scalellm:stage_seconds_sum{stage="tokenizer"} 0.4
"""
)


def test_stage_breakdown_differences_the_server_histograms() -> None:
    before, after = parse_histograms(METRICS_BEFORE), parse_histograms(METRICS_AFTER)
    assert ("vllm:request_prompt_tokens", (("model_name", "m"),)) not in after.series  # not in seconds
    assert not any(name.startswith("other:") for name, _ in after.series)
    rows = {row["series"]: row for row in stage_breakdown(before, after) or []}
    assert set(rows) == {
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "scalellm:stage_seconds",
    }
    e2e, ttft, stage = (
        rows["vllm:e2e_request_latency_seconds"],
        rows["vllm:time_to_first_token_seconds"],
        rows["scalellm:stage_seconds"],
    )
    assert (e2e["count"], e2e["mean_ms"], e2e["share_of_e2e"]) == (4, 2000.0, 1.0)
    assert ttft["mean_ms"] == pytest.approx(500.0) and ttft["share_of_e2e"] == pytest.approx(0.25)
    assert stage["labels"] == {"stage": "tokenizer"} and stage["mean_ms"] == pytest.approx(100.0)
    assert stage_breakdown(None, after) is None and stage_breakdown(before, None) is None
    assert stage_breakdown(after, after) == []  # nothing observed during the run
