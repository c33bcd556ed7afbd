"""The engine service, in-process: echo backend, fakeredis, the real I/O thread."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Callable

import fakeredis
import pytest

from services.engine import service as engine_service
from services.engine.contract import RequestOutput
from services.engine.echo import EchoBackend
from services.engine.service import EngineService
from services.engine.step_outputs import Publication
from shared.histogram import REQUEST_LATENCY_BUCKETS
from shared.messages import EngineStepOutput, Heartbeat, decode, encode
from shared.settings import EngineSettings
from shared.transport import PAYLOAD_FIELD
from tests.fakes.engine_service import NAMES, SHARDS, RunningEngine, tokenized_request, tokens_of, wait_for


def test_generates_echo_tokens_per_shard_and_acks_when_done(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine()
    prompts = {f"req-{i}": [10 + i, 20 + i, 30 + i] for i in range(6)}
    for request_id, prompt in prompts.items():
        engine.submit(request_id, prompt, max_tokens=5)
    wait_for(lambda: all(engine.finished(r) for r in prompts), what="every request to finish")
    deltas = engine.deltas()
    for request_id, prompt in prompts.items():
        mine = deltas[request_id]
        assert tokens_of(mine) == (prompt * 2)[:5]
        assert [d.offset for d in mine] == [0, 1, 2, 3, 4]
        assert mine[0].prompt_tail == prompt and mine[0].detokenize is not None
        assert all(d.detokenize is None for d in mine[1:])
        assert mine[-1].finish_reason == "length"
    # Each shard stream holds only its own requests.
    for shard in range(SHARDS):
        for message in engine.messages(NAMES.generated(shard)):
            assert isinstance(message, EngineStepOutput)
            assert {zlib.crc32(d.request_id.encode()) % SHARDS for d in message.deltas} == {shard}
    wait_for(lambda: engine.pending() == 0, what="acks")
    assert engine.stop() == 0


def test_stop_token_and_eos_end_requests(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine()
    engine.submit("eos", [1, 2, 3], max_tokens=50, eos_token_ids=[3])
    wait_for(lambda: engine.finished("eos"))
    [*_, last] = engine.deltas()["eos"]
    assert tokens_of(engine.deltas()["eos"]) == [1, 2, 3] and last.finish_reason == "stop"


def test_abort_ends_a_running_request_without_output(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine()
    engine.submit("long", [1, 2], max_tokens=100_000)
    wait_for(lambda: "long" in engine.deltas(), what="first tokens")
    engine.abort("long", "not-ours")
    wait_for(lambda: engine.pending() == 0, what="the aborted request's ack")
    produced = len(engine.deltas()["long"])
    time.sleep(0.05)
    assert len(engine.deltas()["long"]) == produced  # nothing more after the abort
    assert not engine.finished("long")  # and no final delta: whoever aborted expects none
    assert engine.failures() == []


def test_expired_and_already_aborted_requests_never_run(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine()
    engine.submit("late", [1], deadline=time.time() - 1)
    wait_for(lambda: engine.redis.xinfo_groups(NAMES.tokenized)[0]["lag"] == 0 and engine.pending() == 0)
    engine.submit("ok", [1], max_tokens=2)
    wait_for(lambda: engine.finished("ok"))
    assert "late" not in engine.deltas()


def test_pulls_only_as_many_requests_as_free_slots(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine(max_running_requests=2)
    for i in range(5):
        engine.submit(f"r{i}", [i + 1], max_tokens=100_000)
    wait_for(lambda: len(engine.deltas()) == 2, what="two running requests")
    time.sleep(0.1)
    assert engine.pending() == 2  # the other three stay in the stream for other engines
    assert sorted(engine.deltas()) == ["r0", "r1"]
    engine.abort("r0")
    wait_for(lambda: "r2" in engine.deltas(), what="the next request to start")
    assert engine.pending() == 2


def test_idle_engine_does_not_step(start_engine: Callable[..., RunningEngine]) -> None:
    class CountingEcho(EchoBackend):
        steps = 0

        def step(self) -> list[RequestOutput]:
            CountingEcho.steps += 1
            return super().step()

    engine = start_engine(backend=CountingEcho(step_delay_s=0.001))
    engine.submit("a", [1], max_tokens=3)
    wait_for(lambda: engine.finished("a"))
    after_work = CountingEcho.steps
    time.sleep(0.3)
    assert CountingEcho.steps == after_work


def test_heartbeat_reports_load_and_is_removed_on_stop(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine(max_running_requests=4)
    key = NAMES.heartbeat("engine", "engine-test")
    engine.submit("a", [1], max_tokens=100_000)

    def running_in_heartbeat() -> bool:
        payload = engine.redis.get(key)
        beat = decode(payload) if payload else None
        return (
            isinstance(beat, Heartbeat)
            and beat.running == 1
            and beat.forward_share > 0
            # The wait before its first step, as counts per bucket (shared/histogram.py).
            and sum(beat.queue_time_counts) == 1
            and len(beat.queue_time_counts) == len(REQUEST_LATENCY_BUCKETS) + 1
        )

    wait_for(running_in_heartbeat, what="a heartbeat with one running request")
    engine.abort("a")
    assert engine.stop() == 0
    assert not engine.redis.exists(key)


def test_stop_finishes_running_requests_and_leaves_the_rest(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine(max_running_requests=1, echo_step_delay_ms=5.0)
    for i in range(3):
        engine.submit(f"r{i}", [i + 1], max_tokens=40)
    wait_for(lambda: "r0" in engine.deltas(), what="the first request to start")
    assert engine.stop() == 0
    assert engine.finished("r0")  # the running request was finished before exit
    assert engine.pending() == 0
    # The two never pulled are still there for another replica.
    other = engine.redis.xreadgroup(NAMES.engine_group, "other", {NAMES.tokenized: ">"}, count=10)
    assert len(other[0][1]) == 2


def test_drain_timeout_fails_started_requests_with_503(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine(drain_timeout_s=0.2)
    engine.submit("endless", [1], max_tokens=100_000)
    wait_for(lambda: "endless" in engine.deltas())
    assert engine.stop() == 0
    [failure] = engine.failures()
    assert (failure.request_id, failure.status) == ("endless", 503)
    assert engine.pending() == 0


def test_backend_crash_fails_running_requests_with_500_and_exits_non_zero(
    start_engine: Callable[..., RunningEngine],
) -> None:
    class CrashingEcho(EchoBackend):
        def step(self) -> list[RequestOutput]:
            if any(s.generated >= 3 for s in self._running.values()):
                raise RuntimeError("device lost")
            return super().step()

    engine = start_engine(backend=CrashingEcho(step_delay_s=0.001))
    engine.submit("a", [1], max_tokens=100)
    engine.submit("b", [2], max_tokens=100)
    engine.thread.join(5)
    assert engine.exit_codes == [1]
    failures = {f.request_id: f for f in engine.failures()}
    assert set(failures) == {"a", "b"}
    assert all(f.status == 500 and "device lost" in f.message for f in failures.values())
    assert engine.pending() == 0


def test_refused_request_becomes_a_400(start_engine: Callable[..., RunningEngine]) -> None:
    engine = start_engine()
    engine.submit("empty", [], max_tokens=3)
    wait_for(lambda: engine.failures(), what="the refusal")
    [failure] = engine.failures()
    assert (failure.request_id, failure.status) == ("empty", 400)
    wait_for(lambda: engine.pending() == 0)


def test_requests_left_by_a_dead_engine_are_rerun(start_engine: Callable[..., RunningEngine]) -> None:
    def dead_engine_took_one(redis: fakeredis.FakeRedis) -> None:
        redis.xgroup_create(NAMES.tokenized, NAMES.engine_group, id="0", mkstream=True)
        redis.xadd(NAMES.tokenized, {PAYLOAD_FIELD: encode(tokenized_request("orphan", [4, 5], max_tokens=3))})
        redis.xreadgroup(NAMES.engine_group, "dead-engine", {NAMES.tokenized: ">"}, count=1)

    engine = start_engine(claim_idle_ms=200, before=dead_engine_took_one)
    wait_for(lambda: engine.finished("orphan"), what="the orphan to be re-run")
    assert tokens_of(engine.deltas()["orphan"]) == [4, 5, 4]
    wait_for(lambda: engine.pending() == 0, what="the orphan's ack")


class _SlowIO:
    """Stands in for the I/O thread: a publication is in Redis only 50 ms after it is handed over."""

    def __init__(self) -> None:
        self.handed: list[Publication] = []

    def publish(self, publication: Publication) -> None:
        self.handed.append(publication)
        threading.Timer(0.05, lambda: [event.set() for event in publication.published]).start()


class _Running:
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


@pytest.mark.parametrize("running", [1, 2])
def test_a_lone_requests_first_token_is_published_before_the_next_step(
    running: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_service, "FIRST_TOKEN_PUBLISH_WAIT_S", 10.0)
    settings = EngineSettings(stream_prefix="t", echo_step_delay_ms=0)
    service = EngineService(settings, EchoBackend.from_settings(settings), lambda: None)  # type: ignore[arg-type,return-value]
    unused = service._io  # never started: its loop is closed with its task cancelled
    unused._main_task.cancel()
    unused._loop.run_until_complete(asyncio.gather(unused._main_task, return_exceptions=True))
    unused._loop.close()
    io = _SlowIO()
    service._io = io  # type: ignore[assignment]
    service._requests = _Running(running)  # type: ignore[assignment]
    later = Publication()
    service._publish_step(later)  # no first token in it: handed over, not waited for
    first = Publication(first_tokens=1)
    service._publish_step(first)
    assert io.handed == [later, first] and not later.published
    if running == 1:  # the next step starts once the token is in Redis
        assert first.published and first.published[0].is_set()
    else:  # a batch of several does not wait for one request's first token
        assert not first.published
