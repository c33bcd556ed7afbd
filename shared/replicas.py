"""The replica registry: who ever beat, who stopped, and taking a gone consumer's entries over.

Every beat (``StreamTransport.beat``) renews the replica's heartbeat key and, in
the same script (``BEAT``), its entry in ``{p}:replicas:{role}`` (replica id -> last beat).
A replica in the registry whose heartbeat has expired is gone. The policy built
on this (whom to claim from, what to abort) is in shared/failover.py.

``ReplicaRegistryMixin`` is part of ``StreamTransport`` (kept apart only for file size).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from shared.redis_client import AsyncRedis
    from shared.transport import Delivery, StreamNames, StreamReply

log = logging.getLogger(__name__)

T = TypeVar("T")

# A replica's beat: renew its heartbeat and its registry entry atomically, and say whether the
# heartbeat it replaced was there and whether someone reaped the replica meanwhile (REAP), clearing
# the mark. A script rather than a MULTI: redis-py's asyncio cluster client runs each command of
# a transaction in a thread with an event loop of its own, which leaves connections bound to
# that loop in the client's pool (seen with redis-py 8.1).
# KEYS heartbeat, registry, reaped mark; ARGV heartbeat payload, ttl ms, replica id, time of the beat.
BEAT = """
local previous = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
local renewed = 0
if previous then renewed = 1 end
return {renewed, redis.call('DEL', KEYS[3])}
"""

# Mark a replica as reaped, only while its heartbeat is absent: the check and the mark in one
# script, so a replica that beats again in between is either still seen alive (and left alone)
# or finds the mark on its next beat (and knows its work was dropped).
# KEYS heartbeat, reaped mark; ARGV how long the mark is kept (ms).
_REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""

# Move a gone consumer's pending entries to a live one, and remove the gone consumer from
# the group once it has none left. One script, so two survivors never both get an entry
# and no entry is delivered to the gone consumer between the check and the removal.
# KEYS[1] stream; ARGV group, gone consumer, new owner, min idle ms, count.
_TAKE_OVER = """
local stream, group, gone, owner = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local count = tonumber(ARGV[5])
local claimed = {}
if count > 0 then
  local pending = redis.call('XPENDING', stream, group, '-', '+', count, gone)
  if #pending > 0 then
    local ids = {}
    for i, entry in ipairs(pending) do ids[i] = entry[1] end
    claimed = redis.call('XCLAIM', stream, group, owner, ARGV[4], unpack(ids))
    -- Redis 6 keeps entries trimmed from the stream pending (and answers nil for them):
    -- acknowledge those, or they would stay pending for ever.
    local returned = {}
    for _, entry in ipairs(claimed) do if entry then returned[entry[1]] = true end end
    for _, id in ipairs(ids) do
      if not returned[id] and #redis.call('XRANGE', stream, id, id) == 0 then redis.call('XACK', stream, group, id) end
    end
  end
end
if #redis.call('XPENDING', stream, group, '-', '+', 1, gone) > 0 then return {0, claimed} end
redis.call('XGROUP', 'DELCONSUMER', stream, group, gone)
return {1, claimed}
"""


@dataclass(frozen=True, slots=True)
class ReplicaCensus:
    """The replicas of one role that ever beat: those beating now, and those that stopped.

    ``gone`` maps a replica id to its last beat (unix time). A replica that never beat
    (a stage of someone else's) is in neither.
    """

    live: frozenset[str]
    gone: dict[str, float]


@dataclass(frozen=True, slots=True)
class BeatOutcome:
    """What a beat found: was the previous heartbeat still there, and was this replica reaped meanwhile."""

    renewed: bool  # False on the first beat and after a lapse
    reaped: bool  # during the lapse another replica acted on this one being gone (``reap``)


@dataclass(frozen=True, slots=True)
class Takeover:
    """What ``take_over`` claimed from a gone consumer, and whether the consumer is now removed."""

    deliveries: list[Delivery]
    consumer_removed: bool


class ReplicaRegistryMixin:
    # Provided by StreamTransport.
    names: StreamNames
    consumer: str
    _redis: AsyncRedis
    _known_groups: set[tuple[str, str]]

    if TYPE_CHECKING:  # only declared: at run time StreamTransport's (and WorkStreamMixin's) are used

        async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T: ...
        async def ensure_group(self, stream: str, group: str) -> None: ...
        async def _decode_entries(self, reply: StreamReply | None, group: str | None) -> list[Delivery]: ...
        async def drop_poisoned(self, stream: str, group: str, deliveries: Sequence[Delivery]) -> list[Delivery]: ...

    async def replica_census(self, role: str) -> ReplicaCensus:
        registry = self.names.registry(role)

        async def look() -> ReplicaCensus:
            registered = {_text(k): _text(v) for k, v in (await self._redis.hgetall(registry)).items()}
            if not registered:
                return ReplicaCensus(frozenset(), {})
            ids = list(registered)
            beats = await self._redis.mget([self.names.heartbeat(role, replica_id) for replica_id in ids])
            live = frozenset(replica_id for replica_id, beat in zip(ids, beats) if beat is not None)
            gone = {replica_id: _float_or_zero(registered[replica_id]) for replica_id in ids if replica_id not in live}
            return ReplicaCensus(live, gone)

        return await self._retry("census", look)

    async def connected_replicas(self) -> frozenset[str] | None:
        """The names of the connections Redis holds now: each replica's connections carry its id.

        None where that cannot be told: a cluster (a replica's connections spread over nodes),
        CLIENT LIST refused (an ACL), or a proxy between us and Redis that hides the names
        (our own connection is not in the list). Not retried: a caller falls back to heartbeats.
        """
        if isinstance(self._redis, RedisCluster):
            return None
        try:
            clients: list[dict[str, Any]] = await self._redis.client_list(_type="normal")
        except Exception as exc:  # noqa: BLE001 - any failure (an ACL, a server or fake that lacks it) means: cannot tell
            log.debug("CLIENT LIST failed (%s): replicas are judged by their heartbeats alone", exc)
            return None
        names = frozenset(_text(client["name"]) for client in clients if client.get("name"))
        return names if self.consumer in names else None

    async def reap(self, role: str, replica_ids: Sequence[str], keep_s: float) -> list[str]:
        """Of ``replica_ids``, those still without a heartbeat, marked so that each learns of it on its next beat.

        Only those returned may be treated as gone: one that beat again since the census is left alone.
        """
        keep_ms = int(keep_s * 1000)

        async def mark(replica_id: str) -> bool:
            keys = [self.names.heartbeat(role, replica_id), self.names.reaped(role, replica_id)]
            return bool(await self._redis.eval(_REAP, 2, *keys, keep_ms))

        return [replica_id for replica_id in replica_ids if await self._retry("reap", lambda: mark(replica_id))]

    async def forget_replica(self, role: str, replica_id: str) -> None:
        """Drop a gone replica from the registry once nothing is left to take over from it."""
        await self._retry("HDEL", lambda: self._redis.hdel(self.names.registry(role), replica_id))

    async def take_over(self, stream: str, group: str, gone: str, *, count: int, min_idle_ms: int) -> Takeover:
        """Claim up to ``count`` of the entries ``gone`` left pending; remove it from the group once it has none.

        ``min_idle_ms`` spares entries the consumer touched that recently: it is not dead after all.
        """
        if gone == self.consumer:
            raise ValueError("a consumer cannot take over from itself")
        if (stream, group) not in self._known_groups:
            await self.ensure_group(stream, group)

        async def claim() -> list[Any]:
            try:
                reply: list[Any] = await self._redis.eval(
                    _TAKE_OVER, 1, stream, group, gone, self.consumer, min_idle_ms, max(0, min(count, 1000))
                )
                return reply
            except ResponseError as exc:
                if not _is_missing_group(exc):
                    raise
                await self.ensure_group(stream, group)
                return [0, []]

        removed, entries = await self._retry("take over", claim)
        pairs = [(entry[0], dict(zip(entry[1][::2], entry[1][1::2]))) for entry in entries if entry]
        deliveries = await self.drop_poisoned(stream, group, await self._decode_entries([(stream, pairs)], group))
        if deliveries:
            log.warning("took over %d entries of %s from gone consumer %s", len(deliveries), stream, gone)
        return Takeover(deliveries, bool(removed))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _float_or_zero(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0  # written by someone else's stage: treat as long gone


def _is_missing_group(exc: ResponseError) -> bool:
    # Imported here: shared.transport imports this module.
    from shared.transport import _is_missing_group as missing_group

    return missing_group(exc)
