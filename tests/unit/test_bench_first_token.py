"""bench/first_token.py's table: medians of each span, per server."""

from __future__ import annotations

from bench.first_token import table


def hops(offset: float) -> dict[str, float]:
    at = {
        "client_sent": 0.0,
        "engine_scheduled": 0.004,
        "engine_first_token": 0.054,
        "gateway_first_output": 0.057,
        "client_first_byte": 0.058,
        "engine_finished": 0.2,
        "gateway_last_output": 0.202,
    }
    return {hop: t + offset if hop != "client_sent" else t for hop, t in at.items()}


def test_each_span_is_the_median_over_the_requests_in_ms() -> None:
    text = table(["a", "b"], {"a": [hops(0.0), hops(0.001), hops(0.010)], "b": [hops(0.0)]})
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in text.splitlines()[2:]}
    assert rows["TTFT (client)"] == ["59.00", "58.00 |"]
    assert rows["first token back (engine -> client)"] == ["4.00", "4.00 |"]
    assert rows["TTFT minus prefill"] == ["9.00", "8.00 |"]
