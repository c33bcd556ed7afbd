"""The one place that turns ``SCALELLM_REDIS_URL`` into a Redis client: one server, a cluster, or Sentinel.

URLs (docs/redis.md):

- ``redis://``, ``rediss://``, ``unix://``: one server, read by redis-py's own ``from_url``.
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``, ``rediss+cluster://``
  (TLS): a Redis Cluster; the hosts are start-up nodes, the client finds the rest itself.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``,
  ``rediss+sentinel://`` (TLS): the master Sentinel names ``service_name``, found again
  after a failover. The password is the master's; sentinels that require one of their
  own get it from ``?sentinel_password=``.

On a cluster every key of a pipeline must hash to one slot, because the Lua scripts,
heartbeat and multi-stream reads of shared/transport.py touch several of a pipeline's keys
at once. ``pipeline_prefix`` makes the stream prefix a hash tag for that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.cluster import ClusterNode
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.sentinel import Sentinel

# Some redis-py releases type Sentinel, ClusterNode and parse_url, others leave them untyped: called through
# Any, strict mypy passes with both (a "type: ignore" is an error where it is not needed).
_AsyncSentinel: Any = AsyncSentinel
_Sentinel: Any = Sentinel
_ClusterNode: Any = ClusterNode
_parse_url: Any = parse_url

AsyncRedis: TypeAlias = aioredis.Redis | aioredis.RedisCluster
SyncRedis: TypeAlias = redis.Redis | redis.RedisCluster
# What a client may raise: RedisClusterException (e.g. no start-up node reachable) is not a RedisError.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SINGLE_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
# TLS options a rediss+ URL may carry (redis-py's names); the other query parameter is sentinel_password.
_SSL_PARAMETERS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
# Unbounded, as a single-server client's pool is: a cluster client's default (100 per node)
# would refuse a busy gateway's concurrent publishes instead of opening more connections.
_CLUSTER_MAX_CONNECTIONS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``SCALELLM_REDIS_URL``. ``url`` is kept only for one server (redis-py parses it)."""

    kind: Literal["single", "cluster", "sentinel"]
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_options: tuple[tuple[str, str], ...] = ()


def parse_redis_url(url: str) -> RedisTarget:
    """The target of ``url``; ValueError saying what is wrong (never quoting the password)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        try:
            _parse_url(url)  # redis-py's own check (scheme, port, db), so a bad URL stops start-up, not the first call
        except ValueError as exc:
            # urllib quotes a bad port, which may be a password typed in its place ("host:secret").
            raise ValueError("the port is not a number" if "port" in str(exc).lower() else str(exc)) from None
        return RedisTarget("single", url)
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        known = ", ".join(f"{s}://" for s in SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES)
        raise ValueError(f"unknown scheme {scheme + '://' if scheme else '(none)'}: expected one of {known}")
    kind: Literal["cluster", "sentinel"] = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    nodes = tuple(_host_port(entry, DEFAULT_PORT[kind], scheme) for entry in hosts.split(","))
    ssl = scheme.startswith("rediss")
    ssl_options: list[tuple[str, str]] = []
    sentinel_password = None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "sentinel_password" and kind == "sentinel":
            sentinel_password = value
        elif name in _SSL_PARAMETERS and ssl:
            ssl_options.append((name, value))
        else:
            raise ValueError(f"{scheme}:// URLs take no query parameter {name!r}")
    path = [segment for segment in parts.path.split("/") if segment]
    if kind == "cluster":
        if path not in ([], ["0"]):
            raise ValueError(f"{scheme}:// URLs have no path: a Redis Cluster has only database 0")
        return RedisTarget(kind, url, nodes, "", 0, username, password, None, ssl, tuple(ssl_options))
    if not path or len(path) > 2:
        raise ValueError(f"{scheme}:// URLs end in /service_name or /service_name/db (the master Sentinel monitors)")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database in a {scheme}:// URL must be a number")
    db = int(path[1]) if len(path) == 2 else 0
    service = unquote(path[0])
    return RedisTarget(kind, url, nodes, service, db, username, password, sentinel_password, ssl, tuple(ssl_options))


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: the text between its first ``{`` and the next ``}``, if not empty."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if end > start + 1 else ""


def pipeline_prefix(prefix: str, *, cluster: bool) -> str:
    """The key prefix to use: on a cluster, ``prefix`` made a hash tag (``scalellm`` -> ``{scalellm}``).

    Every key is ``{prefix}:...``, so with the tag in the prefix all of a pipeline's keys
    share one slot, whatever follows. A prefix that has a tag already is kept as it is
    (``{scalellm}``, ``app-{blue}``); one with braces that form none is refused, since
    wrapping it could leave the tag empty (``}x`` -> ``{}x}``) or let a key's suffix end it.
    One server or Sentinel: unchanged, so existing deployments keep their key names.
    """
    if not cluster or hash_tag(prefix):
        return prefix
    if "{" in prefix or "}" in prefix:
        raise ValueError(
            f"{prefix!r} has braces but no hash tag: on a Redis Cluster use a prefix without braces "
            "(it becomes {prefix}) or with one non-empty {tag}"
        )
    return "{" + prefix + "}"


def async_client(
    url: str,
    *,
    socket_connect_timeout: float | None = 5.0,
    socket_timeout: float | None = None,
    health_check_interval: float = 0,
    client_name: str | None = None,
) -> AsyncRedis:
    """An asyncio client for ``url`` (responses not decoded: bytes). Connects lazily.

    ``client_name``: every connection names itself so (CLIENT SETNAME), which is how
    other replicas see that this one still has a connection (replicas.py). Not on a
    cluster, where a replica's connections spread over nodes."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_connect_timeout": socket_connect_timeout,
        "socket_timeout": socket_timeout,
        "health_check_interval": health_check_interval,
    }
    named: dict[str, Any] = {"client_name": client_name} if client_name else {}
    if target.kind == "single":
        return aioredis.Redis.from_url(url, **options, **named)
    auth = _auth(target)
    if target.kind == "cluster":
        return aioredis.RedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in target.nodes],
            max_connections=_CLUSTER_MAX_CONNECTIONS,
            **auth,
            **options,
        )
    sentinel = _AsyncSentinel(list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, options), **options)
    client: aioredis.Redis = sentinel.master_for(target.service_name, db=target.db, **auth, **named)
    return client


# A stream read as this client gets it (RESP2, responses not decoded, so values are
# bytes): [(stream, [(entry id, {field: value}, or None for a deleted entry), ...]), ...].
# redis-py's own reply types also cover RESP3 and decoded responses, hence the casts.
StreamEntry: TypeAlias = tuple[bytes | str, dict[bytes, bytes] | None]
StreamReply: TypeAlias = Sequence[tuple[bytes | str, Sequence[StreamEntry]]]


def stream_reply(raw: object) -> StreamReply:
    """An XREAD / XREADGROUP reply as Redis sends it (RESP2: [[stream, [[id, [field, value, ...]],
    ...]], ...]; RESP3: a map of streams) -> StreamReply; a deleted entry's fields are None."""
    if not raw:
        return []
    pairs = raw.items() if isinstance(raw, dict) else raw
    reply: list[tuple[bytes | str, list[StreamEntry]]] = []
    for stream, entries in cast(Iterable[tuple[bytes | str, Sequence[Sequence[Any]]]], pairs):
        parsed: list[StreamEntry] = []
        for entry_id, fields in entries:
            parsed.append((entry_id, dict(zip(fields[::2], fields[1::2])) if fields else None))
        reply.append((stream, parsed))
    return reply


class HeldConnections:
    """Commands sent on connections taken once from a client's pool and kept, past the pool.

    For the stream reads every stage waits in (shared/transport.py). redis-py's own way to a
    command (the pool's lock, its connection checks and metrics hooks, the reply callbacks)
    is ~0.1 ms of a read when the caches are cold, as they are at concurrency 1 after the
    engine's forward (docs/benchmarks.md, "fifth session: hops"). Each concurrent caller gets
    a connection of its own. A connection whose reply may not have been read to the end (a
    cancelled or failed read) goes back to the pool disconnected, never to be reused as is.
    Replies come raw: the caller parses them.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool: Any = client.connection_pool  # untyped in some redis-py releases
        self._idle: list[Any] = []

    async def command(self, *args: str | bytes | int) -> Any:
        connection = self._idle.pop() if self._idle else await self._pool.get_connection()
        try:
            await connection.send_command(*args)
            reply = await connection.read_response()
        except ResponseError:
            self._idle.append(connection)  # an error reply, read whole: the connection is fine
            raise
        except BaseException:
            await self._drop(connection)
            raise
        self._idle.append(connection)
        return reply

    async def pipeline(self, commands: Sequence[Sequence[str | bytes | int]]) -> list[Any]:
        """``commands`` sent together, not as a transaction (as redis-py's ``pipeline(transaction=False)``):
        every reply, or the first error reply raised once all are read."""
        connection = self._idle.pop() if self._idle else await self._pool.get_connection()
        replies: list[Any] = []
        error: ResponseError | None = None
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
        except BaseException:
            await self._drop(connection)
            raise
        self._idle.append(connection)
        if error is not None:
            raise error
        return replies

    async def _drop(self, connection: Any) -> None:
        await connection.disconnect(nowait=True)
        await self._pool.release(connection)

    async def close(self) -> None:
        """Give the connections back to the pool (before the client closes)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._pool.release(connection)


def held_connections(client: AsyncRedis) -> HeldConnections | None:
    """For one server or Sentinel's master; None on a cluster, whose commands go by slot to many nodes."""
    return HeldConnections(client) if isinstance(client, aioredis.Redis) else None


def sync_client(
    url: str, *, socket_connect_timeout: float | None = 5.0, socket_timeout: float | None = None
) -> SyncRedis:
    """A blocking client for ``url`` (health checks). A cluster one asks a start-up node for the slots at once."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {"socket_connect_timeout": socket_connect_timeout, "socket_timeout": socket_timeout}
    if target.kind == "single":
        return redis.Redis.from_url(url, **options)
    auth = _auth(target)
    if target.kind == "cluster":
        return redis.RedisCluster(
            startup_nodes=[_ClusterNode(host, port) for host, port in target.nodes],
            **auth,
            **options,
        )
    sentinel = _Sentinel(list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, options), **options)
    client: redis.Redis = sentinel.master_for(target.service_name, db=target.db, **auth)
    return client


async def close_async_client(client: AsyncRedis) -> None:
    """Close ``client``, and for Sentinel the connections to the sentinels too (the master client keeps them)."""
    pool = getattr(client, "connection_pool", None)
    await client.aclose()
    if isinstance(pool, AsyncSentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def _auth(target: RedisTarget) -> dict[str, Any]:
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.ssl:
        auth["ssl"] = True
        auth.update(dict(target.ssl_options))
    return auth


def _sentinel_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    # Sentinels are their own servers: their password is not the master's (None: they need none).
    kwargs: dict[str, Any] = {k: v for k, v in options.items() if k.startswith("socket_")}
    kwargs["password"] = target.sentinel_password
    if target.ssl:
        kwargs["ssl"] = True
        kwargs.update(dict(target.ssl_options))
    return kwargs


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    """(user, password) from ``user:password``, ``:password`` or ``user`` (percent-decoded)."""
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password else None)


def _host_port(entry: str, default_port: int, scheme: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if not entry:
        raise ValueError(f"{scheme}:// URLs need host[:port] entries separated by commas (an entry is empty)")
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"a bad IPv6 address in a {scheme}:// URL")
        port_text = rest[1:]
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"{scheme}:// URLs need a host before each port")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        # Not quoted: a password typed where the port goes ("host:secret") must not be shown.
        raise ValueError(f"a port in a {scheme}:// URL is not a number from 1 to 65535")
    return host, int(port_text)
