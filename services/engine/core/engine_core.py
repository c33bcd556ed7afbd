"""EngineCore: the torch backend's pure loop (schedule, forward, sample, update).

Plain Python with no I/O, driven by the engine service (service.py) through the
EngineBackend protocol. Not thread-safe: the service calls every method from
its one busy-loop thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.engine.contract import (
    EngineLoad,
    EngineRequest,
    ForwardTime,
    QueueTime,
    RequestOutput,
    refusal,
    wants_prompt_logprobs,
)
from services.engine.core.block_manager import BlockManager
from services.engine.core.sampler import Argmax, Sampler
from services.engine.core.scheduler import ScheduledBatch, Scheduler
from services.engine.core.sequence import Sequence
from services.engine.model.batch import ForwardBatch
from services.engine.structured import GrammarCompiler, GrammarState, MaskFiller, TokenMasks
from shared.messages import FinishReason, TokenLogprobs

# Pull pacing (free_slots): a replica takes from the stream only the requests its next
# PULL_AHEAD_STEPS steps can start. Taking more would queue them here while another
# replica may be idle, and a replica that dies takes its whole queue into the takeover.
PULL_AHEAD_STEPS = 2
# Tokens a request is taken to bring to prefill before any has been seen; then a running mean.
TYPICAL_REQUEST_TOKENS = 128
_REQUEST_TOKENS_SMOOTHING = 1 / 8


# Arrival numbers of taken-over requests are this much lower: ahead of any fresh one.
_TAKEN_OVER_FIRST = 1 << 62


class Runner(Protocol):
    """What the core needs from a model runner (services.engine.model.runner)."""

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """[S, vocab] float logits, one row per entry of batch.logits_indices."""
        ...


def _native_argmax(runner: Runner) -> Argmax | None:
    """The compiled greedy pick of a runner that runs the native CPU kernels (ModelRunner's
    plan.native); None for any other runner: the sampler then takes torch's."""
    native = getattr(getattr(runner, "plan", None), "native", None)
    argmax = getattr(native, "argmax", None)
    return argmax if callable(argmax) else None


@dataclass(slots=True)
class EngineCoreConfig:
    num_blocks: int
    block_size: int
    vocab_size: int
    max_model_len: int  # the model's context length (the pool may lower it)
    max_num_batched_tokens: int = 512
    max_running_requests: int = 64
    enable_prefix_caching: bool = True
    # EOS ids for requests that arrive without any (normally the tokenizer fills them in).
    default_eos_token_ids: list[int] = field(default_factory=list)
    sampler_device: str = "cpu"
    sampler_seed: int | None = None
    # load().forward_share is measured over this many recent seconds.
    load_window_s: float = 10.0
    # The runner's kernel plan in words (KernelPlan.describe), reported in load().
    kernels: str = ""


@dataclass(slots=True)
class _StepPlan:
    """One step's forward batch and what to do with its logits rows."""

    batch: ForwardBatch
    sampling_seqs: list[Sequence] = field(default_factory=list)  # rows 0.., in order
    # Then, per sequence collecting prompt logprobs: positions [first, last), one row each.
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    prefilled: list[Sequence] = field(default_factory=list)  # max_tokens 0: end without sampling


class EngineCore:
    def __init__(
        self,
        runner: Runner,
        config: EngineCoreConfig,
        clock: Callable[[], float] = time.perf_counter,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        """``grammars``: compiles structured-output constraints; without it a constrained request
        is refused."""
        self.runner = runner
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_running_requests=config.max_running_requests,
            max_model_len=config.max_model_len,
        )
        self.sampler = Sampler(config.vocab_size, config.sampler_device, config.sampler_seed, _native_argmax(runner))
        self._sequences: dict[str, Sequence] = {}
        # Outputs decided between steps (refusals, aborts), reported by the next step().
        self._pending: list[RequestOutput] = []
        self._arrivals = 0
        self._request_tokens = float(TYPICAL_REQUEST_TOKENS)  # running mean of tokens to prefill per request
        self._forward_time = ForwardTime(clock, config.load_window_s)
        self._queue_time = QueueTime(clock)
        self.num_steps = 0
        self.grammars = grammars
        self._mask_filler = MaskFiller(config.vocab_size) if grammars is not None else None
        # Constrained sequences held: while 0, a step does no structured-output work at all.
        self._num_constrained = 0

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    @property
    def mask_filler(self) -> MaskFiller | None:
        """Fills structured-output masks (its timing counters: bench/structured_decode.py)."""
        return self._mask_filler

    # ---- EngineBackend ----------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. An id already in the engine is ignored (contract.EngineBackend)."""
        if request.request_id in self._sequences:
            return
        prompt = request.prompt_token_ids
        problem = refusal(
            request, max_model_len=self.config.max_model_len, vocab_size=self.config.vocab_size
        ) or self.scheduler.refusal(len(prompt))
        if problem is not None:
            self._pending.append(RequestOutput(request.request_id, [], "error", error=problem))
            return
        self._arrivals += 1
        # A request taken over from a dead engine has a client mid-stream, waiting since the
        # kill: it goes before every fresh request, as a preempted one does (it is one).
        arrival = self._arrivals - _TAKEN_OVER_FIRST if request.output_token_ids else self._arrivals
        brought = len(prompt) + len(request.output_token_ids)
        self._request_tokens += (brought - self._request_tokens) * _REQUEST_TOKENS_SMOOTHING
        seq = Sequence(
            request.request_id,
            prompt,
            request.sampling,
            arrival=arrival,
            default_eos_token_ids=self.config.default_eos_token_ids,
            output_token_ids=request.output_token_ids,
            want_prompt_logprobs=wants_prompt_logprobs(request),
        )
        done = self._finish_reason(seq) if request.output_token_ids else None
        if done is not None:
            # Taken over just as it ended (or this engine's context is shorter): nothing to add.
            self._pending.append(RequestOutput(request.request_id, [], done))
            return
        if request.sampling.max_tokens == 0 and seq.prompt_logprob_span(0, seq.num_tokens) is None:
            # Prefill only, and no prompt logprob to compute: done without running.
            self._pending.append(
                RequestOutput(request.request_id, [], "length", prompt_logprobs=seq.take_prompt_logprobs())
            )
            return
        constraint = request.sampling.structured
        if constraint is not None:
            if self.grammars is None:
                problem = "structured outputs (response_format, structured_outputs) are not available in this engine"
                self._pending.append(RequestOutput(request.request_id, [], "error", error=problem))
                return
            # Compiled on the compiler's thread while the prompt is prefilled.
            seq.grammar = GrammarState(self.grammars.compile(constraint))
            self._num_constrained += 1
        seq.queued_at = self._queue_time.clock()
        self._sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Blocks are freed at once; the abort is reported by the next step()."""
        for request_id in request_ids:
            seq = self._sequences.pop(request_id, None)
            if seq is None:
                continue
            self.scheduler.finish(seq)
            seq.finish("abort")
            self._forget_grammar(seq)
            self._pending.append(RequestOutput(request_id, [], "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    def free_slots(self) -> int:
        """Requests worth pulling now: room under the running cap, KV blocks left after
        the waiting prompts and a reserve for running sequences to grow, and no more than
        the next PULL_AHEAD_STEPS steps' token budget can start (at the mean request size)."""
        scheduler = self.scheduler
        slots = scheduler.max_running - len(scheduler.running) - len(scheduler.waiting)
        if slots <= 0:
            return 0
        room = self.block_manager.num_free_blocks - scheduler.blocks_wanted_by_waiting() - scheduler.watermark_blocks
        queued = sum(seq.num_uncomputed_tokens for seq in scheduler.running) + sum(
            seq.num_uncomputed_tokens for seq in scheduler.waiting
        )
        ahead = PULL_AHEAD_STEPS * scheduler.max_num_batched_tokens - queued
        if ahead <= 0:
            return 0
        startable = math.ceil(ahead / self._request_tokens)
        return max(0, min(slots, room, startable))

    def load(self) -> EngineLoad:
        """Called a few times a second by the service, never per step: the counters are read, not kept here."""
        return EngineLoad(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_usage=self.block_manager.usage(),
            forward_share=self._forward_time.share(),
            prefix_cache_queries=self.block_manager.prefix_queries,
            prefix_cache_hits=self.block_manager.prefix_hits,
            preemptions=self.scheduler.num_preemptions,
            queue_time=self._queue_time.snapshot(),
            kernels=self.config.kernels,
        )

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        for seq in scheduled.admitted:
            if seq.queued_at is not None:  # its first start; a preempted one was counted before
                self._queue_time.started(seq.queued_at)
                seq.queued_at = None
                seq.scheduled_at = time.time()
        if not scheduled:
            return outputs
        plan = self._build_batch(scheduled)
        masks: Future[TokenMasks] | None = None
        if self._num_constrained and plan.sampling_seqs:
            masks = self._start_masks(plan.sampling_seqs)
        with self._forward_time.measure():
            logits = self.runner.forward(plan.batch)
        self.num_steps += 1

        for seq, num_new in zip(scheduled.seqs, scheduled.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
        num_sampling = len(plan.sampling_seqs)
        if plan.prompt_spans:
            self._collect_prompt_logprobs(logits[num_sampling:], plan.prompt_spans)
        for seq in plan.prefilled:
            outputs.append(self._end_prefill_only(seq))
        if plan.sampling_seqs:
            token_masks = None
            if masks is not None and self._mask_filler is not None:
                token_masks = self._mask_filler.wait(masks)  # filled during the forward
            sampled = self.sampler(logits[:num_sampling], plan.sampling_seqs, token_masks)
            failed = set(token_masks.failed) if token_masks is not None else ()
            for row, (seq, token_id, logprobs) in enumerate(
                zip(plan.sampling_seqs, sampled.token_ids, sampled.logprobs)
            ):
                if row in failed:
                    outputs.append(self._end_grammar_failed(seq))
                else:
                    outputs.append(self._append(seq, token_id, logprobs))
        return outputs

    # ---- internals --------------------------------------------------------

    def _start_masks(self, seqs: list[Sequence]) -> Future[TokenMasks] | None:
        """The constrained rows' masks, filled on a helper thread while the forward runs."""
        states = [(row, seq.grammar, seq.output_token_ids) for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not states or self._mask_filler is None:
            return None
        return self._mask_filler.start(states)

    def _forget_grammar(self, seq: Sequence) -> None:
        if seq.grammar is not None:
            seq.grammar = None
            self._num_constrained -= 1

    def _end_grammar_failed(self, seq: Sequence) -> RequestOutput:
        """A constraint that does not compile, or whose matcher failed: the request ends with an error."""
        error = (seq.grammar.error if seq.grammar is not None else None) or "the output constraint failed"
        self.scheduler.finish(seq)
        seq.finish("error")
        self._forget_grammar(seq)
        del self._sequences[seq.request_id]
        return RequestOutput(seq.request_id, [], "error", error=error)

    def _build_batch(self, scheduled: ScheduledBatch) -> _StepPlan:
        """The forward batch; its logits rows are the sampling sequences' (in order), then the
        prompt positions whose logprobs are collected this step (in ``prompt_spans`` order)."""
        block_size = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        prompt_spans: list[tuple[Sequence, int, int]] = []
        prefilled: list[Sequence] = []
        for seq, num_new in zip(scheduled.seqs, scheduled.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + num_new
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            if num_new == 1:
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                span = range(start, end)
                positions.extend(span)
                slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            context_lens.append(end)
            block_tables.append(table)
            wanted = seq.prompt_logprob_span(start, end)
            if wanted is not None:
                first, last = wanted
                position_0 = len(input_ids) - num_new - start  # where position 0 would be in input_ids
                prompt_indices.extend(range(position_0 + first, position_0 + last))
                prompt_spans.append((seq, first, last))
            if end == seq.num_tokens:
                if seq.sampling.max_tokens == 0:
                    prefilled.append(seq)
                else:
                    logits_indices.append(len(input_ids) - 1)
                    sampling_seqs.append(seq)
        logits_indices += prompt_indices
        if not logits_indices:
            # Only prefill-only prompts ending in this step, with no logprob to collect: one row
            # anyway, which nobody reads (a runner is not asked for zero rows).
            logits_indices.append(len(input_ids) - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_lens=list(scheduled.num_new_tokens),
            context_lens=context_lens,
            block_tables=block_tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
        )
        return _StepPlan(batch, sampling_seqs, prompt_spans, prefilled)

    def _collect_prompt_logprobs(self, logits: torch.Tensor, spans: list[tuple[Sequence, int, int]]) -> None:
        """logits: one row per prompt position of ``spans``, in order; appended to each sequence's."""
        targets: list[int] = []
        tops: list[int] = []
        for seq, first, last in spans:
            targets += seq.token_ids[first + 1 : last + 1]
            tops += [seq.sampling.prompt_logprobs or 0] * (last - first)
        computed = self.sampler.prompt_logprobs(logits[: len(targets)], targets, tops)
        row = 0
        for seq, first, last in spans:
            collected = seq.prompt_logprobs
            if collected is not None:  # (always: the span came from it)
                collected += computed[row : row + last - first]
            row += last - first

    def _end_prefill_only(self, seq: Sequence) -> RequestOutput:
        """A max_tokens 0 request whose prompt is computed: it ends with no token."""
        self.scheduler.finish(seq)
        seq.finish("length")
        self._forget_grammar(seq)
        del self._sequences[seq.request_id]
        return RequestOutput(
            seq.request_id,
            [],
            "length",
            prompt_logprobs=seq.take_prompt_logprobs(),
            scheduled_at=seq.take_scheduled_at(),
        )

    def _append(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        seq.append_token(token_id)
        reason = self._finish_reason(seq)
        # A complete constraint does not end the sequence here: its mask then allows only the end of
        # text, which ends it next step as a stop token (the detokenizer takes a "stop" sequence's last
        # token for the stop token and does not show it).
        if reason is not None:
            self.scheduler.finish(seq)
            seq.finish(reason)
            self._forget_grammar(seq)
            del self._sequences[seq.request_id]
        return RequestOutput(
            seq.request_id,
            [token_id],
            reason,
            logprobs=None if logprobs is None else [logprobs],
            prompt_logprobs=seq.take_prompt_logprobs(),
            scheduled_at=seq.take_scheduled_at(),
        )

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        """Whether the sequence's last token ends it."""
        if seq.num_output_tokens and seq.token_ids[-1] in seq.stop_ids:
            return "stop"
        if seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
