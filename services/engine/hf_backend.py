"""The "hf" engine backend: transformers' generate, one request at a time.

The correctness reference for the torch engine, not a fast path. Each step()
runs one whole request through ``model.generate`` with the request's
sampling settings mapped onto transformers' own logits processors, so the
same request can be compared token for token against EngineCore.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from services.engine.contract import (
    EngineLoad,
    EngineRequest,
    ForwardTime,
    RequestOutput,
    refusal,
    stop_token_ids,
    unconstrained_only,
    wants_prompt_logprobs,
)
from shared.messages import FinishReason, PromptTokenLogprobs, TokenLogprobs
from shared.settings import EngineSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

_GREEDY_BELOW = 1e-5  # as in the torch engine's sampler


class _PresenceFrequencyPenalty:
    """OpenAI presence / frequency penalties over the generated tokens (transformers has neither)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len = prompt_len
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids: [1, L] tokens so far; scores: [1, V] logits of the next token."""
        output = input_ids[:, self.prompt_len :]
        if output.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.presence * (counts > 0) - self.frequency * counts


class HFBackend:
    """Implements services.engine.contract.EngineBackend; not thread-safe (one caller)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        vocab_size: int,
        max_model_len: int,
        default_eos_token_ids: list[int],
        clock: Callable[[], float] = time.perf_counter,
        load_window_s: float = 10.0,
    ) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.default_eos_token_ids = list(default_eos_token_ids)
        # A blank generation config: generate() fills every unset option from the
        # model's own, which would bring back EOS (against ignore_eos) and top_k=50.
        # transformers leaves GenerationConfig.__init__ unannotated.
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            pad_token_id=self.default_eos_token_ids[0] if self.default_eos_token_ids else 0
        )
        self.device = next(model.parameters()).device
        self._queue: OrderedDict[str, EngineRequest] = OrderedDict()
        # Outputs decided between steps (refusals, aborts), reported by the next step().
        self._pending: list[RequestOutput] = []
        self._forward_time = ForwardTime(clock, load_window_s)

    # ---- EngineBackend ----------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """An id already queued is ignored (contract.EngineBackend)."""
        if request.request_id in self._queue:
            return
        problem = refusal(request, max_model_len=self.max_model_len, vocab_size=self.vocab_size) or unconstrained_only(
            request, "hf"
        )
        if problem is not None:
            self._pending.append(RequestOutput(request.request_id, [], "error", error=problem))
            return
        self._queue[request.request_id] = request

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if self._queue.pop(request_id, None) is not None:
                self._pending.append(RequestOutput(request_id, [], "abort"))

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self._queue:
            _, request = self._queue.popitem(last=False)
            with self._forward_time.measure():
                outputs.append(self.generate(request))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._queue or self._pending)

    def free_slots(self) -> int:
        # One request at a time: pull the next only when nothing is queued.
        return 0 if self._queue else 1

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=0,
            waiting=len(self._queue),
            kv_usage=0.0,
            forward_share=self._forward_time.share(),
            kernels="hf backend: transformers generate, one request at a time",
        )

    # ---- generation -------------------------------------------------------

    @torch.inference_mode()
    def generate(self, request: EngineRequest) -> RequestOutput:
        """Run one request to the end; one RequestOutput with every token."""
        from transformers import GenerationConfig, LogitsProcessorList

        sampling = request.sampling
        prompt = request.prompt_token_ids
        done = request.output_token_ids  # taken over: generate after them, as part of the context
        stop_ids = sorted(stop_token_ids(sampling, self.default_eos_token_ids))
        prompt_logprobs = (
            self._prompt_logprobs(prompt, sampling.prompt_logprobs or 0) if wants_prompt_logprobs(request) else None
        )
        if sampling.max_tokens == 0:  # prefill only
            return RequestOutput(request.request_id, [], "length", prompt_logprobs=prompt_logprobs)
        # The same context rule as the torch engine: prompt + output <= max_model_len,
        # with at least one token (vLLM's behaviour for a prompt that fills the context).
        max_new = max(1, min(sampling.max_tokens, self.max_model_len - len(prompt)))
        if done:
            max_new = min(sampling.max_tokens - len(done), self.max_model_len - len(prompt) - len(done))
            if done[-1] in stop_ids or max_new <= 0:
                return RequestOutput(request.request_id, [], "stop" if done[-1] in stop_ids else "length")
        do_sample = sampling.temperature >= _GREEDY_BELOW
        # Greedy leaves the sampling options unset: transformers warns about them otherwise.
        sampling_options: dict[str, object] = {}
        if do_sample:
            sampling_options = {
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,  # 0: no limit, as in our sampler
                "top_p": sampling.top_p,
                "min_p": sampling.min_p if sampling.min_p > 0 else None,
            }
        config = GenerationConfig(  # type: ignore[no-untyped-call]  # transformers leaves __init__ unannotated
            max_new_tokens=max_new,
            min_new_tokens=min(max(0, sampling.min_tokens - len(done)), max_new) or None,
            do_sample=do_sample,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=stop_ids or None,
            pad_token_id=self.model.generation_config.pad_token_id,
            return_dict_in_generate=True,
            output_logits=sampling.logprobs is not None,
            **sampling_options,
        )
        processors = LogitsProcessorList()
        if sampling.presence_penalty or sampling.frequency_penalty:
            processors.append(
                _PresenceFrequencyPenalty(len(prompt), sampling.presence_penalty, sampling.frequency_penalty)
            )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed & ((1 << 64) - 1))
        input_ids = torch.tensor([[*prompt, *done]], dtype=torch.long, device=self.device)
        # transformers 5 declares generate on GenerationMixin, which PreTrainedModel no longer
        # subclasses (every *ForCausalLM class mixes both in).
        result = self.model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            logits_processor=processors,
        )
        tokens = result.sequences[0, input_ids.shape[1] :].tolist()
        finish: FinishReason = "stop" if tokens and tokens[-1] in stop_ids else "length"
        logprobs = self._logprobs(result.logits, tokens, sampling.logprobs) if sampling.logprobs is not None else None
        return RequestOutput(request.request_id, tokens, finish, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs(self, prompt: list[int], top_n: int) -> list[PromptTokenLogprobs | None]:
        """One forward pass over the prompt: the raw model distribution at each position."""
        result: list[PromptTokenLogprobs | None] = [None]
        if len(prompt) < 2:
            return result
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float()[:, : self.vocab_size], dim=-1)  # [P - 1, V]
        targets = torch.tensor(prompt[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        top_values: list[list[float]] = [[] for _ in ranks]
        top_ids: list[list[int]] = [[] for _ in ranks]
        if top_n:
            values, ids = logprobs.topk(top_n, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        for value, rank, alt_ids, alt_values in zip(chosen.squeeze(1).tolist(), ranks, top_ids, top_values):
            result.append((value, rank, list(zip(alt_ids, alt_values))))
        return result

    @staticmethod
    def _logprobs(logits: tuple[torch.Tensor, ...], tokens: list[int], top_n: int) -> list[TokenLogprobs]:
        """Raw model logprobs (before any processing), as the torch engine reports them."""
        result: list[TokenLogprobs] = []
        for step_logits, token in zip(logits, tokens):
            logprobs = torch.log_softmax(step_logits[0].float(), dim=-1)
            top: list[tuple[int, float]] = []
            if top_n:
                values, ids = logprobs.topk(top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            result.append((logprobs[token].item(), top))
        return result


def create_hf_backend(settings: EngineSettings) -> HFBackend:
    from transformers import AutoModelForCausalLM

    from services.engine.model.device import resolve_device, resolve_dtype
    from shared.model_files import resolve_model_dir

    model_dir = resolve_model_dir(settings, weights=True)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    # transformers wraps PreTrainedModel.to in a decorator whose signature mypy misreads.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    config = model.config
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    model_max = int(getattr(config, "max_position_embeddings", 2048))
    if settings.max_model_len is not None and settings.max_model_len > model_max:
        raise ValueError(
            f"max_model_len {settings.max_model_len} exceeds the model's max_position_embeddings {model_max}"
        )
    log.info("hf backend: %s on %s in %s", model_dir.name, device, dtype)
    return HFBackend(
        model,
        vocab_size=int(config.vocab_size),
        max_model_len=settings.max_model_len or model_max,
        default_eos_token_ids=eos_ids,
    )
