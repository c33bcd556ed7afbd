"""Publishing only what this engine still owns, and resuming what it takes over (I/O thread).

A request belongs to the engine that has its tokenized-stream entry pending. Two
engines can both be running one request: one that stalled past its heartbeat TTL
(taken for dead, not dead) and the survivor that claimed its entry. With random
sampling their tokens differ, so both publishing would mix two continuations.
``OwnedPublisher.publish`` therefore writes a step's outputs only while every
request in it is still this engine's (``StreamTransport.publish_owned``, one
atomic script); what is not is left out and reported (``on_lost``: the main
thread stops those requests and forgets them unacknowledged), and the rest is published.

What was published is checkpointed in the same script, so an engine that claims
a request reads its output tokens (``done_tokens``) and continues after them
(docs/architecture.md, "Engine takeover").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.engine.step_outputs import Publication
from shared.messages import TokenizedRequest
from shared.transport import Delivery, StreamTransport


class OwnedPublisher:
    def __init__(self, transport: StreamTransport, *, on_lost: Callable[[list[str]], None]) -> None:
        """``on_lost``: these tokenized-stream entries are another engine's now."""
        self._transport = transport
        self._on_lost = on_lost

    async def publish(self, publication: Publication) -> None:
        transport, stream = self._transport, self._transport.names.tokenized
        while not publication.empty:
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
            self._on_lost(lost)
            # Each round leaves out at least one request, so this ends.
            publication = publication.without(set(publication.requests_of(set(lost))))

    async def touch(self, entry_ids: Sequence[str]) -> None:
        """Keep our entries from looking idle (XAUTOCLAIM), reporting those another engine took."""
        lost = await self._transport.touch_owned(
            self._transport.names.tokenized, self._transport.names.engine_group, entry_ids
        )
        if lost:
            self._on_lost(lost)

    async def done_tokens(self, deliveries: Sequence[Delivery]) -> dict[str, list[int]]:
        """For claimed entries: the output tokens already published for each request (one MGET).
        (Our own entry claimed back reads its checkpoint too; the main thread ignores it.)"""
        request_ids = [d.message.request_id for d in deliveries if isinstance(d.message, TokenizedRequest)]
        found = await self._transport.read_output_checkpoints(request_ids)
        return {request_id: tokens for request_id, tokens in zip(request_ids, found) if tokens}
