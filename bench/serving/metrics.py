"""What one request measured, and the run's figures computed from them (pure functions).

Names follow ``vllm bench serve``'s result file, so results compare key for key:

- TTFT: from sending the request to the first chunk that carries output text.
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request with at least two tokens.
- ITL: every gap between two chunks that carry text (a chunk of several tokens is one gap).
- E2EL: from sending the request to the end of its stream.

Percentiles interpolate linearly between the two nearest values (numpy's default), so p50
is the median. Output tokens are the server's usage figure; without one, the tokenizer's
count of the text when there is a tokenizer, else the number of text chunks.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

LATENCIES = ("ttft", "tpot", "itl", "e2el")
LATENCY_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0  # the dataset's count of the prompt's tokens
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens, when it sent usage
    output_tokens: int | None = None  # the server's usage.completion_tokens, when it sent usage
    chunks: int = 0  # chunks that carried output text
    text: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    started_s: float = 0.0  # when it was sent, seconds after the run began

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens or self.chunks
        if n < 2:
            return None
        return (self.latency_s - self.ttft_s) / (n - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy.percentile; nan when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentile_label(q: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's key names)."""
    return f"p{int(q)}" if float(q).is_integer() else f"p{q}"


def describe(values: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean, median, std (population) and the chosen percentiles; nan for no values."""
    out = {
        "mean": statistics.fmean(values) if values else math.nan,
        "median": statistics.median(values) if values else math.nan,
        "std": statistics.pstdev(values) if values else math.nan,
    }
    for q in percentiles:
        out[percentile_label(q)] = percentile(values, q)
    return out


def peak_concurrency(results: Iterable[RequestResult]) -> int:
    """The most requests in flight at one time (from their send and end times)."""
    events: list[tuple[float, int]] = []
    for r in results:
        events.append((r.started_s, 1))
        events.append((r.started_s + r.latency_s, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def error_key(error: str, width: int = 160) -> str:
    """Errors grouped by their first line, cut to width (messages often end in request ids)."""
    line = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return line if len(line) <= width else line[: width - 3] + "..."


def resolve_output_tokens(results: Iterable[RequestResult], count_tokens: Callable[[str], int] | None) -> None:
    """Fills output_tokens where the server sent no usage: the tokenizer's count, else the chunks."""
    for r in results:
        if r.ok and r.output_tokens is None:
            r.output_tokens = count_tokens(r.text) if count_tokens is not None else r.chunks


def compute_metrics(
    results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float] = (99,)
) -> dict[str, Any]:
    """The run's figures: counts, throughput, and every latency's statistics in milliseconds."""
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens if r.output_tokens is not None else r.chunks for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: math.nan)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(error_key(r.error) for r in results if not r.ok).most_common()),
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "max_concurrent_requests": peak_concurrency(results),
    }
    series = {
        "ttft": [r.ttft_s * 1000 for r in ok],
        "tpot": [t * 1000 for r in ok if (t := r.tpot_s) is not None],
        "itl": [gap * 1000 for r in ok for gap in r.itl_s],
        "e2el": [r.latency_s * 1000 for r in ok],
    }
    for name, values in series.items():
        for stat, value in describe(values, percentiles).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics
