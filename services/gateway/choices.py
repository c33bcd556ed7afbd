"""Parallel sampling (``n``) and batched prompts: one pipeline request per choice. Pure logic.

A request with ``n`` choices for each of its prompts becomes ``prompts * n`` ordinary requests
in the pipeline, choice ``prompt_index * n + sample`` (the order OpenAI and vLLM give them).
Each has its own id, ``{id}-{index}``, so that each can be aborted; a seeded request gives its
choice ``sample`` the seed ``seed + sample``, as vLLM does, so the choices differ yet the
response stays reproducible. The engine computes a prompt shared by several choices once: the
copies wait for the first's prompt blocks and take them from its prefix cache (scheduler.py).
request_handle.py runs the choices of a request together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import ApiError

SEED_SPAN = 2**64  # seeds go from -2**63 to 2**64 - 1 (what msgpack carries); seed + sample wraps


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a response and the pipeline request that makes it."""

    index: int  # the choice's ``index`` in the response
    prompt_index: int  # which prompt of a batch
    sample: int  # 0 .. n-1 for that prompt
    request_id: str
    seed: int | None


def plan_choices(request_id: str, prompts: int, n: int, seed: int | None) -> list[Choice]:
    """The choices of a request; a single choice keeps the request's own id."""
    if prompts == 1 and n == 1:
        return [Choice(0, 0, 0, request_id, seed)]
    plan = []
    for prompt_index in range(prompts):
        for sample in range(n):
            index = prompt_index * n + sample
            plan.append(Choice(index, prompt_index, sample, f"{request_id}-{index}", _seed(seed, sample)))
    return plan


def _seed(seed: int | None, sample: int) -> int | None:
    if seed is None:
        return None
    shifted = seed + sample
    return shifted - SEED_SPAN if shifted >= SEED_SPAN else shifted


def merged_usage(plan: Sequence[Choice], usages: Sequence[dict[str, int]]) -> dict[str, int]:
    """Every choice's completion tokens; each prompt's tokens once (as OpenAI and vLLM count them)."""
    prompt = sum(usage["prompt_tokens"] for choice, usage in zip(plan, usages, strict=True) if choice.sample == 0)
    completion = sum(usage["completion_tokens"] for usage in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def merged_response(plan: Sequence[Choice], bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One response body from each choice's own (built with that choice's index)."""
    merged = dict(bodies[0])
    merged["choices"] = sorted((c for body in bodies for c in body["choices"]), key=lambda c: c["index"])
    merged["usage"] = merged_usage(plan, [body["usage"] for body in bodies])
    return merged


def name_prompt(error: ApiError, choice: Choice, batch: bool) -> ApiError:
    """A batch fails as a whole when one prompt is refused: the error says which one."""
    if batch and error.status < 500 and error.param in (None, "prompt"):
        error.param = f"prompt[{choice.prompt_index}]"
        error.message = f"Prompt {choice.prompt_index} of the batch: {error.message}"
    return error
