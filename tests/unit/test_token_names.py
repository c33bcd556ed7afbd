"""How logprobs name tokens (vLLM's naming), on the real SmolLM2 tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from services.detokenizer.incremental import HFTokenDecoder
from services.detokenizer.token_names import TokenNamer


class CountingDecoder(HFTokenDecoder):
    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.calls = 0

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str:
        self.calls += 1
        return super().decode(token_ids, skip_special_tokens, spaces_between_special_tokens)


def names(namer: TokenNamer, ids: list[int]) -> list[str]:
    return [namer.name(token, ids[max(0, i - 4) : i]) for i, token in enumerate(ids)]


@pytest.mark.parametrize("text", ["Hello world", "a😀 b", "中文字符测试", "Ünïcödé 👨‍👩‍👧", "“quoted”"])
def test_names_join_up_to_the_text_and_never_hold_half_a_character(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    got = names(TokenNamer(HFTokenDecoder(tokenizer)), ids)
    assert "".join(got) == text
    assert all("\ufffd" not in name for name in got)


def test_a_piece_of_a_character_is_named_empty_and_its_last_piece_by_the_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("a😀")
    assert all(tokenizer.decode([t]) == "\ufffd" for t in ids[1:])  # alone, each piece is incomplete
    namer = TokenNamer(HFTokenDecoder(tokenizer))
    assert names(namer, ids) == ["a", "", "", "😀"]
    # Without the pieces before it, the last one completes nothing: "".
    assert namer.name(ids[-1], ids[:1]) == ""
    # An alternative is named after the same preceding tokens as the token it stands beside.
    assert namer.name(ids[-1], ids[:-1]) == "😀"


def test_special_tokens_are_named_and_single_names_are_cached(tokenizer: Any) -> None:
    decoder = CountingDecoder(tokenizer)
    namer = TokenNamer(decoder)
    assert namer.name(2, []) == "<|im_end|>"  # special tokens keep their text, as vLLM names them
    hello = tokenizer.encode("Hello")[0]
    assert namer.name(hello, [1, 2]) == "Hello"
    calls = decoder.calls
    assert [namer.name(hello, []) for _ in range(5)] == ["Hello"] * 5
    assert decoder.calls == calls


class MetaspaceDecoder:
    """A SentencePiece-style tokenizer (Llama 2, Mistral): alone, a word's token loses its space."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models

        self.tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>"))
        self.tokenizer.decoder = decoders.Metaspace()

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_piece(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)


def test_sentencepiece_words_keep_their_space_as_vllm_restores_it() -> None:
    decoder = MetaspaceDecoder()
    assert decoder.decode([2]) == "world"  # what decoding alone gives
    namer = TokenNamer(decoder)
    assert [namer.name(2, [1]), namer.name(3, [1, 2])] == [" world", "!"]
