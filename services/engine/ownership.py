"""Publishing only what this engine still owns, and resuming what it takes over (I/O thread).

A request belongs to the engine that has its tokenized-stream entry pending. Two
engines can both be running one request: one that stalled past its heartbeat TTL
(taken for dead, not dead) and the survivor that claimed its entry. With random
sampling their tokens differ, so both publishing would mix two continuations.
``OwnedPublisher.publish`` therefore writes a step's outputs only while every
request in it is still this engine's (``StreamTransport.publish_owned``, one
atomic script); a request that is not is dropped here (``on_lost``: aborted in
the backend, forgotten by the router, not acknowledged) and the rest is published.

What was published is checkpointed in the same script, so an engine that claims
a request reads its output tokens (``done_tokens``) and continues after them
(docs/architecture.md, "Engine takeover").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from services.engine.step_outputs import OutputRouter, Publication
from shared.messages import TokenizedRequest
from shared.transport import Delivery, StreamTransport

log = logging.getLogger(__name__)


class OwnedPublisher:
    def __init__(
        self, transport: StreamTransport, router: OutputRouter, *, on_lost: Callable[[list[str]], None]
    ) -> None:
        """``on_lost``: stop running these requests (another engine owns them now)."""
        self._transport = transport
        self._router = router
        self._on_lost = on_lost

    async def publish(self, publication: Publication) -> None:
        transport, stream = self._transport, self._transport.names.tokenized
        while publication.messages or publication.checkpoints or publication.acks:
            lost = await transport.publish_owned(
                stream,
                transport.names.engine_group,
                publication.messages,
                owned=sorted(set(publication.entries.values())),
                checkpoints=publication.checkpoints,
                acks=publication.acks,
            )
            if not lost:
                return
            # Each round drops at least one request, so this ends.
            lost_ids = publication.requests_of(set(lost))
            self._let_go(lost_ids, "publishing")
            publication = publication.without(set(lost_ids))

    async def touch(self) -> None:
        """Keep our entries from looking idle (XAUTOCLAIM); let go of those another engine took."""
        lost = await self._transport.touch_owned(
            self._transport.names.tokenized, self._transport.names.engine_group, self._router.pending_entry_ids()
        )
        if lost:
            self._let_go(self._router.requests_of_entries(set(lost)), "keeping entries fresh")

    async def done_tokens(self, deliveries: Sequence[Delivery]) -> dict[str, list[int]]:
        """For claimed entries: the output tokens already published for each request (one MGET)."""
        request_ids = [
            d.message.request_id
            for d in deliveries
            if isinstance(d.message, TokenizedRequest) and d.message.request_id not in self._router
        ]
        found = await self._transport.read_output_checkpoints(request_ids)
        done = {request_id: tokens for request_id, tokens in zip(request_ids, found) if tokens}
        if done:
            log.info(
                "resuming %d taken-over requests after their %d published output tokens",
                len(done),
                sum(len(tokens) for tokens in done.values()),
            )
        return done

    def _let_go(self, request_ids: list[str], during: str) -> None:
        if not request_ids:
            return
        log.warning(
            "%d requests are no longer this engine's (found while %s; another engine took them over): "
            "dropping them without publishing",
            len(request_ids),
            during,
        )
        self._router.forget(request_ids)
        self._on_lost(request_ids)
