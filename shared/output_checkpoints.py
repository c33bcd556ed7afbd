"""Engine output checkpoints, and publishing fenced by ownership of the work entry.

An engine that takes over a dead engine's request continues it from the output
tokens already published instead of recomputing them (docs/architecture.md,
"Engine takeover"). For that, what a successor finds must be exactly what the
client was sent. ``publish_owned`` makes it so with one Lua script, which Redis
runs atomically:

- it first checks that this consumer still owns (has pending) the work entry of
  every request the batch touches; if any is no longer its own (another engine
  claimed it, or it was acknowledged already), it writes nothing and returns
  those entries, so the caller drops their requests and publishes the rest;
- it appends the output messages (``engine_step_output``, ``request_failed``);
- it writes each request's new output token ids into ``{p}:outputs:{request_id}``
  (packed little-endian int32) with ``SETRANGE`` at 4 x the tokens' offset, so a
  retry after a lost reply rewrites the same bytes instead of appending twice,
  and deletes the key of a request that ended;
- it acknowledges the entries of the requests that ended.

``OutputCheckpointMixin`` is part of ``StreamTransport`` (kept apart only for file size).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from shared.messages import Message, encode

if TYPE_CHECKING:
    from shared.redis_client import AsyncRedis
    from shared.transport import Ack, StreamNames

log = logging.getLogger(__name__)

T = TypeVar("T")

# A checkpoint lives this long after its last write: far beyond a takeover (about a
# second), and every running request writes it each step. A request that ends deletes it.
OUTPUT_CHECKPOINT_TTL_MS = 600_000
_TOKEN = struct.Struct("<i")

# KEYS: the work stream, then nm output streams, then nc checkpoint keys.
# ARGV: group, consumer, no, nm, nc, na, maxlen, checkpoint ttl ms, then no owned entry ids,
# (payload, capped) per output, (byte offset, bytes, done) per checkpoint, na entry ids to ack.
# Returns the owned entries that are not pending for this consumer; none: all applied.
_PUBLISH_OWNED = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local no, nm, nc, na = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local a = 8
local lost = {}
for i = 1, no do
  local id = ARGV[a + i]
  local pending = redis.pcall('XPENDING', stream, group, id, id, 1)
  if pending['err'] or #pending == 0 or pending[1][2] ~= consumer then lost[#lost + 1] = id end
end
if #lost > 0 then return lost end
a = a + no
for i = 1, nm do
  if ARGV[a + 2 * i] == '1' then
    redis.call('XADD', KEYS[1 + i], 'MAXLEN', '~', ARGV[7], '*', 'm', ARGV[a + 2 * i - 1])
  else
    redis.call('XADD', KEYS[1 + i], '*', 'm', ARGV[a + 2 * i - 1])
  end
end
a = a + 2 * nm
for i = 1, nc do
  local key = KEYS[1 + nm + i]
  if ARGV[a + 3 * i] == '1' then
    redis.call('DEL', key)
  else
    redis.call('SETRANGE', key, ARGV[a + 3 * i - 2], ARGV[a + 3 * i - 1])
    redis.call('PEXPIRE', key, ARGV[8])
  end
end
a = a + 3 * nc
for i = 1, na do redis.call('XACK', stream, group, ARGV[a + i]) end
return lost
"""

# Keep entries this consumer still owns from looking idle; report the ones it does not.
# KEYS[1] stream; ARGV group, consumer, entry ids.
_TOUCH_OWNED = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV do
  local pending = redis.pcall('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if pending['err'] or #pending == 0 or pending[1][2] ~= consumer then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'JUSTID')
  end
end
return lost
"""


@dataclass(frozen=True, slots=True)
class OutputCheckpoint:
    """New output tokens of a request (``offset``: index of the first among its outputs), or its end."""

    request_id: str
    offset: int = 0
    token_ids: tuple[int, ...] = ()
    done: bool = False  # the request ended: delete its checkpoint


def pack_token_ids(token_ids: Iterable[int]) -> bytes:
    ids = list(token_ids)
    return struct.pack(f"<{len(ids)}i", *ids)


def unpack_token_ids(data: bytes) -> list[int] | None:
    """None for bytes that are not whole int32s (not written by an engine)."""
    if len(data) % _TOKEN.size:
        return None
    return [value for (value,) in _TOKEN.iter_unpack(data)]


class OutputCheckpointMixin:
    # Provided by StreamTransport.
    names: StreamNames
    consumer: str
    maxlen: int
    _redis: AsyncRedis

    if TYPE_CHECKING:  # only declared: at run time StreamTransport's (and WorkStreamMixin's) are used

        async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T: ...
        async def _trim_due(self, streams: Iterable[str]) -> None: ...

    async def publish_owned(
        self,
        stream: str,
        group: str,
        messages: Sequence[tuple[str, Message]],
        *,
        owned: Sequence[str],
        checkpoints: Sequence[OutputCheckpoint] = (),
        acks: Sequence[Ack] = (),
    ) -> list[str]:
        """Publish, checkpoint and ack, only if every entry of ``owned`` (of ``stream`` in ``group``) is ours.

        Returns the entries of ``owned`` that are not (any more): nothing was written then.
        An empty list: everything was applied. Output to work streams gets no MAXLEN.
        """
        if any(ack.stream != stream or ack.group != group for ack in acks):
            raise ValueError(f"publish_owned acknowledges entries of {stream} in group {group} only")
        if not messages and not checkpoints and not acks:
            return []
        keys = [stream, *(s for s, _ in messages), *(self.names.output_checkpoint(c.request_id) for c in checkpoints)]
        args: list[str | bytes | int] = [
            group,
            self.consumer,
            len(owned),
            len(messages),
            len(checkpoints),
            len(acks),
            self.maxlen,
            OUTPUT_CHECKPOINT_TTL_MS,
            *owned,
        ]
        for target, message in messages:
            args += [encode(message), 0 if self.names.is_work_stream(target) else 1]
        for checkpoint in checkpoints:
            args += [4 * checkpoint.offset, pack_token_ids(checkpoint.token_ids), int(checkpoint.done)]
        args += [ack.entry_id for ack in acks]
        script = self._script("_owned_script", _PUBLISH_OWNED)
        lost = await self._retry("owned publish", lambda: script(keys=keys, args=args))
        if not lost:
            await self._trim_due({target for target, _ in messages})
        return [_text(entry_id) for entry_id in lost or []]

    async def touch_owned(self, stream: str, group: str, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of the entries still ours; returns those that are not (any more).

        Unlike a plain ``XCLAIM``, never takes an entry back from an engine that claimed it.
        """
        if not entry_ids:
            return []
        script = self._script("_touch_script", _TOUCH_OWNED)
        lost = await self._retry("touch", lambda: script(keys=[stream], args=[group, self.consumer, *entry_ids]))
        return [_text(entry_id) for entry_id in lost or []]

    async def read_output_checkpoints(self, request_ids: Sequence[str]) -> list[list[int] | None]:
        """Each request's checkpointed output token ids; None where there is none (or it is unreadable)."""
        if not request_ids:
            return []
        keys = [self.names.output_checkpoint(request_id) for request_id in request_ids]
        values = await self._retry("MGET", lambda: self._redis.mget(keys))
        found: list[list[int] | None] = []
        for key, value in zip(keys, values):
            token_ids = None if value is None else unpack_token_ids(value.encode() if isinstance(value, str) else value)
            if value is not None and token_ids is None:
                log.error("ignoring unreadable output checkpoint %s (%d bytes)", key, len(value))
            found.append(token_ids)
        return found

    def _script(self, attribute: str, source: str) -> Callable[..., Awaitable[list[bytes | str]]]:
        # Registered once per transport: later calls send only the script's SHA (EVALSHA).
        script = self.__dict__.get(attribute)
        if script is None:
            script = self.__dict__[attribute] = self._redis.register_script(source)
        return cast(Callable[..., Awaitable[list[bytes | str]]], script)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
