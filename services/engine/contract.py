"""The contract between the engine service (service.py) and a backend (echo, torch, hf).

The service owns all I/O; a backend is plain in-process Python driven by
``step()``. Types here are small dataclasses, not wire messages, so that the
decode loop never builds or parses a stream message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from shared.messages import FinishReason, SamplingParams, TokenLogprobs


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # A request taken over from an engine that died: the output tokens it had already
    # published. The backend continues after them (they count toward max_tokens,
    # min_tokens and the penalties) and reports only the tokens that follow.
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None
    # With finish_reason "error": why, in words a client can act on.
    error: str | None = None


@dataclass(slots=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of KV blocks in use, 0..1
    forward_share: float = 0.0  # share of wall time spent in model forward, 0..1


class EngineBackend(Protocol):
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it starts in a later step(). One whose ``output_token_ids``
        already end it (a stop token, max_tokens) finishes in the next step with no tokens."""

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop requests; the next step() reports each as finish_reason "abort"
        (unknown ids are ignored) and their KV blocks are free after it."""

    def step(self) -> list[RequestOutput]:
        """Run one iteration: schedule, forward, sample. Returns outputs only for
        requests that produced tokens or finished in this step."""

    def has_unfinished(self) -> bool: ...

    def free_slots(self) -> int:
        """How many more requests to pull from the stream now; 0 = no KV room."""

    def load(self) -> EngineLoad: ...
