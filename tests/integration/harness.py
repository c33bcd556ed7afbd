"""Start the services as real OS processes against a real redis-server.

Each process writes its output to a log file; a test that fails shows the
logs of every process it started, and teardown stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.redis_server import free_port
from tests.conftest import REPO


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Pipeline:
    """The four services wired to one Redis; grows one process at a time."""

    redis_url: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ServiceProcess] = field(default_factory=list)
    gateway_url: str = ""

    def start(self, role: str, *, command_prefix: Sequence[str] = (), **settings: str) -> ServiceProcess:
        """command_prefix: run the service through it, e.g. ``ip netns exec NAME`` (tests/multihost)."""
        env = dict(os.environ)
        env.update(self.env)
        env["SCALELLM_REDIS_URL"] = self.redis_url
        env.update({f"SCALELLM_{key.upper()}": value for key, value in settings.items()})
        name = f"{role}-{sum(p.name.startswith(role) for p in self.processes)}"
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [*command_prefix, sys.executable, "-m", f"services.{role}"],
                cwd=REPO,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        service = ServiceProcess(name, process, log_path)
        self.processes.append(service)
        return service

    def start_gateway(self, **settings: str) -> ServiceProcess:
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        return self.start("gateway", gateway_port=str(port), gateway_host="127.0.0.1", **settings)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until /ready says every role is alive; fails early if a process died."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for service in self.processes:
                if service.process.poll() is not None:
                    raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log()}")
            try:
                response = httpx.get(f"{self.gateway_url}/ready", timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(f"pipeline not ready after {timeout}s: {last}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"----- {s.name} -----\n{s.log()[-4000:]}" for s in self.processes)

    def stop_all(self) -> None:
        for service in reversed(self.processes):
            service.stop()


@contextlib.contextmanager
def torch_pipeline(redis_url: str, logs: Path, prefix: str) -> Iterator[Pipeline]:
    """gateway + tokenizer + the torch engine (float32, the default model) + detokenizer, on streams
    named ``prefix``; stopped on exit. The model is converted first, before the engine starts."""
    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    resolve_model_dir(CommonSettings(), weights=True)
    pipeline = Pipeline(redis_url, logs, env={"SCALELLM_STREAM_PREFIX": prefix})
    try:
        pipeline.start("tokenizer")
        pipeline.start("engine", engine_backend="torch", dtype="float32", kv_cache_bytes=str(256 * 1024**2))
        pipeline.start("detokenizer")
        pipeline.start_gateway()
        pipeline.wait_ready(timeout=300)
        yield pipeline
    finally:
        pipeline.stop_all()
