"""OutputRouter: a step's RequestOutputs -> one EngineStepOutput per shard, offsets, acks."""

from __future__ import annotations

import pytest

from services.engine.contract import RequestOutput
from services.engine.step_outputs import OutputRouter
from shared.messages import DetokenizeParams, EngineStepOutput, RequestFailed, SamplingParams, TokenizedRequest
from shared.transport import Ack, StreamNames, shard_of

NAMES = StreamNames("t")
SHARDS = 4


def tokenized(request_id: str, prompt: list[int], gateway: str = "gw") -> TokenizedRequest:
    return TokenizedRequest(
        request_id=request_id,
        gateway_id=gateway,
        deadline=1e12,
        prompt_token_ids=prompt,
        sampling=SamplingParams(),
        detokenize=DetokenizeParams(stop=["x"]),
    )


def ids_on_distinct_shards(count: int) -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        found.setdefault(shard_of(f"req-{i}", SHARDS), f"req-{i}")
        i += 1
    return list(found.values())


def test_shard_is_crc32_of_the_request_id() -> None:
    import zlib

    assert shard_of("cmpl-abc", 4) == zlib.crc32(b"cmpl-abc") % 4


def test_one_step_output_per_shard_holding_that_shards_deltas() -> None:
    a, b = ids_on_distinct_shards(2)
    router = OutputRouter(NAMES, "engine-1", SHARDS)
    router.track(tokenized(a, [1, 2, 3]), "1-0")
    router.track(tokenized(b, [4]), "2-0")
    publication = router.route([RequestOutput(a, [7]), RequestOutput(b, [8])])
    streams = {stream: message for stream, message in publication.messages}
    assert set(streams) == {NAMES.generated(shard_of(a, SHARDS)), NAMES.generated(shard_of(b, SHARDS))}
    for request_id, stream in ((a, NAMES.generated(shard_of(a, SHARDS))), (b, NAMES.generated(shard_of(b, SHARDS)))):
        message = streams[stream]
        assert isinstance(message, EngineStepOutput)
        assert message.engine_id == "engine-1" and message.step == 1
        assert [d.request_id for d in message.deltas] == [request_id]
    assert publication.acks == []


def test_requests_on_the_same_shard_share_one_message() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1]), "1-0")
    router.track(tokenized("b", [2]), "2-0")
    [(stream, message)] = router.route([RequestOutput("a", [1]), RequestOutput("b", [2])]).messages
    assert stream == NAMES.generated(0)
    assert isinstance(message, EngineStepOutput)
    assert [d.request_id for d in message.deltas] == ["a", "b"]


def test_offsets_first_delta_params_and_ack_on_the_final_delta() -> None:
    router = OutputRouter(NAMES, "e", 1)
    prompt = list(range(100, 112))
    router.track(tokenized("a", prompt), "5-0")
    deltas = []
    for output in (RequestOutput("a", [1, 2]), RequestOutput("a", [3]), RequestOutput("a", [4], "length")):
        publication = router.route([output])
        [(_, message)] = publication.messages
        assert isinstance(message, EngineStepOutput)
        deltas.append((message.step, message.deltas[0], publication.acks))
    (s1, first, acks1), (s2, second, acks2), (s3, last, acks3) = deltas
    assert (s1, s2, s3) == (1, 2, 3)
    assert [d.offset for d in (first, second, last)] == [0, 2, 3]
    assert first.detokenize == DetokenizeParams(stop=["x"])
    assert first.prompt_tail == prompt[-8:]
    assert first.prompt_tokens == 12 and first.gateway_id == "gw"
    # Stop strings ride on every delta (a detokenizer taking the shard over needs them);
    # the prompt tail only matters for the first.
    assert second.detokenize == DetokenizeParams(stop=["x"]) and second.prompt_tail is None
    assert last.finish_reason == "length"
    assert acks1 == acks2 == []
    assert acks3 == [Ack(NAMES.tokenized, NAMES.engine_group, "5-0")]
    assert "a" not in router and router.pending_entry_ids() == []


def test_default_detokenize_params_are_sent_once() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1, 2]).model_copy(update={"detokenize": DetokenizeParams()}), "1-0")
    deltas = []
    for output in (RequestOutput("a", [1]), RequestOutput("a", [2])):
        [(_, message)] = router.route([output]).messages
        assert isinstance(message, EngineStepOutput)
        deltas.append(message.deltas[0])
    assert deltas[0].detokenize == DetokenizeParams()
    assert deltas[1].detokenize is None


def test_short_prompt_tail_is_the_whole_prompt() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [9, 8]), "1-0")
    [(_, message)] = router.route([RequestOutput("a", [1])]).messages
    assert isinstance(message, EngineStepOutput)
    assert message.deltas[0].prompt_tail == [9, 8]


def test_a_request_that_finishes_in_its_first_step_still_gets_its_params() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1]), "1-0")
    publication = router.route([RequestOutput("a", [], "stop")])
    [(_, message)] = publication.messages
    assert isinstance(message, EngineStepOutput)
    delta = message.deltas[0]
    assert (delta.token_ids, delta.finish_reason, delta.offset) == ([], "stop", 0)
    assert delta.detokenize is not None
    assert len(publication.acks) == 1


def test_aborted_request_is_acked_with_nothing_published() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1]), "1-0")
    router.route([RequestOutput("a", [1])])
    publication = router.route([RequestOutput("a", [], "abort")])
    assert publication.messages == []
    assert publication.acks == [Ack(NAMES.tokenized, NAMES.engine_group, "1-0")]
    assert "a" not in router


def test_refused_request_becomes_a_400_for_its_gateway() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1], gateway="gw-7"), "1-0")
    publication = router.route([RequestOutput("a", [], "error", error="prompt too long")])
    [(stream, message)] = publication.messages
    assert stream == NAMES.responses("gw-7")
    assert message == RequestFailed(
        request_id="a", status=400, error_type="invalid_request_error", message="prompt too long"
    )
    assert publication.acks == [Ack(NAMES.tokenized, NAMES.engine_group, "1-0")]


def test_outputs_for_unknown_requests_are_dropped() -> None:
    router = OutputRouter(NAMES, "e", 1)
    assert router.route([RequestOutput("ghost", [1])]).messages == []


def test_fail_and_forget_after_a_drain_or_crash() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("started", [1]), "1-0")
    router.track(tokenized("queued", [1]), "2-0")
    router.route([RequestOutput("started", [5])])
    assert router.started_ids() == ["started"]
    publication = router.fail(router.started_ids(), status=503, error_type="server_error", message="bye")
    [(stream, message)] = publication.messages
    assert stream == NAMES.responses("gw")
    assert isinstance(message, RequestFailed) and message.status == 503
    assert publication.acks == [Ack(NAMES.tokenized, NAMES.engine_group, "1-0")]
    router.forget(["queued"])
    assert len(router) == 0


def test_tracking_a_request_twice_is_refused() -> None:
    router = OutputRouter(NAMES, "e", 1)
    router.track(tokenized("a", [1]), "1-0")
    with pytest.raises(ValueError, match="already"):
        router.track(tokenized("a", [1]), "2-0")


def test_the_prompt_goes_with_the_first_delta_of_a_request_that_names_or_decodes_it() -> None:
    router = OutputRouter(NAMES, "e", 1)
    scored = tokenized("scored", [1, 2, 3])
    scored.sampling = SamplingParams(prompt_logprobs=1)
    echoed = tokenized("echoed", [4, 5])
    echoed.detokenize = DetokenizeParams(decode_prompt=True)
    router.track(scored, "1-0")
    router.track(echoed, "2-0")
    router.track(tokenized("plain", [6, 7]), "3-0")
    resumed = tokenized("resumed", [8, 9])
    resumed.sampling = SamplingParams(prompt_logprobs=1)
    router.track(resumed, "4-0", done_token_ids=[10])
    logprobs = [None, (-1.0, 2, []), (-0.5, 1, [])]
    outputs = [
        RequestOutput("scored", [7], prompt_logprobs=logprobs),
        RequestOutput("echoed", [], "length"),
        RequestOutput("plain", [8]),
        RequestOutput("resumed", [11]),
    ]
    (_, message), *_ = router.route(outputs).messages
    assert isinstance(message, EngineStepOutput)
    deltas = {d.request_id: d for d in message.deltas}
    assert deltas["scored"].prompt_token_ids == [1, 2, 3] and deltas["scored"].prompt_logprobs == logprobs
    assert deltas["echoed"].prompt_token_ids == [4, 5] and deltas["echoed"].prompt_logprobs is None
    assert deltas["plain"].prompt_token_ids is None
    assert deltas["resumed"].prompt_token_ids is None  # a takeover: the first engine sent it
    (_, later), *_ = router.route([RequestOutput("scored", [9])]).messages
    assert isinstance(later, EngineStepOutput) and later.deltas[0].prompt_token_ids is None
