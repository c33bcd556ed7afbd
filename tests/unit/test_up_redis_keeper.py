"""`scalellm up` restarts its own redis-server on the same port when it dies."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.launcher.redis_keeper import RedisKeeper
from services.launcher.restart_policy import RestartPolicy
from services.redis_server import EmbeddedRedis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as embedded:
        yield embedded


def kill(server: EmbeddedRedis) -> None:
    pid = server.pid
    if pid is None:
        raise RuntimeError("not running")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_killed_redis_server_comes_back_on_the_same_port(server: EmbeddedRedis) -> None:
    said: list[str] = []
    keeper = RedisKeeper(server, RestartPolicy(), said.append)
    url, first_pid = server.url, server.pid
    kill(server)
    killed_at = time.monotonic()
    while keeper.restarts == 0:
        if keeper.tend() is not None:
            raise AssertionError(f"one death is no crash loop: {said}")
        time.sleep(0.01)
    assert time.monotonic() - killed_at < 1.0
    assert server.url == url and server.pid != first_pid
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.close()
    port = server.port
    assert said == [
        (
            f"[launcher] redis-server (pid {first_pid}, port {port}) was killed by signal SIGKILL; "
            "restarting in 0.2 s (death 1 of 5 in 60 s)"
        ),
        f"[launcher] restarted redis-server (pid {server.pid}) on port {port}",
    ]


def test_a_redis_server_that_keeps_dying_is_a_crash_loop(server: EmbeddedRedis) -> None:
    keeper = RedisKeeper(server, RestartPolicy(crash_loop_deaths=1), lambda line: None)
    kill(server)
    verdict = keeper.tend()
    assert verdict is not None
    assert "redis-server" in verdict and "was killed by signal SIGKILL: crash loop: death 1 of 1" in verdict
    assert "its log ends with:" in verdict
