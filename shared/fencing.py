"""Publishing under leases: output, state and acknowledgements applied all at once, or not at all.

A detokenizer keeps per-request decoding state. For a successor to continue a
request exactly where the client's text ends, the state it finds in Redis must
account for precisely the text already published and the entries already
acknowledged. ``publish_fenced`` makes that so with one Lua script, which Redis
runs atomically:

- it first checks that this consumer still holds every lease named (a replica
  that stalled past its lease TTL, whose shard was taken over, is refused: its
  batch would repeat text its successor also sends);
- it checks that none of the state keys named ``absent`` exists: a detokenizer
  starts a request it sees at output 0 without reading its checkpoint first, so
  a checkpoint there means the request was decoded before (a delta delivered
  again) and the batch is refused, to be redone from the checkpoints;
- it acknowledges the inputs; if none of them was still pending, the batch was
  applied already (a retry after a reply lost to a dropped connection) and it
  stops there, so nothing is published twice;
- it appends the output messages and writes the state keys.

``FencedPublishMixin`` is part of ``StreamTransport`` (kept apart only for file size).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from shared.messages import Message, MessageError, decode, encode

if TYPE_CHECKING:
    from shared.redis_client import AsyncRedis
    from shared.transport import Ack, Delivery, StreamNames, StreamReply

log = logging.getLogger(__name__)

T = TypeVar("T")


class StateExists(Exception):
    """``publish_fenced`` wrote nothing: a state key it was told is ``absent`` exists."""


# KEYS: leases (nl), output streams (nm), state keys (ns), acknowledged streams (na), then
# the keys that must not exist (all the rest).
# ARGV: consumer, nl, nm, ns, na, maxlen, lease ttl ms, then a payload per output,
# (value, ttl ms) per state key, (group, entry id) per ack.
# Returns -1: a lease is not ours; -2: a key that must not exist does (nothing done);
# 0: applied before (nothing done); 1: applied.
_PUBLISH_FENCED = """
local consumer = ARGV[1]
local nl, nm, ns, na = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 1, nl do
  if redis.call('GET', KEYS[i]) ~= consumer then return -1 end
end
for i = 1, nl do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end
for i = nl + nm + ns + na + 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return -2 end
end
if na > 0 then
  local key, arg, acked = nl + nm + ns, 7 + nm + 2 * ns, 0
  for i = 1, na do
    acked = acked + redis.call('XACK', KEYS[key + i], ARGV[arg + 2 * i - 1], ARGV[arg + 2 * i])
  end
  if acked == 0 then return 0 end
end
for i = 1, nm do
  redis.call('XADD', KEYS[nl + i], 'MAXLEN', '~', ARGV[6], '*', 'm', ARGV[7 + i])
end
for i = 1, ns do
  redis.call('SET', KEYS[nl + nm + i], ARGV[7 + nm + 2 * i - 1], 'PX', ARGV[7 + nm + 2 * i])
end
return 1
"""


class FencedPublishMixin:
    # Provided by StreamTransport.
    names: StreamNames
    consumer: str
    maxlen: int
    _redis: AsyncRedis

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError  # StreamTransport's

    async def ensure_group(self, stream: str, group: str) -> None:
        raise NotImplementedError  # StreamTransport's

    async def _decode_entries(self, reply: StreamReply | None, group: str | None) -> list[Delivery]:
        raise NotImplementedError  # StreamTransport's

    async def publish_fenced(
        self,
        messages: Sequence[tuple[str, Message]],
        *,
        leases: Sequence[str],
        lease_ttl_ms: int,
        states: Sequence[tuple[str, Message, int]] = (),
        acks: Sequence[Ack] = (),
        absent: Sequence[str] = (),
    ) -> bool:
        """Publish ``messages``, write ``states`` (key, value, ttl ms) and ack, only while holding ``leases``
        and only if none of the keys ``absent`` exists.

        Output goes to streams read by plain XREAD (responses, aborts), trimmed by
        MAXLEN. Held leases are renewed to ``lease_ttl_ms``. False: a lease is not
        held (any more), and nothing was written. StateExists: a key of ``absent``
        exists, and nothing was written (the leases were renewed).
        """
        lease_keys = [self.names.lease(resource) for resource in leases]
        keys = (
            lease_keys
            + [stream for stream, _ in messages]
            + [key for key, _, _ in states]
            + [ack.stream for ack in acks]
            + list(absent)
        )
        args: list[str | bytes | int] = [
            self.consumer,
            len(lease_keys),
            len(messages),
            len(states),
            len(acks),
            self.maxlen,
            lease_ttl_ms,
        ]
        args += [encode(message) for _, message in messages]
        for _, value, ttl_ms in states:
            args += [encode(value), ttl_ms]
        for ack in acks:
            args += [ack.group, ack.entry_id]
        script = self.__dict__.get("_fenced_script")
        if script is None:  # registered once: later calls send only its SHA (EVALSHA)
            script = self.__dict__["_fenced_script"] = self._redis.register_script(_PUBLISH_FENCED)
        outcome = await self._retry("fenced publish", lambda: script(keys=keys, args=args))
        if outcome == -2:
            raise StateExists("a state key expected absent exists")
        if outcome == 0:
            log.warning("a batch was applied already (a retry after a lost reply); not publishing it again")
        return int(outcome) >= 0

    async def claim_all_pending(self, stream: str, group: str, *, count: int) -> list[Delivery]:
        """Every entry of ``stream`` pending in ``group``, whoever read it, now this consumer's.

        For a shard just leased: its previous holder is fenced off, so whatever it
        read and never acknowledged is redone here at once, however recently it was read.
        """
        await self.ensure_group(stream, group)
        claimed: list[Delivery] = []
        cursor = "0-0"
        while True:

            async def autoclaim(start: str = cursor) -> list[Any]:
                return await self._redis.xautoclaim(stream, group, self.consumer, 0, start, count=count)

            reply = await self._retry("XAUTOCLAIM", autoclaim)
            entries = [entry for entry in reply[1] if entry is not None]
            claimed += await self._decode_entries([(stream, entries)], group)
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if cursor == "0-0":
                break
        if claimed:
            log.warning("took over %d pending entries of %s", len(claimed), stream)
        return claimed

    async def read_states(self, keys: Sequence[str]) -> list[Message | None]:
        """The messages stored under ``keys``; None for a missing or unreadable one."""
        if not keys:
            return []
        values = await self._retry("MGET", lambda: self._redis.mget(list(keys)))
        found: list[Message | None] = []
        for key, value in zip(keys, values):
            try:
                found.append(None if value is None else decode(cast(bytes, value)))  # responses are not decoded: bytes
            except MessageError as exc:
                log.error("ignoring unreadable state %s: %s", key, exc)
                found.append(None)
        return found

    async def lease_holders(self, resources: Sequence[str]) -> list[str | None]:
        """Who holds each lease now (None: nobody)."""
        if not resources:
            return []
        keys = [self.names.lease(resource) for resource in resources]
        values = await self._retry("MGET", lambda: self._redis.mget(keys))
        return [value.decode() if isinstance(value, bytes) else value for value in values]
