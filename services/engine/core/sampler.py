"""Choosing the next token for every sequence of a batch at once, in torch.

Order of operations on a row of logits (vLLM's and transformers' meanings):

1. logprobs, when asked for, are taken here from the raw model distribution
   (log_softmax of the logits before any penalty or temperature), as vLLM
   does by default: they describe the model, not the sampling settings;
2. penalties: repetition (over prompt and output: a positive logit is divided
   by the penalty, a negative one multiplied, as in transformers and vLLM),
   then presence and frequency (over output tokens only, OpenAI's meaning:
   subtract presence once per distinct token seen and frequency per occurrence);
3. min_tokens: the end-of-generation tokens are masked until enough output exists;
4. temperature 0 (below 1e-5): greedy, the argmax;
   otherwise divide by temperature, keep the top_k logits, then the smallest
   set of tokens whose probability reaches top_p, then drop tokens whose
   probability is below min_p times the top token's, and draw.

Drawing inverts the cumulative distribution at one uniform number per row
(only the top_k / top_p candidates are looked at when those options are set,
which avoids sorting the vocabulary). A request with a seed takes its
uniform from a hash of (seed, output position), so its tokens depend on its
seed alone, not on what else is in the batch, and an engine that resumes it
at output token k draws what the first engine would have drawn there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.core.sequence import Sequence
from services.engine.structured import TokenMasks
from shared.messages import PromptTokenLogprobs, SamplingParams, TokenLogprobs

_GREEDY_BELOW = 1e-5
# Prompt positions whose log-softmax is taken at once: bounds the extra memory to this many rows.
_PROMPT_ROWS_AT_ONCE = 256


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


# [S, V] float32 CPU logits -> [S] int64: each row's first highest logit, a NaN counting as the
# highest (what torch's max(dim=-1).indices gives); NativeKernels.argmax is one.
Argmax = Callable[[torch.Tensor], torch.Tensor]


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        argmax: Argmax | None = None,
    ) -> None:
        """``argmax``: the greedy pick of float32 CPU logits, in place of torch's (the engine passes
        its compiled kernel: 0.6 against 2.0 ms a step at 64 x 49152 inside a c64 decode step, Intel
        Xeon SPR); None: torch's everywhere."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._argmax = argmax
        # Draws of requests without a seed; seeded from the OS unless given.
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks | None = None) -> SamplerOutput:
        """logits: [S, V] float, one row per sequence of ``seqs`` (same order); ``masks``: the
        tokens a constrained row may take (structured outputs), applied before anything else, in
        place (the engine reads no logits after sampling; a copy cost ~3 ms a step at 64 rows)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(seqs)} sequences")
        logits = logits.float()
        if logits.shape[1] > self.vocab_size:
            # Padded vocabularies: the padding columns are not tokens.
            logits = logits[:, : self.vocab_size]
        params = [seq.sampling for seq in seqs]
        if masks is not None and masks.rows:
            # First, so that logprobs, penalties and every draw see only what the grammar allows
            # (as vLLM applies its bitmask to the logits before its sampler).
            logits = masks.apply(logits)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            # Before any processing: the model's own distribution, for the rows that ask.
            raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1)  # [L, V]

        logits = self._apply_penalties(logits, seqs)
        logits = self._mask_stop_tokens(logits, seqs)

        greedy = [p.temperature < _GREEDY_BELOW for p in params]
        if all(greedy):
            token_ids = self._greedy(logits)
        else:
            token_ids = self._draw(logits, seqs, greedy)
        chosen = token_ids.tolist()
        return SamplerOutput(chosen, self._logprobs(raw_logprobs, logprob_rows, seqs, chosen))

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """[S, V] -> [S]: each row's first highest logit; a NaN counts as the highest."""
        if self._argmax is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return self._argmax(logits)
        return _greedy(logits)

    # ---- logit processing -------------------------------------------------

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [
            i
            for i, seq in enumerate(seqs)
            if seq.sampling.repetition_penalty != 1.0
            or seq.sampling.presence_penalty != 0.0
            or seq.sampling.frequency_penalty != 0.0
        ]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        sub = logits[rows]
        outputs = [seqs[i].output_token_ids for i in rows]
        counts = self._token_counts(outputs, vocab)  # [R, V] occurrences in the output
        repetition = torch.tensor([seqs[i].sampling.repetition_penalty for i in rows], device=logits.device)
        if bool((repetition != 1.0).any()):
            seen = counts > 0
            prompt_seen = self._token_counts([seqs[i].prompt_token_ids for i in rows], vocab) > 0
            seen |= prompt_seen
            penalty = repetition[:, None].expand_as(sub)
            penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
            sub = torch.where(seen, penalized, sub)
        presence = torch.tensor([seqs[i].sampling.presence_penalty for i in rows], device=logits.device)
        frequency = torch.tensor([seqs[i].sampling.frequency_penalty for i in rows], device=logits.device)
        sub = sub - presence[:, None] * (counts > 0) - frequency[:, None] * counts
        logits[rows] = sub
        return logits

    def _token_counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[R, V] float: how often each token id occurs in each list."""
        counts = torch.zeros(len(token_lists), vocab + 1, device=self.device)
        longest = max((len(tokens) for tokens in token_lists), default=0)
        if longest:
            # Pad with a spare column `vocab`, dropped below.
            padded = torch.full((len(token_lists), longest), vocab, dtype=torch.long)
            for row, tokens in enumerate(token_lists):
                if tokens:
                    padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long).clamp_(0, vocab)
            padded = padded.to(self.device)
            counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        return counts[:, :vocab]

    def _mask_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        masked = False
        vocab = logits.shape[1]
        for i, seq in enumerate(seqs):
            # A constrained row's grammar decides when it may end: masking its end of text too
            # could leave it no token at all.
            if seq.grammar is None and seq.num_output_tokens < seq.sampling.min_tokens and seq.stop_ids:
                ids = [t for t in seq.stop_ids if 0 <= t < vocab]
                if not ids:
                    continue
                if not masked:
                    logits = logits.clone()
                    masked = True
                logits[i, ids] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        """[S] token ids: argmax for greedy rows, a draw for the others."""
        device = logits.device
        tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        if greedy_rows:
            tokens[greedy_rows] = self._greedy(logits[greedy_rows])
        rows = [i for i, g in enumerate(greedy) if not g]
        params = [seqs[i].sampling for i in rows]
        vocab = logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)  # [R, V]
        uniforms = self._uniforms([seqs[i] for i in rows], device)  # [R]
        min_p = torch.tensor([p.min_p for p in params], device=device)

        # Rows limited by top_k / top_p are drawn among their most likely tokens only,
        # which spares a sort of the whole vocabulary (the slowest op here on a CPU).
        limits = [_candidate_limit(p.top_k, p.top_p, vocab) for p in params]
        full = [j for j, limit in enumerate(limits) if limit is None]
        if full:
            chosen = _inverse_cdf(_apply_min_p(probs[full], min_p[full]), uniforms[full])
            tokens[[rows[j] for j in full]] = chosen
        cut = [j for j, limit in enumerate(limits) if limit is not None]
        if cut:
            tokens[[rows[j] for j in cut]] = self._draw_truncated(
                probs[cut], [params[j] for j in cut], [limits[j] or vocab for j in cut], uniforms[cut], min_p[cut]
            )
        return tokens

    def _uniforms(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        """One U[0, 1) per row; a seeded request's is a function of its seed and output position."""
        uniforms = torch.rand(len(seqs), generator=self._generator, device=self.device).to(device)
        seeded = [j for j, seq in enumerate(seqs) if seq.sampling.seed is not None]
        if seeded:
            values = [seeded_uniform(seqs[j].sampling.seed or 0, seqs[j].num_output_tokens) for j in seeded]
            # One copy to the device for all seeded rows, not one per row.
            uniforms[seeded] = torch.tensor(values, dtype=uniforms.dtype).to(device)
        return uniforms

    @staticmethod
    def _draw_truncated(
        probs: torch.Tensor,
        params: list[SamplingParams],
        limits: list[int],
        uniforms: torch.Tensor,
        min_p: torch.Tensor,
    ) -> torch.Tensor:
        """probs: [R, V] after temperature; limits: per row, how many of the most likely
        tokens can matter (top_k, or _TOP_P_CANDIDATES for top_p alone)."""
        device = probs.device
        values, ids = probs.topk(max(limits), dim=-1)  # [R, K], descending
        has_top_k = torch.tensor([0 < p.top_k < probs.shape[1] for p in params], device=device)
        in_limit = torch.arange(values.shape[1], device=device)[None, :] < torch.tensor(limits, device=device)[:, None]
        values = values * in_limit
        # top_k renormalises over the k kept tokens before top_p applies (transformers' order);
        # with top_p alone the candidates keep their share of the whole vocabulary.
        values = torch.where(has_top_k[:, None], values / values.sum(dim=-1, keepdim=True), values)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        missing = (~has_top_k) & (values.sum(dim=-1) < top_p)
        if bool(missing.any()):
            # A flat distribution: top_p needs more tokens than the candidates. Sort those rows fully.
            for j in missing.nonzero().flatten().tolist():
                row_values, row_ids = probs[j].sort(descending=True)
                values, ids = _widen(values, ids, probs.shape[1])
                values[j], ids[j] = row_values, row_ids
            in_limit = values > 0
        kept = values.cumsum(dim=-1) - values < top_p[:, None]  # the smallest prefix reaching top_p
        kept &= in_limit
        weights = _apply_min_p(values * kept, min_p)
        return ids.gather(1, _inverse_cdf(weights, uniforms)[:, None]).squeeze(1)

    # ---- logprobs ---------------------------------------------------------

    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[PromptTokenLogprobs]:
        """Prompt logprobs from the logits at prompt positions: row r predicts prompt token
        ``targets[r]`` and wants ``tops[r]`` alternatives. The raw model distribution (as for
        sampled tokens), the token's logprob and its rank in the vocabulary (1: the most likely)."""
        if logits.dim() != 2 or logits.shape[0] != len(targets) or len(tops) != len(targets):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(targets)} prompt positions")
        result: list[PromptTokenLogprobs] = []
        for start in range(0, len(targets), _PROMPT_ROWS_AT_ONCE):
            end = start + _PROMPT_ROWS_AT_ONCE
            rows = logits[start:end].float()
            if rows.shape[1] > self.vocab_size:
                rows = rows[:, : self.vocab_size]
            logprobs = torch.log_softmax(rows, dim=-1)  # [R, V]
            target = torch.tensor(targets[start:end], dtype=torch.long, device=logprobs.device)
            chosen = logprobs.gather(1, target[:, None])  # [R, 1]
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            wanted = tops[start:end]
            top_n = max(wanted)
            top_values: list[list[float]] = [[] for _ in wanted]
            top_ids: list[list[int]] = [[] for _ in wanted]
            if top_n > 0:
                top = logprobs.topk(top_n, dim=-1)
                top_values, top_ids = top.values.tolist(), top.indices.tolist()
            for j, (value, rank, n) in enumerate(zip(chosen.squeeze(1).tolist(), ranks, wanted)):
                result.append((value, rank, list(zip(top_ids[j][:n], top_values[j][:n]))))
        return result

    @staticmethod
    def _logprobs(
        raw_logprobs: torch.Tensor | None, rows: list[int], seqs: list[Sequence], chosen: list[int]
    ) -> list[TokenLogprobs | None]:
        """raw_logprobs: [L, V], the log-distribution of seqs[rows[j]] in row j."""
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is None:
            return result
        wanted = [seqs[i].sampling.logprobs or 0 for i in rows]
        chosen_index = torch.tensor([chosen[i] for i in rows], device=raw_logprobs.device)
        chosen_lp = raw_logprobs.gather(1, chosen_index[:, None]).squeeze(1).tolist()
        top_n = max(wanted)
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if top_n > 0:
            top = raw_logprobs.topk(top_n, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, i in enumerate(rows):
            n = wanted[j]
            result[i] = (chosen_lp[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return result


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, position: int) -> float:
    """U[0, 1) for a seeded request's token at output ``position``.

    Counter-based (no generator state), so it is the same on any engine and device,
    after a preemption and after a takeover. 24 bits, like torch.rand in float32, so
    the value is exact in the float32 tensor it goes into and never rounds up to 1.
    """
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ position) >> 40) / float(1 << 24)


# top_p without top_k draws among this many most likely tokens when they hold
# top_p of the probability (nearly always); otherwise the row is sorted in full.
_TOP_P_CANDIDATES = 256


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """[S, V] -> [S]: each row's first highest logit, as argmax picks it; a NaN counts as the
    highest (the first NaN's index), as in torch's max and argmax.

    max(dim) gives the same index (the first of equal maxima) about 3x faster than argmax
    on the CPU: 0.9 against 2.7 ms for 64 x 49152 float32 logits at 2 threads (torch 2.13,
    Intel Xeon, avx512f). Inside a decode step it takes ~2 ms: the LM head's logits are no longer
    in cache there, and max(dim) reads them at a third of memory speed; hence the native argmax
    the engine passes to the Sampler on the CPU.
    """
    return logits.max(dim=-1).indices


def _candidate_limit(top_k: int, top_p: float, vocab: int) -> int | None:
    """How many of the most likely tokens a row can draw from; None: all of them."""
    if 0 < top_k < vocab:
        return top_k
    if top_p < 1.0:
        return min(_TOP_P_CANDIDATES, vocab)
    return None


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs: [R, N]; zero the tokens below min_p x the row's most likely one."""
    if not bool((min_p > 0).any()):
        return probs
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """weights: [R, N] >= 0 (unnormalised); uniforms: [R] in [0, 1). Index i is
    picked with probability weights[i] / sum, and never one of weight 0."""
    cdf = weights.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picked.clamp_(max=weights.shape[1] - 1)


def _widen(values: torch.Tensor, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [R, K] candidates with zero-probability entries up to [R, width]."""
    if values.shape[1] >= width:
        return values, ids
    pad = width - values.shape[1]
    return (
        torch.cat([values, values.new_zeros(values.shape[0], pad)], dim=1),
        torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1),
    )
