"""Runs child processes, prefixes their output, notices deaths, stops them all.

Each child gets its own process group (so a terminal's Ctrl-C reaches only
the supervisor, which then stops the children in order, and so a child's own
subprocesses are stopped with it). Its output lines are printed as
``[name] line`` and the last few kept for the report when it dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # the whole environment; None: inherit ours
    cwd: str | None = None


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]
    last_lines: deque[str]
    reader: threading.Thread
    stopping: bool = False  # we asked it to stop: its exit is expected

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "is still running"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


@dataclass
class Supervisor:
    out: TextIO
    grace_s: float = 10.0
    keep_lines: int = 40
    children: list[Child] = field(default_factory=list)
    _print_lock: threading.Lock = field(default_factory=threading.Lock)
    _force: threading.Event = field(default_factory=threading.Event)

    def say(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def start(self, spec: ChildSpec) -> Child:
        process = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        last_lines: deque[str] = deque(maxlen=self.keep_lines)
        reader = threading.Thread(
            target=self._relay, args=(spec.name, process, last_lines), name=f"relay-{spec.name}", daemon=True
        )
        child = Child(spec, process, last_lines, reader)
        self.children.append(child)
        reader.start()
        return child

    def _relay(self, name: str, process: subprocess.Popen[bytes], last_lines: deque[str]) -> None:
        stream = process.stdout
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            last_lines.append(line)
            self.say(f"[{name}] {line}")
        stream.close()

    def first_unexpected_exit(self) -> Child | None:
        """A child that ended without being asked to, if any."""
        for child in self.children:
            if not child.stopping and child.process.poll() is not None:
                return child
        return None

    def report(self, child: Child) -> str:
        """What a user needs to know about a dead child: who, how, its last words."""
        child.reader.join(2.0)  # collect the output it wrote before dying
        lines = [f"{child.name} (pid {child.pid}) {child.describe_exit()}"]
        if child.last_lines:
            lines.append(f"its last {len(child.last_lines)} output lines:")
            lines.extend(f"  {line}" for line in child.last_lines)
        else:
            lines.append("it wrote no output")
        return "\n".join(lines)

    def force(self) -> None:
        """Cut the grace period short (a second Ctrl-C)."""
        self._force.set()

    def stop_all(self) -> None:
        """SIGTERM every child's process group, SIGKILL what is left after the grace period."""
        for child in self.children:
            child.stopping = True
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in self.children:
            while child.process.poll() is None and time.monotonic() < deadline and not self._force.is_set():
                time.sleep(0.05)
        for child in self.children:
            if child.process.poll() is None:
                self.say(f"{child.name} did not stop within {self.grace_s:.0f} s: killing it")
            # Also reaches what the child started itself and left behind.
            _signal_group(child.pid, signal.SIGKILL)
            child.process.wait()
        for child in self.children:
            child.reader.join(2.0)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
