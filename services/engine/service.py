"""The engine process: a decode loop on the main thread, Redis on an I/O thread.

The main thread runs a short loop that only touches in-memory queues,
``backend.step()`` and the request bookkeeping (requests.py), which decides
what becomes of everything the I/O thread reads; it blocks on the inbox when
there is nothing to run. SIGTERM / SIGINT stop the intake, let running requests
finish (at most ``drain_timeout_s``), publish, and exit 0. A backend failure
fails the running requests with status 500 so no client hangs, and exits non-zero.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from services.engine.contract import EngineBackend, EngineRequest, RequestOutput
from services.engine.handoff import AbortsRead, EntriesLost, GatewaysGone, InboxItem, Pulled, Wake
from services.engine.io_thread import EngineIO
from services.engine.memory import MemoryTrimmer, bound_kernel_caches
from services.engine.priority import lower_priority
from services.engine.requests import EngineRequests
from services.engine.step_outputs import Publication
from shared.runtime import configure_logging
from shared.settings import EngineSettings, load_settings, new_replica_id
from shared.transport import StreamNames, StreamTransport

log = logging.getLogger(__name__)

# How often the main thread refreshes the load figures the heartbeat reports.
LOAD_INTERVAL_S = 0.5
# How long an idle main loop blocks on the inbox before looking at its flags again.
IDLE_WAIT_S = 0.5
# A lone request's first token (FIRST_TOKEN_MAX_RUNNING requests at most) is given the cores
# before the next step starts: the step waits until the I/O thread has published it (at most
# FIRST_TOKEN_PUBLISH_WAIT_S), and until FIRST_TOKEN_HOLD_S after it was handed over, while the
# detokenizer and the gateway take it to the client. Otherwise the next step's threads hold
# both cores and every hop of the token's way back waits for one: at concurrency 1 the first
# token's way from the engine to the client took 5.2-6.7 ms before, 4.5-5.2 ms after (medians),
# for at most ~2 ms once before the second token (docs/benchmarks.md, "Pipeline overhead").
# With more requests running the whole batch would wait: no hold. 0 turns each part off.
FIRST_TOKEN_PUBLISH_WAIT_S = 0.002
FIRST_TOKEN_HOLD_S = 0.0015
FIRST_TOKEN_MAX_RUNNING = 1
# After the last step, how long the I/O thread gets to publish and close.
IO_FLUSH_TIMEOUT_S = 10.0


class EngineIOFailed(RuntimeError):
    """The I/O thread died; without it no output can be published."""


class EngineService:
    def __init__(
        self,
        settings: EngineSettings,
        backend: EngineBackend,
        transport_factory: Callable[[], StreamTransport],
        *,
        engine_id: str | None = None,
        nice: int = 0,
    ) -> None:
        """``transport_factory`` is called on the I/O thread, inside its event loop. ``nice``: how much
        to lower the priority of every thread of the process but the I/O thread (priority.py), once
        it has started; only for a process of its own."""
        self.settings = settings
        self._nice = nice
        self.engine_id = engine_id or new_replica_id("engine")
        self._backend = backend
        self._requests = EngineRequests(
            StreamNames(settings.stream_prefix), self.engine_id, settings.detokenizer_shards
        )
        self._inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self._io = EngineIO(settings, self.engine_id, transport_factory, self._inbox)
        self._stop = threading.Event()
        self._taken = 0  # pulled entries taken from the inbox since the I/O thread last heard
        self._trimmer = MemoryTrimmer()

    def request_stop(self) -> None:
        """Begin a graceful stop; safe from a signal handler or another thread."""
        self._stop.set()
        self._inbox.put(Wake())

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self._io.start()
        while not self._io.wait_ready(0.2):
            if self._io.failure is not None or self._stop.is_set():
                self._io.cancel()
                self._io.join(IO_FLUSH_TIMEOUT_S)
                return 1 if self._io.failure is not None else 0
        if self._nice:
            io_thread = self._io.thread_id
            lowered = lower_priority(self._nice, keep=[io_thread] if io_thread is not None else [])
            log.info("lowered the CPU priority of %d threads by %d (the I/O thread's kept)", len(lowered), self._nice)
        log.info("engine %s serving", self.engine_id)
        try:
            self._decode_loop()
        except Exception as exc:
            log.exception("engine failed; failing its running requests")
            self._io.close(self._requests.fail_all(f"{type(exc).__name__}: {exc}"))
            if not self._io.join(IO_FLUSH_TIMEOUT_S):
                log.error("could not publish the failures within %.0f s", IO_FLUSH_TIMEOUT_S)
                self._io.cancel()
            return 1
        self._io.close(self._requests.release_all())
        if not self._io.join(IO_FLUSH_TIMEOUT_S):
            log.error("could not publish the last outputs within %.0f s", IO_FLUSH_TIMEOUT_S)
            self._io.cancel()
            self._io.join(1.0)
            return 1
        log.info("engine %s stopped", self.engine_id)
        return 0

    def _decode_loop(self) -> None:
        backend = self._backend
        drain_deadline: float | None = None
        next_load = 0.0
        while True:
            if self._io.failure is not None:
                raise EngineIOFailed(f"the engine's I/O thread failed: {self._io.failure!r}")
            if self._stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + self.settings.drain_timeout_s
                self._requests.stop_admitting()
                self._io.stop_pulling()
                log.info("stopping: finishing running requests (at most %.0f s)", self.settings.drain_timeout_s)
            busy = backend.has_unfinished()
            if drain_deadline is not None and (not busy or time.monotonic() >= drain_deadline):
                return
            self._take_inbox(block=not busy)
            if backend.has_unfinished():
                outputs = backend.step()
                if outputs:
                    self._publish_step(self._requests.route(outputs))
            self._io.set_capacity(backend.free_slots(), self._taken)
            self._taken = 0
            owned = self._requests.owned_entries()
            if owned is not None:
                self._io.set_owned_entries(owned)
            now = time.monotonic()
            if now >= next_load:
                self._io.set_load(backend.load())
                next_load = now + LOAD_INTERVAL_S
            self._trimmer.maybe_trim()

    def _publish_step(self, publication: Publication) -> None:
        """Hand a step's outputs to the I/O thread; a lone request's first token gets a head start."""
        hold = publication.first_tokens and len(self._requests) <= FIRST_TOKEN_MAX_RUNNING
        if not hold or (FIRST_TOKEN_PUBLISH_WAIT_S <= 0 and FIRST_TOKEN_HOLD_S <= 0):
            self._io.publish(publication)
            return
        published = threading.Event()
        publication.published.append(published)
        handed_over = time.monotonic()
        self._io.publish(publication)
        if FIRST_TOKEN_PUBLISH_WAIT_S > 0:
            published.wait(FIRST_TOKEN_PUBLISH_WAIT_S)
        rest = FIRST_TOKEN_HOLD_S - (time.monotonic() - handed_over)
        if rest > 0:
            time.sleep(rest)

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        dropped = Publication()
        refused: list[RequestOutput] = []
        while True:
            if isinstance(item, Pulled):
                self._taken += len(item.deliveries)
                admission = self._requests.admit(item)
                dropped.extend(admission.dropped)
                for request in admission.requests:
                    refusal = self._add(request)
                    if refusal is not None:
                        refused.append(refusal)
            elif isinstance(item, AbortsRead):
                self._backend.abort(self._requests.aborts_read(item.request_ids))
            elif isinstance(item, GatewaysGone):
                self._backend.abort(self._requests.gateways_gone(item.gateway_ids))
            elif isinstance(item, EntriesLost):
                self._backend.abort(self._requests.entries_lost(item.entry_ids))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        if refused:
            dropped.extend(self._requests.route(refused))
        if not dropped.empty:
            self._io.publish(dropped)

    def _add(self, request: EngineRequest) -> RequestOutput | None:
        try:
            self._backend.add_request(request)
        except (ValueError, TypeError) as exc:
            # One bad request must not take the engine (and everyone's requests) down.
            log.warning("backend refused request %s: %s", request.request_id, exc)
            return RequestOutput(request.request_id, [], "error", error=f"the engine refused the request: {exc}")
        return None


def main() -> None:
    # Before the backend imports torch: its kernel caches read their capacity once, on first use.
    kernel_caches = bound_kernel_caches()
    from services.engine.backends import BackendUnavailable, create_backend

    settings = load_settings(EngineSettings)
    configure_logging(settings.log_level, settings.secrets())
    log.info("kernel caches: %s", " ".join(f"{name}={value}" for name, value in kernel_caches.items()))
    redis_url = settings.require_redis_url()
    engine_id = new_replica_id("engine")
    log.info("engine %s: building the %s backend", engine_id, settings.engine_backend)
    try:
        backend = create_backend(settings)
    except BackendUnavailable as exc:
        raise SystemExit(str(exc)) from None

    def transport_factory() -> StreamTransport:
        return StreamTransport(
            redis_url,
            settings.stream_prefix,
            engine_id,
            maxlen=settings.stream_maxlen,
            max_deliveries=settings.max_deliveries,
        )

    service = EngineService(settings, backend, transport_factory, engine_id=engine_id, nice=settings.engine_nice)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.exit(service.run())


if __name__ == "__main__":
    main()
