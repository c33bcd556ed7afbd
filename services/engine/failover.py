"""The engine's part in failover, run on its I/O thread (never on the decode loop).

Only the Redis side: what it finds goes to the main thread, which decides what
becomes of each request (requests.py).

- Requests of an engine that is gone (heartbeat expired) are claimed here, as
  many as there is room for, within a heartbeat interval of being noticed; those
  of a consumer that never beat, after ``claim_idle_ms`` (XAUTOCLAIM). A claimed
  request continues after the output tokens its engine published (ownership.py).
- Gateways that are gone are reported (their requests are aborted: nobody reads
  their output), and their response streams deleted (shared/failover.py, ``GoneGateways``).
  Each is first marked as reaped, atomically with a last look at its heartbeat, so that
  one that was only stalled learns on its next beat that its requests ended.
- The entries of requests running here are touched, so that XAUTOCLAIM does
  not hand them to another engine while this one is alive (only those still
  ours: an engine that stalled must not take its requests back from the one
  that took them over).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shared.failover import ConsumerTakeover, GoneGateways, OwnPulse
from shared.replicas import ReplicaCensus
from shared.settings import EngineSettings
from shared.transport import Delivery, StreamTransport


class EngineFailover:
    def __init__(
        self,
        settings: EngineSettings,
        transport: StreamTransport,
        *,
        room: Callable[[], int],
        claimed: Callable[[list[Delivery]], Awaitable[None]],
        gateways_gone: Callable[[frozenset[str]], None],
        touch: Callable[[], Awaitable[None]],
    ) -> None:
        """``room``: entries to read now; ``claimed``: hand claimed entries on; ``gateways_gone``: the gone
        gateways, whenever they change; ``touch``: refresh the idle time of the entries held here."""
        self._settings = settings
        self._transport = transport
        self._room = room
        self._claimed = claimed
        self._gateways_gone = gateways_gone
        self._touch = touch
        self._interval = settings.heartbeat_interval_s
        self.pulse = OwnPulse(settings.heartbeat_ttl_s)  # fed by the engine's beats
        # An entry touched within one beat has an owner that is not dead after all.
        self._takeover = ConsumerTakeover(
            transport,
            "engine",
            transport.names.tokenized,
            transport.names.engine_group,
            min_idle_ms=int(self._interval * 1000),
            pulse=self.pulse,
        )
        self._gateways = GoneGateways()

    async def watch_loop(self, closing: Callable[[], bool]) -> None:
        """Every heartbeat interval: gone gateways, then gone engines; XAUTOCLAIM now and then."""
        idle_ms = self._settings.claim_idle_ms
        fallback_interval = min(5.0, max(0.1, idle_ms / 2000))
        next_fallback = time.monotonic() + fallback_interval
        while not closing():
            await asyncio.sleep(self._interval)
            # Gateways first, so that requests claimed below for a gone gateway are dropped.
            await self.check_gateways()
            await self.take_over()
            if time.monotonic() >= next_fallback:
                next_fallback = time.monotonic() + fallback_interval
                room = self._room()
                if room > 0:
                    tokenized = self._transport.names.tokenized
                    stale = await self._transport.claim_stale(
                        tokenized, self._transport.names.engine_group, min_idle_ms=idle_ms, count=room
                    )
                    if stale:
                        await self._claimed(stale)

    async def take_over(self) -> None:
        """Claim what gone engines left pending, up to the free room (0: only tidy up)."""
        room = max(0, self._room())
        claimed = await self._takeover.claim(room)
        if claimed:
            await self._claimed(claimed)

    async def check_gateways(self) -> None:
        transport = self._transport
        census = await transport.replica_census("gateway")
        if census.gone and not self.pulse.steady(time.monotonic()):
            return  # our own heartbeat lapsed too (Redis unreachable?): theirs prove nothing
        before = self._gateways.gone
        newly = [gateway_id for gateway_id in census.gone if gateway_id not in before]
        if newly:
            # Act only on those still gone once marked: a gateway that beat again since the
            # census keeps its requests, and one marked learns on its next beat that they ended.
            reaped = set(await transport.reap("gateway", newly, keep_s=self._gateways.retention_s))
            gone = {
                gateway_id: beat
                for gateway_id, beat in census.gone.items()
                if gateway_id not in newly or gateway_id in reaped
            }
            census = ReplicaCensus(census.live, gone)
        verdict = self._gateways.update(census, time.time())
        if verdict.gone != before:
            self._gateways_gone(verdict.gone)
        if verdict.sweep:
            await transport.delete(*(transport.names.responses(gateway_id) for gateway_id in verdict.sweep))
        for gateway_id in verdict.forget:
            await transport.forget_replica("gateway", gateway_id)

    async def touch_loop(self, closing: Callable[[], bool]) -> None:
        """Keep our pending entries' idle time low so that XAUTOCLAIM leaves them alone."""
        interval = min(5.0, max(0.05, self._settings.claim_idle_ms / 3000))
        while not closing():
            await asyncio.sleep(interval)
            await self._touch()
