"""Noticing replicas that stopped, from their heartbeats, and taking their work over.

Every beat (``StreamTransport.beat``) renews two things at once: the replica's
heartbeat key, which expires after ``heartbeat_ttl_s``, and its entry in the
role's registry (``{p}:replicas:{role}``, id -> last beat), which does not
expire. A replica in the registry without a heartbeat is *gone*: it was heard
of and has stopped. That is noticed within about one TTL, instead of after the
long idle time XAUTOCLAIM needs to be sure an entry is orphaned.

- ``ConsumerTakeover``: a tokenizer or engine claims the pending entries of a
  gone replica of its own role (consumer name = replica id) and removes the
  gone consumer from the group once it has none left.
- ``GoneGateways``: engines abort the requests of gateways that are gone and
  delete their response streams (nobody reads them any more).

A process that dies (a crash, SIGKILL, OOM) closes its sockets at once, while its
heartbeat key outlives it by up to a TTL. So a replica with a live heartbeat but no
connection to Redis (each connection is named after its replica) in two censuses in
a row, a heartbeat interval apart, is taken for gone too (``Disconnections``): its
work moves in about half a TTL instead of one. Where connections cannot be seen (a
cluster, an ACL without CLIENT LIST, a proxy), the TTL alone decides, as it does for
a replica that hangs with its connections open.

A consumer that never beat (a stage of someone else's) is never in the
registry; its entries are still taken over by XAUTOCLAIM after
``claim_idle_ms``. Likewise a request from a gateway that never beat is never
aborted, which also covers a gateway whose first beat is still on its way.

A replica judges the others only while its own heartbeat is steady
(``OwnPulse``): after Redis was unreachable for longer than a TTL, every
heartbeat has expired, and replicas that took each other for gone would swap
and re-run each other's work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from shared.replicas import ReplicaCensus
from shared.transport import Delivery, StreamTransport

log = logging.getLogger(__name__)


class OwnPulse:
    """Whether this replica's own heartbeat has been unbroken long enough to judge others by theirs.

    Fed by each beat with whether the previous heartbeat was still there. Steady
    means: the last beat is less than a TTL old, and no beat found its
    predecessor expired during the last TTL (by then every live replica has
    beaten again). No I/O; times are ``time.monotonic()``.
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._last_beat: float | None = None
        self._unbroken_since: float | None = None

    def record(self, previous_alive: bool, now: float) -> None:
        if not previous_alive or self._unbroken_since is None:
            self._unbroken_since = now
        self._last_beat = now

    def steady(self, now: float) -> bool:
        if self._last_beat is None or self._unbroken_since is None:
            return False
        return now - self._last_beat < self._ttl_s and now - self._unbroken_since >= self._ttl_s


class Disconnections:
    """Which replicas that still look alive have had no connection to Redis in two censuses in a row.

    One census without a connection proves little (a live replica reconnecting after
    Redis dropped it); two, a beat apart, prove the process is gone. No I/O.
    """

    def __init__(self) -> None:
        self._missing: frozenset[str] = frozenset()

    def update(self, live: frozenset[str], connected: frozenset[str] | None) -> frozenset[str]:
        """live: replicas with a heartbeat; connected: names of the connections now (None: unknown)."""
        missing = frozenset() if connected is None else live - connected
        gone = missing & self._missing
        self._missing = missing
        return gone


class ConsumerTakeover:
    """Claims, for this replica, what the gone replicas of its role left pending in one group."""

    def __init__(
        self, transport: StreamTransport, role: str, stream: str, group: str, *, min_idle_ms: int, pulse: OwnPulse
    ) -> None:
        self._transport = transport
        self._role = role
        self._stream = stream
        self._group = group
        self._min_idle_ms = min_idle_ms
        self._pulse = pulse
        self._disconnections = Disconnections()

    async def claim(self, count: int) -> list[Delivery]:
        """Up to ``count`` entries of gone replicas; with ``count`` 0 it only tidies up.

        Called with what the caller has room for, so an engine never takes on
        more requests than it can run; the rest waits for the next call (or
        for another survivor).
        """
        transport = self._transport
        census = await transport.replica_census(self._role)
        # Connections are listed only while someone besides us looks alive: nothing to learn otherwise.
        others = census.live - {transport.consumer}
        connected = await transport.connected_replicas() if others else None
        disconnected = self._disconnections.update(others, connected)
        claimed: list[Delivery] = []
        if (census.gone or disconnected) and not self._pulse.steady(time.monotonic()):
            return claimed
        for replica_id in disconnected:
            log.warning("%s %s has a heartbeat but no connection to Redis: taken for gone", self._role, replica_id)
        for replica_id in [*census.gone, *sorted(disconnected)]:
            # Our own heartbeat lapsed (a long pause): our entries are ours to finish.
            if replica_id == transport.consumer:
                continue
            takeover = await transport.take_over(
                self._stream, self._group, replica_id, count=count - len(claimed), min_idle_ms=self._min_idle_ms
            )
            claimed.extend(takeover.deliveries)
            if takeover.consumer_removed:
                await transport.forget_replica(self._role, replica_id)
                log.info("%s %s is gone; nothing of it is left on %s", self._role, replica_id, self._stream)
        return claimed


@dataclass(frozen=True, slots=True)
class GatewayVerdict:
    """What an engine does about gone gateways after one census."""

    gone: frozenset[str]  # their requests are aborted, and dropped when pulled
    sweep: list[str] = field(default_factory=list)  # delete their response streams
    forget: list[str] = field(default_factory=list)  # drop from the registry


class GoneGateways:
    """Which gateways are gone, from successive censuses of the gateway role. No I/O.

    A gone gateway's response stream is deleted again on every census for
    ``sweep_s`` after its last beat, because output already on its way (a
    detokenizer's last batch, a tokenizer's refusal) recreates the stream.
    Its registry entry is kept for ``retention_s`` so that requests of it
    still queued are recognised and dropped, then removed with a last sweep.
    """

    def __init__(self, *, sweep_s: float = 60.0, retention_s: float = 3600.0) -> None:
        if retention_s < sweep_s:
            raise ValueError("gone gateways must be remembered at least as long as their streams are swept")
        self._sweep_s = sweep_s
        self.retention_s = retention_s
        self.gone: frozenset[str] = frozenset()

    def __contains__(self, gateway_id: object) -> bool:
        return gateway_id in self.gone

    def update(self, census: ReplicaCensus, now: float) -> GatewayVerdict:
        newly = set(census.gone) - self.gone
        if newly:
            log.warning("gateway(s) gone: %s; aborting their requests", ", ".join(sorted(newly)))
        self.gone = frozenset(census.gone)
        sweep: list[str] = []
        forget: list[str] = []
        for gateway_id, last_beat in census.gone.items():
            age = now - last_beat
            if age >= self.retention_s:
                forget.append(gateway_id)
                sweep.append(gateway_id)
            elif age < self._sweep_s or gateway_id in newly:
                sweep.append(gateway_id)
        return GatewayVerdict(self.gone, sweep, forget)
