"""When each request is sent: a Poisson process, or a gamma process with burstiness, as in vLLM.

The gaps between requests are gamma-distributed with shape ``burstiness`` and mean
``1 / request_rate``: burstiness 1 is a Poisson process (exponential gaps), below 1 the
arrivals come in bursts (the gaps' coefficient of variation is 1 / sqrt(burstiness)),
above 1 they are more even. An infinite rate sends everything at once. The first request
goes at 0, each later one a gap after the one before (vLLM sends, then sleeps).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArrivalProcess:
    request_rate: float = math.inf  # requests per second
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"the request rate must be positive (inf: all at once), not {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"the burstiness must be a positive number, not {self.burstiness}")

    @property
    def all_at_once(self) -> bool:
        return math.isinf(self.request_rate)

    def gaps(self, count: int, seed: int) -> list[float]:
        """The waits before each request after the first (count - 1 of them)."""
        if count < 2 or self.all_at_once:
            return [0.0] * max(0, count - 1)
        rng = random.Random(seed)
        scale = 1.0 / (self.request_rate * self.burstiness)  # mean = shape * scale = 1 / rate
        return [rng.gammavariate(self.burstiness, scale) for _ in range(count - 1)]

    def send_times(self, count: int, seed: int) -> list[float]:
        """Seconds after the start at which each of count requests is sent."""
        if count < 1:
            return []
        times = [0.0]
        for gap in self.gaps(count, seed):
            times.append(times[-1] + gap)
        return times

    def describe(self) -> dict[str, float | str]:
        return {"request_rate": "inf" if self.all_at_once else self.request_rate, "burstiness": self.burstiness}
