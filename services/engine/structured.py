"""Constrained decoding in the engine (issue 10): grammars compiled off the step, masks filled
while the forward runs.

- ``GrammarCompiler`` compiles a request's constraint on its own thread, when the request is added
  (so during its prefill, never in a step's critical path), into a pristine llguidance matcher kept
  in a small LRU keyed by the constraint's text; each sequence gets a copy (``deep_copy``, ~1 us).
  llguidance drops the GIL while it compiles.
- ``GrammarState`` is one sequence's matcher. It follows the sequence's output tokens, not the
  steps: before each mask it consumes the tokens it has not seen, so a request taken over from
  another engine (its checkpointed output tokens) and a preempted one (recomputed; its tokens are
  kept) need nothing special.
- ``MaskFiller`` fills the next step's token bitmasks of the constrained rows on a helper thread
  (llguidance's own pool, GIL released) started before the forward and joined after it, so the
  fill overlaps the forward (torch drops the GIL too). The helper thread runs no torch op: one
  there gives it an OpenMP thread team of its own, which slowed every forward by ~20 ms on two
  cores. The sampler applies the masks first.

Nothing here runs for a batch without a constrained sequence: EngineCore counts them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.torch
import torch

from shared.messages import StructuredOutputs
from shared.structured import InvalidConstraint, grammar_text, llg_tokenizer, new_matcher

log = logging.getLogger(__name__)

# Pristine matchers kept per engine (one per distinct constraint text); a miss costs a compile.
COMPILED_GRAMMARS = 256


class GrammarFailed(RuntimeError):
    """A constraint that does not compile here, or a matcher in its error state; the message says why."""


def constraint_key(constraint: StructuredOutputs) -> str:
    """The cache key: the constraint's fields, without the request field it came from."""
    return constraint.model_copy(update={"param": None}).model_dump_json(by_alias=True, exclude_none=True)


class GrammarCompiler:
    """Compiles constraints on one background thread; safe to call from the engine's main thread."""

    def __init__(
        self, tokenizer_factory: Callable[[], llguidance.LLTokenizer], warm_up: Callable[[], None] | None = None
    ) -> None:
        """``tokenizer_factory`` runs first on the compile thread (~0.5 s), not on the caller's.
        ``warm_up`` runs at once on a thread of its own that then ends (see for_model)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._tokenizer: Future[llguidance.LLTokenizer] = self._pool.submit(tokenizer_factory)
        self._lock = threading.Lock()  # guards _compiled (main thread reads, compile thread fills)
        self._compiled: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()
        self._warm_up: threading.Thread | None = None
        if warm_up is not None:
            self._warm_up = threading.Thread(target=warm_up, name="grammar-warm", daemon=True)
            self._warm_up.start()

    @classmethod
    def for_model(
        cls, hf_tokenizer_loader: Callable[[], Any], vocab_size: int, eos_token_ids: list[int]
    ) -> GrammarCompiler:
        # The mask kernel is warmed before any constrained step needs it, on a thread of its own
        # that then ends: on the compile thread, which lives on, the OpenMP team the kernel gave
        # it made every later forward ~15-20 ms slower on two cores (as in MaskFiller.start).
        return cls(
            lambda: llg_tokenizer(hf_tokenizer_loader(), vocab_size, eos_token_ids),
            warm_up=lambda: warm_mask_kernel(vocab_size),
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the tokenizer is built and the warm-up has ended (or ``timeout`` seconds
        passed); whether both are done. Their ~3 s of Python (torch.compile) hold the GIL and the
        second core: a forward running beside them took twice as long (Intel Xeon SPR, 2 cores),
        so the engine waits here before it serves. A tokenizer that failed counts as done: each
        compile() then reports the failure to its request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._tokenizer.exception(timeout=timeout)
        except TimeoutError:
            return False
        except CancelledError:  # closed meanwhile: nothing more will come of it
            pass
        if self._warm_up is not None:
            self._warm_up.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if self._warm_up.is_alive():
                return False
        return True

    def compile(self, constraint: StructuredOutputs) -> Future[llguidance.LLMatcher]:
        """A future pristine matcher for ``constraint`` (copy it before use); compiled once per text."""
        key = constraint_key(constraint)
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._compiled[key] = future
            if len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        return future

    def _compile(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        tokenizer = self._tokenizer.result()
        try:
            matcher = new_matcher(tokenizer, grammar_text(constraint))
        except InvalidConstraint as exc:
            raise GrammarFailed(str(exc)) from None
        if matcher.is_error():
            raise GrammarFailed(f"the constraint does not compile: {matcher.get_error()}")
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One sequence's matcher, fed with the sequence's output tokens."""

    __slots__ = ("_compiled", "_matcher", "consumed", "error")

    def __init__(self, compiled: Future[llguidance.LLMatcher]) -> None:
        self._compiled = compiled
        self._matcher: llguidance.LLMatcher | None = None
        self.consumed = 0  # output tokens the matcher has consumed
        self.error: str | None = None

    def catch_up(self, output_token_ids: Sequence[int]) -> llguidance.LLMatcher | None:
        """The matcher, having consumed every output token so far (waits for the compile if it is
        still running: only a request whose prefill took less than its compile). None: an error."""
        if self.error is not None:
            return None
        if self._matcher is None:
            try:
                self._matcher = self._compiled.result().deep_copy()
            except GrammarFailed as exc:
                self.error = str(exc)
                return None
        matcher = self._matcher
        if self.consumed < len(output_token_ids):
            # A takeover's checkpointed tokens, or the token sampled since the last mask.
            if not matcher.consume_tokens(list(output_token_ids[self.consumed :])):
                self.error = f"the output does not match the constraint: {matcher.get_error()}"
                return None
            self.consumed = len(output_token_ids)
        return matcher


@dataclass(slots=True)
class TokenMasks:
    """The allowed tokens of some rows of a step: ``bitmask[j]`` is row ``rows[j]``'s
    (bit t of word t // 32 set: token t allowed). ``failed``: rows whose matcher errored,
    which the core ends with an error instead of sampling freely (a failed row may be in
    ``rows`` too, with a mask that allows everything)."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32
    failed: list[int]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [S, V] float, modified in place: a constrained row's disallowed tokens become -inf."""
        if not self.rows:
            return logits
        words = (logits.shape[1] + 31) // 32
        bitmask = self.bitmask[:, :words]
        if self.rows != list(range(logits.shape[0])):
            # A mask for every row (an unconstrained row allows all) and one pass over the logits
            # in place: at 64 rows, gathering the constrained rows and scattering them back took
            # ~4 ms a step on two cores, the masks' whole pass well under 1 ms.
            full = torch.full((logits.shape[0], words), -1, dtype=torch.int32)
            full[self.rows] = bitmask
            bitmask = full
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        return logits


def warm_mask_kernel(vocab_size: int) -> None:
    """Applies masks of 1 and 2 rows once: llguidance's apply kernel is torch.compile'd, once for
    1 row and once for more, and the first call otherwise stalls a step (~1.6 s here, cold)."""
    for rows in (1, 2):
        masks = TokenMasks(list(range(rows)), llguidance.torch.allocate_token_bitmask(rows, vocab_size), [])
        masks.apply(torch.zeros(rows, vocab_size))


class MaskFiller:
    """Fills a step's masks on a helper thread, so that the fill overlaps the forward (or, with
    ``overlap`` False, at once on the caller's thread: the benchmark's comparison).

    Keeps running totals (two clock reads per step each), read by bench/structured_decode.py:
    ``fill_seconds`` spent filling (on the helper thread, catch-up included) over ``fills`` fills
    of ``fill_rows`` rows, and ``wait_seconds`` the engine's thread spent blocked in ``wait``
    after the forward: about 0 while the fill is hidden behind the forward.
    """

    def __init__(self, vocab_size: int, overlap: bool = True) -> None:
        self.vocab_size = vocab_size
        self.overlap = overlap
        self._executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        self.fills = 0
        self.fill_rows = 0
        self.fill_seconds = 0.0  # written by the helper thread only
        self.wait_seconds = 0.0  # written by the engine's thread only

    def start(self, states: Sequence[tuple[int, GrammarState, Sequence[int]]]) -> Future[TokenMasks]:
        """``states``: (row, state, output token ids) per constrained row of the step."""
        # Allocated here: a torch op on the helper thread (torch.full runs OpenMP-parallel at this
        # size) gave that thread an OpenMP team of its own, and every forward after it was ~20 ms
        # slower at 64 rows on two cores (bench/structured_decode.py).
        bitmask = llguidance.torch.allocate_token_bitmask(max(len(states), 1), self.vocab_size)
        if self.overlap:
            return self._thread.submit(self.fill, list(states), bitmask)
        filled: Future[TokenMasks] = Future()
        filled.set_result(self.fill(list(states), bitmask))
        return filled

    def wait(self, masks: Future[TokenMasks]) -> TokenMasks:
        """The masks ``start`` is filling, once filled (after the forward: normally at once)."""
        started = time.perf_counter()
        try:
            return masks.result()
        finally:
            self.wait_seconds += time.perf_counter() - started

    def fill(self, states: list[tuple[int, GrammarState, Sequence[int]]], bitmask: torch.Tensor) -> TokenMasks:
        """``bitmask``: [len(states) or 1, ceil(vocab / 32)] int32, all ones (filled in place)."""
        started = time.perf_counter()
        try:
            return self._fill(states, bitmask)
        finally:
            self.fill_seconds += time.perf_counter() - started
            self.fills += 1
            self.fill_rows += len(states)

    def _fill(self, states: list[tuple[int, GrammarState, Sequence[int]]], bitmask: torch.Tensor) -> TokenMasks:
        live: list[tuple[int, GrammarState, llguidance.LLMatcher]] = []
        failed: list[int] = []
        for row, state, output in states:
            matcher = state.catch_up(output)
            if matcher is None:
                failed.append(row)
            else:
                live.append((row, state, matcher))
        if live:
            pairs = [(matcher, index) for index, (_row, _state, matcher) in enumerate(live)]
            llguidance.torch.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        for index, (row, state, matcher) in enumerate(live):
            if matcher.is_error():  # e.g. a grammar that allows nothing here
                state.error = f"the constraint allows no token here: {matcher.get_error()}"
                failed.append(row)
                # Its token is never used (the core ends the row); an all-allowed mask keeps the
                # sampler off an all -inf row. One row: too small for torch to go OpenMP-parallel.
                bitmask[index].fill_(-1)
        rows = [row for row, _state, _matcher in live]
        return TokenMasks(rows, bitmask[: len(rows)], failed)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
