"""Redis and the pipeline's stages, each started on its own host of a netns.Network.

Redis listens only on the redis host's address; every stage gets that address as
its SCALELLM_REDIS_URL and runs under ``ip netns exec`` (the integration harness's
``command_prefix``); the gateway binds the gateway host's address. Nothing is
started in the caller's own network namespace.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.redis_server import redis_executable
from tests.integration.harness import Pipeline, ServiceProcess
from tests.multihost.netns import Network

REDIS_PORT = 6379
STAGES = ("gateway", "tokenizer", "engine", "detokenizer")
# The test's own HTTP and Redis clients run on this host.
CLIENT = "client"
HOSTS = ("redis", *STAGES, CLIENT)
REDIS_START_TIMEOUT_S = 10.0


@dataclass
class Hosts:
    """A Network with Redis running on its redis host, and the pipelines started on it."""

    network: Network
    log_dir: Path
    redis: ServiceProcess | None = None
    pipelines: list[Pipeline] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.network.addresses['redis']}:{REDIS_PORT}/0"

    def start_redis(self) -> None:
        """redis-server on the redis host, bound to its address only; returns once it answers
        a PING from the client host."""
        directory = self.log_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "redis.log"
        argv = [
            *self.network.prefix("redis"),
            redis_executable(),
            "--bind", self.network.addresses["redis"],
            "--port", str(REDIS_PORT),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--daemonize", "no",
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        self.redis = ServiceProcess("redis", process, log_path)
        self.network.call_in(CLIENT, self._wait_for_redis)

    def _wait_for_redis(self) -> None:
        assert self.redis is not None
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.redis.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.redis.process.returncode}:\n{self.redis.log()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise TimeoutError(f"redis-server on the redis host did not answer in {REDIS_START_TIMEOUT_S} s")

    def start_pipeline(
        self, name: str, *, gateway_port: int, engine: dict[str, str], ready_timeout_s: float = 120.0
    ) -> Pipeline:
        """One tokenizer, one engine, one detokenizer and a gateway, each on its own host, on
        streams of their own (SCALELLM_STREAM_PREFIX=name); returns once /ready, asked from
        the client host, says every role is alive. Stopped by stop()."""
        log_dir = self.log_dir / name
        log_dir.mkdir(parents=True, exist_ok=True)
        pipeline = Pipeline(self.redis_url, log_dir, env={"SCALELLM_STREAM_PREFIX": name})
        self.pipelines.append(pipeline)
        pipeline.start("tokenizer", command_prefix=self.network.prefix("tokenizer"))
        pipeline.start("engine", command_prefix=self.network.prefix("engine"), **engine)
        pipeline.start("detokenizer", command_prefix=self.network.prefix("detokenizer"))
        address = self.network.addresses["gateway"]
        pipeline.start(
            "gateway",
            command_prefix=self.network.prefix("gateway"),
            gateway_host=address,
            gateway_port=str(gateway_port),
            request_timeout_s="60",
        )
        pipeline.gateway_url = f"http://{address}:{gateway_port}"
        self.network.call_in(CLIENT, lambda: pipeline.wait_ready(ready_timeout_s))
        return pipeline

    def stop(self) -> None:
        """Every stage of every pipeline, then Redis."""
        for pipeline in reversed(self.pipelines):
            pipeline.stop_all()
        if self.redis is not None:
            self.redis.stop()

    def logs(self) -> str:
        parts = [pipeline.logs() for pipeline in self.pipelines]
        if self.redis is not None:
            parts.append(f"----- redis -----\n{self.redis.log()[-4000:]}")
        return "\n".join(parts)
