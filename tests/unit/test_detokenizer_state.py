"""DetokenizerState: engine steps for many requests -> text per gateway, plus aborts."""

from __future__ import annotations

from typing import Any

from services.detokenizer.incremental import HFTokenDecoder
from services.detokenizer.state import DetokenizerState
from shared.messages import DetokenizeParams, EngineStepOutput, FinishReason, TokenDelta


def delta(
    request_id: str,
    offset: int,
    ids: list[int],
    *,
    gateway: str = "gw-1",
    finish: FinishReason | None = None,
    first: DetokenizeParams | None = None,
) -> TokenDelta:
    return TokenDelta(
        request_id=request_id,
        gateway_id=gateway,
        offset=offset,
        token_ids=ids,
        prompt_tokens=3,
        finish_reason=finish,
        detokenize=first,
        prompt_tail=[1, 2, 3] if first is not None else None,
    )


def step(*deltas: TokenDelta) -> EngineStepOutput:
    return EngineStepOutput(engine_id="e", step=1, deltas=list(deltas))


def test_text_goes_to_each_requests_gateway(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    a, b = tokenizer.encode("Hello there"), tokenizer.encode("你好")
    result = state.process(
        [
            step(
                delta("r-a", 0, a, first=DetokenizeParams()),
                delta("r-b", 0, b, gateway="gw-2", first=DetokenizeParams()),
            )
        ],
        now=0.0,
    )
    assert {gw: [(d.request_id, d.text) for d in ds] for gw, ds in result.responses.items()} == {
        "gw-1": [("r-a", "Hello there")],
        "gw-2": [("r-b", "你好")],
    }
    assert result.aborts == []
    assert len(state) == 2


def test_stop_string_ends_the_request_and_asks_engines_to_abort(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    ids = tokenizer.encode("one two three four")
    assert len(ids) == 4
    result = state.process([step(delta("r", 0, ids[:2], first=DetokenizeParams(stop=[" three"])))], now=0.0)
    assert result.aborts == [] and result.responses["gw-1"][0].text == "one two"

    result = state.process([step(delta("r", 2, ids[2:]))], now=1.0)
    (final,) = result.responses["gw-1"]
    assert final.finish_reason == "stop" and final.text == ""
    assert result.aborts == ["r"]
    assert len(state) == 0
    # The engine keeps going until the abort lands: that output is dropped.
    late = state.process([step(delta("r", 4, tokenizer.encode(" five")))], now=2.0)
    assert late.responses == {} and late.aborts == []


def test_a_request_the_engine_finished_needs_no_abort(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    ids = tokenizer.encode("short answer")
    result = state.process([step(delta("r", 0, ids, finish="length", first=DetokenizeParams(stop=["answer"])))], 0.0)
    assert result.responses["gw-1"][0].finish_reason == "stop"  # the stop string still wins
    assert result.aborts == []


def test_output_of_a_request_first_seen_mid_way_is_still_decoded(tokenizer: Any) -> None:
    # The replica that saw this request's start died; its later output lands here.
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    ids = tokenizer.encode("carries on from here")
    result = state.process([step(delta("r", 12, ids))], now=0.0)
    assert result.responses["gw-1"][0].text == "carries on from here"
    final = state.process([step(delta("r", 12 + len(ids), [], finish="length"))], now=1.0).responses["gw-1"][0]
    assert final.usage is not None and final.usage.completion_tokens == 12 + len(ids)


def test_a_shard_taken_over_mid_request_still_applies_its_stop_strings(tokenizer: Any) -> None:
    # Engines repeat non-default parameters on every delta, so the new holder has them.
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    ids = tokenizer.encode("and then it said STOP here")
    result = state.process([step(delta("r", 40, ids, first=DetokenizeParams(stop=["STOP"])))], now=0.0)
    (final,) = result.responses["gw-1"]
    assert (final.text, final.finish_reason) == ("and then it said ", "stop")
    assert result.aborts == ["r"]


def test_idle_requests_are_forgotten(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer), idle_timeout_s=10.0)
    state.process([step(delta("old", 0, [100], first=DetokenizeParams()))], now=0.0)
    state.process([step(delta("new", 0, [100], first=DetokenizeParams()))], now=8.0)
    assert state.expire(now=12.0) == ["old"]
    assert state.active_request_ids() == ["new"]


class _BrokenDecoder:
    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str:
        if 666 in token_ids:
            raise ValueError("cannot decode 666")
        return "x" * len(token_ids)


def test_a_decoding_failure_ends_that_request_only() -> None:
    state = DetokenizerState(_BrokenDecoder())
    result = state.process(
        [step(delta("bad", 0, [5, 666], first=DetokenizeParams()), delta("good", 0, [5, 6], first=DetokenizeParams()))],
        now=0.0,
    )
    bad, good = result.responses["gw-1"]
    assert (bad.request_id, bad.finish_reason) == ("bad", "error")
    assert (good.request_id, good.text, good.finish_reason) == ("good", "xx", None)
    assert result.aborts == ["bad"]


def test_requests_starting_in_a_batch_are_told_apart_from_those_to_look_up(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    state.process([step(delta("known", 0, [5], first=DetokenizeParams()))], now=0.0)
    outputs = [
        step(
            delta("new", 0, [5], first=DetokenizeParams()),
            delta("known", 1, [6]),
            delta("mid-way", 3, [7]),  # its first entries went to another replica
            delta("resumed", 2, [8], first=DetokenizeParams()),  # another engine continues it
        ),
        step(delta("new", 1, [6]), delta("no-params", 0, [9])),
    ]
    assert state.starting_and_unknown(outputs) == (["new"], ["mid-way", "resumed", "no-params"])
