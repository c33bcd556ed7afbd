"""``scalellm bench stages A.json B.json ...``: the stage breakdown of saved runs as one table.

Each run of a result file (--save-result) holds the server's histograms differenced over the run
(server_metrics.py). Against our gateway they include ``scalellm:request_stage_seconds`` per
segment of the stage timeline (shared/timeline.py): this turns them into the share of the
request's time in the gateway (from its arrival to its last bytes: the segments' sum) each segment
took, one column per run, in the order a request passes them (a Markdown table, as
docs/benchmarks.md shows it). vLLM's end-to-end histogram is shown beside it: it starts later,
once the body is parsed. Pure logic but for reading the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serving.report import load_result
from shared.timeline import FIRST_OUTPUT_RETURN, SEGMENTS

STAGE_SERIES = "scalellm:request_stage_seconds"
E2E = "vllm:e2e_request_latency_seconds"


def run_segments(run: dict[str, Any]) -> tuple[dict[str, tuple[int, float]], float, int]:
    """A run's segments (observations, total seconds), vLLM's end-to-end total and its count."""
    segments: dict[str, tuple[int, float]] = {}
    e2e_total, requests = 0.0, 0
    for row in run.get("server_metrics") or []:
        if row["series"] == STAGE_SERIES and "segment" in row["labels"]:
            segments[row["labels"]["segment"]] = (row["count"], row["total_s"])
        elif row["series"] == E2E:
            e2e_total += row["total_s"]
            requests += row["count"]
    return segments, e2e_total, requests


def stage_table(columns: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per segment, one column per (label, run): its share of the segments' sum (mean ms)."""
    names = [name for name, _, _ in SEGMENTS]
    figures = [run_segments(run) for _, run in columns]
    if not any(segments for segments, _, _ in figures):
        raise ValueError(f"no run has {STAGE_SERIES} (not measured against our gateway, or an older one)")
    chains = [sum(segments[name][1] for name in names if name in segments) for segments, _, _ in figures]
    lines = ["| segment | " + " | ".join(label for label, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in [*names, FIRST_OUTPUT_RETURN[0]]:
        cells = []
        for (segments, _, _), chain in zip(figures, chains, strict=True):
            if name in segments and chain > 0:
                count, total_s = segments[name]
                cells.append(f"{100 * total_s / chain:.1f}% ({1000 * total_s / count:.2f} ms)")
            else:
                cells.append("-")
        label = f"({name}, beside the chain)" if name == FIRST_OUTPUT_RETURN[0] else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chain_row, e2e_row = [], []
    for (segments, e2e_total, requests), chain in zip(figures, chains, strict=True):
        count = max((segments[name][0] for name in names if name in segments), default=0)
        chain_row.append(f"{1000 * chain / count:.2f} ms" if count else "-")
        e2e_row.append(f"{1000 * e2e_total / requests:.2f} ms ({requests} requests)" if requests else "-")
    lines.append("| the segments together, mean | " + " | ".join(chain_row) + " |")
    lines.append("| vLLM's e2e latency (from the parsed body), mean | " + " | ".join(e2e_row) + " |")
    return "\n".join(lines)


def columns_of_files(paths: Sequence[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """(label, run) for every run of the files: the file's --label, and the concurrency if several."""
    columns = []
    for path in paths:
        result = load_result(path)
        label = result.get("config", {}).get("label") or Path(path).stem
        for run in result["runs"]:
            runs = len(result["runs"])
            columns.append((f"{label} c{run['max_concurrency']}" if runs > 1 else str(label), run))
    return columns


def table_of_files(paths: Sequence[str | Path]) -> str:
    return stage_table(columns_of_files(paths))


def plot_stages(paths: Sequence[str | Path], output: str | Path) -> Path:
    """One bar per run, split by segment (share of the request's time in the gateway); matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns_of_files(paths)
    names = [name for name, _, _ in SEGMENTS]
    shares: list[list[float]] = []
    for _, run in columns:
        segments, _, _ = run_segments(run)
        chain = sum(segments[name][1] for name in names if name in segments) or 1.0
        shares.append([100 * segments[name][1] / chain if name in segments else 0.0 for name in names])
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.6 * len(columns)))
    left = [0.0] * len(columns)
    colors = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        widths = [row[index] for row in shares]
        axes.barh([label for label, _ in columns], widths, left=left, label=name, color=colors[index % len(colors)])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes.set_xlabel("share of the request's time in the gateway (%)")
    axes.set_xlim(0, 100)
    axes.invert_yaxis()
    axes.legend(ncol=4, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(columns)))
    figure.tight_layout()
    figure.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(output)
