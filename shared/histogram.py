"""A histogram as counts per bucket: cheap to fill, to copy into a heartbeat, and to merge.

Prometheus histograms are cumulative counts per upper bound; this class keeps one count per
bucket (the last for values above every bound) and the sum, which is what a heartbeat carries
(docs/protocol.md) and what the gateway adds up and exports (services/gateway/metrics/).
prometheus_client's own Histogram cannot be used for these: it lives in one process's registry,
observes one value at a time, and cannot be merged with counts that come from elsewhere.

Pure logic, not thread-safe: each instance has one writer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

# vLLM's bounds for per-request times (vllm:e2e_request_latency_seconds,
# vllm:request_queue_time_seconds, ...), so that dashboards built for vLLM read the same buckets.
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """A snapshot: ``counts[i]`` values fell at or below ``bounds[i]`` and above the bound before;
    ``counts[-1]`` above every bound. ``total`` is the sum of the values."""

    counts: tuple[int, ...] = ()
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class BucketHistogram:
    """Counts per bucket for the fixed, increasing ``bounds``."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bounds must be increasing and not empty")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """``weight`` values equal to ``value`` (a value on a bound belongs to that bound's bucket)."""
        if weight <= 0:
            return
        self._counts[bisect.bisect_left(self.bounds, value)] += weight
        self._total += value * weight

    def merge(self, other: BucketHistogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bounds")
        for i, count in enumerate(other._counts):
            self._counts[i] += count
        self._total += other._total

    def snapshot(self) -> HistogramCounts:
        return HistogramCounts(tuple(self._counts), self._total)
