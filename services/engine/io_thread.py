"""The engine's I/O thread: every Redis operation, on its own asyncio loop.

The decode loop (main thread) never waits on Redis. It talks to this thread
only through in-memory structures:

- main -> I/O: ``set_capacity`` / ``set_load`` (values under a lock),
  ``send_outputs`` (each step's outputs, handed to the loop thread-safely),
  ``stop_pulling``, ``finish``, ``crash``, ``cancel``;
- I/O -> main: the ``inbox`` queue of ``NewRequest`` / ``AbortIds`` / ``Wake``.

All request bookkeeping (``OutputRouter``) lives on this thread, and so does
failover (failover.py: taking over a gone engine's requests, aborting those of
a gone gateway) and publishing fenced by entry ownership (ownership.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.engine.contract import EngineLoad, EngineRequest, RequestOutput
from services.engine.failover import EngineFailover
from services.engine.ownership import OwnedPublisher
from services.engine.step_outputs import OutputRouter, Publication
from shared.messages import AbortRequests, Heartbeat, TokenizedRequest
from shared.settings import EngineSettings
from shared.transport import Ack, Delivery, StreamTransport

log = logging.getLogger(__name__)

# XREADGROUP / XREAD block this long, so stop flags are noticed this often.
READ_BLOCK_MS = 500
# Abort ids remembered so that a request aborted before it was pulled never runs.
RECENT_ABORTS = 10_000


@dataclass(frozen=True, slots=True)
class NewRequest:
    request: EngineRequest


@dataclass(frozen=True, slots=True)
class AbortIds:
    request_ids: list[str]


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: makes a main loop blocked on the inbox look at its flags."""


InboxItem = NewRequest | AbortIds | Wake


@dataclass(frozen=True, slots=True)
class _End:
    """The last outbox item: after drain (``drained``) or a backend crash."""

    kind: Literal["drained", "crashed"]
    reason: str = ""


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
        self._transport: StreamTransport | None = None
        self._router: OutputRouter | None = None
        self._failover: EngineFailover | None = None
        self._owned: OwnedPublisher | None = None
        self._lock = threading.Lock()
        self._free_slots = 0
        self._admitted = 0  # requests the main thread has taken from the inbox
        self._pulled = 0  # requests this thread has put on the inbox
        self._load = EngineLoad()
        self._pulling = True
        self._closing = False  # set on the I/O thread when its loops must end
        self._recent_aborts: OrderedDict[str, None] = OrderedDict()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._outbox: asyncio.Queue[list[RequestOutput] | _End] = asyncio.Queue()
        self._capacity_changed = asyncio.Event()
        self._main_task = self._loop.create_task(self._main())
        self._thread = threading.Thread(target=self._run_thread, name="engine-io", daemon=True)

    # -- called from the main thread ------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def set_capacity(self, free_slots: int, admitted: int) -> None:
        with self._lock:
            changed = free_slots != self._free_slots or admitted != self._admitted
            self._free_slots, self._admitted = free_slots, admitted
        if changed:
            self._call_soon(self._capacity_changed.set)

    def set_load(self, load: EngineLoad) -> None:
        with self._lock:
            self._load = load

    def send_outputs(self, outputs: list[RequestOutput]) -> None:
        self._call_soon(self._outbox.put_nowait, outputs)

    def stop_pulling(self) -> None:
        with self._lock:
            self._pulling = False
        self._call_soon(self._capacity_changed.set)

    def finish(self) -> None:
        """After draining: publish what is left, then end the thread."""
        self._call_soon(self._outbox.put_nowait, _End("drained"))

    def crash(self, reason: str) -> None:
        """The backend failed: fail every tracked request (500), then end the thread."""
        self._call_soon(self._outbox.put_nowait, _End("crashed", reason))

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

    def _room(self) -> int:
        """Requests to pull now: free slots minus those already on their way."""
        with self._lock:
            if not self._pulling:
                return 0
            return self._free_slots - (self._pulled - self._admitted)

    async def _main(self) -> None:
        transport = self._transport = self._transport_factory()
        names = transport.names
        router = self._router = OutputRouter(names, self._engine_id, self._settings.detokenizer_shards)
        owned = self._owned = OwnedPublisher(transport, router, on_lost=self._abort_lost)
        failover = self._failover = EngineFailover(
            self._settings,
            transport,
            router,
            room=self._room,
            intake=self._intake_claimed,
            abort=self._abort_gone,
            touch=owned.touch,
        )
        try:
            await transport.ensure_group(names.tokenized, names.engine_group)
            aborts_from = await transport.last_entry_id(names.aborts)
            await self._beat()
            self._ready.set()
            background = [
                self._spawn(self._pull_loop()),
                self._spawn(self._abort_loop(aborts_from)),
                self._spawn(failover.touch_loop(self._is_closing)),
                self._spawn(self._heartbeat_loop()),
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

    # -- intake: new work from the tokenized stream --------------------------

    async def _pull_loop(self) -> None:
        transport = self._require_transport()
        stream = transport.names.tokenized
        while not self._closing:
            room = self._room()
            if room <= 0:
                self._capacity_changed.clear()
                if self._room() <= 0:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                    # cancellation that coincides with the event being set.
                    try:
                        async with asyncio.timeout(1.0):
                            await self._capacity_changed.wait()
                    except TimeoutError:
                        pass
                continue
            deliveries = await transport.read_group(
                [stream], transport.names.engine_group, count=room, block_ms=READ_BLOCK_MS
            )
            await self._intake(deliveries)

    async def _intake_claimed(self, deliveries: Sequence[Delivery]) -> None:
        """Entries taken over from another engine: continue after the output it published."""
        owned = self._owned
        await self._intake(deliveries, await owned.done_tokens(deliveries) if owned is not None else {})

    async def _intake(self, deliveries: Sequence[Delivery], done: dict[str, list[int]] | None = None) -> None:
        router, transport = self._require_router(), self._require_transport()
        now = time.time()
        drop: list[Ack] = []
        for delivery in deliveries:
            message = delivery.message
            ack = Ack(delivery.stream, transport.names.engine_group, delivery.entry_id)
            if not isinstance(message, TokenizedRequest):
                log.error("dropping a %s found on the tokenized stream", type(message).__name__)
                drop.append(ack)
            elif message.request_id in router:
                # Our own entry claimed back, or a duplicate publish of a request
                # already running here: the running copy answers for both.
                if delivery.entry_id not in router.pending_entry_ids():
                    drop.append(ack)
            elif (
                message.deadline <= now
                or message.request_id in self._recent_aborts
                or (self._failover is not None and self._failover.gateway_gone(message.gateway_id))
            ):
                drop.append(ack)  # nobody waits for the answer any more
            else:
                outputs = (done or {}).get(message.request_id, [])
                router.track(message, delivery.entry_id, outputs)
                self._pulled += 1
                request = EngineRequest(message.request_id, list(message.prompt_token_ids), message.sampling, outputs)
                self._inbox.put(NewRequest(request))
        if drop:
            await transport.ack(drop)

    # -- aborts, keep-alive, heartbeats --------------------------------------

    async def _abort_loop(self, last_id: str) -> None:
        transport, router = self._require_transport(), self._require_router()
        while not self._closing:
            last_id, deliveries = await transport.read_stream(
                transport.names.aborts, last_id, count=1000, block_ms=READ_BLOCK_MS
            )
            ours: list[str] = []
            for delivery in deliveries:
                if not isinstance(delivery.message, AbortRequests):
                    continue
                for request_id in delivery.message.request_ids:
                    self._remember_abort(request_id)
                    if request_id in router:
                        ours.append(request_id)
            if ours:
                self._inbox.put(AbortIds(ours))

    def _abort_gone(self, request_ids: list[str]) -> None:
        """Abort requests whose gateway is gone; a copy of one pulled later never runs."""
        for request_id in request_ids:
            self._remember_abort(request_id)
        self._inbox.put(AbortIds(request_ids))

    def _abort_lost(self, request_ids: list[str]) -> None:
        """Stop running requests another engine owns now (not remembered: it may hand them back)."""
        self._inbox.put(AbortIds(request_ids))

    def _is_closing(self) -> bool:
        return self._closing

    def _remember_abort(self, request_id: str) -> None:
        self._recent_aborts[request_id] = None
        if len(self._recent_aborts) > RECENT_ABORTS:
            self._recent_aborts.popitem(last=False)

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._settings.heartbeat_interval_s)
            await self._beat()

    async def _beat(self) -> None:
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
        )
        alive = await self._require_transport().beat(heartbeat, ttl_s=self._settings.heartbeat_ttl_s)
        if self._failover is not None:
            self._failover.pulse.record(alive, time.monotonic())

    # -- output ---------------------------------------------------------------

    async def _publish_loop(self, owned: OwnedPublisher) -> None:
        """Publish steps in order; a backlog of steps goes out in one round trip."""
        router = self._require_router()
        while True:
            items = [await self._outbox.get()]
            while not self._outbox.empty():
                items.append(self._outbox.get_nowait())
            publication = Publication()
            end: _End | None = None
            for item in items:
                if isinstance(item, _End):
                    end = item
                    break
                publication.extend(router.route(item))
            if end is not None:
                publication.extend(self._last_words(end))
            await owned.publish(publication)
            if end is not None:
                return

    def _last_words(self, end: _End) -> Publication:
        router = self._require_router()
        if end.kind == "crashed":
            return router.fail(
                router.request_ids(),
                status=500,
                error_type="server_error",
                message=f"the engine failed while running this request: {end.reason}",
            )
        # Drained: a request whose output has begun cannot move to another engine
        # unnoticed, so it ends with an error; the others stay pending for a replica.
        started = router.started_ids()
        if started:
            log.warning("drain timeout: %d requests still running are failed", len(started))
        publication = router.fail(
            started,
            status=503,
            error_type="server_error",
            message="the engine shut down before the request finished; retry it",
        )
        router.forget(router.request_ids())
        return publication

    def _require_transport(self) -> StreamTransport:
        if self._transport is None:
            raise RuntimeError("the engine I/O loop has not started")
        return self._transport

    def _require_router(self) -> OutputRouter:
        if self._router is None:
            raise RuntimeError("the engine I/O loop has not started")
        return self._router
