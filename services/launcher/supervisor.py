"""Runs child processes, prefixes their output, restarts the ones that die.

Each child gets its own process group (so a terminal's Ctrl-C reaches only
the supervisor, which then stops the children in order, and so a child's own
subprocesses are stopped with it) and dies with the supervisor even when the
supervisor is SIGKILLed (orphans.py). Its output lines are printed as
``[name] line`` and the last few kept for the report when it dies.

A child that dies while not asked to stop is restarted after a backoff
(restart_policy.py) while the others keep running: the pipeline's replicas
cover for each other. One that keeps dying is a crash loop, which ``tend``
hands back to the caller to stop everything.

``start`` and ``tend`` must run on one thread that outlives the children:
the kernel's parent-death signal follows the thread that forked the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from services.launcher.orphans import die_with_parent
from services.launcher.restart_policy import RestartPolicy, RestartTracker, Verdict

# What the supervisor itself says is prefixed like a child's output.
PREFIX = "[launcher]"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # the whole environment; None: inherit ours
    cwd: str | None = None


def describe_exit(returncode: int | None) -> str:
    """``exited with code 3`` / ``was killed by signal SIGKILL``, from a Popen return code."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]
    last_lines: deque[str]
    reader: threading.Thread
    tracker: RestartTracker
    started_at: float
    stopping: bool = False  # we asked it to stop: its exit is expected
    restart_at: float | None = None  # dead, to be started again at this time
    last_verdict: Verdict | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe_exit(self) -> str:
        return describe_exit(self.process.returncode)


@dataclass
class Supervisor:
    out: TextIO
    grace_s: float = 10.0
    keep_lines: int = 40
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    children: list[Child] = field(default_factory=list)
    _print_lock: threading.Lock = field(default_factory=threading.Lock)
    _force: threading.Event = field(default_factory=threading.Event)

    def say(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def start(self, spec: ChildSpec) -> Child:
        process, last_lines, reader = self._spawn(spec)
        child = Child(spec, process, last_lines, reader, RestartTracker(self.policy), self.clock())
        self.children.append(child)
        self.say(f"{PREFIX} started {spec.name} (pid {process.pid})")
        return child

    def _spawn(self, spec: ChildSpec) -> tuple[subprocess.Popen[bytes], deque[str], threading.Thread]:
        process = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGKILL: with the launcher gone nothing would escalate a SIGTERM a
            # service is slow to act on, and replicas are built to survive a kill.
            # (preexec_fn with threads running is safe here: it takes no lock.)
            preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )
        last_lines: deque[str] = deque(maxlen=self.keep_lines)
        reader = threading.Thread(
            target=self._relay, args=(spec.name, process, last_lines), name=f"relay-{spec.name}", daemon=True
        )
        reader.start()
        return process, last_lines, reader

    def _relay(self, name: str, process: subprocess.Popen[bytes], last_lines: deque[str]) -> None:
        stream = process.stdout
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            last_lines.append(line)
            self.say(f"[{name}] {line}")
        stream.close()

    def tend(self) -> Child | None:
        """Notice deaths, schedule and perform restarts; a child in a crash loop, if any.

        Call it often (every few tens of milliseconds): a death is noticed
        only here, and the first restart is due 0.2 s after it.
        """
        for child in self.children:
            if child.stopping or (child.last_verdict is not None and child.last_verdict.crash_loop):
                continue
            now = self.clock()
            if child.restart_at is None:
                if child.process.poll() is None:
                    continue
                # What it started itself goes with it, or a restart could find
                # its port or files still held.
                _signal_group(child.pid, signal.SIGKILL)
                verdict = child.tracker.record_death(now, child.started_at)
                child.last_verdict = verdict
                if verdict.crash_loop:
                    return child
                self.say(f"{PREFIX} {child.name} {child.describe_exit()}; {child.tracker.describe(verdict)}")
                child.restart_at = now + verdict.delay_s
            elif now >= child.restart_at:
                child.reader.join(1.0)  # its last words come before the news of its successor
                child.process, child.last_lines, child.reader = self._spawn(child.spec)
                child.started_at, child.restart_at = self.clock(), None
                child.restarts += 1
                self.say(f"{PREFIX} restarted {child.name} (pid {child.pid})")
        return None

    def report(self, child: Child) -> str:
        """What a user needs to know about a dead child: who, how, its last words."""
        child.reader.join(2.0)  # collect the output it wrote before dying
        verdict = child.last_verdict
        why = f": {child.tracker.describe(verdict)}" if verdict is not None else ""
        lines = [f"{child.name} (pid {child.pid}) {child.describe_exit()}{why}"]
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
            child.restart_at = None
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
