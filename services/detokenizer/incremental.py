"""Token ids to text, one request at a time, as the tokens arrive. No I/O.

Decoding works on a small window of ids (after vLLM's detokenize_incrementally):
``prefix_offset..read_offset`` is text already produced, ``read_offset..`` is
new. The new text is ``decode(window) - decode(prefix part)``; decoding both
from the same start keeps tokenizer quirks (a SentencePiece word's leading
space, byte-level pieces) consistent. While the window ends in an incomplete
UTF-8 character (decode gives U+FFFD) nothing is produced and the window
grows, so a character split over tokens is never emitted in halves.

Stop strings: once one appears in the output, the text is cut before it (or
after it, with ``include_stop_str_in_output``) and the request finishes with
"stop". While streaming, a tail of the text that could be the start of a stop
string is held back until it is decided either way.

Logprobs: for a request that asks for them, tokens are decoded one at a time,
so that each token's text offset (where its text starts in the output) is
known, and each token and its alternatives are named (token_names.py). A
request's prompt (TokenDelta.prompt_token_ids, on its first delta) is named the
same way for prompt logprobs, with offsets into the prompt's own text, and
decoded for the echo of a prompt given as token ids; both go out at once with
the first text delta, never into a checkpoint.

``checkpoint()`` / ``restore()``: the whole decoding state in a few dozen
bytes (the window, the unsent text and the stop-string context), so another
replica can continue a request exactly where this one left it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from services.detokenizer.token_names import MAX_CONTEXT, REPLACEMENT_CHAR, TokenDecoder, TokenNamer
from shared.messages import (
    DecodeCheckpoint,
    DetokenizeParams,
    FinishReason,
    NamedToken,
    PromptTokenLogprobs,
    TextDelta,
    TokenDelta,
    TokenLogprobs,
    Usage,
)

log = logging.getLogger(__name__)

__all__ = ["HFTokenDecoder", "IncrementalDetokenizer", "REPLACEMENT_CHAR", "TokenDecoder"]


class HFTokenDecoder:
    """A transformers tokenizer as a TokenDecoder.

    Tokenization-space clean-up ("hello ." -> "hello.") is turned off: it
    rewrites text across token boundaries, so a window's decode would no
    longer extend its prefix's (vLLM decodes without it for the same reason).
    ``spaces_between_special_tokens`` is passed on, as vLLM passes it: a tokenizer
    that implements it (a custom or legacy one) honours it; transformers 5's
    tokenizers ignore it, as vLLM's fast detokenizer does.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True
    ) -> str:
        text: str = self._tokenizer.decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        return text

    def token_piece(self, token_id: int) -> str | None:
        """The token's vocabulary entry ("▁world", "Ġworld"), for naming it (token_names.py)."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        return piece if isinstance(piece, str) else None


class IncrementalDetokenizer:
    """One request's decoding state: feed TokenDeltas, get TextDeltas."""

    def __init__(
        self,
        decoder: TokenDecoder,
        request_id: str,
        params: DetokenizeParams,
        prompt_tail: Sequence[int] = (),
        *,
        start_offset: int = 0,
        namer: TokenNamer | None = None,
    ) -> None:
        """``namer``: names tokens for logprobs; a replica shares one among its requests."""
        self.request_id = request_id
        self.params = params
        self._decoder = decoder
        self._namer = namer if namer is not None else TokenNamer(decoder)
        self._stops = [s for s in params.stop if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        # The prompt tail is decoding context only: it is never part of the output.
        self._ids: list[int] = list(prompt_tail)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # the output text decoded so far (cut at a stop string)
        # Code points of output before ``text``: non-zero once restored from a
        # checkpoint, which carries only the end of the text.
        self.text_base = 0
        self._sent = 0  # characters of ``text`` already emitted
        self.num_tokens = start_offset  # output tokens seen: the next expected offset
        self.finish_reason: FinishReason | None = None
        self.stopped_by_string = False
        # Tokens (and their named logprobs) not yet reported in a TextDelta, because
        # they produced no text yet.
        self._unsent_ids: list[int] = []
        self._unsent_named: list[NamedToken] = []
        # The prompt, named and decoded when asked (see the module's doc): sent with the next delta.
        self._prompt_seen = False
        self._prompt_named: list[NamedToken] | None = None
        self._prompt_text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # -- takeover --------------------------------------------------------------------

    def checkpoint(self, gateway_id: str) -> DecodeCheckpoint:
        """The state a successor needs to produce exactly the text this replica would."""
        checkpoint = DecodeCheckpoint(
            request_id=self.request_id,
            gateway_id=gateway_id,
            detokenize=self.params,
            num_tokens=self.num_tokens,
            finish_reason=self.finish_reason,
            stopped_by_string=self.stopped_by_string,
        )
        if self.finished:
            return checkpoint  # later deltas are only dropped: nothing else is needed
        # A stop string completed by the next tokens can start this far back.
        start = max(0, min(self._sent, len(self.text) - max(0, self._longest_stop - 1)))
        checkpoint.window = self._ids[self._prefix_offset :]
        checkpoint.read_offset = self._read_offset - self._prefix_offset
        checkpoint.text_offset = self.text_base + start
        checkpoint.text_tail = self.text[start:]
        checkpoint.sent = self._sent - start
        checkpoint.unsent_token_ids = list(self._unsent_ids)
        checkpoint.unsent_named = list(self._unsent_named) or None
        return checkpoint

    @classmethod
    def restore(
        cls, decoder: TokenDecoder, checkpoint: DecodeCheckpoint, namer: TokenNamer | None = None
    ) -> IncrementalDetokenizer:
        restored = cls(
            decoder, checkpoint.request_id, checkpoint.detokenize, start_offset=checkpoint.num_tokens, namer=namer
        )
        restored._ids = list(checkpoint.window)
        restored._read_offset = checkpoint.read_offset
        restored.text_base = checkpoint.text_offset
        restored.text = checkpoint.text_tail
        restored._sent = checkpoint.sent
        restored._unsent_ids = list(checkpoint.unsent_token_ids)
        restored._unsent_named = list(checkpoint.unsent_named or [])
        if checkpoint.unsent_logprobs and not restored._unsent_named:
            # Written by an older version, which kept ids: named here, at the end of the text.
            end = restored.text_base + len(restored.text)
            restored._unsent_named = [
                restored._named(token, (), end, logprobs)
                for token, logprobs in zip(checkpoint.unsent_token_ids, checkpoint.unsent_logprobs)
            ]
        restored.finish_reason = checkpoint.finish_reason
        restored.stopped_by_string = checkpoint.stopped_by_string
        restored._prompt_seen = True  # the prompt went out with the request's first text
        return restored

    def add(self, delta: TokenDelta) -> TextDelta | None:
        """Take one engine delta; returns the text to send, or None if there is none yet."""
        if self.finished:
            return None
        skip = self.num_tokens - delta.offset
        if skip < 0:
            # Tokens in between never reached us (their entries were lost);
            # the text continues after the gap rather than stalling.
            log.warning("%s: output tokens %d..%d missing", self.request_id, self.num_tokens, delta.offset - 1)
            skip = 0
        new_ids = list(delta.token_ids[skip:])
        # The prompt rides on a request's first delta (offset 0): taken once.
        prompt = delta.prompt_token_ids if not self._prompt_seen and self.num_tokens == 0 else None
        if not new_ids and delta.finish_reason is None and prompt is None:
            return None  # a repeat of what was already seen
        if prompt is not None:
            self._take_prompt(prompt, delta.prompt_logprobs)
        new_logprobs = list(delta.logprobs[skip:]) if delta.logprobs else []
        self.num_tokens = max(self.num_tokens, delta.offset + len(delta.token_ids))
        self._unsent_ids += new_ids

        to_decode = len(new_ids)
        if delta.finish_reason == "stop" and new_ids and not self.params.include_stop_str_in_output:
            # The engine stopped on a stop token (EOS or stop_token_ids): it
            # counts as output but, as in vLLM, is not part of the text.
            to_decode -= 1
        text_before = len(self.text)
        if new_logprobs:
            # One token at a time: each token's text offset is where the text stood before it.
            for i, token in enumerate(new_ids):
                offset = self.text_base + len(self.text)
                context = self._ids[-MAX_CONTEXT:]
                if i < to_decode:
                    self._decode([token])
                if i < len(new_logprobs):
                    self._unsent_named.append(self._named(token, context, offset, new_logprobs[i]))
        else:
            self._decode(new_ids[:to_decode])
        if delta.finish_reason is not None:
            self._flush()
        self._check_stop_strings(text_before)
        if self.finish_reason is None:
            self.finish_reason = delta.finish_reason
        return self._emit(prompt_tokens=delta.prompt_tokens)

    # -- naming (logprobs) ----------------------------------------------------------

    def _named(self, token: int, context: Sequence[int], offset: int, logprobs: TokenLogprobs) -> NamedToken:
        chosen, alternatives = logprobs
        name = self._namer.name
        named_alternatives = [(alt, name(alt, context), value) for alt, value in alternatives]
        return (token, name(token, context), offset, chosen, None, named_alternatives)

    def _take_prompt(self, prompt: list[int], logprobs: list[PromptTokenLogprobs | None] | None) -> None:
        """Name the prompt's tokens (with their offsets in its text) and decode it, as asked.

        The prompt's text keeps its special tokens: it is the input as the model saw it, as a
        text prompt's echo shows it (skip_special_tokens is about the output)."""
        self._prompt_seen = True
        as_input = DetokenizeParams(
            skip_special_tokens=False, spaces_between_special_tokens=self.params.spaces_between_special_tokens
        )
        if logprobs is None:
            if self.params.decode_prompt:
                self._prompt_text = self._decoder.decode(
                    prompt,
                    skip_special_tokens=False,
                    spaces_between_special_tokens=as_input.spaces_between_special_tokens,
                )
            return
        # Offsets the way the output's are found: decoding one token at a time, as a stream would.
        reader = IncrementalDetokenizer(self._decoder, self.request_id, as_input, namer=self._namer)
        offsets: list[int] = []
        for token in prompt:
            offsets.append(len(reader.text))
            reader._decode([token])
        reader._flush()
        name = self._namer.name
        named: list[NamedToken] = []
        for i, token in enumerate(prompt):
            context = prompt[max(0, i - MAX_CONTEXT) : i]
            entry = logprobs[i] if i < len(logprobs) else None
            if entry is None:
                named.append((token, name(token, context), offsets[i], None, None, []))
                continue
            value, rank, alternatives = entry
            named_alternatives = [(alt, name(alt, context), alt_value) for alt, alt_value in alternatives]
            named.append((token, name(token, context), offsets[i], value, rank, named_alternatives))
        self._prompt_named = named
        if self.params.decode_prompt:
            self._prompt_text = reader.text

    # -- decoding ------------------------------------------------------------------

    def _decode(self, new_ids: list[int]) -> None:
        if not new_ids:
            return
        self._ids += new_ids
        prefix = self._text_of(self._ids[self._prefix_offset : self._read_offset])
        window = self._text_of(self._ids[self._prefix_offset :])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT_CHAR):
            self.text += window[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _text_of(self, token_ids: list[int]) -> str:
        return self._decoder.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def _flush(self) -> None:
        """At the end, whatever is left: an incomplete character decodes as U+FFFD."""
        if self._read_offset >= len(self._ids):
            return
        prefix = self._text_of(self._ids[self._prefix_offset : self._read_offset])
        window = self._text_of(self._ids[self._prefix_offset :])
        self.text += window[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)

    # -- stop strings --------------------------------------------------------------

    def _check_stop_strings(self, text_before: int) -> None:
        if not self._stops or len(self.text) == text_before:
            return
        # Only a match that ends in the new text is new; it may start earlier.
        start = max(0, text_before - self._longest_stop + 1)
        best: tuple[int, int] | None = None  # (end, start) of the match that completes first
        for stop in self._stops:
            index = self.text.find(stop, start)
            if index >= 0:
                candidate = (index + len(stop), index)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return
        end, index = best
        self.text = self.text[: end if self.params.include_stop_str_in_output else index]
        self.stopped_by_string = True
        self.finish_reason = "stop"

    def _held_back(self) -> int:
        """How many trailing characters might begin a stop string (not sent yet)."""
        if not self._stops or self.params.include_stop_str_in_output:
            return 0  # a stop string would be sent anyway; nothing to take back
        unsent = len(self.text) - self._sent
        for length in range(min(self._longest_stop - 1, unsent), 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    # -- output --------------------------------------------------------------------

    def _emit(self, *, prompt_tokens: int) -> TextDelta | None:
        end = len(self.text) if self.finished else len(self.text) - self._held_back()
        start = self._sent
        text = self.text[start:end]
        prompt_ready = self._prompt_named is not None or self._prompt_text is not None
        if not text and not self.finished and not prompt_ready:
            return None
        self._sent = max(self._sent, end)
        named = self._unsent_named
        if self.stopped_by_string:
            # Tokens after the cut start where the text now ends.
            text_end = self.text_base + len(self.text)
            named = [(t, n, min(offset, text_end), v, r, a) for t, n, offset, v, r, a in named]
        delta = TextDelta(
            request_id=self.request_id,
            text=text,
            token_ids=self._unsent_ids,
            finish_reason=self.finish_reason,
            named_logprobs=named or None,
            prompt_logprobs=self._prompt_named,
            prompt_text=self._prompt_text,
            offset=self.text_base + start,
            prompt_tokens=prompt_tokens,
        )
        if self.finished:
            delta.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=self.num_tokens)
        self._unsent_ids = []
        self._unsent_named = []
        self._prompt_named = self._prompt_text = None
        return delta
