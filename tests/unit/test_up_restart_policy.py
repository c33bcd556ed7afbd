"""The launcher's restart policy: backoff and crash-loop verdicts, on a fake clock."""

from __future__ import annotations

import pytest

from services.launcher.restart_policy import RestartPolicy, RestartTracker


class FakeService:
    """Deaths at chosen times; each incarnation starts when the previous restart was due."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.tracker = RestartTracker(policy)
        self.up_since = 0.0

    def dies_after(self, up_for_s: float) -> tuple[bool, float, int]:
        now = self.up_since + up_for_s
        verdict = self.tracker.record_death(now, self.up_since)
        self.up_since = now + verdict.delay_s
        return verdict.restart, verdict.delay_s, verdict.deaths_in_window


def test_quick_deaths_double_the_backoff_up_to_the_cap() -> None:
    service = FakeService(RestartPolicy(initial_backoff_s=0.2, max_backoff_s=1.0, crash_loop_deaths=100))
    delays = [service.dies_after(0.1)[1] for _ in range(6)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_a_service_that_stayed_up_long_enough_gets_the_quick_restart_again() -> None:
    service = FakeService(RestartPolicy(initial_backoff_s=0.2, backoff_reset_after_s=10.0, crash_loop_deaths=100))
    assert [service.dies_after(1.0)[1] for _ in range(3)] == pytest.approx([0.2, 0.4, 0.8])
    assert service.dies_after(10.0)[1] == pytest.approx(0.2)
    assert service.dies_after(1.0)[1] == pytest.approx(0.4)  # and doubles again from there


def test_the_fifth_death_within_a_minute_is_a_crash_loop() -> None:
    service = FakeService(RestartPolicy())
    verdicts = [service.dies_after(1.0) for _ in range(5)]
    assert [restart for restart, _, _ in verdicts] == [True, True, True, True, False]
    assert [deaths for _, _, deaths in verdicts] == [1, 2, 3, 4, 5]
    assert verdicts[-1][1] == 0.0


def test_deaths_older_than_the_window_do_not_count() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_deaths=3, crash_loop_window_s=60.0))
    assert tracker.record_death(now=0.0, up_since=-1.0).deaths_in_window == 1
    assert tracker.record_death(now=30.0, up_since=29.0).deaths_in_window == 2
    # The first death is exactly 60 s old: out of the window.
    third = tracker.record_death(now=60.0, up_since=59.0)
    assert (third.restart, third.deaths_in_window) == (True, 2)
    fourth = tracker.record_death(now=61.0, up_since=60.5)
    assert (fourth.restart, fourth.deaths_in_window) == (False, 3)


def test_one_death_allowed_means_the_first_death_stops_everything() -> None:
    verdict = RestartTracker(RestartPolicy(crash_loop_deaths=1)).record_death(now=5.0, up_since=0.0)
    assert verdict.crash_loop


def test_the_log_wording() -> None:
    tracker = RestartTracker(RestartPolicy())
    first = tracker.record_death(now=1.0, up_since=0.0)
    assert tracker.describe(first) == "restarting in 0.2 s (death 1 of 5 in 60 s)"
    for now in (2.0, 3.0, 4.0):
        tracker.record_death(now=now, up_since=now - 0.5)
    assert tracker.describe(tracker.record_death(now=5.0, up_since=4.5)) == "crash loop: death 5 of 5 in 60 s"


@pytest.mark.parametrize(
    "settings",
    [
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"backoff_reset_after_s": -1.0},
        {"crash_loop_deaths": 0},
        {"crash_loop_window_s": 0.0},
    ],
)
def test_nonsense_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**settings)  # type: ignore[arg-type]
