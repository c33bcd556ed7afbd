"""Pure logic of the peer comparison: read a client's result file, check the targets, write the table.

Both clients' files are read: ``vllm bench serve --save-result`` (one run, its figures at the top
level) and ``scalellm bench --save-result`` (``runs[i].metrics`` with the same key names).

The targets (issue 8), ours against the peers on the same machine and load:
- concurrency 1: mean TPOT at most llama.cpp's (on the same GGUF), mean TTFT at most half the
  best (lowest) peer's;
- concurrency 64: output throughput at least 1.5x the best peer's, and the useful work at least
  70% of the matmul roofline: 2 FLOP per weight per token, prompt tokens (prefill) included.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OURS = "ours"
LLAMACPP = "llamacpp"
FIGURES = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "output_throughput",
           "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
           "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms")  # fmt: skip
TTFT_SHARE = 0.5  # ours at most half the best peer's TTFT at concurrency 1
THROUGHPUT_RATIO = 1.5  # ours at least 1.5x the best peer's output tok/s at concurrency 64
ROOFLINE_SHARE = 0.7  # and at least 70% of the matmul roofline
# CPU flags worth naming beside the figures (the rest say nothing about these kernels).
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


def is_ours(name: str) -> bool:
    """ "ours" or "ours (ENV=VALUE ...)": one of our configurations, never a peer."""
    return name == OURS or name.startswith(OURS + " ")


def client_figures(data: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run from either client's result file (the first run of ours)."""
    if data.get("kind") == "scalellm-bench":
        runs = data.get("runs") or []
        if not runs:
            raise ValueError("a scalellm bench result without runs")
        metrics = dict(runs[0]["metrics"])
        metrics["max_concurrency"] = runs[0].get("max_concurrency")
    else:
        metrics = dict(data)
    out: dict[str, Any] = {k: metrics.get(k) for k in FIGURES}
    if out["failed"] is None and metrics.get("num_prompts") is not None and out["completed"] is not None:
        out["failed"] = int(metrics["num_prompts"]) - int(out["completed"])
    if out["total_token_throughput"] is None and out["duration"]:
        tokens = (out["total_input_tokens"] or 0) + (out["total_output_tokens"] or 0)
        out["total_token_throughput"] = tokens / out["duration"]
    out["max_concurrency"] = metrics.get("max_concurrency")
    return out


def load_figures(path: str | Path) -> dict[str, Any]:
    return client_figures(json.loads(Path(path).read_text(encoding="utf-8")))


def safetensors_params(path: str | Path) -> int:
    """Weights in a safetensors file (or every *.safetensors of a folder), from the headers alone."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def roofline_fraction(total_token_throughput: float | None, params: int, matmul_gflops: float) -> float | None:
    """Useful FLOP/s (2 per weight per token, prompt tokens included) over the best matmul rate."""
    if not total_token_throughput or not matmul_gflops or not params:
        return None
    return 2.0 * params * total_token_throughput / (matmul_gflops * 1e9)


def _at(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], server: str, conc: int, key: str) -> float | None:
    value = runs.get(server, {}).get(conc, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _best(values: Sequence[float | None], *, low: bool) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if low else max(present)


def evaluate_targets(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    *,
    ours: str = OURS,
    params: int,
    matmul_gflops: float,
    low: int | None = 1,
    high: int | None = 64,
) -> list[dict[str, Any]]:
    """Each target for ``ours``: what it compares, the two values, and held True/False (None: not measured).

    low / high: the concurrency the latency / throughput targets are read at (target_levels); None
    leaves those targets out, for a run that has no such level."""
    peers = [name for name in runs if not is_ours(name)]

    def target(name: str, value: float | None, bound: float | None, at_most: bool) -> dict[str, Any]:
        held = None if value is None or bound is None else (value <= bound if at_most else value >= bound)
        return {"target": name, "value": value, "bound": bound, "held": held}

    rows = []
    if low is not None:
        best_ttft = _best([_at(runs, p, low, "mean_ttft_ms") for p in peers], low=True)
        rows += [
            target(f"c{low} mean TPOT <= llama.cpp's (ms)", _at(runs, ours, low, "mean_tpot_ms"),
                   _at(runs, LLAMACPP, low, "mean_tpot_ms"), True),
            target(f"c{low} mean TTFT <= {TTFT_SHARE:g} x best peer's (ms)", _at(runs, ours, low, "mean_ttft_ms"),
                   None if best_ttft is None else TTFT_SHARE * best_ttft, True),
        ]  # fmt: skip
    if high is not None:
        best_tput = _best([_at(runs, p, high, "output_throughput") for p in peers], low=False)
        fraction = roofline_fraction(_at(runs, ours, high, "total_token_throughput"), params, matmul_gflops)
        rows += [
            target(f"c{high} output tok/s >= {THROUGHPUT_RATIO:g} x best peer's", _at(runs, ours, high, "output_throughput"),
                   None if best_tput is None else THROUGHPUT_RATIO * best_tput, False),
            target(f"c{high} share of the matmul roofline >= {ROOFLINE_SHARE:.0%}", fraction, ROOFLINE_SHARE, False),
        ]  # fmt: skip
    return rows


def target_levels(concurrency: Sequence[int]) -> tuple[int | None, int | None]:
    """(latency, throughput): the concurrency each kind of target is read at in a run of these levels.

    Latency at 1 (single-stream figures mean nothing under load), throughput at the highest level
    above 1 (one stream's tok/s is no throughput target): a run of one kind of level leaves the
    other kind's targets out instead of reading them at the wrong load."""
    latency = 1 if 1 in concurrency else None
    highest = max(concurrency, default=1)
    return latency, (highest if highest > 1 else None)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    *,
    params: int,
    matmul_gflops: float,
    low: int = 1,
    high: int = 64,
) -> str:
    """One row per server: c1 TTFT / TPOT, c64 output tok/s, TTFT, TPOT, share of the roofline."""
    head = (f"| server | c{low} mean TTFT (ms) | c{low} mean TPOT (ms) | c{high} output tok/s | c{high} mean TTFT (ms) "
            f"| c{high} mean TPOT (ms) | c{high} share of matmul roofline | failed |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for name in runs:
        fraction = roofline_fraction(_at(runs, name, high, "total_token_throughput"), params, matmul_gflops)
        failed = sum(int(_at(runs, name, c, "failed") or 0) for c in (low, high))
        lines.append(
            f"| {name} | {_num(_at(runs, name, low, 'mean_ttft_ms'))} | {_num(_at(runs, name, low, 'mean_tpot_ms'))} "
            f"| {_num(_at(runs, name, high, 'output_throughput'))} | {_num(_at(runs, name, high, 'mean_ttft_ms'))} "
            f"| {_num(_at(runs, name, high, 'mean_tpot_ms'))} "
            f"| {'-' if fraction is None else f'{fraction:.1%}'} | {failed} |"
        )
    return "\n".join(lines)


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| target | ours | bound | held |", "|---|---|---|---|"]
    for t in targets:
        pct = "roofline" in t["target"]
        value = "-" if t["value"] is None else (f"{t['value']:.1%}" if pct else _num(t["value"]))
        bound = "-" if t["bound"] is None else (f"{t['bound']:.0%}" if pct else _num(t["bound"]))
        held = {True: "yes", False: "**no**", None: "not measured"}[t["held"]]
        lines.append(f"| {t['target']} | {value} | {bound} | {held} |")
    return "\n".join(lines)


def cpu_description(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU model and the flags of KEY_FLAGS it has, from /proc/cpuinfo's text."""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else "unknown CPU"), [f for f in KEY_FLAGS if f in have]
