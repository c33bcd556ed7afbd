"""One request's state inside the engine core, from arrival to finish."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Tokens

from services.engine.contract import stop_token_ids
from services.engine.structured import GrammarState
from shared.messages import FinishReason, PromptTokenLogprobs, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens, and how much of them the KV cache holds.

    The KV cache holds the first ``num_computed_tokens`` tokens. Every step
    computes some of the rest; when all are computed the step's logits give
    the next token, which is appended and is itself uncomputed until the next
    step. So a fresh prompt, a prefill chunk, a decode and a recompute after
    preemption are the same thing: "compute tokens [num_computed, num_tokens)".
    """

    __slots__ = (
        "arrival",
        "block_hashes",
        "block_table",
        "finish_reason",
        "grammar",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_hashed_blocks",
        "num_preemptions",
        "num_prompt_tokens",
        "prompt_logprobs",
        "queued_at",
        "request_id",
        "sampling",
        "scheduled_at",
        "status",
        "stop_ids",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival: int,
        default_eos_token_ids: list[int] | None = None,
        output_token_ids: Tokens[int] = (),
        want_prompt_logprobs: bool = False,
    ) -> None:
        """``output_token_ids``: tokens another engine already generated for this request
        (a takeover); they are computed like a prompt but count as output.
        ``want_prompt_logprobs``: collect the prompt's logprobs while it is computed."""
        self.request_id = request_id
        # Order of arrival: the scheduler serves and protects older requests first.
        self.arrival = arrival
        self.sampling = sampling
        self.token_ids: list[int] = [*prompt_token_ids, *output_token_ids]
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens served from the prefix cache at the last admission (a statistic).
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Chain hashes of this sequence's full blocks, filled in by the block
        # manager as tokens become known; they survive preemption.
        self.block_hashes: list[bytes] = []
        # Leading blocks of block_table already offered to the prefix cache.
        self.num_hashed_blocks = 0
        self.stop_ids = stop_token_ids(sampling, default_eos_token_ids or ())
        self.finish_reason: FinishReason | None = None
        # Constrained decoding (structured outputs): its matcher, set by EngineCore; None: free text.
        self.grammar: GrammarState | None = None
        self.num_preemptions = 0
        # When it was added (the engine's clock), until it first runs: then None
        # (EngineCore measures the wait once per request, as vLLM's queue time).
        self.queued_at: float | None = None
        # Unix time it first ran (its prefill started), until its first output hands it over.
        self.scheduled_at: float | None = None
        # Prompt logprobs collected so far, one per prompt token from the first (None: nothing
        # predicts it); None when not wanted, or once handed over (take_prompt_logprobs).
        self.prompt_logprobs: list[PromptTokenLogprobs | None] | None = [None] if want_prompt_logprobs else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_cacheable_tokens(self) -> int:
        """Leading tokens whose computation the prefix cache may skip: all but the last (whose
        logits give the next token) and none whose logits give a prompt logprob still missing."""
        if self.prompt_logprobs is not None:
            # The logits at position p give token p + 1's logprob: the next missing one needs p = len - 1.
            return min(self.num_tokens - 1, len(self.prompt_logprobs) - 1)
        return self.num_tokens - 1

    def prompt_logprob_span(self, start: int, end: int) -> tuple[int, int] | None:
        """Positions in [start, end) (tokens computed in one step) whose logits give a missing
        prompt logprob: the logits at position p give token p + 1's; None if there are none."""
        if self.prompt_logprobs is None:
            return None
        first = max(start, len(self.prompt_logprobs) - 1)
        last = min(end, self.num_prompt_tokens - 1)
        return (first, last) if first < last else None

    def take_scheduled_at(self) -> float | None:
        """When it first ran, for its first output only (the timeline's engine_scheduled)."""
        scheduled_at, self.scheduled_at = self.scheduled_at, None
        return scheduled_at

    def take_prompt_logprobs(self) -> list[PromptTokenLogprobs | None] | None:
        """The prompt's logprobs once all are collected, handed over once (then forgotten)."""
        collected = self.prompt_logprobs
        if collected is None or len(collected) < self.num_prompt_tokens:
            return None
        self.prompt_logprobs = None
        return collected

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
