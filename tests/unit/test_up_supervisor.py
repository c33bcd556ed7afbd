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

import pytest
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


def run_in_thread(supervisor: Supervisor, specs: list[ChildSpec], stop: threading.Event) -> tuple[threading.Thread, list[int]]:
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


def test_a_dead_child_is_reported_by_name_exit_code_and_last_lines(supervisor: Supervisor) -> None:
    crasher = python("import sys; print('loading'); print('boom: no such model', flush=True); sys.exit(3)", "engine-1")
    code = supervise(supervisor, [python(SLEEPER, "gateway"), crasher], threading.Event())
    assert code == 1
    output = printed(supervisor)
    assert "engine-1 (pid" in output and "exited with code 3" in output
    assert "  boom: no such model" in output.split("exited with code 3", 1)[1]  # quoted in the report
    # The others were stopped, not left running.
    gateway = supervisor.children[0]
    assert gateway.process.returncode == -signal.SIGTERM


def test_a_child_killed_by_a_signal_is_reported_with_the_signal(supervisor: Supervisor) -> None:
    suicide = python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "tokenizer-2")
    assert supervise(supervisor, [suicide], threading.Event()) == 1
    assert "tokenizer-2 (pid" in printed(supervisor)
    assert "killed by signal SIGKILL" in printed(supervisor)


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
from services.launcher.up import stop_on_signals, supervise

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
with stop_on_signals(stop, supervisor):
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


def test_sigterm_stops_every_child_and_grandchild(supervising_process: subprocess.Popen[str]) -> None:
    stdout = supervising_process.stdout
    assert stdout is not None
    pids: list[int] = []
    while len(pids) < 4:
        line = stdout.readline()
        if not line:
            raise AssertionError(f"the supervisor ended early with {supervising_process.wait()}")
        words = line.split()
        if len(words) == 3 and words[1] in ("child", "grandchild"):
            pids.append(int(words[2]))
    supervising_process.send_signal(signal.SIGTERM)
    assert supervising_process.wait(15) == 0
    stdout.read()
    wait_for(lambda: all(process_gone(pid) for pid in pids), timeout=5)
