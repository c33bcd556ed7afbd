"""The text each token is named by in logprobs, as vLLM names it. No I/O.

A token is named by decoding it alone, special tokens included (vLLM's
``convert_ids_list_to_tokens``): " world", "<|im_end|>". A token that alone is
only part of a UTF-8 character (byte-level pieces of an emoji or a CJK
character: decoding it gives U+FFFD) is decoded again after up to four of the
tokens before it in the sequence (vLLM's ``_correct_decoded_token``; four
bytes make any character): the token that completes the character is named by
the whole character, and one that does not complete it, by "". So the names
of a sequence's tokens join up to its text (special tokens aside), and a client
never sees U+FFFD or half a character. Alternatives (top_logprobs) are named the same way, each
after the same preceding tokens of the sequence.

This is where we follow vLLM rather than OpenAI: OpenAI names such a token by
its bytes (``"bytes:\\xe2\\x80"``), vLLM by "" or the completed character.

SentencePiece tokenizers (Llama 2, Mistral) drop a word's leading space when
its token is decoded alone; as in vLLM, the space is given back when the
token's vocabulary entry starts with SentencePiece's word mark, "▁".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Preceding tokens tried as context for an incomplete character: UTF-8 has at most 4 bytes a character.
MAX_CONTEXT = 4
# Single-token names kept per detokenizer replica (a vocabulary is rarely larger).
CACHE_SIZE = 1 << 18
SENTENCEPIECE_SPACE = "\u2581"


class TokenDecoder(Protocol):
    """What a transformers tokenizer offers for decoding."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str: ...


class TokenNamer:
    """Names tokens; one per replica, shared by its requests (it caches single-token names)."""

    def __init__(self, decoder: TokenDecoder, cache_size: int = CACHE_SIZE) -> None:
        self._decoder = decoder
        self._cache: dict[int, str] = {}
        self._cache_size = cache_size
        # The vocabulary entry of a token, where the decoder tells it (HFTokenDecoder does).
        self._piece: Callable[[int], str | None] | None = getattr(decoder, "token_piece", None)

    def alone(self, token_id: int) -> str:
        """The token decoded by itself, special tokens included (and its word's space, for SentencePiece)."""
        text = self._cache.get(token_id)
        if text is None:
            text = self._decoder.decode([token_id], skip_special_tokens=False)
            if self._piece is not None and text and not text.startswith(" "):
                piece = self._piece(token_id)
                if piece is not None and piece.startswith(SENTENCEPIECE_SPACE):
                    text = " " + text
            if len(self._cache) < self._cache_size:
                self._cache[token_id] = text
        return text

    def name(self, token_id: int, context: Sequence[int]) -> str:
        """The token's name after ``context``, the tokens before it in the sequence (the last
        MAX_CONTEXT are used, and only when the token alone is an incomplete character)."""
        text = self.alone(token_id)
        if not text.endswith(REPLACEMENT_CHAR):
            return text
        context = list(context[-MAX_CONTEXT:])
        for size in range(1, len(context) + 1):
            before = context[-size:]
            joined = self._decode([*before, token_id])
            if joined.endswith(REPLACEMENT_CHAR):
                continue  # still incomplete: take one more byte of context
            # The context tokens that are themselves pieces of this character were named "":
            # their part of the character belongs to this token's name. Only the complete
            # tokens before them are context to strip.
            clean = len(before)
            while clean > 0 and self.alone(before[clean - 1]).endswith(REPLACEMENT_CHAR):
                clean -= 1
            prefix = self._decode(before[:clean]) if clean else ""
            if joined.startswith(prefix):
                return joined[len(prefix) :]
            common = 0  # a tokenizer that normalises across the boundary: strip what they share
            for a, b in zip(prefix, joined):
                if a != b:
                    break
                common += 1
            return joined[common:]
        return ""  # the character is not complete yet: its last token will carry it

    def _decode(self, token_ids: list[int]) -> str:
        return self._decoder.decode(token_ids, skip_special_tokens=False)
