"""The echo backend: an EngineBackend without a model.

Each step every running request emits one token: its prompt's tokens repeated
cyclically. It exercises the whole pipeline (batching, stop and length limits,
aborts, back-pressure) with no model, and its per-step sleep stands in for a
forward pass so overhead benchmarks can compare the pipeline's cost with it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.engine.contract import (
    EngineLoad,
    EngineRequest,
    ForwardTime,
    QueueTime,
    RequestOutput,
    refusal,
    stop_token_ids,
    unconstrained_only,
    wants_prompt_logprobs,
)
from shared.messages import FinishReason, PromptTokenLogprobs, TokenLogprobs
from shared.settings import EngineSettings


@dataclass(slots=True)
class _EchoSequence:
    request: EngineRequest
    stop_ids: frozenset[int]
    queued_at: float  # when it was added (QueueTime's clock)
    generated: int = 0
    scheduled_at: float | None = None  # unix time it started running, until its first output says so

    @classmethod
    def start(cls, request: EngineRequest, queued_at: float) -> _EchoSequence:
        # No model, so no model EOS: only the request's own. Taken over from another
        # engine: continue the cycle where its output ended.
        return cls(request, stop_token_ids(request.sampling), queued_at, generated=len(request.output_token_ids))

    def ended(self) -> FinishReason | None:
        """Why a taken-over request was already over when it arrived, if it was."""
        done = self.request.output_token_ids
        if done and done[-1] in self.stop_ids and len(done) > self.request.sampling.min_tokens:
            return "stop"
        return "length" if self.generated >= self.request.sampling.max_tokens else None

    def next_token(self) -> tuple[int, FinishReason | None]:
        """The next token and, if it ends the request, why."""
        prompt = self.request.prompt_token_ids
        sampling = self.request.sampling
        token = prompt[self.generated % len(prompt)]
        index = self.generated  # 0-based position among the output tokens
        self.generated += 1
        # As in vLLM, min_tokens tokens come before a stop token may end the request.
        if token in self.stop_ids and index >= sampling.min_tokens:
            return token, "stop"
        if self.generated >= sampling.max_tokens:
            return token, "length"
        return token, None


class EchoBackend:
    """Implements services.engine.contract.EngineBackend; not thread-safe (one caller)."""

    def __init__(
        self,
        *,
        max_running_requests: int = 64,
        step_delay_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_running_requests < 1:
            raise ValueError(f"max_running_requests must be at least 1, got {max_running_requests}")
        if step_delay_s < 0:
            raise ValueError(f"step_delay_s must not be negative, got {step_delay_s}")
        self.max_running_requests = max_running_requests
        self.step_delay_s = step_delay_s
        self._sleep = sleep
        self._waiting: OrderedDict[str, _EchoSequence] = OrderedDict()
        self._running: dict[str, _EchoSequence] = {}
        # Outputs decided between steps (refusals, aborts), reported by the next step().
        self._pending: list[RequestOutput] = []
        self._forward_time = ForwardTime(clock)
        self._queue_time = QueueTime(clock)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> EchoBackend:
        return cls(
            max_running_requests=settings.max_running_requests,
            step_delay_s=settings.echo_step_delay_ms / 1000.0,
        )

    def add_request(self, request: EngineRequest) -> None:
        """An id already in the engine is ignored (contract.EngineBackend)."""
        if request.request_id in self._waiting or request.request_id in self._running:
            return
        problem = refusal(request) or unconstrained_only(request, "echo")
        if problem is not None:
            self._pending.append(RequestOutput(request.request_id, [], "error", error=problem))
            return
        sequence = _EchoSequence.start(request, self._queue_time.clock())
        ended = sequence.ended()
        if ended is not None:
            # Taken over at its end, or max_tokens 0 (prefill only): its prompt logprobs, if any, now.
            self._pending.append(
                RequestOutput(request.request_id, [], ended, prompt_logprobs=_echo_prompt_logprobs(request))
            )
            return
        self._waiting[request.request_id] = sequence

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if self._running.pop(request_id, None) is not None or self._waiting.pop(request_id, None) is not None:
                self._pending.append(RequestOutput(request_id, [], "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def free_slots(self) -> int:
        return max(0, self.max_running_requests - len(self._running) - len(self._waiting))

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        while self._waiting and len(self._running) < self.max_running_requests:
            request_id, sequence = self._waiting.popitem(last=False)
            self._running[request_id] = sequence
            self._queue_time.started(sequence.queued_at)
            sequence.scheduled_at = time.time()
        if not self._running:
            return outputs
        with self._forward_time.measure():
            if self.step_delay_s:
                self._sleep(self.step_delay_s)
        finished: list[str] = []
        for request_id, sequence in self._running.items():
            first = sequence.generated == len(sequence.request.output_token_ids)
            token, finish = sequence.next_token()
            output = RequestOutput(request_id, [token], finish, logprobs=_echo_logprobs(sequence.request, token))
            if first:
                output.prompt_logprobs = _echo_prompt_logprobs(sequence.request)
                output.scheduled_at, sequence.scheduled_at = sequence.scheduled_at, None
            outputs.append(output)
            if finish is not None:
                finished.append(request_id)
        for request_id in finished:
            del self._running[request_id]
        return outputs

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_usage=len(self._running) / self.max_running_requests,
            forward_share=self._forward_time.share(),
            queue_time=self._queue_time.snapshot(),
            kernels="echo backend: no model",
        )


def _echo_prompt_logprobs(request: EngineRequest) -> list[PromptTokenLogprobs | None] | None:
    """Every prompt token is certain too: logprob 0, rank 1, and its own top alternative."""
    if not wants_prompt_logprobs(request):
        return None
    top = request.sampling.prompt_logprobs or 0
    prompt = request.prompt_token_ids
    return [None, *((0.0, 1, [(token, 0.0)][:top]) for token in prompt[1:])]


def _echo_logprobs(request: EngineRequest, token: int) -> list[TokenLogprobs] | None:
    """The echoed token is certain: logprob 0, and it is its own top alternative."""
    top = request.sampling.logprobs
    if top is None:
        return None
    return [(0.0, [(token, 0.0)][:top])]
