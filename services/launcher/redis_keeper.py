"""Restarts the launcher's own redis-server when it dies.

The services keep their Redis URL and reconnect by themselves (the stream
transport retries), so the server comes back on the same port with the same
directory. It is kept apart from the services' Supervisor because it is
started and checked differently (it is ready when it answers PING, and it
writes to a log file rather than to a pipe), but it dies and is restarted
under the same RestartPolicy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.launcher.restart_policy import RestartPolicy, RestartTracker
from services.launcher.supervisor import PREFIX, describe_exit
from services.redis_server import EmbeddedRedis, EmbeddedRedisError

NAME = "redis-server"


class RedisKeeper:
    def __init__(
        self,
        redis: EmbeddedRedis,
        policy: RestartPolicy,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.tracker = RestartTracker(policy)
        self._say = say
        self._clock = clock
        self._started_at = clock()
        self._restart_at: float | None = None
        self.restarts = 0

    def tend(self) -> str | None:
        """Notice a death, restart when due; None, or why everything must stop."""
        now = self._clock()
        if self._restart_at is None:
            code = self.redis.poll()
            if code is None:
                return None
            verdict = self.tracker.record_death(now, self._started_at)
            how = f"{NAME} (pid {self.redis.pid}, port {self.redis.port}) {describe_exit(code)}"
            if verdict.crash_loop:
                return f"{how}: {self.tracker.describe(verdict)}\nits log ends with:\n{self.redis.log_tail()}"
            self._say(f"{PREFIX} {how}; {self.tracker.describe(verdict)}")
            self._restart_at = now + verdict.delay_s
            return None
        if now < self._restart_at:
            return None
        self._restart_at = None
        try:
            self.redis.restart()
        except EmbeddedRedisError as exc:
            return str(exc)
        self._started_at = self._clock()
        self.restarts += 1
        self._say(f"{PREFIX} restarted {NAME} (pid {self.redis.pid}) on port {self.redis.port}")
        return None
