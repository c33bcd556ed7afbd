"""`scalellm up` end to end with a real redis-server and fake services.

A driver runs the real CLI in a subprocess with two substitutions: the model
preparation is skipped, and each service is a small stand-in (the gateway one
answers /ready with 200 once it has reached Redis).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.launcher.up import service_specs
from services.redis_server import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parents[2]

DRIVER = r'''
import sys
from services.launcher import up
from services.launcher.supervisor import ChildSpec

GATEWAY = """
import http.server, os, redis
redis.Redis.from_url(os.environ["SCALELLM_REDIS_URL"]).ping()
print("pid", os.getpid(), "reached redis; backend", os.environ["SCALELLM_ENGINE_BACKEND"], flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
address = (os.environ["SCALELLM_GATEWAY_HOST"], int(os.environ["SCALELLM_GATEWAY_PORT"]))
http.server.HTTPServer(address, Health).serve_forever()
"""
SERVICE = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
DYING = "import sys; print('engine: cannot load the model', flush=True); sys.exit(2)"

real_specs = up.service_specs

def fake_specs(args, redis_url, env):
    fakes = []
    for spec in real_specs(args, redis_url, env):
        code = GATEWAY if spec.name == "gateway" else SERVICE
        if spec.name == "engine-1" and env.get("FAKE_ENGINE_DIES"):
            code = DYING
        fakes.append(ChildSpec(spec.name, [sys.executable, "-c", code], spec.env))
    return fakes

up.service_specs = fake_specs
up.prepare_model = lambda backend, out: print("(model preparation skipped)", flush=True)
from services.cli import main
main(sys.argv[1:])
'''


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def port_closed(url: str) -> bool:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


class UpProcess:
    def __init__(self, *args: str, **env: str) -> None:
        environment = {k: v for k, v in os.environ.items() if k != "SCALELLM_REDIS_URL"}
        environment.update(env)
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, "up", *args],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []

    def read_until(self, fragment: str, timeout: float = 30.0) -> str:
        stdout = self.process.stdout
        if stdout is None:
            raise RuntimeError("no output pipe")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if fragment in line:
                return line
        raise AssertionError(f"{fragment!r} never printed; output:\n" + "\n".join(self.lines))

    def rest(self) -> str:
        stdout = self.process.stdout
        tail = stdout.read() if stdout is not None else ""
        return "\n".join(self.lines) + "\n" + tail

    def pids(self) -> list[int]:
        return [int(line.split("pid ", 1)[1].split()[0]) for line in self.lines if "] pid " in line]


@pytest.fixture
def start_up() -> Iterator[type[UpProcess]]:
    started: list[UpProcess] = []

    class Tracked(UpProcess):
        def __init__(self, *args: str, **env: str) -> None:
            super().__init__(*args, **env)
            started.append(self)

    yield Tracked
    for up in started:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGTERM)
            try:
                up.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(up.process.pid, signal.SIGKILL)
                up.process.wait()


def test_up_starts_redis_and_services_reports_ready_and_stops_everything(start_up: type[UpProcess]) -> None:
    port = free_port()
    up = start_up(
        "--host", "127.0.0.1", "--port", str(port), "--tokenizers", "2", "--detokenizers", "2", "--backend", "echo"
    )  # fmt: skip
    redis_line = up.read_until("started redis-server at ")
    redis_url = redis_line.rsplit(" ", 1)[1].strip()
    ready = up.read_until("ready: ")
    assert ready.startswith(f"ready: http://127.0.0.1:{port} (") and ready.rstrip().endswith(" s)")
    assert any(line.startswith("[gateway] pid") and "backend echo" in line for line in up.lines)
    names = {line.split("]", 1)[0][1:] for line in up.lines if line.startswith("[") and "] pid " in line}
    # Services print their pid when they start; wait for all six.
    while len(names) < 6:
        line = up.read_until("] pid ")
        names.add(line.split("]", 1)[0][1:])
    assert names == {"gateway", "tokenizer-1", "tokenizer-2", "engine-1", "detokenizer-1", "detokenizer-2"}
    pids = up.pids()
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(20) == 0
    up.rest()
    assert all(process_gone(pid) for pid in pids)
    assert port_closed(redis_url)


def test_up_restarts_a_dying_service_then_stops_everything_on_a_crash_loop(start_up: type[UpProcess]) -> None:
    up = start_up("--port", str(free_port()), FAKE_ENGINE_DIES="1", SCALELLM_CRASH_LOOP_DEATHS="3")
    redis_url = up.read_until("started redis-server at ").rsplit(" ", 1)[1].strip()
    assert up.process.wait(30) == 1
    output = up.rest()
    assert "[launcher] engine-1 exited with code 2; restarting in 0.2 s (death 1 of 3 in 60 s)" in output
    assert "[launcher] engine-1 exited with code 2; restarting in 0.4 s (death 2 of 3 in 60 s)" in output
    report = output.split("exited with code 2: crash loop: death 3 of 3 in 60 s", 1)[1]
    assert "  engine: cannot load the model" in report
    assert "[launcher] engine-1 keeps dying; stopping everything" in report
    assert all(process_gone(pid) for pid in up.pids())
    assert port_closed(redis_url)


def test_service_specs_name_each_replica_and_pass_the_settings() -> None:
    args = argparse.Namespace(host="127.0.0.1", port=8123, tokenizers=2, engines=1, detokenizers=3, backend="torch")
    specs = service_specs(args, "redis://127.0.0.1:1/0", {"PATH": "/bin", "PYTHONPATH": "/extra"})
    assert [s.name for s in specs] == [
        "gateway", "tokenizer-1", "tokenizer-2", "engine-1", "detokenizer-1", "detokenizer-2", "detokenizer-3",
    ]  # fmt: skip
    assert specs[1].argv == [sys.executable, "-m", "services.tokenizer"]
    env = specs[0].env or {}
    assert env["SCALELLM_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert (env["SCALELLM_GATEWAY_PORT"], env["SCALELLM_ENGINE_BACKEND"]) == ("8123", "torch")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/extra"]
    assert env["PATH"] == "/bin"


def test_embedded_redis_serves_without_persistence_and_stops_cleanly() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert server.url.startswith("redis://127.0.0.1:")
        pid = server.pid
        client.close()
    assert pid is not None and process_gone(pid)
    assert port_closed(server_url := f"redis://127.0.0.1:{server.port}/0"), server_url


def test_embedded_redis_keeps_a_directory_it_was_given(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert redis.Redis.from_url(server.url).ping()
    assert (tmp_path / "redis").is_dir()
