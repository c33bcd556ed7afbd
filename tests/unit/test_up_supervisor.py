"""`scalellm up`'s supervision, with fake child commands instead of the services."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.launcher.restart_policy import RestartPolicy
from services.launcher.supervisor import ChildSpec, Supervisor
from services.launcher.up import supervise

PYTHON = sys.executable


def python(code: str, name: str) -> ChildSpec:
    return ChildSpec(name, [PYTHON, "-c", textwrap.dedent(code)])


SLEEPER = "import time; print('hello', flush=True); time.sleep(60)"


def printed(supervisor: Supervisor) -> str:
    out = supervisor.out
    if not isinstance(out, io.StringIO):
        raise TypeError("these tests give the supervisor a StringIO")
    return out.getvalue()


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    sup = Supervisor(io.StringIO(), grace_s=5.0)
    yield sup
    sup.stop_all()  # whatever a failing test left running


def run_in_thread(
    supervisor: Supervisor, specs: list[ChildSpec], stop: threading.Event
) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(supervise(supervisor, specs, stop)), daemon=True)
    thread.start()
    return thread, codes


def test_children_start_and_their_output_is_prefixed_with_their_name(supervisor: Supervisor) -> None:
    stop = threading.Event()
    thread, codes = run_in_thread(supervisor, [python(SLEEPER, "alpha"), python(SLEEPER, "beta")], stop)
    wait_for(lambda: "[alpha] hello" in printed(supervisor) and "[beta] hello" in printed(supervisor))
    assert all(child.process.poll() is None for child in supervisor.children)
    stop.set()
    thread.join(10)
    assert codes == [0]
    assert all(process_gone(child.pid) for child in supervisor.children)


def test_a_crash_loop_stops_everything_and_reports_name_exit_code_and_last_lines() -> None:
    policy = RestartPolicy(initial_backoff_s=0.01, crash_loop_deaths=3)
    supervisor = Supervisor(io.StringIO(), grace_s=5.0, policy=policy)
    crasher = python("import sys; print('loading'); print('boom: no such model', flush=True); sys.exit(3)", "engine-1")
    try:
        code = supervise(supervisor, [python(SLEEPER, "gateway"), crasher], threading.Event())
    finally:
        supervisor.stop_all()
    assert code == 1
    output = printed(supervisor)
    assert "[launcher] engine-1 exited with code 3; restarting in 0.0 s (death 1 of 3 in 60 s)" in output
    assert "[launcher] engine-1 exited with code 3; restarting in 0.0 s (death 2 of 3 in 60 s)" in output
    report = output.split("exited with code 3: crash loop: death 3 of 3 in 60 s", 1)[1]
    assert "  boom: no such model" in report  # its last words are quoted
    assert "engine-1 keeps dying; stopping everything" in report
    # The others kept running meanwhile, then were stopped, not left running.
    gateway = supervisor.children[0]
    assert gateway.restarts == 0 and gateway.process.returncode == -signal.SIGTERM


def test_a_killed_child_is_restarted_quickly_while_the_others_keep_running(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    marker = tmp_path / "died-once"
    # Dies by SIGKILL the first time only, like a replica hit by the OOM killer.
    flaky = python(
        f"""
        import os, signal, time
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        print('hello', flush=True)
        time.sleep(60)
        """,
        "tokenizer-2",
    )
    stop = threading.Event()
    thread, codes = run_in_thread(supervisor, [python(SLEEPER, "gateway"), flaky], stop)
    wait_for(lambda: "[tokenizer-2] hello" in printed(supervisor))
    output = printed(supervisor)
    assert "[launcher] tokenizer-2 was killed by signal SIGKILL; restarting in 0.2 s (death 1 of 5 in 60 s)" in output
    assert "[launcher] restarted tokenizer-2 (pid" in output
    gateway, tokenizer = supervisor.children
    assert (gateway.restarts, tokenizer.restarts) == (0, 1)
    assert gateway.process.poll() is None and tokenizer.process.poll() is None
    stop.set()
    thread.join(10)
    assert codes == [0]


def test_death_to_restart_takes_well_under_a_second(supervisor: Supervisor) -> None:
    child = supervisor.start(python(SLEEPER, "detokenizer-1"))
    wait_for(lambda: "[detokenizer-1] hello" in printed(supervisor))
    first_pid = child.pid
    killed_at = time.monotonic()
    os.kill(first_pid, signal.SIGKILL)
    while child.restarts == 0:
        if supervisor.tend() is not None:
            raise AssertionError("one death is no crash loop")
        time.sleep(0.01)
    assert time.monotonic() - killed_at < 0.6
    assert child.pid != first_pid and child.process.poll() is None


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    supervisor = Supervisor(io.StringIO(), grace_s=0.3)
    stubborn = python(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(60)
        """,
        "stubborn",
    )
    child = supervisor.start(stubborn)
    wait_for(lambda: "[stubborn] ready" in printed(supervisor))
    supervisor.stop_all()
    assert child.process.returncode == -signal.SIGKILL
    assert "stubborn did not stop within" in printed(supervisor)


SUPERVISING_SCRIPT = """
import sys, threading, textwrap
from services.launcher.supervisor import ChildSpec, Supervisor
from services.launcher.up import handling_stop_signals, supervise

# Each child starts a grandchild of its own, which must be stopped too.
CHILD = textwrap.dedent('''
    import os, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import os, time; print('grandchild', os.getpid(), flush=True); time.sleep(60)"])
    print('child', os.getpid(), flush=True)
    time.sleep(60)
''')
supervisor = Supervisor(sys.stdout, grace_s=5.0)
stop = threading.Event()
specs = [ChildSpec(f"svc-{i}", [sys.executable, "-c", CHILD]) for i in range(2)]
with handling_stop_signals(stop, supervisor):
    sys.exit(supervise(supervisor, specs, stop))
"""


@pytest.fixture
def supervising_process() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [PYTHON, "-c", SUPERVISING_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        start_new_session=True,
    )
    yield process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_pids(supervising_process: subprocess.Popen[str]) -> dict[str, list[int]]:
    """The pids the two children and two grandchildren print when they start."""
    stdout = supervising_process.stdout
    assert stdout is not None
    pids: dict[str, list[int]] = {"child": [], "grandchild": []}
    while sum(map(len, pids.values())) < 4:
        line = stdout.readline()
        if not line:
            raise AssertionError(f"the supervisor ended early with {supervising_process.wait()}")
        words = line.split()
        if len(words) == 3 and words[1] in pids:
            pids[words[1]].append(int(words[2]))
    return pids


def test_sigterm_stops_every_child_and_grandchild(supervising_process: subprocess.Popen[str]) -> None:
    stdout = supervising_process.stdout
    assert stdout is not None
    pids = [pid for group in read_pids(supervising_process).values() for pid in group]
    supervising_process.send_signal(signal.SIGTERM)
    assert supervising_process.wait(15) == 0
    stdout.read()
    wait_for(lambda: all(process_gone(pid) for pid in pids), timeout=5)


def test_children_die_with_a_supervisor_that_is_sigkilled(supervising_process: subprocess.Popen[str]) -> None:
    pids = read_pids(supervising_process)
    supervising_process.kill()  # no chance to stop anything itself
    supervising_process.wait()
    wait_for(lambda: all(process_gone(pid) for pid in pids["child"]), timeout=5)
    # A grandchild is its parent's business (PR_SET_PDEATHSIG covers one generation);
    # the fixture's process group kill does not reach it either: end it here.
    for pid in pids["grandchild"]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
