"""scalellm bench's arrival process: Poisson and gamma gaps with the right statistics (fixed seeds)."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.serving.arrivals import ArrivalProcess

N = 20_000


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def test_infinite_rate_sends_everything_at_once() -> None:
    process = ArrivalProcess()
    assert process.all_at_once
    assert process.send_times(5, seed=0) == [0.0] * 5
    assert process.describe() == {"request_rate": "inf", "burstiness": 1.0}


def test_poisson_gaps_are_exponential_with_mean_one_over_rate() -> None:
    gaps = ArrivalProcess(request_rate=8.0).gaps(N + 1, seed=1)
    assert len(gaps) == N
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.03)
    assert cv(gaps) == pytest.approx(1.0, rel=0.03)  # exponential: std = mean
    # Memoryless: P(gap > t) = exp(-rate t).
    assert sum(g > 0.25 for g in gaps) / N == pytest.approx(math.exp(-2), rel=0.06)


def test_poisson_counts_per_second_have_variance_equal_to_mean() -> None:
    times = ArrivalProcess(request_rate=5.0).send_times(N, seed=2)
    seconds = int(times[-1])
    counts = [0] * seconds
    for t in times:
        if t < seconds:
            counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(5.0, rel=0.03)
    assert statistics.pvariance(counts) == pytest.approx(5.0, rel=0.1)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_gamma_gaps_keep_the_rate_and_scale_the_spread(burstiness: float) -> None:
    gaps = ArrivalProcess(request_rate=10.0, burstiness=burstiness).gaps(N + 1, seed=3)
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.04)
    assert cv(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_burstier_means_more_requests_close_together() -> None:
    bursty = ArrivalProcess(10.0, 0.25).gaps(N, seed=4)
    steady = ArrivalProcess(10.0, 4.0).gaps(N, seed=4)
    assert sum(g < 0.01 for g in bursty) > 5 * sum(g < 0.01 for g in steady)


def test_send_times_start_at_zero_and_accumulate_the_gaps() -> None:
    process = ArrivalProcess(request_rate=3.0, burstiness=0.7)
    gaps = process.gaps(10, seed=9)
    times = process.send_times(10, seed=9)
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert [b - a for a, b in zip(times, times[1:])] == pytest.approx(gaps)
    assert times == process.send_times(10, seed=9)
    assert times != process.send_times(10, seed=10)
    assert process.send_times(0, seed=0) == [] and process.send_times(1, seed=0) == [0.0]


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, math.inf)])
def test_bad_rates_and_burstiness_are_refused(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        ArrivalProcess(rate, burstiness)
