"""Failover from heartbeats: the transport's primitives (against fakeredis) and the pure rules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import fakeredis
import pytest

from shared.failover import ConsumerTakeover, Disconnections, GoneGateways, OwnPulse
from shared.messages import AbortRequests, Heartbeat
from shared.replicas import BeatOutcome, ReplicaCensus
from shared.transport import Ack, StreamTransport

GROUP = "workers"


def run(scenario: Callable[[fakeredis.FakeServer], Awaitable[None]]) -> None:
    asyncio.run(scenario(fakeredis.FakeServer()))


def transport(server: fakeredis.FakeServer, consumer: str) -> StreamTransport:
    return StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), "t", consumer)


def abort(i: int) -> AbortRequests:
    return AbortRequests(request_ids=[f"r{i}"])


def beat(role: str, replica_id: str) -> Heartbeat:
    return Heartbeat(role=role, replica_id=replica_id, time=time.time())


async def consumers(server: fakeredis.FakeServer, stream: str) -> dict[str, int]:
    found = await fakeredis.FakeAsyncRedis(server=server).xinfo_consumers(stream, GROUP)
    return {c["name"].decode(): c["pending"] for c in found}


async def left_pending_by(server: fakeredis.FakeServer, consumer: str, *messages: AbortRequests) -> str:
    """Publishes ``messages`` to the requests stream; ``consumer`` reads them and never acknowledges."""
    t = transport(server, consumer)
    stream = t.names.requests
    await t.ensure_group(stream, GROUP)
    await t.publish([(stream, m) for m in messages])
    await t.read_group([stream], GROUP, count=max(1, len(messages)), block_ms=0)
    await t.close()
    return stream


# -- heartbeats and the registry -------------------------------------------------------


def test_a_replica_that_stopped_beating_is_gone_and_one_never_heard_of_is_not_listed() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        t = transport(server, "x")
        assert await t.beat(beat("engine", "e1"), ttl_s=0.05) == BeatOutcome(renewed=False, reaped=False)  # the first
        assert await t.beat(beat("engine", "e1"), ttl_s=0.05) == BeatOutcome(renewed=True, reaped=False)
        await t.beat(beat("engine", "e2"), ttl_s=10)
        await t.beat(beat("tokenizer", "t1"), ttl_s=0.05)
        # A heartbeat written by a stage that does not register: not part of the census.
        await fakeredis.FakeAsyncRedis(server=server).set(t.names.heartbeat("engine", "foreign"), b"x", px=50)
        census = await t.replica_census("engine")
        assert census.live == {"e1", "e2"} and census.gone == {}
        await asyncio.sleep(0.1)
        census = await t.replica_census("engine")
        assert census.live == {"e2"}
        assert list(census.gone) == ["e1"] and abs(census.gone["e1"] - time.time()) < 5
        # After a lapse the next beat says so: the others may have taken us for gone.
        assert await t.beat(beat("engine", "e1"), ttl_s=10) == BeatOutcome(renewed=False, reaped=False)
        assert (await t.replica_census("engine")).gone == {}
        await t.forget_replica("tokenizer", "t1")
        assert await t.replica_census("tokenizer") == ReplicaCensus(frozenset(), {})

    run(scenario)


def test_reap_marks_only_replicas_still_gone_and_their_next_beat_reports_it_once() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        engine, gateway = transport(server, "e1"), transport(server, "gw")
        await gateway.beat(beat("gateway", "gw-stalled"), ttl_s=0.05)
        await gateway.beat(beat("gateway", "gw-back"), ttl_s=0.05)
        await asyncio.sleep(0.1)
        assert set((await engine.replica_census("gateway")).gone) == {"gw-stalled", "gw-back"}
        # gw-back beats between the census and the reap: it is left alone.
        assert await gateway.beat(beat("gateway", "gw-back"), ttl_s=10) == BeatOutcome(renewed=False, reaped=False)
        assert await engine.reap("gateway", ["gw-stalled", "gw-back"], keep_s=10) == ["gw-stalled"]
        assert await gateway.beat(beat("gateway", "gw-stalled"), ttl_s=10) == BeatOutcome(renewed=False, reaped=True)
        assert await gateway.beat(beat("gateway", "gw-stalled"), ttl_s=10) == BeatOutcome(renewed=True, reaped=False)
        # A live replica cannot be marked; a mark nobody collects expires.
        assert await engine.reap("gateway", ["gw-stalled"], keep_s=10) == []
        await fakeredis.FakeAsyncRedis(server=server).delete(engine.names.heartbeat("gateway", "gw-stalled"))
        assert await engine.reap("gateway", ["gw-stalled"], keep_s=0.05) == ["gw-stalled"]
        await asyncio.sleep(0.1)
        assert await gateway.beat(beat("gateway", "gw-stalled"), ttl_s=10) == BeatOutcome(renewed=False, reaped=False)

    run(scenario)


# -- take_over: claim by consumer ------------------------------------------------------


def test_take_over_claims_a_consumers_entries_oldest_first_then_removes_it() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me, other = transport(server, "me"), transport(server, "other")
        stream = await left_pending_by(server, "gone", abort(1), abort(2), abort(3))
        await left_pending_by(server, "alive", abort(4))
        await asyncio.sleep(0.02)

        first = await me.take_over(stream, GROUP, "gone", count=2, min_idle_ms=10)
        assert [d.message for d in first.deliveries] == [abort(1), abort(2)]
        assert not first.consumer_removed  # one entry is still pending there
        # Entries just taken over are fresh: a second survivor gets nothing twice.
        assert (await other.take_over(stream, GROUP, "me", count=10, min_idle_ms=10)).deliveries == []
        second = await me.take_over(stream, GROUP, "gone", count=2, min_idle_ms=10)
        assert [d.message for d in second.deliveries] == [abort(3)] and second.consumer_removed
        # (XCLAIM makes its caller a consumer even when it claims nothing.)
        assert await consumers(server, stream) == {"me": 3, "alive": 1, "other": 0}
        # Claimed entries are ours to acknowledge, like any we read.
        await me.ack([Ack(stream, GROUP, d.entry_id) for d in first.deliveries + second.deliveries])
        assert (await consumers(server, stream))["me"] == 0

    run(scenario)


def test_take_over_spares_entries_touched_more_recently_than_min_idle() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "me")
        stream = await left_pending_by(server, "slow", abort(1))
        takeover = await me.take_over(stream, GROUP, "slow", count=5, min_idle_ms=60_000)
        assert takeover.deliveries == [] and not takeover.consumer_removed
        assert (await consumers(server, stream))["slow"] == 1

    run(scenario)


def test_take_over_with_no_room_only_removes_a_consumer_with_nothing_pending() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "me")
        stream = await left_pending_by(server, "busy", abort(1))
        await left_pending_by(server, "idle")
        assert (await me.take_over(stream, GROUP, "busy", count=0, min_idle_ms=0)).consumer_removed is False
        assert (await me.take_over(stream, GROUP, "idle", count=0, min_idle_ms=0)).consumer_removed is True
        assert (await me.take_over(stream, GROUP, "never-seen", count=3, min_idle_ms=0)).consumer_removed is True
        assert await consumers(server, stream) == {"busy": 1}

    run(scenario)


def test_take_over_acknowledges_entries_trimmed_from_the_stream() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "me")
        stream = await left_pending_by(server, "gone", abort(1), abort(2))
        raw = fakeredis.FakeAsyncRedis(server=server)
        oldest = (await raw.xrange(stream, count=1))[0][0]
        await raw.xdel(stream, oldest)
        takeover = await me.take_over(stream, GROUP, "gone", count=5, min_idle_ms=0)
        assert [d.message for d in takeover.deliveries] == [abort(2)] and takeover.consumer_removed
        assert await consumers(server, stream) == {"me": 1}  # not the trimmed one

    run(scenario)


def test_take_over_on_a_missing_stream_creates_the_group_and_finds_nothing() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "me")
        takeover = await me.take_over(me.names.requests, GROUP, "gone", count=5, min_idle_ms=0)
        assert takeover.deliveries == []
        with pytest.raises(ValueError):
            await me.take_over(me.names.requests, GROUP, "me", count=5, min_idle_ms=0)

    run(scenario)


# -- ConsumerTakeover: whom to claim from ----------------------------------------------


def steady_pulse() -> OwnPulse:
    pulse = OwnPulse(ttl_s=1.0)
    pulse.record(True, time.monotonic() - 5)
    pulse.record(True, time.monotonic())
    return pulse


def test_consumer_takeover_claims_only_from_registered_replicas_whose_heartbeat_expired() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "tok-me")
        stream = await left_pending_by(server, "tok-gone", abort(1), abort(2))
        await left_pending_by(server, "tok-live", abort(3))
        await left_pending_by(server, "tok-never-beat", abort(4))
        await left_pending_by(server, "tok-me", abort(5))
        await me.beat(beat("tokenizer", "tok-gone"), ttl_s=0.05)
        await me.beat(beat("tokenizer", "tok-live"), ttl_s=10)
        await me.beat(beat("tokenizer", "tok-me"), ttl_s=0.05)  # our own beat lapsed: not ours to take
        await asyncio.sleep(0.1)
        takeover = ConsumerTakeover(me, "tokenizer", stream, GROUP, min_idle_ms=10, pulse=steady_pulse())

        assert [d.message for d in await takeover.claim(1)] == [abort(1)]
        assert "tok-gone" in (await me.replica_census("tokenizer")).gone  # one entry left there
        assert [d.message for d in await takeover.claim(5)] == [abort(2)]
        census = await me.replica_census("tokenizer")
        assert set(census.gone) == {"tok-me"}  # tok-gone is forgotten once empty and removed
        assert await consumers(server, stream) == {"tok-live": 1, "tok-never-beat": 1, "tok-me": 3}

    run(scenario)


def test_consumer_takeover_judges_nobody_while_its_own_pulse_is_unsteady() -> None:
    async def scenario(server: fakeredis.FakeServer) -> None:
        me = transport(server, "tok-me")
        stream = await left_pending_by(server, "tok-gone", abort(1))
        await me.beat(beat("tokenizer", "tok-gone"), ttl_s=0.05)
        await asyncio.sleep(0.1)
        pulse = OwnPulse(ttl_s=1.0)
        pulse.record(False, time.monotonic())  # e.g. just back from a Redis outage
        takeover = ConsumerTakeover(me, "tokenizer", stream, GROUP, min_idle_ms=10, pulse=pulse)
        assert await takeover.claim(5) == []
        assert await consumers(server, stream) == {"tok-gone": 1}

    run(scenario)


# -- pure rules --------------------------------------------------------------------------


def test_own_pulse_is_steady_after_a_ttl_of_unbroken_beats() -> None:
    pulse = OwnPulse(ttl_s=1.0)
    assert not pulse.steady(0.0)
    pulse.record(False, 0.0)  # the first beat
    assert not pulse.steady(0.5)
    pulse.record(True, 0.75)
    assert pulse.steady(1.0)
    assert not pulse.steady(1.8)  # our last beat is a TTL old: we may look gone ourselves
    pulse.record(False, 2.0)  # a lapse: everybody may have lapsed (Redis was away)
    assert not pulse.steady(2.5)
    pulse.record(True, 2.9)
    assert pulse.steady(3.0)


def test_gone_gateways_are_swept_for_a_while_then_forgotten() -> None:
    gateways = GoneGateways(sweep_s=60, retention_s=3600)
    verdict = gateways.update(ReplicaCensus(frozenset({"g-live"}), {"g-dead": 1000.0}), now=1002.0)
    assert verdict.gone == {"g-dead"} and "g-dead" in gateways and "g-live" not in gateways
    assert verdict.sweep == ["g-dead"] and verdict.forget == []
    # Late output may recreate its stream: swept again on every census for a while...
    assert gateways.update(ReplicaCensus(frozenset(), {"g-dead": 1000.0}), now=1050.0).sweep == ["g-dead"]
    # ...then left alone, but still known, so its requests still queued are dropped.
    verdict = gateways.update(ReplicaCensus(frozenset(), {"g-dead": 1000.0}), now=1100.0)
    assert verdict.sweep == [] and verdict.gone == {"g-dead"}
    verdict = gateways.update(ReplicaCensus(frozenset(), {"g-dead": 1000.0}), now=4700.0)
    assert verdict.forget == ["g-dead"] and verdict.sweep == ["g-dead"]
    # A gateway never heard of (its first beat on its way) is never gone.
    assert "g-new" not in gateways


def test_a_gateway_first_seen_gone_long_after_it_died_is_swept_once() -> None:
    gateways = GoneGateways(sweep_s=60, retention_s=3600)
    assert gateways.update(ReplicaCensus(frozenset(), {"g-old": 0.0}), now=600.0).sweep == ["g-old"]
    assert gateways.update(ReplicaCensus(frozenset(), {"g-old": 0.0}), now=601.0).sweep == []
    # Back from the dead (a stalled gateway beats again): no longer gone.
    assert gateways.update(ReplicaCensus(frozenset({"g-old"}), {}), now=602.0).gone == frozenset()


# -- Disconnections: a heartbeat outliving its process ---------------------------------


def test_a_replica_without_a_connection_in_two_censuses_in_a_row_is_gone() -> None:
    seen = Disconnections()
    live = frozenset({"e1", "e2"})
    assert seen.update(live, frozenset({"e2", "me"})) == frozenset()  # one census proves little
    assert seen.update(live, frozenset({"e2", "me"})) == {"e1"}
    # Back between two censuses (a reconnect): the count starts again.
    assert seen.update(live, frozenset({"e1", "me"})) == frozenset()
    assert seen.update(live, frozenset({"e1", "e2", "me"})) == frozenset()
    # Connections that cannot be seen (a cluster, an ACL, a proxy) judge nobody, and forget.
    assert seen.update(live, frozenset({"me"})) == frozenset()
    assert seen.update(live, None) == frozenset()
    assert seen.update(live, frozenset({"me"})) == frozenset()
