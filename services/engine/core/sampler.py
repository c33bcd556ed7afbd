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

Drawing uses the exponential race (argmax of p / E with E ~ Exp(1)), which
picks token i with probability p_i. A request with a seed draws its E from
its own torch.Generator, so its tokens depend on its seed alone and not on
what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.backend import TokenLogprobs
from services.engine.core.sequence import Sequence

_GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Draws of requests without a seed; seeded from the OS unless given.
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [S, V] float, one row per sequence of ``seqs`` (same order)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(seqs)} sequences")
        logits = logits.float()
        if logits.shape[1] > self.vocab_size:
            # Padded vocabularies: the padding columns are not tokens.
            logits = logits[:, : self.vocab_size]
        params = [seq.sampling for seq in seqs]

        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = self._apply_penalties(logits, seqs)
        logits = self._mask_stop_tokens(logits, seqs)

        greedy = [p.temperature < _GREEDY_BELOW for p in params]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._draw(logits, seqs, greedy)
        chosen = token_ids.tolist()
        return SamplerOutput(chosen, self._logprobs(raw_logprobs, seqs, chosen))

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
            if seq.num_output_tokens < seq.sampling.min_tokens and seq.stop_ids:
                ids = [t for t in seq.stop_ids if 0 <= t < vocab]
                if not ids:
                    continue
                if not masked:
                    logits = logits.clone()
                    masked = True
                logits[i, ids] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        params = [seq.sampling for seq in seqs]
        vocab = logits.shape[1]
        device = logits.device
        temperature = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
        scaled = logits / temperature[:, None]

        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        if any(k < vocab for k in top_k):
            scaled = self._apply_top_k(scaled, top_k)
        top_p = [p.top_p for p in params]
        if any(v < 1.0 for v in top_p):
            scaled = self._apply_top_p(scaled, torch.tensor(top_p, device=device))
        probs = torch.softmax(scaled, dim=-1)
        min_p = [p.min_p for p in params]
        if any(v > 0.0 for v in min_p):
            threshold = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)

        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._generator)
        for i, seq in enumerate(seqs):
            generator = seq.generator(device)
            if generator is not None and not greedy[i]:
                noise[i].exponential_(generator=generator)
        # An exact 0 draw would turn a masked (0 probability) token into 0/0.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            greedy_rows = torch.tensor(greedy, device=device)
            sampled = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
        """top_k: per row, how many logits to keep (vocab size: no limit)."""
        vocab = logits.shape[1]
        limited = [k for k in top_k if k < vocab]
        top_values = logits.topk(max(limited), dim=-1).values  # [S, max_k], descending
        k = torch.tensor([min(k, top_values.shape[1]) for k in top_k], device=logits.device)
        kth = top_values.gather(1, (k - 1)[:, None])
        unlimited = torch.tensor([k >= vocab for k in top_k], device=logits.device)
        kth = kth.masked_fill(unlimited[:, None], float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))

    @staticmethod
    def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose total is at most 1 - top_p; the top token always stays.
        drop = cumulative <= (1.0 - top_p)[:, None]
        drop[:, -1] = False
        mask = torch.zeros_like(drop).scatter_(1, order, drop)
        return logits.masked_fill(mask, float("-inf"))

    # ---- logprobs ---------------------------------------------------------

    @staticmethod
    def _logprobs(
        raw_logprobs: torch.Tensor | None, seqs: list[Sequence], chosen: list[int]
    ) -> list[TokenLogprobs | None]:
        if raw_logprobs is None:
            return [None] * len(seqs)
        wanted = [seq.sampling.logprobs for seq in seqs]
        rows = [i for i, n in enumerate(wanted) if n is not None]
        row_index = torch.tensor(rows, device=raw_logprobs.device)
        chosen_index = torch.tensor([chosen[i] for i in rows], device=raw_logprobs.device)
        chosen_lp = raw_logprobs[row_index, chosen_index].tolist()
        top_n = max(wanted[i] or 0 for i in rows)
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if top_n > 0:
            top = raw_logprobs[row_index].topk(top_n, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        for j, i in enumerate(rows):
            n = wanted[i] or 0
            result[i] = (chosen_lp[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return result
