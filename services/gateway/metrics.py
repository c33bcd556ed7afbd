"""Gateway counters in the Prometheus text format (GET /metrics). Pure logic."""

from __future__ import annotations

from collections import Counter

# Latency buckets in seconds: from a fast first token to a long generation.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self, name: str) -> list[str]:
        lines, cumulative = [f"# TYPE {name} histogram"], 0
        for bound, count in zip(BUCKETS, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]
        return lines


class GatewayMetrics:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.slow_clients: Counter[str] = Counter()  # clients cut off for not reading, by reason
        self.time_to_first_event = Histogram()
        self.request_latency = Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        self.responses[(endpoint, status)] += 1

    def output_done(
        self, prompt_tokens: int, completion_tokens: int, first_event_s: float | None, latency_s: float
    ) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        if first_event_s is not None:
            self.time_to_first_event.observe(first_event_s)
        self.request_latency.observe(latency_s)

    def render(self, in_flight: int, buffered_bytes: int = 0) -> str:
        p = "scalellm_gateway"
        lines = [f"# TYPE {p}_requests_total counter"]
        for (endpoint, status), count in sorted(self.responses.items()):
            lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        lines += [
            f"# TYPE {p}_requests_in_flight gauge",
            f"{p}_requests_in_flight {in_flight}",
            f"# TYPE {p}_aborted_total counter",
            f"{p}_aborted_total {self.aborted}",
            f"# TYPE {p}_slow_clients_total counter",
            *(
                f'{p}_slow_clients_total{{reason="{reason}"}} {self.slow_clients[reason]}'
                for reason in ("buffer", "timeout")
            ),
            f"# TYPE {p}_buffered_bytes gauge",
            f"{p}_buffered_bytes {buffered_bytes}",
            f"# TYPE {p}_prompt_tokens_total counter",
            f"{p}_prompt_tokens_total {self.prompt_tokens}",
            f"# TYPE {p}_generation_tokens_total counter",
            f"{p}_generation_tokens_total {self.generation_tokens}",
        ]
        lines += self.time_to_first_event.render(f"{p}_time_to_first_event_seconds")
        lines += self.request_latency.render(f"{p}_request_latency_seconds")
        return "\n".join(lines) + "\n"
