"""Run the real ``scalellm up`` as a subprocess, its output in a log file.

The log file (not a pipe) keeps the launcher from ever blocking on a test
that is not reading, and lets a test look back at every line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.redis_server import free_port
from tests.conftest import REPO

STARTED = re.compile(r"^\[launcher\] (?:started|restarted) (\S+) \(pid (\d+)\)", re.MULTILINE)


class Launcher:
    def __init__(self, log_path: Path, *args: str, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "SCALELLM_REDIS_URL"}
        env.update({f"SCALELLM_{key.upper()}": value for key, value in settings.items()})
        argv = [sys.executable, "-m", "services.cli", "up", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, waiting for it to be written."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = regex.search(self.log())
            if found is not None:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never logged (launcher: {self.process.poll()}); log:\n{self.log()[-6000:]}")

    def pids(self) -> dict[str, int]:
        """Each service's and the redis-server's current pid, from the launcher's own lines."""
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                # Its children die with it (PR_SET_PDEATHSIG).
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``, from /proc (no psutil needed)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
