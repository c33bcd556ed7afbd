"""The gateway's side of the Redis streams: one reader, one batching writer, a heartbeat.

- The reader is the only consumer of ``{p}:responses:{gateway_id}`` (plain
  XREAD) and hands each message to the RequestRegistry.
- The writer coalesces what concurrent HTTP handlers publish (requests,
  aborts) into one pipelined ``transport.publish`` per loop turn, so a burst
  of N requests costs one Redis round trip, not N.
- The heartbeat announces the gateway. Once it expires, engines abort the
  gateway's requests and delete its responses stream (shared/failover.py);
  the EXPIRE each beat renews on the stream is the backstop if none does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from services.gateway.registry import RequestRegistry
from shared.messages import (
    AbortRequests,
    CompletionRequest,
    DetokenizeRequest,
    Heartbeat,
    Message,
    RequestFailed,
    TokenizeRequest,
)
from shared.transport import StreamTransport

log = logging.getLogger(__name__)

RESPONSES_TTL_S = 3600
_STOP = object()  # tells the writer to finish what is queued and exit
_Item = tuple[str, Message, "asyncio.Future[None] | None"]


def merge_aborts(messages: Sequence[tuple[str, Message]]) -> list[tuple[str, Message]]:
    """Fold all AbortRequests to the same stream with the same reason into one message.

    Engines read aborts as a broadcast, so fewer, larger entries are cheaper for all of them.
    """
    merged: list[tuple[str, Message]] = []
    aborts: dict[tuple[str, str], AbortRequests] = {}
    for stream, message in messages:
        if isinstance(message, AbortRequests):
            key = (stream, message.reason)
            if key in aborts:
                aborts[key].request_ids.extend(message.request_ids)
                continue
            message = AbortRequests(request_ids=list(message.request_ids), reason=message.reason)
            aborts[key] = message
        merged.append((stream, message))
    return merged


class BatchingWriter:
    def __init__(self, transport: StreamTransport, *, max_batch: int = 512) -> None:
        self._transport = transport
        self._queue: asyncio.Queue[_Item | object] = asyncio.Queue()
        self._max_batch = max_batch
        self.batches = 0  # publish calls made; observable coalescing

    def send(self, stream: str, message: Message) -> asyncio.Future[None]:
        """Queue a message; the future completes once it is in Redis."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((stream, message, future))
        return future

    def send_nowait(self, stream: str, message: Message) -> None:
        """Queue a message nobody waits for (safe to call from a cancelled handler)."""
        self._queue.put_nowait((stream, message, None))

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            # Let handlers that are already runnable add their messages to this batch.
            await asyncio.sleep(0)
            batch: list[_Item] = [first]  # type: ignore[list-item]
            stop = False
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            await self._publish(batch)
            if stop:
                return

    async def _publish(self, batch: list[_Item]) -> None:
        futures = [future for _, _, future in batch if future is not None]
        try:
            await self._transport.publish(merge_aborts([(stream, message) for stream, message, _ in batch]))
            self.batches += 1
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            if len(batch) > 1:
                # The transport retries lost connections itself, so this is one bad message
                # (say, one that cannot be encoded): publish each alone, and only its sender fails.
                for item in batch:
                    await self._publish([item])
                return
            log.exception("publishing %d messages failed", len(batch))
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future in futures:
            if not future.done():
                future.set_result(None)

    def stop(self) -> None:
        self._queue.put_nowait(_STOP)


async def cancel_and_wait(tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Cancel tasks and wait for them to end, cancelling again while they linger.

    Python 3.11's asyncio.wait_for (used inside redis-py) can swallow a
    cancellation that lands just as the awaited operation completes; a task
    hit that way carries on, so one cancel() is not enough to stop it.
    """
    pending = {task for task in tasks if not task.done()}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.warning("tasks did not stop in time: %s", ", ".join(t.get_name() for t in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(0.1, remaining))


class PipelineClient:
    """Owns the gateway's background tasks; handlers call submit() and abort()."""

    def __init__(
        self,
        transport: StreamTransport,
        gateway_id: str,
        registry: RequestRegistry,
        *,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float | None = None,
        read_count: int = 1024,
        block_ms: int = 1000,
    ) -> None:
        self.transport = transport
        self.names = transport.names
        self.gateway_id = gateway_id
        self.registry = registry
        self.responses_stream = self.names.responses(gateway_id)
        self.writer = BatchingWriter(transport)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_ttl_s = 4 * heartbeat_interval_s if heartbeat_ttl_s is None else heartbeat_ttl_s
        self._read_count = read_count
        self._block_ms = block_ms
        self._tasks: list[asyncio.Task[None]] = []
        self._writer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Start after the stream's newest entry: anything older belongs to an
        # earlier life of this id, and no request of ours exists yet.
        last_id = await self.transport.last_entry_id(self.responses_stream)
        self._writer_task = asyncio.create_task(self.writer.run(), name="gateway-writer")
        self._tasks = [
            asyncio.create_task(self._read_loop(last_id), name="gateway-reader"),
            asyncio.create_task(self._heartbeat_loop(), name="gateway-heartbeat"),
        ]

    def submit(self, request: CompletionRequest | TokenizeRequest | DetokenizeRequest) -> asyncio.Future[None]:
        """Queue a request for the tokenizers; the future completes once it is in Redis."""
        return self.writer.send(self.names.requests, request)

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        if request_ids:
            self.writer.send_nowait(self.names.aborts, AbortRequests(request_ids=request_ids, reason=reason))

    async def _read_loop(self, last_id: str) -> None:
        while True:
            try:
                last_id, deliveries = await self.transport.read_stream(
                    self.responses_stream, last_id, count=self._read_count, block_ms=self._block_ms
                )
                for delivery in deliveries:
                    self.registry.dispatch(delivery.message)
                if deliveries:
                    # Let the handlers just woken write to their clients before the next read is
                    # sent: issuing it (redis-py, a send to Redis) first would delay every
                    # dispatched event by its cost (docs/benchmarks.md, "Pipeline overhead").
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reader must outlive any one bad read
                log.exception("reading %s failed; retrying", self.responses_stream)
                await asyncio.sleep(0.5)

    async def _heartbeat_loop(self) -> None:
        first = True
        while True:
            try:
                beat = Heartbeat(
                    role="gateway", replica_id=self.gateway_id, time=time.time(), running=len(self.registry)
                )
                outcome = await self.transport.beat(beat, ttl_s=self._heartbeat_ttl_s)
                if outcome.reaped:
                    self._fail_after_reaping()
                elif not outcome.renewed and not first:
                    log.warning("this gateway's heartbeat lapsed, but no engine acted on it: requests continue")
                first = False
                # EXPIRE is a no-op until the stream exists; refreshing it on
                # every beat keeps a live gateway's stream alive indefinitely.
                await self.transport.expire(self.responses_stream, RESPONSES_TTL_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
            await asyncio.sleep(self._heartbeat_interval_s)

    def _fail_after_reaping(self) -> None:
        """Our heartbeat expired (a stall of this process, or of Redis) and an engine took this
        gateway for gone: it aborted its requests and deleted its response stream, so none of
        the requests in flight would ever end."""
        failed = self.registry.fail_all(
            lambda request_id: RequestFailed(
                request_id=request_id,
                status=503,
                error_type="server_error",
                message="The gateway lost contact with the pipeline; retry the request.",
            )
        )
        log.error("an engine took this gateway for gone; %d requests in flight end with 503", len(failed))
        self.abort(failed, reason="gateway heartbeat lapsed")

    def fail_in_flight(self) -> None:
        """Refuse new requests; end waiting ones with a 503 and abort them in the engines."""
        failed = self.registry.close(
            lambda request_id: RequestFailed(
                request_id=request_id,
                status=503,
                error_type="server_error",
                message="The gateway is shutting down; retry the request.",
            )
        )
        self.abort(failed, reason="gateway shutdown")

    async def stop(self, grace_s: float = 2.0) -> None:
        """End waiting requests, flush what is queued for Redis, and stop the tasks."""
        self.fail_in_flight()
        if self._writer_task is not None:
            self.writer.stop()
            done, _ = await asyncio.wait({self._writer_task}, timeout=grace_s)
            if not done:
                log.warning("could not flush pending messages to Redis before shutdown")
            await cancel_and_wait([self._writer_task], grace_s)
        await cancel_and_wait(self._tasks, grace_s)
        self._tasks = []
        try:
            await asyncio.wait_for(self._final_cleanup(), grace_s)
        except (TimeoutError, Exception):  # noqa: BLE001 - shutting down regardless
            log.warning("could not set the expiry of %s before shutdown", self.responses_stream)

    async def _final_cleanup(self) -> None:
        await self.transport.expire(self.responses_stream, RESPONSES_TTL_S)
        await self.transport.delete(self.names.heartbeat("gateway", self.gateway_id))
