"""IncrementalDetokenizer on real SmolLM2 token streams: what a streaming client would read."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models

from services.detokenizer.incremental import HFTokenDecoder, IncrementalDetokenizer
from shared.messages import DetokenizeParams, FinishReason, TextDelta, TokenDelta

EOS = 2  # <|im_end|>
IM_START = 1


def token_delta(
    offset: int, ids: list[int], finish: FinishReason | None = None, logprobs: list[Any] | None = None
) -> TokenDelta:
    return TokenDelta(
        request_id="r",
        gateway_id="gw",
        offset=offset,
        token_ids=ids,
        prompt_tokens=7,
        finish_reason=finish,
        logprobs=logprobs,
    )


def stream(
    detok: IncrementalDetokenizer, ids: list[int], *, step: int = 1, finish: FinishReason = "length"
) -> list[TextDelta]:
    """Feed ids ``step`` at a time, the last delta finishing; returns what was emitted."""
    out: list[TextDelta] = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        last = start + step >= len(ids)
        emitted = detok.add(token_delta(start, chunk, finish if last else None))
        if emitted is not None:
            out.append(emitted)
        if detok.finished:
            break
    return out


def text_of(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


def detokenizer(tokenizer: Any, prompt_tail: list[int] | None = None, **params: Any) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(HFTokenDecoder(tokenizer), "r", DetokenizeParams(**params), prompt_tail or [])


TEXTS = [
    "Hello world! This is a plain sentence, with punctuation; and numbers: 3.14159.",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 in the middle of text.",
    "中文字符测试：你好，世界！日本語のテキストも。한국어 문장도.",
    "  leading spaces\n\ttabs and\nnew lines\n\n  def f(x):\n      return x  ",
    "Ünïcödé àccents, Ελληνικά, русский текст, עברית, العربية.",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_token_by_token_equals_decoding_the_whole(tokenizer: Any, text: str, step: int) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(detokenizer(tokenizer), ids, step=step)

    assert text_of(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d.text for d in deltas)  # no character is ever sent in halves
    assert [t for d in deltas for t in d.token_ids] == ids  # every token reported exactly once
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == len(ids)


def test_characters_split_over_tokens_wait_for_their_last_byte(tokenizer: Any) -> None:
    ids = tokenizer.encode("a😀")
    assert "\ufffd" in tokenizer.decode(ids[1:2])  # the emoji really spans tokens
    detok = detokenizer(tokenizer)
    outputs = [detok.add(token_delta(i, [t])) for i, t in enumerate(ids)]
    assert [o.text if o else None for o in outputs] == ["a"] + [None] * (len(ids) - 2) + ["😀"]
    # Tokens that produced no text yet are reported with the text they complete.
    assert outputs[-1] is not None and outputs[-1].token_ids == ids[1:]


def test_output_cut_inside_a_character_ends_like_a_full_decode(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 😀")[:-1]  # generation stopped mid-emoji
    assert text_of(stream(detokenizer(tokenizer), ids)) == tokenizer.decode(ids)


def test_prompt_tail_is_context_not_output(tokenizer: Any) -> None:
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    generated = tokenizer.encode(" Sure, here it is.")
    deltas = stream(detokenizer(tokenizer, prompt_tail=prompt[-8:]), generated)
    assert text_of(deltas) == " Sure, here it is."


class _MetaspaceDecoder:
    """A SentencePiece-style decoder (Llama, Mistral): a text's first word loses its space."""

    def __init__(self) -> None:
        vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁how": 4}
        self.tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        self.tokenizer.decoder = decoders.Metaspace()

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_prompt_tail_keeps_the_space_before_the_first_generated_word() -> None:
    decoder = _MetaspaceDecoder()
    assert decoder.decode([2, 3]) == "world!"  # alone, the space is lost
    with_context = IncrementalDetokenizer(decoder, "r", DetokenizeParams(), prompt_tail=[1])
    assert text_of(stream(with_context, [2, 3, 4])) == " world! how"


def test_stop_string_across_tokens_cuts_the_text_and_finishes(tokenizer: Any) -> None:
    ids = tokenizer.encode("The answer is 42.\nQuestion: next one")
    stop = "\nQuestion"
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # no single token holds it
    detok = detokenizer(tokenizer, stop=[stop])
    deltas = stream(detok, ids)

    assert text_of(deltas) == "The answer is 42."
    assert deltas[-1].finish_reason == "stop" and detok.stopped_by_string
    consumed = len(tokenizer.encode("The answer is 42.\nQuestion"))
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == consumed


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after(tokenizer: Any) -> None:
    ids = tokenizer.encode("one, two, three, four")
    deltas = stream(detokenizer(tokenizer, stop=["three"], include_stop_str_in_output=True), ids)
    assert text_of(deltas) == "one, two, three"


def test_text_that_may_start_a_stop_string_is_held_back_until_decided(tokenizer: Any) -> None:
    detok = detokenizer(tokenizer, stop=["</answer>"])
    ids = tokenizer.encode("x </ans</b> done</answ")
    sent = [d.text for d in stream(detok, ids, finish="length")]
    # While "</ans" could still become "</answer>", none of it was sent; once
    # it could not (or generation ended), all of it was.
    assert "".join(sent[:-1]) == "x </ans</b> done"
    assert sent[-1] == "</answ"
    assert "".join(sent) == tokenizer.decode(ids)


def test_stop_found_in_a_multi_token_delta(tokenizer: Any) -> None:
    ids = tokenizer.encode("alpha beta gamma delta")
    detok = detokenizer(tokenizer, stop=["gamma", "beta"])
    (only,) = stream(detok, ids, step=len(ids))
    assert only.text == "alpha " and only.finish_reason == "stop"


def test_the_stop_token_is_counted_but_not_shown(tokenizer: Any) -> None:
    ids = tokenizer.encode("Bye.") + [EOS]
    shown = stream(detokenizer(tokenizer, skip_special_tokens=False), ids, finish="stop")
    assert text_of(shown) == "Bye." and shown[-1].usage.completion_tokens == len(ids)  # type: ignore[union-attr]
    included = stream(
        detokenizer(tokenizer, skip_special_tokens=False, include_stop_str_in_output=True), ids, finish="stop"
    )
    assert text_of(included) == "Bye.<|im_end|>"


def test_skip_special_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("a") + [IM_START] + tokenizer.encode("b")
    assert text_of(stream(detokenizer(tokenizer), ids)) == "ab"
    assert text_of(stream(detokenizer(tokenizer, skip_special_tokens=False), ids)) == "a<|im_start|>b"


def test_repeated_and_overlapping_deltas_are_decoded_once(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four five six")
    detok = detokenizer(tokenizer)
    first = detok.add(token_delta(0, ids[:3]))
    assert detok.add(token_delta(0, ids[:3])) is None  # delivered twice
    overlap = detok.add(token_delta(1, ids[1:5]))  # partly new
    last = detok.add(token_delta(5, ids[5:], "length"))
    outputs = [d for d in (first, overlap, last) if d is not None]
    assert text_of(outputs) == tokenizer.decode(ids)
    assert [t for d in outputs for t in d.token_ids] == ids
    assert last is not None and last.usage is not None and last.usage.completion_tokens == len(ids)
    assert detok.add(token_delta(5, ids[5:], "length")) is None  # after the end, nothing more


def test_logprobs_travel_with_their_tokens_named_and_placed(tokenizer: Any) -> None:
    ids = tokenizer.encode("a😀 b")
    logprobs = [(-0.1 * i, [(i, -0.1 * i)]) for i in range(len(ids))]
    detok = detokenizer(tokenizer)
    outputs = [detok.add(token_delta(i, [t], logprobs=[logprobs[i]])) for i, t in enumerate(ids)]
    emitted = [o for o in outputs if o is not None]
    named = [n for o in emitted for n in (o.named_logprobs or [])]
    assert [n[0] for n in named] == ids and [n[3] for n in named] == [lp for lp, _ in logprobs]
    # The emoji's pieces are named "" until the one that completes it; names join up to the text.
    assert [n[1] for n in named] == ["a", "", "", "😀", " b"]
    assert [n[2] for n in named] == [0, 1, 1, 1, 2]  # where each token's text starts
    assert emitted[1].named_logprobs == named[1:4]  # the emoji's tokens, reported with the emoji
    assert named[1][5] == [(IM_START, "<|im_start|>", -0.1)]  # alternatives named too, special ones as such
    assert all(o.logprobs is None for o in emitted)  # names replace the ids-only form


def test_text_offsets_are_exact_in_any_text_and_any_chunking(tokenizer: Any) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        for step in (1, 4):
            detok = detokenizer(tokenizer)
            deltas = []
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                last = start + step >= len(ids)
                delta = token_delta(start, chunk, "length" if last else None, logprobs=[(-1.0, [])] * len(chunk))
                if (out := detok.add(delta)) is not None:
                    deltas.append(out)
            output = text_of(deltas)
            named = [n for d in deltas for n in (d.named_logprobs or [])]
            assert "".join(n[1] for n in named) == output == text
            for (_, name, offset, *_), next_offset in zip(named, [n[2] for n in named[1:]] + [len(output)]):
                assert output[offset:next_offset] == name


def test_the_stop_token_is_named_at_the_end_and_a_stop_string_cut_clamps_offsets(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hi there")
    detok = detokenizer(tokenizer)
    out = detok.add(token_delta(0, [*ids, EOS], "stop", logprobs=[(-0.5, [])] * (len(ids) + 1)))
    assert out is not None and out.text == "Hi there" and out.named_logprobs is not None
    assert out.named_logprobs[-1][1:3] == ("<|im_end|>", len("Hi there"))
    ids = tokenizer.encode("one two three four")
    detok = detokenizer(tokenizer, stop=[" two"])
    out = detok.add(token_delta(0, ids, logprobs=[(-0.5, [])] * len(ids)))
    assert out is not None and out.text == "one" and out.finish_reason == "stop"
    assert out.named_logprobs is not None and [n[2] for n in out.named_logprobs] == [0, 3, 3, 3]


def prompt_delta(prompt: list[int], ids: list[int], **fields: Any) -> TokenDelta:
    return TokenDelta(
        request_id="r",
        gateway_id="gw",
        offset=0,
        token_ids=ids,
        prompt_tokens=len(prompt),
        prompt_token_ids=prompt,
        prompt_tail=prompt[-8:],
        **fields,
    )


def test_the_prompt_is_named_with_offsets_in_its_text_on_the_first_delta(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Le café 😀 ok")
    prompt_logprobs: list[Any] = [None] + [(-float(i), i, [(i, -0.5)]) for i in range(1, len(prompt))]
    detok = detokenizer(tokenizer)
    # The first output token alone is half a character: no text yet, but the prompt goes out now.
    first = detok.add(prompt_delta(prompt, tokenizer.encode("😀")[:1], prompt_logprobs=prompt_logprobs))
    assert first is not None and first.text == "" and first.prompt_text is None
    named = first.prompt_logprobs
    assert named is not None and [n[0] for n in named] == prompt
    assert "".join(n[1] for n in named) == "Le café 😀 ok"
    assert named[0][3:] == (None, None, [])  # nothing predicts the first token
    assert named[1][3:5] == (-1.0, 1) and named[1][5] == [(IM_START, "<|im_start|>", -0.5)]
    for name, offset in ((n[1], n[2]) for n in named):
        assert "Le café 😀 ok"[offset:].startswith(name)
    later = detok.add(token_delta(1, tokenizer.encode("😀")[1:], "length"))
    assert later is not None and later.prompt_logprobs is None and later.text == "😀"


def test_the_prompt_text_is_decoded_for_an_echo_of_token_ids(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Say ünïcödé")
    detok = detokenizer(tokenizer, decode_prompt=True)
    # max_tokens 0: no output token, the request ends on its first delta.
    out = detok.add(prompt_delta(prompt, [], finish_reason="length"))
    assert out is not None and out.prompt_text == "Say ünïcödé" and out.prompt_logprobs is None
    assert out.text == "" and out.usage is not None and out.usage.completion_tokens == 0
    assert out.finish_reason == "length"


def test_the_prompt_keeps_its_special_tokens_in_its_text_and_names(tokenizer: Any) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    prompt = tokenizer.encode(text)
    assert prompt[0] == IM_START and prompt[-1] == EOS
    logprobs: list[Any] = [None] + [(-1.0, 1, [])] * (len(prompt) - 1)
    detok = detokenizer(tokenizer, decode_prompt=True)  # skip_special_tokens: the output's, not the prompt's
    out = detok.add(prompt_delta(prompt, [], finish_reason="length", prompt_logprobs=logprobs))
    assert out is not None and out.prompt_text == text and out.prompt_logprobs is not None
    assert "".join(n[1] for n in out.prompt_logprobs) == text
    assert [n[2] for n in out.prompt_logprobs] == [text.index(n[1]) for n in out.prompt_logprobs]


def test_unsent_named_logprobs_survive_a_checkpoint(tokenizer: Any) -> None:
    ids = tokenizer.encode("a😀")
    detok = detokenizer(tokenizer)
    for i, token in enumerate(ids[:2]):
        detok.add(token_delta(i, [token], logprobs=[(-1.0, [(token, -1.0)])]))
    checkpoint = detok.checkpoint("gw")
    assert checkpoint.unsent_named is not None and len(checkpoint.unsent_named) == 1
    restored = IncrementalDetokenizer.restore(HFTokenDecoder(tokenizer), checkpoint)
    out = restored.add(token_delta(2, ids[2:], "length", logprobs=[(-1.0, [])] * (len(ids) - 2)))
    assert out is not None and out.text == "😀"
    assert out.named_logprobs is not None and [n[0] for n in out.named_logprobs] == ids[1:]
    assert [n[1] for n in out.named_logprobs] == ["", "", "😀"][-(len(ids) - 1) :]


def test_a_final_delta_without_tokens_still_ends_the_request(tokenizer: Any) -> None:
    detok = detokenizer(tokenizer, stop=["zzz"])
    ids = tokenizer.encode("Hello z")
    partial = detok.add(token_delta(0, ids))
    assert partial is not None and partial.text == "Hello "  # "z" might start "zzz"
    final = detok.add(token_delta(len(ids), [], "abort"))
    assert final is not None and final.text == "z" and final.finish_reason == "abort"
    assert final.usage is not None and final.usage.completion_tokens == len(ids)
