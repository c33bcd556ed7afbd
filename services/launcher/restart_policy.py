"""When to restart a service that died, and when to give up on it.

Pure bookkeeping with the clock passed in, so the launcher's decisions are
tested without processes or sleeping. A replica that dies is restarted soon
(the rest of the pipeline covers for it meanwhile), but one that keeps dying
is a fault a restart will not fix (a bad model path, a port in use): after
``crash_loop_deaths`` deaths within ``crash_loop_window_s`` the launcher stops
everything and says why, instead of restarting it forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_CRASH_LOOP_DEATHS = 5
DEFAULT_CRASH_LOOP_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    # The first restart is quick: the pipeline's target is to recover within 2 s.
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    # A service that stayed up this long before dying gets the quick first restart again.
    backoff_reset_after_s: float = 10.0
    crash_loop_deaths: int = DEFAULT_CRASH_LOOP_DEATHS
    crash_loop_window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.backoff_reset_after_s < 0:
            raise ValueError(f"backoff_reset_after_s must not be negative, got {self.backoff_reset_after_s}")
        if self.crash_loop_deaths < 1:
            raise ValueError(f"crash_loop_deaths must be at least 1, got {self.crash_loop_deaths}")
        if self.crash_loop_window_s <= 0:
            raise ValueError(f"crash_loop_window_s must be positive, got {self.crash_loop_window_s}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one death."""

    restart: bool  # False: a crash loop, stop everything
    delay_s: float  # wait this long before restarting (0 when not restarting)
    deaths_in_window: int  # this death included

    @property
    def crash_loop(self) -> bool:
        return not self.restart


class RestartTracker:
    """One service's recent deaths and its current backoff."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._deaths: deque[float] = deque()
        self._next_delay_s = policy.initial_backoff_s

    def record_death(self, now: float, up_since: float) -> Verdict:
        """A death at ``now`` of the incarnation that started at ``up_since``."""
        policy = self.policy
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - policy.crash_loop_window_s:
            self._deaths.popleft()
        deaths = len(self._deaths)
        if deaths >= policy.crash_loop_deaths:
            return Verdict(restart=False, delay_s=0.0, deaths_in_window=deaths)
        if now - up_since >= policy.backoff_reset_after_s:
            self._next_delay_s = policy.initial_backoff_s
        delay = self._next_delay_s
        self._next_delay_s = min(delay * 2, policy.max_backoff_s)
        return Verdict(restart=True, delay_s=delay, deaths_in_window=deaths)

    def describe(self, verdict: Verdict) -> str:
        """``restarting in 0.2 s (death 1 of 5 in 60 s)``, for the launcher's log."""
        window = (
            f"{verdict.deaths_in_window} of {self.policy.crash_loop_deaths} in {self.policy.crash_loop_window_s:g} s"
        )
        if verdict.crash_loop:
            return f"crash loop: death {window}"
        return f"restarting in {verdict.delay_s:.1f} s (death {window})"
