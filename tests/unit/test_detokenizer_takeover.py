"""A detokenizer taking a request over mid-way sends exactly the text the first would have.

The first replica decodes part of a request and checkpoints; a second restores
the checkpoint (after a trip through the wire format) and decodes the rest. For
every cut point, the client's joined text must equal an uninterrupted run's,
byte for byte: no U+FFFD from a character split across the cut, nothing held
back (a partial stop string, an incomplete character) lost, nothing repeated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.detokenizer.incremental import HFTokenDecoder, IncrementalDetokenizer
from services.detokenizer.state import DetokenizerState
from services.gateway.registry import RequestRegistry
from shared.messages import (
    DecodeCheckpoint,
    DetokenizeParams,
    EngineStepOutput,
    FinishReason,
    ResponseBatch,
    TextDelta,
    TokenDelta,
    decode,
    encode,
)

PROMPT_TAIL = [28, 42]


def token_delta(offset: int, ids: list[int], finish: FinishReason | None = None) -> TokenDelta:
    return TokenDelta(
        request_id="r", gateway_id="gw", offset=offset, token_ids=ids, prompt_tokens=5, finish_reason=finish
    )


def feed(detok: IncrementalDetokenizer, ids: list[int], start: int, end: int, *, finish_at: int) -> list[TextDelta]:
    """Tokens ``start..end`` one at a time; the token at ``finish_at - 1`` ends the request."""
    out: list[TextDelta] = []
    for i in range(start, end):
        finish: FinishReason | None = "length" if i == finish_at - 1 else None
        emitted = detok.add(token_delta(i, [ids[i]], finish))
        if emitted is not None:
            out.append(emitted)
    return out


def over_the_wire(checkpoint: DecodeCheckpoint) -> DecodeCheckpoint:
    restored = decode(encode(checkpoint))
    assert isinstance(restored, DecodeCheckpoint)
    return restored


def with_takeover(tokenizer: Any, ids: list[int], cut: int, params: DetokenizeParams) -> tuple[list[TextDelta], ...]:
    decoder = HFTokenDecoder(tokenizer)
    first = IncrementalDetokenizer(decoder, "r", params, PROMPT_TAIL)
    before = feed(first, ids, 0, cut, finish_at=len(ids))
    if first.finished:
        return before, []
    second = IncrementalDetokenizer.restore(decoder, over_the_wire(first.checkpoint("gw")))
    return before, feed(second, ids, cut, len(ids), finish_at=len(ids))


def uninterrupted(tokenizer: Any, ids: list[int], params: DetokenizeParams) -> list[TextDelta]:
    detok = IncrementalDetokenizer(HFTokenDecoder(tokenizer), "r", params, PROMPT_TAIL)
    return feed(detok, ids, 0, len(ids), finish_at=len(ids))


def assert_contiguous(deltas: list[TextDelta]) -> None:
    """Each delta's offset is where the text so far ends: what the gateway dedups by."""
    sent = 0
    for delta in deltas:
        assert delta.offset == sent
        sent += len(delta.text)


TEXTS = [
    "Открыться миру: съешь же ещё этих мягких французских булок.",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 mid-text.",
    "日本語のテキスト、中文字符，한국어 문장도.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_every_cut_point_gives_the_uninterrupted_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    params = DetokenizeParams()
    expected = uninterrupted(tokenizer, ids, params)
    assert "".join(d.text for d in expected) == tokenizer.decode(ids)
    cuts_inside_a_character = 0
    for cut in range(len(ids) + 1):
        before, after = with_takeover(tokenizer, ids, cut, params)
        joined = before + after
        assert "".join(d.text for d in joined).encode() == tokenizer.decode(ids).encode(), cut
        assert all("\ufffd" not in d.text for d in joined)
        assert [d.token_ids for d in joined] == [d.token_ids for d in expected]  # same deltas, same boundaries
        assert_contiguous(joined)
        cuts_inside_a_character += tokenizer.decode(ids[:cut]).endswith("\ufffd")
    assert cuts_inside_a_character > 0  # the test covers a character split across replicas


def test_a_stop_string_held_back_across_the_takeover_is_still_cut(tokenizer: Any) -> None:
    text = "Ответ: 42 😀</answer> and then more text"
    ids = tokenizer.encode(text)
    params = DetokenizeParams(stop=["</answer>"])
    held_back_at_cut = 0
    for cut in range(len(ids) + 1):
        before, after = with_takeover(tokenizer, ids, cut, params)
        joined = before + after
        assert "".join(d.text for d in joined) == "Ответ: 42 😀", cut
        assert joined[-1].finish_reason == "stop"
        assert_contiguous(joined)
        decoded_before = tokenizer.decode(ids[:cut])
        held_back_at_cut += "</" in decoded_before and "</answer>" not in decoded_before
    assert held_back_at_cut > 0  # some cuts fall while "</ans..." was held back


def test_a_partial_stop_string_that_was_not_one_is_sent_after_the_takeover(tokenizer: Any) -> None:
    ids = tokenizer.encode("x </ans</b> done</answ")
    params = DetokenizeParams(stop=["</answer>"])
    for cut in range(len(ids) + 1):
        before, after = with_takeover(tokenizer, ids, cut, params)
        assert "".join(d.text for d in before + after) == tokenizer.decode(ids), cut


def test_include_stop_str_in_output_across_the_takeover(tokenizer: Any) -> None:
    ids = tokenizer.encode("one, two, three, four")
    params = DetokenizeParams(stop=["three"], include_stop_str_in_output=True)
    for cut in range(len(ids) + 1):
        before, after = with_takeover(tokenizer, ids, cut, params)
        assert "".join(d.text for d in before + after) == "one, two, three", cut


def test_tokens_already_in_the_checkpoint_are_not_decoded_again(tokenizer: Any) -> None:
    # An engine re-running the request after its own failover resends output from offset 0.
    decoder = HFTokenDecoder(tokenizer)
    ids = tokenizer.encode("Привет, мир!")
    first = IncrementalDetokenizer(decoder, "r", DetokenizeParams(), PROMPT_TAIL)
    sent = feed(first, ids, 0, 4, finish_at=len(ids))
    second = IncrementalDetokenizer.restore(decoder, over_the_wire(first.checkpoint("gw")))
    rest = second.add(token_delta(0, ids, "length"))
    assert rest is not None
    assert "".join(d.text for d in sent) + rest.text == "Привет, мир!"
    assert rest.usage is not None and rest.usage.completion_tokens == len(ids)


# -- many requests: DetokenizerState ------------------------------------------------------


def step(*deltas: TokenDelta) -> EngineStepOutput:
    return EngineStepOutput(engine_id="e", step=1, deltas=list(deltas))


def test_a_successor_state_continues_every_request_from_the_checkpoints(tokenizer: Any) -> None:
    texts = {"a": "Открыться 😀 миру", "b": "plain words, more words and E ENDING", "c": "🎉🎉 fin"}
    params = {"a": DetokenizeParams(), "b": DetokenizeParams(stop=["END"]), "c": DetokenizeParams()}
    ids = {rid: tokenizer.encode(text) for rid, text in texts.items()}
    longest = max(len(v) for v in ids.values())

    def delta(rid: str, i: int) -> TokenDelta:
        last = i == len(ids[rid]) - 1
        return TokenDelta(
            request_id=rid,
            gateway_id="gw",
            offset=i,
            token_ids=[ids[rid][i]],
            prompt_tokens=3,
            finish_reason="length" if last else None,
            detokenize=params[rid] if i == 0 else None,
            prompt_tail=PROMPT_TAIL if i == 0 else None,
        )

    steps = [step(*(delta(rid, i) for rid in ids if i < len(ids[rid]))) for i in range(longest)]
    cut = 5
    first = DetokenizerState(HFTokenDecoder(tokenizer))
    text: dict[str, str] = {rid: "" for rid in ids}
    latest: dict[str, DecodeCheckpoint] = {}
    for s in steps[:cut]:
        result = first.process([s], now=0.0)
        for d in result.responses.get("gw", []):
            text[d.request_id] += d.text
        latest.update((c.request_id, over_the_wire(c)) for c in result.checkpoints)

    second = DetokenizerState(HFTokenDecoder(tokenizer))
    assert sorted(second.unknown(["a", "b", "c", "a"])) == ["a", "b", "c"]
    second.restore(latest.values(), now=1.0)
    assert second.unknown(["a", "b", "c"]) == []
    aborts: list[str] = []
    for s in steps[cut - 2 :]:  # two steps replayed: published already, then claimed again
        result = second.process([s], now=1.0)
        aborts += result.aborts
        for d in result.responses.get("gw", []):
            text[d.request_id] += d.text
    assert text == {"a": "Открыться 😀 миру", "b": "plain words, more words and E ", "c": "🎉🎉 fin"}
    assert aborts == ["b"]  # stopped by its string while the engine still ran


def test_a_finished_request_stays_finished_on_the_successor(tokenizer: Any) -> None:
    ids = tokenizer.encode("Yes. No. Maybe.")
    first = DetokenizerState(HFTokenDecoder(tokenizer))
    start = TokenDelta(
        request_id="r",
        gateway_id="gw",
        offset=0,
        token_ids=ids,
        prompt_tokens=3,
        detokenize=DetokenizeParams(stop=["No"]),
    )
    (checkpoint,) = first.process([step(start)], now=0.0).checkpoints
    assert checkpoint.finish_reason == "stop" and checkpoint.window == [] and checkpoint.text_tail == ""

    second = DetokenizerState(HFTokenDecoder(tokenizer))
    second.restore([over_the_wire(checkpoint)], now=1.0)
    late = TokenDelta(request_id="r", gateway_id="gw", offset=len(ids), token_ids=[13], prompt_tokens=3)
    result = second.process([step(late)], now=1.0)
    assert result.responses == {} and result.aborts == [] and result.checkpoints == []


def test_forgotten_state_is_looked_up_again(tokenizer: Any) -> None:
    state = DetokenizerState(HFTokenDecoder(tokenizer))
    state.process([step(TokenDelta(request_id="r", gateway_id="gw", offset=0, token_ids=[42], prompt_tokens=1))], 0.0)
    assert state.unknown(["r"]) == []
    state.forget(["r"])
    assert state.unknown(["r"]) == ["r"] and len(state) == 0


# -- the gateway: text published twice reaches the client once ------------------------


def test_the_gateway_drops_text_it_already_delivered() -> None:
    async def scenario() -> None:
        registry = RequestRegistry(capacity=4)
        queue = registry.open("r")

        def batch(*deltas: tuple[int, str, FinishReason | None]) -> ResponseBatch:
            return ResponseBatch(
                deltas=[TextDelta(request_id="r", text=t, offset=o, finish_reason=f) for o, t, f in deltas]
            )

        registry.dispatch(batch((0, "Отк", None), (3, "рыться", None)))
        registry.dispatch(batch((3, "рыться", None)))  # a replay: dropped whole
        registry.dispatch(batch((5, "ться ми", None)))  # overlapping: only the new part
        registry.dispatch(batch((12, "ру", "stop")))
        # Text waiting together comes out as one delta (the buffer coalesces it).
        assert queue.take().text == "Открыться миру"  # type: ignore[union-attr]
        registry.dispatch(ResponseBatch(deltas=[TextDelta(request_id="r", text="no offset")]))
        assert queue.take().text == "no offset"  # type: ignore[union-attr]  # older producers: as before
        registry.release("r")

    asyncio.run(scenario())
