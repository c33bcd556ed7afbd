"""The engine's I/O thread: every Redis operation, on its own asyncio loop, and nothing else.

It reads and publishes; what to make of what it reads is decided on the main
thread (requests.py), which never waits on Redis. The two meet only in memory:

- I/O -> main: the inbox (handoff.py): entries pulled or claimed, aborts read,
  gone gateways, entries another engine took;
- main -> I/O: ``publish`` (each step's Publication, handed to the loop
  thread-safely), ``set_capacity`` (the PullBudget), ``set_load`` and
  ``set_owned_entries`` (snapshots for the heartbeat and the touch), and
  ``stop_pulling``, ``close``, ``cancel``.

Failover's Redis side (claims, the gateway census, touching) is failover.py;
publishing fenced by entry ownership is ownership.py.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from services.engine.contract import EngineLoad
from services.engine.failover import EngineFailover
from services.engine.handoff import AbortsRead, EntriesLost, GatewaysGone, InboxItem, PullBudget, Pulled, Wake
from services.engine.ownership import OwnedPublisher
from services.engine.step_outputs import Publication
from shared.messages import AbortRequests, Heartbeat
from shared.settings import EngineSettings
from shared.transport import Delivery, StreamTransport

log = logging.getLogger(__name__)

# XREADGROUP / XREAD block this long, so stop flags are noticed this often.
READ_BLOCK_MS = 500


@dataclass(frozen=True, slots=True)
class _Last:
    """The last outbox item: published, then the thread ends."""

    publication: Publication


class EngineIO:
    def __init__(
        self,
        settings: EngineSettings,
        engine_id: str,
        transport_factory: Callable[[], StreamTransport],
        inbox: queue.SimpleQueue[InboxItem],
    ) -> None:
        self._settings = settings
        self._engine_id = engine_id
        self._transport_factory = transport_factory
        self._inbox = inbox
        self._budget = PullBudget()
        self._lock = threading.Lock()  # guards the snapshots below
        self._load = EngineLoad()
        self._owned_entries: list[str] = []
        self._closing = False  # set on the I/O thread when its loops must end
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._outbox: asyncio.Queue[Publication | _Last] = asyncio.Queue()
        self._capacity_changed = asyncio.Event()
        self._main_task = self._loop.create_task(self._main())
        self._thread = threading.Thread(target=self._run_thread, name="engine-io", daemon=True)

    # -- called from the main thread ------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        """The I/O thread's native id, once started."""
        return self._thread.native_id

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def set_capacity(self, free_slots: int, taken: int) -> None:
        """The backend's free slots, and how many pulled entries the main thread took since the last call."""
        if self._budget.update(free_slots, taken):
            self._call_soon(self._capacity_changed.set)

    def set_load(self, load: EngineLoad) -> None:
        with self._lock:
            self._load = load

    def set_owned_entries(self, entry_ids: list[str]) -> None:
        """The entries of the requests held now: kept fresh so that nobody claims them."""
        with self._lock:
            self._owned_entries = entry_ids

    def publish(self, publication: Publication) -> None:
        self._call_soon(self._outbox.put_nowait, publication)

    def stop_pulling(self) -> None:
        self._budget.close()
        self._call_soon(self._capacity_changed.set)

    def close(self, last: Publication) -> None:
        """Publish what is queued and ``last``, then end the thread."""
        self._call_soon(self._outbox.put_nowait, _Last(last))

    def cancel(self) -> None:
        """End the thread without publishing anything more."""
        self._call_soon(self._main_task.cancel)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop has ended (I/O failure); the main loop sees ``failure``

    # -- the thread ------------------------------------------------------------

    def _run_thread(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main_task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread, which exits non-zero
            log.exception("engine I/O thread failed")
            self._failure = exc
        finally:
            self._close_loop()
            self._inbox.put(Wake())

    def _close_loop(self) -> None:
        """Like asyncio.run's exit: end tasks left by libraries, then close."""
        leftovers = asyncio.all_tasks(self._loop)
        for task in leftovers:
            task.cancel()
        try:
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        transport = self._transport_factory()
        names = transport.names
        owned = OwnedPublisher(transport, on_lost=lambda entry_ids: self._inbox.put(EntriesLost(entry_ids)))

        async def claimed(deliveries: list[Delivery]) -> None:
            # Counted before the checkpoint read, so that no other read uses the room meanwhile.
            self._budget.count_read(len(deliveries))
            self._inbox.put(Pulled(deliveries, await owned.done_tokens(deliveries)))

        async def touch() -> None:
            with self._lock:
                entry_ids = self._owned_entries
            await owned.touch(entry_ids)

        failover = EngineFailover(
            self._settings,
            transport,
            room=self._budget.room,
            claimed=claimed,
            gateways_gone=lambda gateway_ids: self._inbox.put(GatewaysGone(gateway_ids)),
            touch=touch,
        )
        try:
            await transport.ensure_group(names.tokenized, names.engine_group)
            aborts_from = await transport.last_entry_id(names.aborts)
            await self._beat(transport, failover)
            self._ready.set()
            background = [
                self._spawn(self._pull_loop(transport)),
                self._spawn(self._abort_loop(transport, aborts_from)),
                self._spawn(failover.touch_loop(self._is_closing)),
                self._spawn(self._heartbeat_loop(transport, failover)),
                self._spawn(failover.watch_loop(self._is_closing)),
            ]
            try:
                await self._publish_loop(owned)
            finally:
                # The flag ends a loop even if a library swallowed its cancellation.
                self._closing = True
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
            await transport.delete(names.heartbeat("engine", self._engine_id))
        finally:
            await transport.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        task.add_done_callback(self._on_background_done)
        return task

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("engine I/O task failed", exc_info=task.exception())
        self._failure = task.exception()
        self._inbox.put(Wake())

    def _is_closing(self) -> bool:
        return self._closing

    # -- reading ---------------------------------------------------------------

    async def _pull_loop(self, transport: StreamTransport) -> None:
        """New work from the tokenized stream, as much as the budget has room for."""
        stream, group = transport.names.tokenized, transport.names.engine_group
        while not self._closing:
            room = self._budget.room()
            if room <= 0:
                self._capacity_changed.clear()
                if self._budget.room() <= 0:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                    # cancellation that coincides with the event being set.
                    try:
                        async with asyncio.timeout(1.0):
                            await self._capacity_changed.wait()
                    except TimeoutError:
                        pass
                continue
            deliveries = await transport.read_group([stream], group, count=room, block_ms=READ_BLOCK_MS)
            if deliveries:
                self._budget.count_read(len(deliveries))
                self._inbox.put(Pulled(deliveries))

    async def _abort_loop(self, transport: StreamTransport, last_id: str) -> None:
        while not self._closing:
            last_id, deliveries = await transport.read_stream(
                transport.names.aborts, last_id, count=1000, block_ms=READ_BLOCK_MS
            )
            request_ids = [
                request_id
                for delivery in deliveries
                if isinstance(delivery.message, AbortRequests)
                for request_id in delivery.message.request_ids
            ]
            if request_ids:
                self._inbox.put(AbortsRead(request_ids))

    # -- publishing ------------------------------------------------------------

    async def _heartbeat_loop(self, transport: StreamTransport, failover: EngineFailover) -> None:
        while not self._closing:
            await asyncio.sleep(self._settings.heartbeat_interval_s)
            await self._beat(transport, failover)

    async def _beat(self, transport: StreamTransport, failover: EngineFailover) -> None:
        with self._lock:
            load = self._load
        heartbeat = Heartbeat(
            role="engine",
            replica_id=self._engine_id,
            time=time.time(),
            running=load.running,
            waiting=load.waiting,
            kv_usage=load.kv_usage,
            forward_share=load.forward_share,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
            preemptions=load.preemptions,
            queue_time_counts=list(load.queue_time.counts),
            queue_time_sum=load.queue_time.total,
            kernels=load.kernels or None,
        )
        outcome = await transport.beat(heartbeat, ttl_s=self._settings.heartbeat_ttl_s)
        failover.pulse.record(outcome.renewed, time.monotonic())

    async def _publish_loop(self, owned: OwnedPublisher) -> None:
        """Publish in order; a backlog of steps goes out in one round trip."""
        while True:
            items = [await self._outbox.get()]
            while not self._outbox.empty():
                items.append(self._outbox.get_nowait())
            publication = Publication()
            last = False
            for item in items:
                if isinstance(item, _Last):
                    publication.extend(item.publication)
                    last = True
                    break  # nothing is queued after it
                publication.extend(item)
            await owned.publish(publication)
            for event in publication.published:
                event.set()
            if last:
                return
