"""The result file (JSON) and the tables printed after a run or a sweep."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.serving.metrics import LATENCIES, LATENCY_NAMES, RequestResult, percentile_label
from bench.serving.runner import RunResult

KIND = "scalellm-bench"
FORMAT = 1
WIDTH = 50


def machine() -> dict[str, Any]:
    """The client machine: figures mean little without it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}


def finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: nan -> null, inf -> "inf", recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def request_details(results: Iterable[RequestResult]) -> list[dict[str, Any]]:
    return [
        {
            "ok": r.ok,
            "started_s": r.started_s,
            "prompt_len": r.prompt_len,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "ttft_s": r.ttft_s,
            "latency_s": r.latency_s,
            "itl_s": r.itl_s,
            "error": r.error,
        }
        for r in results
    ]


def build_result(config: dict[str, Any], runs: Sequence[RunResult], *, detailed: bool = False) -> dict[str, Any]:
    result = {
        "kind": KIND,
        "format": FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "client": machine(),
        "config": config,
        "runs": [
            {
                "max_concurrency": run.max_concurrency,
                "metrics": run.metrics,
                "server_metrics": run.server_metrics,
                **({"requests": request_details(run.requests)} if detailed else {}),
            }
            for run in runs
        ],
    }
    return dict(finite(result))


def save_result(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def load_result(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a scalellm bench result (saved with --save-result)")
    return data


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.{digits}f}"


def _heading(text: str, fill: str = "-") -> str:
    return f" {text} ".center(WIDTH, fill)


def format_run(
    run: RunResult, percentiles: Sequence[float], shown: Sequence[str] = LATENCIES, request_rate: Any = "inf"
) -> str:
    """A run's figures as ``vllm bench serve`` prints them, then the server's histograms if any."""
    m = run.metrics
    lines = [_heading("Serving Benchmark Result", "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<40}{_number(value, digits):>10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Maximum request concurrency:", run.max_concurrency if run.max_concurrency else "none")
    row("Request rate (req/s):", request_rate)
    row("Peak concurrent requests:", m["max_concurrent_requests"])
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for name in shown:
        lines.append(_heading(LATENCY_NAMES[name]))
        short = name.upper()
        row(f"Mean {short} (ms):", m.get(f"mean_{name}_ms"))
        row(f"Median {short} (ms):", m.get(f"median_{name}_ms"))
        for q in percentiles:
            label = percentile_label(q)
            row(f"{label.upper()} {short} (ms):", m.get(f"{label}_{name}_ms"))
    if m["errors"]:
        lines.append(_heading("Errors"))
        for error, count in m["errors"].items():
            lines.append(f"{count:>6} x {error}")
    if run.server_metrics:
        lines.append(_heading("Server's histograms (/metrics, this run)"))
        lines.append(f"{'series':<52}{'count':>8}{'mean ms':>10}{'of e2e':>8}")
        for s in run.server_metrics:
            labels = ",".join(f"{k}={v}" for k, v in s["labels"].items() if k != "model_name")
            name = s["series"] + (f"{{{labels}}}" if labels else "")
            share = s.get("share_of_e2e")
            share_text = "" if share is None or math.isnan(share) else f"{100 * share:.0f}%"
            lines.append(f"{name[:52]:<52}{s['count']:>8}{s['mean_ms']:>10.2f}{share_text:>8}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(runs: Sequence[RunResult]) -> str:
    """One line per run: the figures a sweep is read for."""
    header = (
        f"{'concurrency':>11} {'req/s':>8} {'out tok/s':>10} {'TTFT med':>9} {'TTFT p99':>9} "
        f"{'TPOT med':>9} {'ITL p99':>9} {'E2E med':>9} {'failed':>7}"
    )
    lines = ["Sweep (latencies in ms; p99 = the 99th percentile, n/a when not computed)", header]
    for run in runs:
        m = run.metrics
        cells = [
            _number(m["request_throughput"]),
            _number(m["output_throughput"], 1),
            _number(m["median_ttft_ms"], 1),
            _number(m.get("p99_ttft_ms"), 1),
            _number(m["median_tpot_ms"], 1),
            _number(m.get("p99_itl_ms"), 1),
            _number(m["median_e2el_ms"], 1),
        ]
        limit = str(run.max_concurrency) if run.max_concurrency else "none"
        lines.append(
            f"{limit:>11} {cells[0]:>8} {cells[1]:>10} {cells[2]:>9} {cells[3]:>9} "
            f"{cells[4]:>9} {cells[5]:>9} {cells[6]:>9} {m['failed']:>7}"
        )
    return "\n".join(lines)
