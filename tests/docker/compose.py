"""One docker-compose project of compose.yaml, as the test drives it, and what it asks Docker about its containers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ComposeProject:
    """``docker-compose -p NAME -f compose.yaml``, with only the given variables for compose.yaml to read.

    The caller's own SCALELLM_* variables (an API key, say) must not reach the containers.
    """

    def __init__(self, name: str, variables: Mapping[str, str]) -> None:
        self.name = name
        inherited = {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_HOST") if key in os.environ}
        self.env = {**inherited, **variables}

    def run(self, *args: str, timeout_s: float = 900) -> str:
        command = ["docker-compose", "-p", self.name, "-f", str(REPO / "compose.yaml"), *args]
        result = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def containers(self, service: str) -> list[str]:
        """The ids of the service's containers, by replica number."""
        ids = self.run("ps", "-q", service).split()
        return sorted(
            ids,
            key=lambda container: inspect(
                container, template='{{index .Config.Labels "com.docker.compose.container-number"}}'
            ),
        )

    def unhealthy(self) -> list[str]:
        """The containers whose health check has not passed (yet), with their state."""
        states = inspect(*self.run("ps", "-q").split(), template="{{.Name}} {{.State.Health.Status}}")
        return [state for state in states.splitlines() if not state.endswith(" healthy")]

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "40")

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "20")


def inspect(*containers: str, template: str) -> str:
    """``template`` filled in for each container, a line each."""
    command = ["docker", "inspect", "--format", template, *containers]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def crash(container: str) -> None:
    """SIGKILL the container's main process from the host, as the kernel's OOM killer would.

    Not ``docker kill``: Docker takes that for an operator's stop and does not apply the
    restart policy.
    """
    os.kill(int(inspect(container, template="{{.State.Pid}}")), signal.SIGKILL)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)
