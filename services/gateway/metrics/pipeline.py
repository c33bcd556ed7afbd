"""The pipeline as Redis shows it, read when /metrics is scraped: replicas, streams, engines.

The heartbeats the gateway already reads for /health (``StreamTransport.live_replicas``)
give the live replicas of every role and the engines' figures; ``XINFO GROUPS`` (and
``XPENDING``) on each work stream gives its length, lag and pending entries, the signals
docs/scaling.md uses to tell which role is short. A scrape every few seconds costs Redis a
few commands per role and per stream; nothing is read between scrapes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from services.gateway.metrics.engines import engine_families
from shared.messages import Heartbeat, Role
from shared.transport import StreamNames, StreamTransport
from shared.work_streams import StreamProgress

log = logging.getLogger(__name__)

ROLES: tuple[Role, ...] = ("gateway", "tokenizer", "engine", "detokenizer")


@dataclass(frozen=True, slots=True)
class PipelineFigures:
    """One reading of Redis; ``ok`` False when it failed or timed out (the rest is then empty)."""

    ok: bool
    live: dict[Role, list[Heartbeat]] = field(default_factory=dict)
    streams: tuple[StreamProgress, ...] = ()


def watched_streams(names: StreamNames, shards: int) -> list[str]:
    """The work streams, upstream first, and the dead-letter stream."""
    return [names.requests, names.tokenized, *(names.generated(i) for i in range(shards)), names.deadletter]


async def read_pipeline(transport: StreamTransport, shards: int, timeout_s: float) -> PipelineFigures:
    """Heartbeats of every role and the progress of every watched stream, within ``timeout_s``
    (the transport retries an unreachable Redis for ever; a scrape must answer anyway)."""
    try:
        async with asyncio.timeout(timeout_s):
            beats = await asyncio.gather(*(transport.live_replicas(role) for role in ROLES))
            streams = await asyncio.gather(
                *(transport.stream_progress(s) for s in watched_streams(transport.names, shards))
            )
    except Exception as exc:  # noqa: BLE001 - a scrape reports what it could not read, it does not fail
        log.warning("/metrics: could not read the pipeline's figures from Redis: %r", exc)
        return PipelineFigures(ok=False)
    return PipelineFigures(ok=True, live=dict(zip(ROLES, beats)), streams=tuple(streams))


def stream_label(names: StreamNames, stream: str) -> str:
    """A stream's name without the pipeline's prefix: "requests", "generated:0", ..."""
    return stream.removeprefix(f"{names.prefix}:")


def pipeline_families(figures: PipelineFigures, names: StreamNames, model_name: str) -> list[Metric]:
    """Our series for the pipeline (scalellm:) and vLLM's for the engines. Pure."""
    up = GaugeMetricFamily("scalellm:redis_up", "1 if this scrape read the pipeline's figures from Redis.")
    up.add_metric([], 1 if figures.ok else 0)
    if not figures.ok:
        return [up]
    replicas = GaugeMetricFamily("scalellm:replicas", "Live replicas (a heartbeat within its TTL).", labels=["role"])
    for role in ROLES:
        replicas.add_metric([role], len(figures.live.get(role, [])))
    length = GaugeMetricFamily("scalellm:stream_length", "Entries in the stream (XLEN).", labels=["stream"])
    lag = GaugeMetricFamily(
        "scalellm:stream_lag",
        "Entries no consumer of the group has read yet: work waiting for a replica (Redis 7 and later).",
        labels=["stream", "group"],
    )
    pending = GaugeMetricFamily(
        "scalellm:stream_pending",
        "Entries read by a consumer of the group and not yet acknowledged: work in progress.",
        labels=["stream", "group"],
    )
    for progress in figures.streams:
        stream = stream_label(names, progress.stream)
        length.add_metric([stream], progress.length)
        for group in progress.groups:
            pending.add_metric([stream, group.name], group.pending)
            if group.lag is not None:
                lag.add_metric([stream, group.name], group.lag)
    return [up, replicas, length, lag, pending, *engine_families(figures.live.get("engine", []), model_name)]


class PipelineCollector:
    """A prometheus_client collector that exports the last reading (``refresh`` before each scrape)."""

    def __init__(self, transport: StreamTransport, shards: int, model_name: str, timeout_s: float) -> None:
        self._transport = transport
        self._shards = shards
        self._model_name = model_name
        self._timeout_s = timeout_s
        self._figures = PipelineFigures(ok=False)

    async def refresh(self) -> None:
        self._figures = await read_pipeline(self._transport, self._shards, self._timeout_s)

    def collect(self) -> Iterator[Metric]:
        yield from pipeline_families(self._figures, self._transport.names, self._model_name)

    def describe(self) -> Sequence[Metric]:
        return []  # names vary with what Redis holds; registering must not read Redis
