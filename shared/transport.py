"""The one class that talks to Redis: streams, consumer groups, heartbeats, leases.

Services see typed messages (``shared.messages``); this module turns them into
stream entries and back. Delivery is at-least-once: a consumer acknowledges an
entry only after publishing what it produced from it (``publish(..., acks=)``
does both in one pipelined round trip). Entries left pending by a replica whose
heartbeat expired are taken over at once with ``take_over`` (shared/replicas.py,
used by shared/failover.py); those of a consumer that never beat, after an idle
timeout with ``claim_stale`` (XAUTOCLAIM).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from redis.asyncio import RedisCluster
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.fencing import FencedPublishMixin
from shared.messages import Heartbeat, Message, MessageError, decode, encode
from shared.output_checkpoints import OutputCheckpointMixin
from shared.redis_client import (
    AsyncRedis,
    HeldConnections,
    async_client,
    close_async_client,
    held_connections,
    pipeline_prefix,
    stream_reply,
)
from shared.redis_client import StreamReply as StreamReply
from shared.replicas import BEAT, BeatOutcome, ReplicaRegistryMixin
from shared.stream_names import StreamNames as StreamNames
from shared.work_streams import DEFAULT_MAX_DELIVERIES, DEFAULT_TRIM_INTERVAL_S, WorkStreamMixin

log = logging.getLogger(__name__)

T = TypeVar("T")
PAYLOAD_FIELD = b"m"
# On a cluster, a failover leaves slots without a master for a moment (CLUSTERDOWN, TRYAGAIN):
# waited out like a lost connection (redis-py's cluster client retries MOVED/ASK itself).
_RETRYABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ClusterDownError, TryAgainError)


# Renew or release a lease only if we still hold it.
_RENEW_LEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE_LEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _is_missing_group(exc: ResponseError) -> bool:
    # Redis says NOGROUP; fakeredis words it differently for a missing key.
    return "NOGROUP" in str(exc) or "requires the key to exist" in str(exc)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message read from a stream, with what is needed to acknowledge it."""

    stream: str
    entry_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    group: str
    entry_id: str


def shard_of(request_id: str, shards: int) -> int:
    """The ``{p}:generated:{shard}`` stream that carries a request's output.

    Part of the protocol (docs/protocol.md): engines publish by it, and a
    detokenizer uses it to know which requests live on the shards it holds.
    """
    return zlib.crc32(request_id.encode()) % shards


def _connection_name(consumer: str) -> str | None:
    """CLIENT SETNAME takes no spaces or control characters: such a consumer stays unnamed."""
    return consumer if consumer.isprintable() and " " not in consumer else None


class StreamTransport(WorkStreamMixin, FencedPublishMixin, OutputCheckpointMixin, ReplicaRegistryMixin):
    """Async Redis streams with retry across lost connections.

    Every operation retries with backoff while Redis is unreachable, so a Redis
    restart stalls the pipeline instead of crashing it; ``close()`` ends retries.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        consumer: str,
        *,
        maxlen: int = 100_000,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        trim_interval_s: float = DEFAULT_TRIM_INTERVAL_S,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.consumer = consumer
        self.maxlen = maxlen
        self._max_backoff_s = max_backoff_s
        # One server, a cluster or Sentinel, by the URL's scheme (shared/redis_client.py, docs/redis.md).
        self._redis: AsyncRedis = async_client(
            redis_url, socket_connect_timeout=5, health_check_interval=30, client_name=_connection_name(consumer)
        )
        # Settings give the prefix made a hash tag on a cluster already; a caller that passes its own gets the same.
        self.names = StreamNames(pipeline_prefix(prefix, cluster=isinstance(self._redis, RedisCluster)))
        # The stream reads past redis-py's pool (read_group, read_stream); None on a cluster.
        self._reads: HeldConnections | None = held_connections(self._redis)
        self._known_groups: set[tuple[str, str]] = set()
        self._closed = False
        self._init_work_streams(max_deliveries, trim_interval_s)

    @classmethod
    def from_client(cls, client: AsyncRedis, prefix: str, consumer: str, **kwargs: float) -> StreamTransport:
        """For tests: wrap an existing client (e.g. fakeredis)."""
        transport = cls("redis://unused", prefix, consumer, **kwargs)  # type: ignore[arg-type]
        transport._redis = client
        transport._reads = held_connections(client)
        return transport

    async def close(self) -> None:
        self._closed = True
        if self._reads is not None:
            await self._reads.close()
        await close_async_client(self._redis)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _RETRYABLE:
            return False

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        backoff = 0.05
        failures = 0
        while True:
            try:
                result = await operation()
                if failures:
                    log.warning("redis reachable again after %d failed attempts (%s)", failures, what)
                return result
            except _RETRYABLE as exc:
                if self._closed:
                    raise
                failures += 1
                if failures == 1:
                    log.warning("redis unreachable during %s (%s); retrying", what, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    # -- consumer groups -------------------------------------------------

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group (and the stream) unless it exists already."""

        async def create() -> None:
            try:
                await self._redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._retry("XGROUP CREATE", create)
        self._known_groups.add((stream, group))

    async def read_group(self, streams: Sequence[str], group: str, *, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this consumer; waits up to ``block_ms`` for one."""
        if not streams or count <= 0:
            if block_ms:
                await asyncio.sleep(block_ms / 1000)
            return []
        for stream in streams:
            if (stream, group) not in self._known_groups:
                await self.ensure_group(stream, group)

        async def read() -> StreamReply:
            try:
                if self._reads is not None:
                    wait = ("BLOCK", block_ms) if block_ms else ()
                    raw = await self._reads.command(
                        "XREADGROUP", "GROUP", group, self.consumer, "COUNT", count, *wait,
                        "STREAMS", *streams, *(">" for _ in streams),
                    )  # fmt: skip
                    return stream_reply(raw)
                reply = await self._redis.xreadgroup(
                    group, self.consumer, {s: ">" for s in streams}, count=count, block=block_ms or None
                )
                return cast(StreamReply, reply)
            except ResponseError as exc:
                # The stream or group vanished (e.g. Redis restarted empty).
                if not _is_missing_group(exc):
                    raise
                for stream in streams:
                    await self.ensure_group(stream, group)
                return []

        reply = await self._retry("XREADGROUP", read)
        return await self._decode_entries(reply, group)

    async def claim_stale(self, stream: str, group: str, *, min_idle_ms: int, count: int = 100) -> list[Delivery]:
        """Take over entries another consumer read but never acknowledged."""
        if (stream, group) not in self._known_groups:
            await self.ensure_group(stream, group)

        async def claim() -> StreamReply:
            try:
                reply = await self._redis.xautoclaim(stream, group, self.consumer, min_idle_ms, "0-0", count=count)
            except ResponseError as exc:
                if not _is_missing_group(exc):
                    raise
                await self.ensure_group(stream, group)
                return []
            return [(stream, [e for e in reply[1] if e is not None])]

        reply = await self._retry("XAUTOCLAIM", claim)
        deliveries = await self.drop_poisoned(stream, group, await self._decode_entries(reply, group))
        if deliveries:
            log.warning("claimed %d stale entries of %s", len(deliveries), stream)
        return deliveries

    async def touch(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries still being worked on, so nobody claims them."""
        if entry_ids:
            await self._retry(
                "XCLAIM",
                lambda: self._redis.xclaim(stream, group, self.consumer, 0, list(entry_ids), justid=True),
            )

    async def ack(self, acks: Iterable[Ack]) -> None:
        await self.publish([], acks=acks)

    async def _decode_entries(self, reply: StreamReply | None, group: str | None) -> list[Delivery]:
        deliveries: list[Delivery] = []
        rejected: list[tuple[str, str, bytes]] = []
        for raw_stream, entries in reply or []:
            stream = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                payload = (fields or {}).get(PAYLOAD_FIELD, b"")
                try:
                    deliveries.append(Delivery(stream, entry_id, decode(payload)))
                except MessageError as exc:
                    log.error("dropping undecodable entry %s of %s: %s", entry_id, stream, exc)
                    rejected.append((stream, entry_id, payload))
        if rejected:
            await self._dead_letter(rejected, group)
        return deliveries

    async def _dead_letter(self, rejected: list[tuple[str, str, bytes]], group: str | None) -> None:
        """Park bad entries for inspection and acknowledge them so they are not redelivered."""

        async def park() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for stream, entry_id, payload in rejected:
                pipe.xadd(
                    self.names.deadletter,
                    {b"stream": stream, b"id": entry_id, PAYLOAD_FIELD: payload, b"reason": b"undecodable"},
                    maxlen=10_000,
                    approximate=True,
                )
                if group is not None:
                    pipe.xack(stream, group, entry_id)
            await pipe.execute()

        await self._retry("dead-letter", park)

    # -- publishing -------------------------------------------------------

    async def publish(self, messages: Sequence[tuple[str, Message]], *, acks: Iterable[Ack] = ()) -> None:
        """Append messages to streams, then acknowledge inputs: one round trip.

        Acks follow the appends in the same pipeline, so an input is never
        acknowledged unless what it produced was written first. Work streams get no
        MAXLEN: they are trimmed by their groups' progress (shared/work_streams.py).
        """
        acks = list(acks)
        if not messages and not acks:
            return
        encoded = [(stream, encode(message)) for stream, message in messages]
        commands = self._publish_commands(encoded, acks)

        async def send() -> None:
            if self._reads is not None:
                await self._reads.pipeline(commands)
                return
            pipe = self._redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

        await self._retry("publish", send)
        await self._trim_due({stream for stream, _ in encoded})

    def _publish_commands(
        self, encoded: list[tuple[str, bytes]], acks: list[Ack]
    ) -> list[tuple[str | bytes | int, ...]]:
        """``publish``'s XADDs, then its XACKs."""
        commands: list[tuple[str | bytes | int, ...]] = []
        for stream, payload in encoded:
            if self.names.is_work_stream(stream):  # trimmed by progress: _trim_due
                commands.append(("XADD", stream, "*", PAYLOAD_FIELD, payload))
            else:
                commands.append(("XADD", stream, "MAXLEN", "~", self.maxlen, "*", PAYLOAD_FIELD, payload))
        commands += [("XACK", ack.stream, ack.group, ack.entry_id) for ack in acks]
        return commands

    # -- plain reads (one reader per stream, or broadcast) ------------------

    async def read_stream(self, stream: str, last_id: str, *, count: int, block_ms: int) -> tuple[str, list[Delivery]]:
        """Entries after ``last_id`` (``"$"``: only new ones); returns the new last id."""

        async def read() -> StreamReply:
            if self._reads is not None:
                wait = ("BLOCK", block_ms) if block_ms else ()
                return stream_reply(
                    await self._reads.command("XREAD", "COUNT", count, *wait, "STREAMS", stream, last_id)
                )
            reply = await self._redis.xread({stream: last_id}, count=count, block=block_ms or None)
            return cast(StreamReply, reply)

        reply = await self._retry("XREAD", read)
        for _, entries in reply or []:
            if entries:
                raw_id = entries[-1][0]
                last_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        return last_id, await self._decode_entries(reply, None)

    async def last_entry_id(self, stream: str) -> str:
        """The id of the newest entry (``"0-0"`` if none): a start point for read_stream."""
        reply = await self._retry("XREVRANGE", lambda: self._redis.xrevrange(stream, count=1))
        if not reply:
            return "0-0"
        raw_id = reply[0][0]
        return raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)

    async def delete(self, *keys: str) -> None:
        await self._retry("DEL", lambda: self._redis.delete(*keys))

    async def expire(self, key: str, seconds: int) -> None:
        await self._retry("EXPIRE", lambda: self._redis.expire(key, seconds))

    # -- heartbeats ---------------------------------------------------------

    async def beat(self, heartbeat: Heartbeat, ttl_s: float) -> BeatOutcome:
        """Renew the replica's heartbeat (it expires after ``ttl_s``) and its entry in the role's registry.

        Both at once (one script, shared/replicas.py): a replica in the registry without a
        heartbeat has stopped beating, it is not one that has yet to start. The outcome says
        whether the previous heartbeat was still there (not on the first beat, nor after a
        lapse) and whether, during a lapse, another replica acted on this one being gone
        (``reap``): a lapse nobody acted on, such as Redis stalling for longer than a TTL,
        costs nothing.
        """
        role, replica_id = heartbeat.role, heartbeat.replica_id
        keys = [self.names.heartbeat(role, replica_id), self.names.registry(role), self.names.reaped(role, replica_id)]
        args: list[bytes | str | int] = [encode(heartbeat), int(ttl_s * 1000), replica_id, repr(heartbeat.time)]
        renewed, reaped = await self._retry("heartbeat", lambda: self._redis.eval(BEAT, 3, *keys, *args))
        return BeatOutcome(renewed=bool(renewed), reaped=bool(reaped))

    async def live_replicas(self, role: str) -> list[Heartbeat]:
        async def scan() -> list[Heartbeat]:
            found: list[Heartbeat] = []
            keys = [key async for key in self._redis.scan_iter(match=self.names.heartbeat_pattern(role), count=500)]
            if not keys:
                return found
            for payload in await self._redis.mget(keys):
                if payload is None:
                    continue  # expired between SCAN and MGET
                try:
                    message = decode(cast(bytes, payload))  # responses are not decoded: bytes
                except MessageError:
                    continue
                if isinstance(message, Heartbeat):
                    found.append(message)
            return found

        return await self._retry("heartbeat scan", scan)

    # -- leases (a key owned by one replica at a time, with a TTL) ----------

    async def acquire_lease(self, resource: str, ttl_ms: int) -> bool:
        key = self.names.lease(resource)
        return bool(await self._retry("lease", lambda: self._redis.set(key, self.consumer, nx=True, px=ttl_ms)))

    async def renew_lease(self, resource: str, ttl_ms: int) -> bool:
        key = self.names.lease(resource)
        return bool(await self._retry("lease", lambda: self._redis.eval(_RENEW_LEASE, 1, key, self.consumer, ttl_ms)))

    async def release_lease(self, resource: str) -> None:
        key = self.names.lease(resource)
        await self._retry("lease", lambda: self._redis.eval(_RELEASE_LEASE, 1, key, self.consumer))
