"""shared/redis_client.py: Redis URLs (one server, cluster, Sentinel), the cluster's hash tag, no password shown."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot

from shared.redaction import Redactor, redact_url, url_secrets
from shared.redis_client import (
    RedisTarget,
    async_client,
    close_async_client,
    hash_tag,
    is_cluster_url,
    parse_redis_url,
    pipeline_prefix,
)
from shared.settings import CommonSettings, load_settings
from shared.transport import StreamNames, StreamTransport


def test_one_server_urls_are_left_to_redis_py() -> None:
    for url in ["redis://localhost:6379/0", "rediss://:pw@db:6380/1", "unix:///run/redis.sock?db=2"]:
        assert parse_redis_url(url) == RedisTarget("single", url)


def test_cluster_url_lists_start_up_nodes_with_credentials_and_default_port() -> None:
    target = parse_redis_url("redis+cluster://alice:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert target.kind == "cluster"
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == ("alice", "p@ss", False)
    assert parse_redis_url("redis+cluster://:pw@h:1/0").password == "pw"  # /0 allowed: the only database
    tls = parse_redis_url("rediss+cluster://h:1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert tls.ssl and dict(tls.ssl_options) == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required"}


def test_sentinel_url_names_the_service_database_and_sentinel_password() -> None:
    target = parse_redis_url("redis+sentinel://:master-pw@s1:26380,s2/mymaster/3?sentinel_password=s%2Fpw")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26380), ("s2", 26379))
    assert (target.service_name, target.db) == ("mymaster", 3)
    assert (target.username, target.password, target.sentinel_password) == (None, "master-pw", "s/pw")
    assert parse_redis_url("redis+sentinel://s1/mymaster").db == 0
    assert parse_redis_url("rediss+sentinel://s1/mymaster").ssl


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://db:6379", "unknown scheme http://"),
        ("localhost:6379", "unknown scheme (none)"),
        ("redis+cluster://", "an entry is empty"),
        ("redis+cluster://h:1,,h:2", "an entry is empty"),
        ("redis+cluster://h:99999", "not a number from 1 to 65535"),
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:1?sentinel_password=x", "no query parameter 'sentinel_password'"),
        ("redis+cluster://h:1?ssl_ca_certs=/ca", "no query parameter 'ssl_ca_certs'"),  # not without TLS
        ("redis+sentinel://s1:26379", "/service_name"),
        ("redis+sentinel://s1/a/b/c", "/service_name"),
        ("redis+sentinel://s1/mymaster/x", "must be a number"),
        ("redis+sentinel://[::1/m", "IPv6"),
        ("redis+sentinel://:1/m", "need a host"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_redis_url(url)


def test_a_password_typed_where_the_port_goes_is_not_quoted() -> None:
    for url in ["redis+cluster://db:hunter2", "redis+sentinel://db:hunter2/m", "redis://db:hunter2/0"]:
        with pytest.raises(ValueError) as raised:
            parse_redis_url(url)
        assert "hunter2" not in str(raised.value)


def test_a_bad_url_stops_start_up_naming_the_setting_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCALELLM_REDIS_URL", "redis+sentinel://:hunter2@s1:26379")
    with pytest.raises(SystemExit) as raised:
        load_settings(CommonSettings)
    assert "SCALELLM_REDIS_URL" in str(raised.value) and "/service_name" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_hash_tag_is_what_redis_hashes() -> None:
    assert hash_tag("{scalellm}:requests") == "scalellm"
    assert hash_tag("app-{blue}:x") == "blue"
    assert hash_tag("{}x:{y}") == "" and hash_tag("plain") == "" and hash_tag("}{") == ""
    for key in ["{scalellm}:requests", "app-{blue}:x", "a{b}c{d}"]:
        assert key_slot(key.encode()) == key_slot(hash_tag(key).encode())


def test_on_a_cluster_the_prefix_becomes_a_hash_tag() -> None:
    assert pipeline_prefix("scalellm", cluster=True) == "{scalellm}"
    assert pipeline_prefix("{scalellm}", cluster=True) == "{scalellm}"  # idempotent
    assert pipeline_prefix("app-{blue}", cluster=True) == "app-{blue}"
    assert pipeline_prefix("scalellm", cluster=False) == "scalellm"  # one server: key names unchanged
    for bad in ["}x", "{}x", "a{b", "a}b"]:
        with pytest.raises(ValueError, match="no hash tag"):
            pipeline_prefix(bad, cluster=True)


def test_every_key_of_a_tagged_prefix_hashes_to_one_slot() -> None:
    names = StreamNames(pipeline_prefix("scalellm", cluster=True))
    keys = [names.requests, names.tokenized, names.aborts, names.deadletter, names.generated(3)]
    keys += [names.responses("gw-{odd}"), names.heartbeat("engine", "e}1"), names.registry("engine")]
    keys += [names.lease("generated:0"), names.decode_state("r{1}"), names.output_checkpoint("r}2")]
    assert {key_slot(key.encode()) for key in keys} == {key_slot(b"scalellm")}


def test_settings_tag_the_prefix_only_for_a_cluster_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings(redis_url="redis+cluster://h:1").stream_prefix == "{scalellm}"
    assert CommonSettings(redis_url="redis+cluster://h:1", stream_prefix="{x}").stream_prefix == "{x}"
    assert CommonSettings(redis_url="redis+sentinel://s/m").stream_prefix == "scalellm"
    assert CommonSettings(redis_url="redis://h:1/0").stream_prefix == "scalellm"
    assert is_cluster_url("rediss+cluster://h:1") and not is_cluster_url("redis://h")
    monkeypatch.setenv("SCALELLM_REDIS_URL", "redis+cluster://h:1")
    monkeypatch.setenv("SCALELLM_STREAM_PREFIX", "a}b")
    with pytest.raises(SystemExit, match="SCALELLM_STREAM_PREFIX"):
        load_settings(CommonSettings)


def test_clients_of_each_kind_are_built_without_connecting() -> None:
    async def build() -> None:
        cluster = async_client("redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2")
        assert isinstance(cluster, aioredis.RedisCluster)
        sentinel = async_client("redis+sentinel://:pw@127.0.0.1:1/mymaster/2?sentinel_password=spw")
        assert isinstance(sentinel, aioredis.Redis)
        pool = sentinel.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
        assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
        assert [s.connection_pool.connection_kwargs["password"] for s in pool.sentinel_manager.sentinels] == ["spw"]
        single = async_client("redis://127.0.0.1:1/0")
        assert type(single) is aioredis.Redis
        for client in (cluster, sentinel, single):
            await close_async_client(client)
        transport = StreamTransport("redis+cluster://127.0.0.1:1", "p", "c")
        assert transport.names.prefix == "{p}"  # a caller that passes an untagged prefix gets the tag too
        await transport.close()

    asyncio.run(build())


@pytest.mark.parametrize(
    "url, shown, secrets",
    [
        ("redis+cluster://:pw1@h1:7000,h2:7001", "redis+cluster://:***@h1:7000,h2:7001", ["pw1"]),
        ("rediss+cluster://bob:p%40w@[::1]:7000", "rediss+cluster://bob:***@[::1]:7000", ["p%40w", "p@w"]),
        (
            "redis+sentinel://:m-pw@s1:26379,s2/mymaster/0?sentinel_password=s-pw",
            "redis+sentinel://:***@s1:26379,s2/mymaster/0?sentinel_password=***",
            ["m-pw", "s-pw"],
        ),
        ("redis+sentinel://s1/mymaster", "redis+sentinel://s1/mymaster", []),
    ],
)
def test_passwords_of_cluster_and_sentinel_urls_are_redacted(url: str, shown: str, secrets: list[str]) -> None:
    assert redact_url(url) == shown
    assert url_secrets(url) == secrets
    assert set(CommonSettings(redis_url=url).secrets()) == set(secrets)
    assert Redactor(url_secrets(url))(f"could not reach {url} (password {secrets[:1]})") == (
        f"could not reach {shown} (password {['***'] if secrets else []})"
    )
