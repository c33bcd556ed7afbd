"""The engine's failover, in-process (echo backend, fakeredis, the real I/O thread):
taking over from a gone engine, and aborting the requests of a gone gateway."""

from __future__ import annotations

import time
from collections.abc import Callable

import fakeredis

from shared.messages import DetokenizeParams, SamplingParams, TokenizedRequest, encode
from shared.output_checkpoints import pack_token_ids, unpack_token_ids
from shared.transport import PAYLOAD_FIELD
from tests.fakes.engine_service import NAMES, RunningEngine, tokens_of, wait_for

# Beats every 0.1 s (the fixture's), gone after 0.3 s: the engine judges others 0.3 s after it starts.
FAST = {"heartbeat_ttl_s": 0.3}


def request(request_id: str, prompt: list[int], gateway_id: str, max_tokens: int) -> TokenizedRequest:
    return TokenizedRequest(
        request_id=request_id,
        gateway_id=gateway_id,
        deadline=time.time() + 60,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
        detokenize=DetokenizeParams(),
    )


def left_by_gone_engine(*requests: TokenizedRequest) -> Callable[[fakeredis.FakeRedis], None]:
    """Before the engine starts: an engine that beat once and died with ``requests`` pending."""

    def prepare(redis: fakeredis.FakeRedis) -> None:
        redis.xgroup_create(NAMES.tokenized, NAMES.engine_group, id="0", mkstream=True)
        for message in requests:
            redis.xadd(NAMES.tokenized, {PAYLOAD_FIELD: encode(message)})
        redis.xreadgroup(NAMES.engine_group, "engine-gone", {NAMES.tokenized: ">"}, count=len(requests))
        redis.hset(NAMES.registry("engine"), "engine-gone", str(time.time() - 2))  # its heartbeat has expired

    return prepare


def pending_of(engine: RunningEngine, consumer: str) -> int:
    consumers = engine.redis.xinfo_consumers(NAMES.tokenized, NAMES.engine_group)
    return sum(c["pending"] for c in consumers if c["name"].decode() == consumer)


def test_a_gone_engines_requests_are_taken_over_long_before_the_idle_timeout(
    start_engine: Callable[..., RunningEngine],
) -> None:
    orphan = request("orphan", [4, 5], "gw", max_tokens=3)
    started = time.monotonic()
    engine = start_engine(before=left_by_gone_engine(orphan), claim_idle_ms=30_000, **FAST)
    wait_for(lambda: engine.finished("orphan"), timeout=3, what="the orphan to be taken over")
    assert time.monotonic() - started < 3  # not the 30 s XAUTOCLAIM would take
    assert tokens_of(engine.deltas()["orphan"]) == [4, 5, 4]
    wait_for(lambda: engine.pending() == 0, what="the orphan's ack")
    # The gone engine has left its group and the registry.
    names = {c["name"].decode() for c in engine.redis.xinfo_consumers(NAMES.tokenized, NAMES.engine_group)}
    assert "engine-gone" not in names
    assert not engine.redis.hexists(NAMES.registry("engine"), "engine-gone")


def test_a_taken_over_request_continues_after_the_output_its_engine_published(
    start_engine: Callable[..., RunningEngine],
) -> None:
    orphan = request("orphan", [4, 5, 6], "gw", max_tokens=7)

    def prepare(redis: fakeredis.FakeRedis) -> None:
        left_by_gone_engine(orphan)(redis)
        redis.set(NAMES.output_checkpoint("orphan"), pack_token_ids([4, 5, 6, 4]))  # what it had published

    engine = start_engine(before=prepare, **FAST)
    wait_for(lambda: engine.finished("orphan"), timeout=3, what="the orphan to be taken over")
    deltas = engine.deltas()["orphan"]
    assert deltas[0].offset == 4 and deltas[0].prompt_tail == [4, 5, 6, 4, 5, 6, 4]
    assert tokens_of(deltas) == [5, 6, 4]  # the echo's cycle, continued where it was
    wait_for(lambda: engine.pending() == 0, what="the orphan's ack")
    assert not engine.redis.exists(NAMES.output_checkpoint("orphan"))


def test_an_engine_takes_over_only_as_many_requests_as_it_has_room_for(
    start_engine: Callable[..., RunningEngine],
) -> None:
    orphans = [request(f"o{i}", [i + 1], "gw", max_tokens=40) for i in range(5)]
    engine = start_engine(before=left_by_gone_engine(*orphans), max_running_requests=2, echo_step_delay_ms=5.0, **FAST)
    most = 0
    deadline = time.monotonic() + 10
    while not all(engine.finished(o.request_id) for o in orphans):
        assert time.monotonic() < deadline, "the orphans did not all finish"
        most = max(most, pending_of(engine, "engine-test"))
        time.sleep(0.01)
    assert most <= 2
    assert all(tokens_of(engine.deltas()[o.request_id]) == [int(o.request_id[1:]) + 1] * 40 for o in orphans)


def test_a_gone_gateways_requests_are_aborted_and_its_stream_deleted(
    start_engine: Callable[..., RunningEngine],
) -> None:
    engine = start_engine(echo_step_delay_ms=5.0, **FAST)
    redis = engine.redis
    # A gateway that beats for a little while (0.5 s of heartbeat), and one that never beat at all.
    redis.hset(NAMES.registry("gateway"), "gw-dying", str(time.time()))
    redis.set(NAMES.heartbeat("gateway", "gw-dying"), b"beat", px=500)
    redis.xadd(NAMES.responses("gw-dying"), {PAYLOAD_FIELD: b"whatever"})
    for message in (request("doomed", [1], "gw-dying", 100_000), request("kept", [2], "gw-unknown", 100_000)):
        redis.xadd(NAMES.tokenized, {PAYLOAD_FIELD: encode(message)})
    wait_for(lambda: {"doomed", "kept"} <= set(engine.deltas()), what="both requests to run")

    expired = time.monotonic() + 0.5
    wait_for(lambda: pending_of(engine, "engine-test") == 1, timeout=5, what="the gone gateway's request to end")
    assert time.monotonic() - expired < 1.5  # noticed within a TTL and an interval or so
    assert not redis.exists(NAMES.responses("gw-dying"))
    assert redis.exists(NAMES.reaped("gateway", "gw-dying"))  # its next beat, if any, tells it
    assert not engine.finished("kept")  # a gateway never heard of is not taken for gone

    # A request of the gone gateway pulled later is dropped without running.
    redis.xadd(NAMES.tokenized, {PAYLOAD_FIELD: encode(request("late", [3], "gw-dying", 5))})
    wait_for(lambda: redis.xinfo_groups(NAMES.tokenized)[0]["entries-read"] == 3, what="the late request")
    wait_for(lambda: pending_of(engine, "engine-test") == 1, what="the late request's ack")
    assert "late" not in engine.deltas()
    engine.abort("kept")
    wait_for(lambda: engine.pending() == 0, what="the kept request's abort")


def test_an_engine_stops_publishing_a_request_another_engine_claimed(
    start_engine: Callable[..., RunningEngine],
) -> None:
    """An engine taken for dead (stalled past its TTL) whose request was claimed must not mix its tokens in."""
    engine = start_engine(echo_step_delay_ms=5.0, **FAST)
    entry = engine.submit("taken", [1], max_tokens=100_000)
    wait_for(lambda: "taken" in engine.deltas(), what="the request to run")
    engine.redis.xclaim(NAMES.tokenized, NAMES.engine_group, "survivor", 0, [entry], justid=True)
    wait_for(lambda: not engine.service._backend.has_unfinished(), what="the engine to drop the request")
    published = len(tokens_of(engine.deltas()["taken"]))
    time.sleep(0.1)
    assert len(tokens_of(engine.deltas()["taken"])) == published
    assert not engine.finished("taken")
    assert pending_of(engine, "survivor") == 1 and pending_of(engine, "engine-test") == 0
    # Left for the survivor to continue from: exactly what was published.
    assert unpack_token_ids(engine.redis.get(NAMES.output_checkpoint("taken"))) == tokens_of(engine.deltas()["taken"])
