"""Work streams: trimmed by their consumer groups' progress, and rid of poison entries.

A *work stream* (``{p}:requests``, ``{p}:tokenized``, ``{p}:generated:*``) holds entries a
consumer group must process: each entry is one piece of a request that someone waits for.
Trimming such a stream by length (``MAXLEN``) would drop queued work whenever the backlog
outgrows the limit, and the request would only end at its deadline. So work streams are
trimmed with ``XTRIM MINID`` to the oldest entry some group still needs (its oldest pending
entry, or the one after its last delivered entry), and the backlog is bounded instead where
work comes in: the gateway refuses new requests while it is too long.

A *poison entry* is one whose consumers keep dying on it: each claim after a death is one
more delivery (XAUTOCLAIM/XCLAIM count them). Past ``max_deliveries`` the entry is moved to
``{p}:deadletter`` and acknowledged, and its requests fail with a clear error, so one bad
entry cannot take down replica after replica.

``WorkStreamMixin`` is part of ``StreamTransport`` (kept apart only for file size).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from shared.messages import (
    AbortRequests,
    CompletionRequest,
    DetokenizeRequest,
    EngineStepOutput,
    Message,
    RequestFailed,
    TokenizedRequest,
    TokenizeRequest,
    encode,
)

if TYPE_CHECKING:
    from shared.redis_client import AsyncRedis
    from shared.transport import Delivery, StreamNames

log = logging.getLogger(__name__)

T = TypeVar("T")
DEADLETTER_MAXLEN = 10_000
DEFAULT_MAX_DELIVERIES = 3
# How often one producer trims a work stream it appends to: each trim is three round trips.
DEFAULT_TRIM_INTERVAL_S = 1.0


def parse_id(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id``: MINID to it keeps everything newer, drops it."""
    millis, seq = parse_id(entry_id)
    return f"{millis}-{seq + 1}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class GroupProgress:
    name: str
    last_delivered: str
    pending: int
    # Entries not yet delivered to the group; None where the server cannot tell (Redis < 7).
    lag: int | None
    oldest_pending: str | None = None


@dataclass(frozen=True, slots=True)
class StreamProgress:
    stream: str
    length: int
    groups: tuple[GroupProgress, ...]

    def trim_point(self) -> str | None:
        """The MINID below which no group needs anything; None: trim nothing."""
        if not self.groups:
            return None  # nobody has read it yet: all of it is still to do
        points = [g.oldest_pending if g.oldest_pending is not None else next_id(g.last_delivered) for g in self.groups]
        return min(points, key=parse_id)

    def backlog(self) -> int:
        """Entries the slowest group has not finished (undelivered + pending).

        Without ``lag`` (Redis < 7) it is the stream's length, an over-estimate by the
        acknowledged entries newer than the oldest pending one; exact right after a trim
        when nothing is pending.
        """
        if not self.groups:
            return self.length
        if any(g.lag is None for g in self.groups):
            return self.length
        return max(g.lag + g.pending for g in self.groups if g.lag is not None)


async def read_progress(redis: AsyncRedis, stream: str) -> StreamProgress:
    """Each group's position, read so that the trim point derived from it is safe.

    XINFO GROUPS comes first, XPENDING after: an entry delivered in between is newer
    than the last-delivered id already read, and a pending entry can only become
    acknowledged, never unacknowledged, so the older of the two stays safe.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.xinfo_groups(stream)
    pipe.xlen(stream)
    infos, length = await pipe.execute(raise_on_error=False)
    if isinstance(infos, ResponseError):
        if "no such key" not in str(infos).lower():
            raise infos
        infos = []
    if isinstance(length, Exception):
        raise length
    groups = [_group(info) for info in infos]
    waiting = [g for g in groups if g.pending]
    if waiting:
        pipe = redis.pipeline(transaction=False)
        for group in waiting:
            pipe.xpending(stream, group.name)
        summaries = await pipe.execute()
        oldest = {g.name: s.get("min") for g, s in zip(waiting, summaries)}
        groups = [
            GroupProgress(g.name, g.last_delivered, g.pending, g.lag, _text(oldest[g.name]))
            if oldest.get(g.name) is not None
            else g
            for g in groups
        ]
    return StreamProgress(stream, int(length), tuple(groups))


def _group(info: dict[Any, Any]) -> GroupProgress:
    fields = {_text(key): value for key, value in info.items()}
    lag = fields.get("lag")
    return GroupProgress(
        name=_text(fields["name"]),
        last_delivered=_text(fields.get("last-delivered-id", "0-0")),
        pending=int(fields.get("pending") or 0),
        lag=None if lag is None else int(lag),
    )


async def trim_by_progress(redis: AsyncRedis, stream: str) -> StreamProgress:
    """Drop the entries every group is done with; the progress returned has the new length."""
    progress = await read_progress(redis, stream)
    point = progress.trim_point()
    if point is None:
        return progress
    # Exact, not "~": then a length read right after is the backlog (the Redis < 7 fallback).
    removed = await redis.xtrim(stream, minid=point, approximate=False)
    return StreamProgress(stream, progress.length - int(removed or 0), progress.groups)


def split_poisoned(
    deliveries: Sequence[Delivery], delivery_counts: dict[str, int], max_deliveries: int
) -> tuple[list[Delivery], list[tuple[Delivery, int]]]:
    """(to keep, [(poisoned, failed deliveries)]).

    A count includes the claim just made, so the deliveries that failed are one fewer.
    """
    keep: list[Delivery] = []
    poisoned: list[tuple[Delivery, int]] = []
    for delivery in deliveries:
        failed = delivery_counts.get(delivery.entry_id, 1) - 1
        if failed >= max_deliveries:
            poisoned.append((delivery, failed))
        else:
            keep.append(delivery)
    return keep, poisoned


_STAGE_OF = {"requests": "tokenizer", "tokenized": "engine", "generated": "detokenizer"}


def poison_notices(names: StreamNames, delivery: Delivery, failed: int) -> list[tuple[str, Message]]:
    """A RequestFailed for each request of a poisoned entry, and an abort for the engines."""
    message = delivery.message
    targets: dict[str, str] = {}  # request id -> gateway id
    if isinstance(message, (CompletionRequest, TokenizedRequest, TokenizeRequest, DetokenizeRequest)):
        targets[message.request_id] = message.gateway_id
    elif isinstance(message, EngineStepOutput):
        for delta in message.deltas:
            targets.setdefault(delta.request_id, delta.gateway_id)
    if not targets:
        return []
    kind = delivery.stream.removeprefix(names.prefix + ":").split(":")[0]
    stage = _STAGE_OF.get(kind, "consumer")
    text = (
        f"The request was dead-lettered after {failed} deliveries: each {stage} that took it "
        f"({delivery.stream} entry {delivery.entry_id}) stopped before finishing it, so it is not retried."
    )
    notices: list[tuple[str, Message]] = [
        (
            names.responses(gateway_id),
            RequestFailed(request_id=request_id, status=500, error_type="server_error", message=text),
        )
        for request_id, gateway_id in targets.items()
    ]
    if not isinstance(message, (CompletionRequest, TokenizeRequest, DetokenizeRequest)):
        # The others never reach an engine. An engine may still run this one (a stalled,
        # not dead, consumer): nobody waits for it now.
        notices.append((names.aborts, AbortRequests(request_ids=list(targets), reason="dead-lettered")))
    return notices


class WorkStreamMixin:
    """StreamTransport's work-stream upkeep: trimming by progress, backlog, poison entries."""

    # Provided by StreamTransport.
    names: StreamNames
    maxlen: int
    _redis: AsyncRedis

    def _init_work_streams(self, max_deliveries: int, trim_interval_s: float) -> None:
        self.max_deliveries = max_deliveries
        self.trim_interval_s = trim_interval_s
        self._next_trim: dict[str, float] = {}

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError  # StreamTransport's

    async def trim_by_progress(self, stream: str) -> StreamProgress:
        """Trim a work stream to what its groups still need (safe to call from anywhere)."""
        return await self._retry("XTRIM MINID", lambda: trim_by_progress(self._redis, stream))

    async def stream_progress(self, stream: str) -> StreamProgress:
        """A stream's length and each group's lag and pending entries, read only (for /metrics)."""
        return await self._retry("XINFO GROUPS", lambda: read_progress(self._redis, stream))

    async def backlog(self, streams: Iterable[str]) -> int:
        """Entries of these work streams not yet processed: group lag plus pending, summed.

        The streams are read one after the other, not at one instant: list them
        downstream first, so that work moving between them is never counted twice.
        """
        total = 0
        for stream in streams:
            total += (await self.trim_by_progress(stream)).backlog()
        return total

    async def _trim_due(self, streams: Iterable[str]) -> None:
        """Called after appending: trim each work stream at most once per interval."""
        now = time.monotonic()
        due = [s for s in streams if self.names.is_work_stream(s) and self._next_trim.get(s, 0.0) <= now]
        for stream in due:
            self._next_trim[stream] = now + self.trim_interval_s
        # Together, so an engine's publish loop waits for one trim, not one per shard.
        results = await asyncio.gather(*(self.trim_by_progress(s) for s in due), return_exceptions=True)
        for stream, result in zip(due, results):
            if isinstance(result, ResponseError):  # e.g. not a stream: the append already said so
                log.warning("could not trim %s: %s", stream, result)
            elif isinstance(result, BaseException):
                raise result

    async def drop_poisoned(self, stream: str, group: str, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """For the claim paths: dead-letter entries delivered too often, return the others.

        Each poisoned entry is parked in ``{p}:deadletter``, its requests get a
        RequestFailed (500) and an abort, and it is acknowledged, in one round trip.
        """
        if not deliveries:
            return []

        async def counts() -> dict[str, int]:
            pipe = self._redis.pipeline(transaction=False)
            for delivery in deliveries:
                pipe.xpending_range(stream, group, delivery.entry_id, delivery.entry_id, 1)
            found: dict[str, int] = {}
            for rows in await pipe.execute():
                for row in rows:
                    found[_text(row["message_id"])] = int(row["times_delivered"])
            return found

        keep, poisoned = split_poisoned(deliveries, await self._retry("XPENDING", counts), self.max_deliveries)
        if poisoned:
            await self._retry("dead-letter", lambda: self._park_poisoned(group, poisoned))
        return keep

    async def _park_poisoned(self, group: str, poisoned: Sequence[tuple[Delivery, int]]) -> None:
        # Imported here: shared.transport imports this module.
        from shared.transport import PAYLOAD_FIELD

        pipe = self._redis.pipeline(transaction=False)
        for delivery, failed in poisoned:
            log.error(
                "dead-lettering entry %s of %s: delivered %d times without being acknowledged",
                delivery.entry_id,
                delivery.stream,
                failed,
            )
            fields: dict[FieldT, EncodableT] = {
                b"stream": delivery.stream,
                b"id": delivery.entry_id,
                PAYLOAD_FIELD: encode(delivery.message),
                b"reason": "max_deliveries",
                b"group": group,
                b"deliveries": failed,
            }
            pipe.xadd(self.names.deadletter, fields, maxlen=DEADLETTER_MAXLEN, approximate=True)
            for target, notice in poison_notices(self.names, delivery, failed):
                pipe.xadd(target, {PAYLOAD_FIELD: encode(notice)}, maxlen=self.maxlen, approximate=True)
        # Acks last, as everywhere: an entry is let go only once its failure is written.
        for delivery, _ in poisoned:
            pipe.xack(delivery.stream, group, delivery.entry_id)
        await pipe.execute()
