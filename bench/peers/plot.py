"""The comparison as one PNG: c1 TTFT and TPOT, c64 output tok/s against the roofline's rate."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    path: Path,
    *,
    title: str,
    roofline_output_tps: float | None,
    low: int = 1,
    high: int = 64,
) -> None:
    """Three bar panels, one bar per server; a dashed line for the roofline's output tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
    panels = [
        (f"concurrency {low}: mean TTFT (ms)", low, "mean_ttft_ms"),
        (f"concurrency {low}: mean TPOT (ms)", low, "mean_tpot_ms"),
        (f"concurrency {high}: output tokens/s", high, "output_throughput"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (label, conc, key) in zip(axes, panels, strict=True):
        values = [float(runs[n].get(conc, {}).get(key) or 0.0) for n in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7, rotation=20)
        ax.set_title(label, fontsize=10)
        if key == "output_throughput" and roofline_output_tps:
            ax.axhline(roofline_output_tps, color="tab:red", linestyle="--", linewidth=1)
            ax.text(0, roofline_output_tps, f" matmul roofline {roofline_output_tps:,.0f}", color="tab:red",
                    fontsize=8, va="bottom")  # fmt: skip
            ax.set_ylim(0, max([*values, roofline_output_tps]) * 1.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
