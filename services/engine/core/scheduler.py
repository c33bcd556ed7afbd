"""Continuous batching with chunked prefill, a token budget and preemption.

Every step the scheduler picks, for each sequence it runs, how many of its
uncomputed tokens to compute (see Sequence): 1 for a decode, a chunk for a
prompt. Policy, in order:

1. Running sequences that decode (one uncomputed token), oldest first.
2. Running sequences part way through their prompt, oldest first: the next
   chunk, as large as the remaining budget allows.
3. Waiting sequences (new, or preempted earlier), oldest first, while the
   budget, the running cap and the free blocks allow; each starts from its
   prefix-cache hit. The head of the queue is never skipped for a smaller
   request behind it (no starvation of long prompts), with one exception:
   a sequence whose next uncached prompt block another running sequence is
   computing right now (the choices of one request with n > 1, or clients
   sending the same prompt at once) waits until that block is in the prefix
   cache, so the shared prompt is computed once, not once per copy. It only
   waits for a running sequence, which makes progress every step, so it
   cannot starve; the sequences behind it are not held up.

``max_num_batched_tokens`` bounds the tokens of one step, so a long prompt
delays the decodes by at most one step's worth of prefill. When a running
sequence needs a block and none is free (a prompt chunk first shrinks to the
free room), the newest running sequence is preempted: its blocks are freed (full ones stay in the prefix cache) and it
goes back to the waiting queue to be recomputed later. The oldest sequence is
therefore never preempted while a newer one runs, so it always progresses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from services.engine.core.block_manager import BlockManager
from services.engine.core.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: sequences in batch order and their token counts."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Waiting sequences this step starts (new ones, or preempted ones again).
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def _arrival(seq: Sequence) -> int:
    return seq.arrival


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_batched_tokens: int,
        max_running_requests: int,
        max_model_len: int,
        watermark_blocks: int | None = None,
    ) -> None:
        if max_num_batched_tokens < 1 or max_running_requests < 1 or max_model_len < 1:
            raise ValueError("max_num_batched_tokens, max_running_requests and max_model_len must be >= 1")
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        # A running decode costs one token of budget each step; more running
        # sequences than the budget would leave some of them unserved.
        self.max_running = min(max_running_requests, max_num_batched_tokens)
        self.model_max_len = max_model_len
        # The context a sequence can reach: the model's, or the whole pool if smaller,
        # so a sequence alone in the engine always finds room for its next token.
        self.kv_capacity_tokens = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = min(max_model_len, self.kv_capacity_tokens)
        # New sequences start only if this many blocks stay free for the running
        # ones to grow into, which keeps admission from causing preemption at once.
        self.watermark_blocks = (
            max(1, block_manager.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        )
        self.waiting: list[Sequence] = []  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0

    # ---- queue ------------------------------------------------------------

    def refusal(self, num_prompt_tokens: int) -> str | None:
        """Why a prompt of this length can never fit this engine's KV cache, or None if it can.
        (What every backend refuses, an empty prompt or one past the context, is contract.refusal.)"""
        if num_prompt_tokens > self.kv_capacity_tokens:
            return (
                f"the prompt has {num_prompt_tokens} tokens but this engine's KV cache holds at most "
                f"{self.kv_capacity_tokens} tokens; shorten the prompt or give the engine a larger "
                "KV cache (SCALELLM_KV_CACHE_BYTES)"
            )
        return None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def blocks_wanted_by_waiting(self) -> int:
        """Blocks the waiting sequences' prompts would take, ignoring cache hits."""
        blocks_for = self.block_manager.blocks_for
        return sum(blocks_for(seq.num_tokens) for seq in self.waiting)

    # ---- one step ---------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        scheduled: dict[Sequence, int] = {}  # insertion order is batch order
        budget = self.max_num_batched_tokens

        def reserve(seq: Sequence, wanted: int) -> int:
            """Give seq blocks for up to ``wanted`` tokens; how many it got.

            A prompt chunk shrinks to what the free blocks hold; only when not
            even one token fits are newer sequences preempted (newest first),
            possibly seq itself, which then gets 0.
            """
            nonlocal budget
            while True:
                granted = min(wanted, self.block_manager.num_fitting_tokens(seq))
                if granted >= 1:
                    self.block_manager.may_append(seq, granted)
                    return granted
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                budget += scheduled.pop(victim, 0)
                if victim is seq:
                    return 0

        # 1. Decodes.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1 and reserve(seq, 1):
                scheduled[seq] = 1
                budget -= 1
        # 2. Prompts part way through their prefill.
        for seq in list(self.running):
            if budget == 0:
                break
            remaining = seq.num_uncomputed_tokens
            if seq.status is not SequenceStatus.RUNNING or remaining <= 1:
                continue
            granted = reserve(seq, min(remaining, budget))
            if granted:
                scheduled[seq] = granted
                budget -= granted
        # 3. Waiting sequences; not in a step that had to preempt (there is no room).
        in_flight: set[bytes] | None = None  # computed on first need: most steps admit nothing
        position = 0
        while (
            position < len(self.waiting) and budget > 0 and len(self.running) < self.max_running and not batch.preempted
        ):
            seq = self.waiting[position]
            cached = self.block_manager.match_prefix(seq)
            if self.block_manager.enable_prefix_caching:
                if in_flight is None:
                    in_flight = self._blocks_in_flight()
                if self.block_manager.next_block_key(seq, len(cached)) in in_flight:
                    position += 1  # its copy computes that block this step; it joins the cache after
                    continue
            num_new = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            reserve_blocks = self.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(seq, num_new, cached, reserve_blocks):
                break
            self.block_manager.allocate(seq, num_new, cached)
            self.waiting.pop(position)
            if in_flight is not None:
                in_flight.update(self.block_manager.uncomputed_full_block_keys(seq))
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            batch.admitted.append(seq)
            scheduled[seq] = num_new
            budget -= num_new

        batch.seqs = list(scheduled)
        batch.num_new_tokens = list(scheduled.values())
        return batch

    def _blocks_in_flight(self) -> set[bytes]:
        """Prefix-cache keys of the full blocks running sequences are still computing."""
        keys: set[bytes] = set()
        for seq in self.running:
            keys.update(self.block_manager.uncomputed_full_block_keys(seq))
        return keys

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
