"""Hostile entries on every stream of a running pipeline: each is processed as the message it decodes
to, or dead-lettered and acknowledged, and every service keeps serving (docs/protocol.md).

The pipeline's services are real processes without a restarting launcher, so a service that dies
on an entry stays dead and fails the test.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.messages import (
    AbortRequests,
    CompletionRequest,
    EngineStepOutput,
    Message,
    MessageError,
    RequestFailed,
    ResponseBatch,
    TokenizedRequest,
    decode,
    encode,
)
from shared.transport import PAYLOAD_FIELD, StreamNames
from tests.fuzz.conftest import FuzzPipeline
from tests.fuzz.strategies import hostile_payloads, model_strategy

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SCALELLM_FUZZ_EXAMPLES", "50"))
SETTLE_S = 15.0
SHARDS = 4  # SCALELLM_DETOKENIZER_SHARDS's default, which the fuzz pipeline keeps


@dataclass(frozen=True)
class Consumed:
    """A stream a service reads: its consumer group (None: read with XREAD) and what belongs on it."""

    group: str | None
    expected: tuple[type[Message], ...]


def consumed_streams(names: StreamNames, gateway_id: str) -> dict[str, Consumed]:
    streams = {
        names.requests: Consumed(StreamNames.tokenizer_group, (CompletionRequest,)),
        names.tokenized: Consumed(StreamNames.engine_group, (TokenizedRequest,)),
        names.aborts: Consumed(None, (AbortRequests,)),
        names.responses(gateway_id): Consumed(None, (ResponseBatch, RequestFailed)),
    }
    streams.update(
        {
            names.generated(shard): Consumed(StreamNames.detokenizer_group, (EngineStepOutput,))
            for shard in range(SHARDS)
        }
    )
    return streams


def undecodable(payload: bytes) -> bool:
    try:
        decode(payload)
    except MessageError:
        return True
    return False


@st.composite
def entries(draw: st.DrawFn, consumed: Consumed) -> dict[bytes, bytes]:
    """An entry's fields: half the time a well-formed message of the kind the stream carries (with
    generated, so hostile, values), else any payload; sometimes under another field or beside one."""
    if draw(st.booleans()):
        # Half the requests still live when they arrive, so the stages run them instead of dropping them.
        live = st.floats(30, 120).map(lambda seconds: time.time() + seconds)
        deadline = st.one_of(st.floats(allow_nan=False), live)
        kinds = [model_strategy(cls, deadline=deadline) for cls in consumed.expected]
        payload = encode(draw(st.one_of(kinds)))
    else:
        payload = draw(hostile_payloads())
    odd_field = draw(st.binary(min_size=1, max_size=8).filter(lambda name: name != PAYLOAD_FIELD))
    layout = draw(st.sampled_from(["payload", "elsewhere", "beside"]))
    if layout == "elsewhere":
        return {odd_field: payload}
    if layout == "beside":
        return {odd_field: draw(st.binary(max_size=20)), PAYLOAD_FIELD: payload}
    return {PAYLOAD_FIELD: payload}


def past_int32_token() -> bytes:
    """A live tokenized_request with a token id past int32: it crashed the engine (checkpoints pack
    output ids as int32) until the schema bounded token ids; now it is undecodable."""
    fields = {
        "type": TokenizedRequest.TYPE,
        "request_id": "past-int32",
        "gateway_id": "nobody",
        "deadline": time.time() + 60,
        "prompt_token_ids": [2**40],
        "sampling": {"max_tokens": 3},
        "detokenize": {},
    }
    return bytes(msgpack.packb(fields))


def wait_until_settled(fuzz: FuzzPipeline, dead_letters: int, rejected: dict[tuple[str, str], list[str]]) -> None:
    """Until the dead-letter stream holds ``dead_letters`` entries and every ``rejected`` entry of a
    (stream, group) is acknowledged. Well-formed entries may stay pending: a forged request runs
    until its max_tokens (the stages trust what is on the streams), and is acknowledged then."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        dead = fuzz.redis.xlen(fuzz.names.deadletter)
        pending = [
            entry_id
            for (stream, group), ids in rejected.items()
            for entry_id in ids
            if fuzz.redis.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        ]
        if dead >= dead_letters and not pending:
            assert dead == dead_letters, "a decodable entry was dead-lettered"
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {SETTLE_S} s: {dead} of {dead_letters} dead letters, pending {pending}")
        time.sleep(0.05)


def test_hostile_entries_on_every_stream_are_processed_or_dead_lettered_and_nobody_dies(
    fuzz_pipeline: FuzzPipeline, show_logs_on_failure: None
) -> None:
    gateway_id = httpx.get(f"{fuzz_pipeline.url}/ready", timeout=5).json()["gateway_id"]
    streams = consumed_streams(fuzz_pipeline.names, gateway_id)

    stream_and_entry = st.sampled_from(sorted(streams)).flatmap(
        lambda stream: st.tuples(st.just(stream), entries(streams[stream]))
    )

    @given(st.lists(stream_and_entry, min_size=1, max_size=4))
    @example([(fuzz_pipeline.names.tokenized, {PAYLOAD_FIELD: past_int32_token()})])
    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def survives(batch: list[tuple[str, dict[bytes, bytes]]]) -> None:
        dead_letters = fuzz_pipeline.redis.xlen(fuzz_pipeline.names.deadletter)
        rejected: dict[tuple[str, str], list[str]] = {}
        for stream, fields in batch:
            entry_id = fuzz_pipeline.redis.xadd(stream, fields).decode()  # type: ignore[arg-type]
            if undecodable(fields.get(PAYLOAD_FIELD, b"")):
                # Each stream has one reader here (one engine reads the aborts): one dead letter each.
                dead_letters += 1
                group = streams[stream].group
                if group is not None:
                    rejected.setdefault((stream, group), []).append(entry_id)
        wait_until_settled(fuzz_pipeline, dead_letters, rejected)
        assert all(p.process.poll() is None for p in fuzz_pipeline.pipeline.processes)
        assert fuzz_pipeline.complete("Hello world", max_tokens=2) == "Hello world"

    survives()
