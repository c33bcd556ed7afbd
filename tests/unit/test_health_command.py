"""`scalellm health ROLE`: this host's replica is alive while its heartbeat (written by the transport) lives."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest

from services import cli
from services.launcher import health
from shared.messages import Heartbeat
from shared.settings import CommonSettings, new_replica_id
from shared.transport import StreamNames, StreamTransport

PREFIX = "t"


def test_the_ids_new_replica_id_gives_are_this_hosts_and_no_other_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "c0ffee")
    ours = new_replica_id("tokenizer")
    assert health.host_replica_id_pattern("tokenizer").fullmatch(ours)
    assert not health.host_replica_id_pattern("detokenizer").fullmatch(ours)
    # A host whose name starts with ours (c0ffee-2) is another host.
    assert not health.host_replica_id_pattern("tokenizer").fullmatch(ours.replace("c0ffee", "c0ffee-2"))
    assert not health.host_replica_id_pattern("tokenizer", hostname="c0ffee-2").fullmatch(ours)


def beat(server: fakeredis.FakeServer, role: str, replica_id: str, ttl_s: float) -> None:
    """A heartbeat as every replica writes it: through StreamTransport.beat."""
    transport = StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), PREFIX, replica_id)
    asyncio.run(transport.beat(Heartbeat(role=role, replica_id=replica_id, time=time.time()), ttl_s=ttl_s))


def test_only_live_replicas_of_the_role_on_this_host_count() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    names = StreamNames(PREFIX)

    def live() -> list[str]:
        return health.live_host_replicas(client, names, "engine", hostname="h1")

    assert live() == []  # nothing ever beat
    beat(server, "engine", "engine-h2-00000001", ttl_s=10)  # another host
    beat(server, "tokenizer", "tokenizer-h1-00000002", ttl_s=10)  # another role
    assert live() == []
    beat(server, "engine", "engine-h1-0000000a", ttl_s=0.05)
    assert live() == ["engine-h1-0000000a"]
    time.sleep(0.1)
    assert live() == []  # stopped beating: its registry entry stays, its heartbeat expired
    beat(server, "engine", "engine-h1-0000000b", ttl_s=10)  # restarted in the same container
    assert live() == ["engine-h1-0000000b"]


def test_an_unreachable_redis_is_unhealthy_and_its_password_is_not_shown() -> None:
    healthy, line = health.check("gateway", CommonSettings(redis_url="redis://:hunter2@127.0.0.1:1/0"))
    assert not healthy
    assert line.startswith("unhealthy: Redis at redis://") and "hunter2" not in line


@pytest.mark.parametrize(("healthy", "code"), [(True, 0), (False, 1)])
def test_the_exit_status_says_whether_healthy(
    healthy: bool, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checked: list[str] = []

    def check(role: str, settings: CommonSettings) -> tuple[bool, str]:
        checked.append(role)
        return healthy, "the line"

    monkeypatch.setenv("SCALELLM_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setattr(health, "check", check)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["health", "detokenizer"])
    assert (exit_info.value.code, checked, capsys.readouterr().out) == (code, ["detokenizer"], "the line\n")
