"""The engines' figures, from their heartbeats, as vLLM's series. Pure logic.

Every engine beats every 0.25 s with its load and its counters (docs/protocol.md); the
gateway reads the live engines' heartbeats when it is scraped and exports them one series
per engine, labelled ``engine`` as vLLM labels its engine cores. Not summed: a counter summed
over the live engines would go down when one of them leaves, which Prometheus takes for a
counter reset (a burst of phantom increase); ``sum by (model_name)`` in a query gives the total.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from shared.histogram import REQUEST_LATENCY_BUCKETS, HistogramCounts
from shared.messages import Heartbeat

LABELS = ["model_name", "engine"]
# new_replica_id: "engine-<host name>-<8 hex digits>".
_OUR_REPLICA_ID = re.compile(r"^engine-.+-([0-9a-f]{8})$")


def engine_label(replica_id: str) -> str:
    """The ``engine`` label: the random part of the replica id, without the host name.

    /metrics needs no API key, so it must not name hosts (as /health hides its gateway_id
    when a key is set). The suffix is in the engine's log ("engine engine-HOST-SUFFIX
    serving"); an id of another shape (someone else's engine) is hashed.
    """
    match = _OUR_REPLICA_ID.match(replica_id)
    if match:
        return match.group(1)
    return hashlib.blake2b(replica_id.encode(), digest_size=4).hexdigest()


def cumulative_buckets(counts: HistogramCounts, bounds: Sequence[float]) -> list[tuple[str, float]] | None:
    """Prometheus buckets (upper bound, values at or below it), "+Inf" last; None when the
    counts do not fit the bounds (an engine that does not measure it, or another version)."""
    if len(counts.counts) != len(bounds) + 1:
        return None
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*bounds, float("inf")], counts.counts):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return buckets


def engine_families(heartbeats: Iterable[Heartbeat], model_name: str) -> list[Metric]:
    """vLLM's engine-side series (and our forward share), one sample per live engine."""
    running = GaugeMetricFamily(
        "vllm:num_requests_running", "Number of requests in model execution batches.", labels=LABELS
    )
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=LABELS
    )
    kv_usage = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=LABELS
    )
    queries = CounterMetricFamily(
        "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels=LABELS
    )
    hits = CounterMetricFamily(
        "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=LABELS
    )
    preemptions = CounterMetricFamily(
        "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=LABELS
    )
    queue_time = HistogramMetricFamily(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request (in the engine, after the streams).",
        labels=LABELS,
    )
    forward_share = GaugeMetricFamily(
        "scalellm:engine_forward_share", "Share of the last 10 s the engine spent in model forward.", labels=LABELS
    )
    # An info series, as Prometheus exporters show build and config facts: always 1, the text in a label.
    kernels = GaugeMetricFamily(
        "scalellm:engine_kernels",
        "The engine's compute paths (dtype, kernels, the CPU flags that chose them), in the label kernels.",
        labels=[*LABELS, "kernels"],
    )
    seen: set[str] = set()
    for beat in sorted(heartbeats, key=lambda b: b.replica_id):
        if beat.role != "engine":
            continue
        engine = engine_label(beat.replica_id)
        if engine in seen:
            continue  # two ids with one suffix (1 in 4 billion): a second sample would break the text
        seen.add(engine)
        labels = [model_name, engine]
        running.add_metric(labels, beat.running)
        waiting.add_metric(labels, beat.waiting)
        kv_usage.add_metric(labels, beat.kv_usage)
        queries.add_metric(labels, beat.prefix_cache_queries)
        hits.add_metric(labels, beat.prefix_cache_hits)
        preemptions.add_metric(labels, beat.preemptions)
        forward_share.add_metric(labels, beat.forward_share)
        if beat.kernels:
            kernels.add_metric([*labels, beat.kernels], 1.0)
        counts = HistogramCounts(tuple(beat.queue_time_counts), beat.queue_time_sum)
        buckets = cumulative_buckets(counts, REQUEST_LATENCY_BUCKETS)
        if buckets is not None:
            queue_time.add_metric(labels, buckets, counts.total)
    return [running, waiting, kv_usage, queries, hits, preemptions, queue_time, forward_share, kernels]
