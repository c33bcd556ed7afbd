"""GatewayMetrics: every series of GET /metrics, in one prometheus_client registry per app.

A registry per app (not prometheus_client's global one), so that several gateways in one
process (the tests) keep their counts apart. docs/api.md ("Metrics") lists every series.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from services.gateway.metrics.pipeline import PipelineCollector
from services.gateway.metrics.requests import SLOW_CLIENT_REASONS, ClosedRequest, RequestMetrics
from shared.transport import StreamTransport

# The classic text format, which every Prometheus reads (the text the 1.0.0 type names is the same).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# How long a scrape waits for Redis before it answers without the pipeline's figures.
PIPELINE_READ_TIMEOUT_S = 2.0

# Without this every counter and histogram also has a "_created" series: twice the series
# for a timestamp nobody graphs. A process-wide switch; the gateway process has no other metrics.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client


class GatewayMetrics:
    def __init__(
        self,
        model_name: str,
        transport: StreamTransport | None = None,
        *,
        detokenizer_shards: int = 4,
        pipeline_read_timeout_s: float = PIPELINE_READ_TIMEOUT_S,
    ) -> None:
        """Without ``transport`` only the gateway's own figures are exported (no Redis reads)."""
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, model_name)
        self._pipeline: PipelineCollector | None = None
        if transport is not None:
            self._pipeline = PipelineCollector(transport, detokenizer_shards, model_name, pipeline_read_timeout_s)
            self.registry.register(self._pipeline)

    # -- observed by the request handlers (services/gateway/server.py) ---------

    def request_done(self, endpoint: str, status: int) -> None:
        """Every answer of a completion endpoint, errors included."""
        self.requests.responses.labels(endpoint, str(status)).inc()

    def slow_client(self, reason: str) -> None:
        if reason not in SLOW_CLIENT_REASONS:
            raise ValueError(f"unknown slow-client reason {reason!r}")
        self.requests.slow_clients[reason].inc()

    def request_closed(self, request: ClosedRequest, now: float) -> None:
        self.requests.request_closed(request, now)

    # -- GET /metrics -----------------------------------------------------------

    async def scrape(self, in_flight: int, buffered_bytes: int) -> bytes:
        """The Prometheus text (media type ``CONTENT_TYPE``), with the pipeline read just now."""
        self.requests.in_flight.set(in_flight)
        self.requests.buffered_bytes.set(buffered_bytes)
        if self._pipeline is not None:
            await self._pipeline.refresh()
        return generate_latest(self.registry)
