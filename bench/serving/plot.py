"""``scalellm bench plot A.json B.json -o out.png``: result files side by side (matplotlib, optional).

One line per file, one point per run, against the run's concurrency limit (or, for a run
without one, the peak number of requests it had in flight): output throughput, and the
median and p99 (dashed) of TTFT, TPOT and end-to-end latency. matplotlib is the optional
extra ``scalellm[bench]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serving.report import load_result

PANELS = (
    ("output_throughput", None, "output tokens/s"),
    ("ttft", "ms", "TTFT (ms)"),
    ("tpot", "ms", "TPOT (ms)"),
    ("e2el", "ms", "end-to-end latency (ms)"),
)


def series_points(result: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(x, metrics) for each run of a result file, sorted by x."""
    points = []
    for run in result["runs"]:
        metrics = run["metrics"]
        x = run.get("max_concurrency") or metrics.get("max_concurrent_requests") or 1
        points.append((float(x), metrics))
    return sorted(points, key=lambda p: p[0])


def label_for(path: Path, result: dict[str, Any]) -> str:
    return str(result.get("config", {}).get("label") or path.stem)


def values(points: Sequence[tuple[float, dict[str, Any]]], key: str) -> list[float]:
    """The metric at each point; nan where the file has none (null), which leaves a gap."""
    out = []
    for _, metrics in points:
        value = metrics.get(key)
        out.append(float(value) if isinstance(value, (int, float)) else float("nan"))
    return out


def plot(paths: Sequence[str | Path], output: str | Path, labels: Sequence[str] = (), title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("scalellm bench plot needs matplotlib: pip install 'scalellm[bench]'") from exc
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} result files")
    results = [(Path(p), load_result(p)) for p in paths]
    names = list(labels) if labels else [label_for(path, result) for path, result in results]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    every_x: set[float] = set()
    for index, ((_, result), label) in enumerate(zip(results, names)):
        points = series_points(result)
        xs = [x for x, _ in points]
        every_x.update(xs)
        color = f"C{index % 10}"
        for ax, (key, unit, ylabel) in zip(axes.flat, PANELS):
            if unit is None:
                ax.plot(xs, values(points, key), "o-", color=color, label=label)
            else:
                ax.plot(xs, values(points, f"median_{key}_{unit}"), "o-", color=color, label=f"{label} median")
                ax.plot(xs, values(points, f"p99_{key}_{unit}"), "s--", color=color, label=f"{label} p99")
            ax.set_ylabel(ylabel)
    for ax in axes.flat:
        ax.set_xlabel("concurrency (limit, or peak in flight)")
        if every_x and max(every_x) / max(1.0, min(every_x)) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(every_x), [f"{x:g}" for x in sorted(every_x)])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    figure.suptitle(title or "scalellm bench: " + " vs ".join(names))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
