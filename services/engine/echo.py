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

from services.engine.contract import EngineLoad, EngineRequest, RequestOutput
from shared.messages import FinishReason, TokenLogprobs
from shared.settings import EngineSettings


@dataclass(slots=True)
class _EchoSequence:
    request: EngineRequest
    stop_ids: frozenset[int]
    generated: int = 0

    @classmethod
    def start(cls, request: EngineRequest) -> _EchoSequence:
        sampling = request.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(sampling.eos_token_ids)
        # Taken over from another engine: continue the cycle where its output ended.
        return cls(request, frozenset(stop_ids), generated=len(request.output_token_ids))

    def ended(self) -> FinishReason | None:
        """Why a taken-over request was already over when it arrived, if it was."""
        done = self.request.output_token_ids
        if done and done[-1] in self.stop_ids and len(done) > self.request.sampling.min_tokens:
            return "stop"
        return "length" if self.generated >= self.request.sampling.max_tokens else None

    def next_token(self) -> tuple[int, str | None]:
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
        self._clock = clock
        self._waiting: OrderedDict[str, EngineRequest] = OrderedDict()
        self._running: dict[str, _EchoSequence] = {}
        self._abort_ids: set[str] = set()
        # forward_share is measured over the window since the previous load() call.
        self._window_start = clock()
        self._window_forward_s = 0.0

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> EchoBackend:
        return cls(
            max_running_requests=settings.max_running_requests,
            step_delay_s=settings.echo_step_delay_ms / 1000.0,
        )

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self._waiting or request.request_id in self._running:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        self._waiting[request.request_id] = request

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if request_id in self._waiting or request_id in self._running:
                self._abort_ids.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def free_slots(self) -> int:
        return max(0, self.max_running_requests - len(self._running) - len(self._waiting))

    def step(self) -> list[RequestOutput]:
        outputs = self._take_aborts()
        outputs.extend(self._admit())
        if not self._running:
            return outputs
        started = self._clock()
        if self.step_delay_s:
            self._sleep(self.step_delay_s)
        self._window_forward_s += self._clock() - started
        finished: list[str] = []
        for request_id, sequence in self._running.items():
            token, finish = sequence.next_token()
            outputs.append(RequestOutput(request_id, [token], finish, logprobs=_echo_logprobs(sequence.request, token)))
            if finish is not None:
                finished.append(request_id)
        for request_id in finished:
            del self._running[request_id]
        return outputs

    def load(self) -> EngineLoad:
        now = self._clock()
        wall = now - self._window_start
        share = min(1.0, self._window_forward_s / wall) if wall > 0 else 0.0
        self._window_start = now
        self._window_forward_s = 0.0
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_usage=len(self._running) / self.max_running_requests,
            forward_share=share,
        )

    def _take_aborts(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for request_id in sorted(self._abort_ids):
            if self._running.pop(request_id, None) is not None or self._waiting.pop(request_id, None) is not None:
                outputs.append(RequestOutput(request_id, [], "abort"))
        self._abort_ids.clear()
        return outputs

    def _admit(self) -> list[RequestOutput]:
        refused: list[RequestOutput] = []
        while self._waiting and len(self._running) < self.max_running_requests:
            _, request = self._waiting.popitem(last=False)
            if not request.prompt_token_ids:
                refused.append(RequestOutput(request.request_id, [], "error", error="the prompt has no tokens to echo"))
                continue
            sequence = _EchoSequence.start(request)
            ended = sequence.ended()
            if ended is not None:
                refused.append(RequestOutput(request.request_id, [], ended))
                continue
            self._running[request.request_id] = sequence
        return refused


def _echo_logprobs(request: EngineRequest, token: int) -> list[TokenLogprobs] | None:
    """The echoed token is certain: logprob 0, and it is its own top alternative."""
    top = request.sampling.logprobs
    if top is None:
        return None
    return [(0.0, [(token, 0.0)][:top])]
