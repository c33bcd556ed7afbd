"""GET /metrics: vLLM's series and our own (scalellm:), in Prometheus text (docs/api.md "Metrics").

- requests.py: what the gateway observes of each request (TTFT, token gaps, latency, tokens)
  and its HTTP counters;
- engines.py: the engines' figures from their heartbeats, one series per engine;
- pipeline.py: replicas, streams and engines, read from Redis at each scrape;
- gateway.py: GatewayMetrics, the per-app registry that holds them all.
"""

from services.gateway.metrics.gateway import CONTENT_TYPE, GatewayMetrics
from services.gateway.metrics.requests import TokenGaps

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "TokenGaps"]
