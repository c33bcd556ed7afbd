"""The requests this engine holds, and every decision about them: main thread, no I/O.

The I/O thread passes on what it read (handoff.py); ``EngineRequests`` decides
what becomes of it, in one place per request's life:

- which pulled or claimed entries run here. Not a second copy of a request
  running here: the running copy answers for both (its own entry claimed back
  stays pending, another entry is acknowledged). Not one past its deadline,
  aborted, or from a gateway that is gone: acknowledged unrun, nobody waits for
  it. While draining, none: they stay pending for another engine.
- which running requests stop: aborted by a client (remembered, so a copy
  pulled later never runs), from a gateway that is gone, or taken over by
  another engine (forgotten unacknowledged: the entry is that engine's now).
- what each step publishes (OutputRouter), and the last words after a drain or
  a crash.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.engine.contract import EngineRequest, RequestOutput
from services.engine.handoff import Pulled
from services.engine.step_outputs import OutputRouter, Publication
from shared.messages import TokenizedRequest
from shared.transport import Ack, StreamNames

log = logging.getLogger(__name__)

# Abort ids remembered so that a request aborted before it was pulled never runs.
RECENT_ABORTS = 10_000


@dataclass(slots=True)
class Admission:
    """What to do with one batch of pulled entries."""

    requests: list[EngineRequest] = field(default_factory=list)  # for the backend
    dropped: Publication = field(default_factory=Publication)  # acknowledgements of entries not run


class EngineRequests:
    def __init__(
        self, names: StreamNames, engine_id: str, shards: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock``: wall time, to compare with request deadlines."""
        self._names = names
        self._router = OutputRouter(names, engine_id, shards, clock=clock)
        self._clock = clock
        self._recent_aborts: OrderedDict[str, None] = OrderedDict()
        self._gone_gateways: frozenset[str] = frozenset()
        self._admitting = True
        self._entries_seen = -1  # the router's ``changes`` when owned_entries last answered

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._router

    def __len__(self) -> int:
        return len(self._router)

    def admit(self, pulled: Pulled) -> Admission:
        admission = Admission()
        if not self._admitting:
            return admission
        now = self._clock()
        own_entries = set(self._router.pending_entry_ids())
        for delivery in pulled.deliveries:
            message = delivery.message
            ack = Ack(delivery.stream, self._names.engine_group, delivery.entry_id)
            if not isinstance(message, TokenizedRequest):
                log.error("dropping a %s found on the tokenized stream", type(message).__name__)
                admission.dropped.acks.append(ack)
            elif message.request_id in self._router:
                if delivery.entry_id not in own_entries:
                    admission.dropped.acks.append(ack)
            elif (
                message.deadline <= now
                or message.request_id in self._recent_aborts
                or message.gateway_id in self._gone_gateways
            ):
                admission.dropped.acks.append(ack)
            else:
                done = pulled.done_tokens.get(message.request_id, [])
                self._router.track(message, delivery.entry_id, done, pulled_at=now)
                own_entries.add(delivery.entry_id)
                admission.requests.append(
                    EngineRequest(message.request_id, list(message.prompt_token_ids), message.sampling, done)
                )
        resumed = [request.output_token_ids for request in admission.requests if request.output_token_ids]
        if resumed:
            log.info(
                "resuming %d taken-over requests after their %d published output tokens",
                len(resumed),
                sum(map(len, resumed)),
            )
        return admission

    def stop_admitting(self) -> None:
        """Draining: entries pulled from now on stay pending, for another engine."""
        self._admitting = False

    def aborts_read(self, request_ids: Iterable[str]) -> list[str]:
        """Aborts from the aborts stream: the ones running here, to stop in the backend."""
        ours: list[str] = []
        for request_id in request_ids:
            self._remember_abort(request_id)
            if request_id in self._router:
                ours.append(request_id)
        return ours

    def gateways_gone(self, gateway_ids: frozenset[str]) -> list[str]:
        """The gateways gone now: the running requests of those newly gone, to stop in the backend."""
        newly = gateway_ids - self._gone_gateways
        self._gone_gateways = gateway_ids
        doomed = self._router.requests_of_gateways(newly)
        if doomed:
            log.warning("aborting %d requests of gone gateways", len(doomed))
        for request_id in doomed:
            self._remember_abort(request_id)
        return doomed

    def entries_lost(self, entry_ids: Iterable[str]) -> list[str]:
        """Entries another engine took: their requests, forgotten unacknowledged, to stop in the backend.
        Not remembered as aborted: that engine may hand them back by dying too."""
        lost = self._router.requests_of_entries(set(entry_ids))
        if lost:
            log.warning(
                "%d requests are no longer this engine's (another engine took them over): dropping them unpublished",
                len(lost),
            )
            self._router.forget(lost)
        return lost

    def route(self, outputs: list[RequestOutput]) -> Publication:
        return self._router.route(outputs)

    def owned_entries(self) -> list[str] | None:
        """The entries of the requests held here (to keep fresh), if they changed since the last call."""
        if self._router.changes == self._entries_seen:
            return None
        self._entries_seen = self._router.changes
        return self._router.pending_entry_ids()

    def fail_all(self, reason: str) -> Publication:
        """The backend failed: every request held here ends with a 500 the client sees."""
        return self._router.fail(
            self._router.request_ids(),
            status=500,
            error_type="server_error",
            message=f"the engine failed while running this request: {reason}",
        )

    def release_all(self) -> Publication:
        """After a drain: what another engine can still run from the start is left pending for it.
        A request whose output has begun cannot move unnoticed, so it ends with a 503."""
        started = self._router.started_ids()
        if started:
            log.warning("drain timeout: %d requests still running are failed", len(started))
        publication = self._router.fail(
            started,
            status=503,
            error_type="server_error",
            message="the engine shut down before the request finished; retry it",
        )
        self._router.forget(self._router.request_ids())
        return publication

    def _remember_abort(self, request_id: str) -> None:
        self._recent_aborts[request_id] = None
        if len(self._recent_aborts) > RECENT_ABORTS:
            self._recent_aborts.popitem(last=False)
