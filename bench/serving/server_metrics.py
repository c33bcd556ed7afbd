"""The server's own view of a run: its latency histograms on /metrics, read before and after.

``stage_breakdown`` is the hook for issue 12's stage timeline (item 1): every histogram in
seconds whose name starts with ``scalellm:`` or ``vllm:`` is differenced between the two
scrapes, so each one's mean over this run, and its share of the server's end-to-end time,
come out without the benchmark knowing the stages' names. Today our gateway exports vLLM's
request histograms (TTFT, queue time, end-to-end...); the per-stage series of item 1 will
show up here by themselves once the gateway exports them. A vLLM server gives its own
histograms the same way; a server without /metrics gives nothing (None).

Other traffic on the server during the run is counted too, and with several gateways each
one's /metrics covers only its own requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

PREFIXES = ("scalellm:", "vllm:")
E2E = "vllm:e2e_request_latency_seconds"

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # histogram name, its labels (without le)


@dataclass(frozen=True)
class Snapshot:
    """sum and count of every latency histogram series on /metrics at one moment."""

    series: dict[SeriesKey, tuple[float, float]]


def parse_histograms(text: str, prefixes: tuple[str, ...] = PREFIXES) -> Snapshot:
    """The _sum and _count of each histogram named <prefix>..._seconds in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[SeriesKey, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.startswith(prefixes) or not family.name.endswith("_seconds"):
            continue
        for sample in family.samples:
            suffix = sample.name[len(family.name) :]
            if suffix not in ("_sum", "_count"):
                continue
            key = (family.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le")))
            total, count = series.get(key, (0.0, 0.0))
            series[key] = (sample.value, count) if suffix == "_sum" else (total, sample.value)
    return Snapshot(series)


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Snapshot | None:
    """The server's histograms now, or None when it has no Prometheus /metrics."""
    try:
        response = await client.get(path, timeout=5.0)
        if response.status_code != 200:
            return None
        return parse_histograms(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def stage_breakdown(before: Snapshot | None, after: Snapshot | None) -> list[dict[str, Any]] | None:
    """Per histogram series observed during the run: observations, mean (ms), total (s), share of e2e."""
    if before is None or after is None:
        return None
    rows: list[dict[str, Any]] = []
    for key, (total_after, count_after) in sorted(after.series.items()):
        total_before, count_before = before.series.get(key, (0.0, 0.0))
        count, total = count_after - count_before, total_after - total_before
        if count <= 0:
            continue
        name, labels = key
        rows.append({"series": name, "labels": dict(labels), "count": int(count), "total_s": total})
    e2e = sum(row["total_s"] for row in rows if row["series"] == E2E)
    for row in rows:
        row["mean_ms"] = 1000 * row["total_s"] / row["count"]
        row["share_of_e2e"] = row["total_s"] / e2e if e2e > 0 else math.nan
    return rows
