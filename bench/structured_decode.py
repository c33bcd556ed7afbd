"""Decode cost of structured outputs in the torch engine (issue 10, item 2).

    python -m bench.structured_decode                      # default model, 5 repeats
    python -m bench.structured_decode --repeats 3 --steps 24 --profile

EngineCore driven directly (no Redis, as bench/offline.py), the default model and dtype. Each
run starts a fresh core with ``batch`` sequences (random 32-token prompts, the same in every run),
prefills them all, takes 2 warm-up steps, then times ``--steps`` decode steps one by one. Every
sequence decodes in every timed step: the unconstrained ones are greedy with ignore_eos, the
constrained ones greedy under a JSON schema (an object of a name, an age and an array of at least
32 {id, label} objects) that cannot be complete in fewer than ~300 tokens, so none ends early.

Runs, side by side in each repeat: 64 sequences with 0%, 50% (every other row) and 100%
constrained, and 1 sequence with 0% and 100%; the constrained ones once as the engine runs them
(masks filled on the helper thread during the forward) and once with the fill done just before
the forward on the engine's thread, to see what the overlap saves. Printed per run, medians over
the repeats:

- step time and decode tokens/s of the batch; the per-sequence rate of its unconstrained rows
  (1 / step: what an unconstrained request in a mixed batch sees);
- mask fill per step (MaskFiller.fill on its helper thread, catch-up included) and the engine's
  wait for the masks after the forward (MaskFiller.wait): a wait of about 0 while the fill takes
  longer than 0 means the fill ran during the forward;
- separately, the time to apply the masks to the logits (TokenMasks.apply, on the step's critical
  path after the forward) at 1, 32 and 64 rows, and what its first calls in a process cost
  (llguidance's apply kernel is torch.compile'd: one compile for 1 row, one for more).

``--profile`` adds cProfile's top functions over the timed steps of one 64-sequence run, 0% and
100%, to see where a constrained step's extra time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.contract import EngineRequest, RequestOutput
from services.engine.core.build import engine_core_for, grammar_compiler_for
from services.engine.model.native import KERNEL_CHOICES
from services.engine.model.runner import ModelRunner
from services.engine.structured import GrammarCompiler, TokenMasks
from shared.messages import SamplingParams, StructuredOutputs

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "label": {"type": "string", "maxLength": 16},
    },
    "required": ["id", "label"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": ITEM, "minItems": 32},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
CONSTRAINT = StructuredOutputs(json=json.dumps(SCHEMA), param="response_format")
PROMPT_TOKENS = 32
WARM_STEPS = 2


@dataclass(slots=True)
class RunResult:
    step_s: float  # median over the timed steps
    fill_s: float  # mean mask fill per step (0 without constrained rows)
    wait_s: float  # mean wait for the masks per step


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


def decode_run(
    runner: ModelRunner,
    compiler: GrammarCompiler,
    batch: int,
    constrained: int,
    args: argparse.Namespace,
    overlap: bool | None = None,
    profile: cProfile.Profile | None = None,
) -> RunResult:
    """``constrained`` of the ``batch`` sequences are constrained, spread evenly over the rows;
    ``overlap``: fill the masks on the helper thread during the forward or not (None: the engine's
    way, which is to overlap)."""
    core = engine_core_for(
        runner,
        max_num_batched_tokens=args.budget,
        max_running_requests=64,
        enable_prefix_caching=False,
        grammars=compiler,
    )
    filler = core.mask_filler
    if filler is None:
        raise RuntimeError("the engine has no mask filler")
    if overlap is not None:
        filler.overlap = overlap
    max_tokens = 1 + WARM_STEPS + args.steps + 1
    every = batch / constrained if constrained else 0.0
    rows = {int(i * every) for i in range(constrained)}
    for i, prompt in enumerate(prompts(batch, runner.config.vocab_size)):
        structured = CONSTRAINT if i in rows else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, structured=structured)
        core.add_request(EngineRequest(f"r{i}", prompt, params))
    started: set[str] = set()
    while len(started) < batch:  # prefill everyone: the timed steps are pure decode
        started.update(_check(core.step()))
    for _ in range(WARM_STEPS):
        _check(core.step())
    fill_before, wait_before = filler.fill_seconds, filler.wait_seconds
    step_times = []
    if profile is not None:
        profile.enable()
    for _ in range(args.steps):
        step_times.append(timed(lambda: _check(core.step())))
    if profile is not None:
        profile.disable()
    core.abort([f"r{i}" for i in range(batch)])
    core.step()
    filler.close()  # its helper thread; the next run's core has its own
    return RunResult(
        statistics.median(step_times),
        (filler.fill_seconds - fill_before) / args.steps,
        (filler.wait_seconds - wait_before) / args.steps,
    )


def _check(outputs: list[RequestOutput]) -> list[str]:
    """The ids that produced a token; a sequence that ends here would shrink the batch."""
    for output in outputs:
        if output.finish_reason is not None:
            raise RuntimeError(f"{output.request_id} ended early: {output.finish_reason} {output.error or ''}")
    return [output.request_id for output in outputs if output.new_token_ids]


def apply_times(vocab: int, repeats: int = 50) -> tuple[dict[str, float], dict[int, float]]:
    """(first calls in this process: seconds, per rows; median TokenMasks.apply seconds per rows)."""
    first: dict[str, float] = {}
    median: dict[int, float] = {}
    words = (vocab + 31) // 32
    for rows in (1, 2, 32, 64):
        logits = torch.randn(64 if rows > 1 else 1, vocab)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32)
        masks = TokenMasks(list(range(rows)), bitmask, [])
        once = timed(lambda: masks.apply(logits.clone()))
        if rows <= 2:
            first[f"{rows} row{'s' if rows > 1 else ''}"] = once
        if rows == 2:
            continue
        samples = []
        for _ in range(repeats):
            fresh = logits.clone()
            samples.append(timed(lambda: masks.apply(fresh)))  # noqa: B023 (called at once)
        median[rows] = statistics.median(samples)
    return first, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens (64 prompts in one step)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        from shared.model_files import resolve_model_dir
        from shared.settings import CommonSettings

        model_dir = resolve_model_dir(CommonSettings(), weights=True)
    runner = ModelRunner(
        model_dir,
        dtype=args.dtype,
        device="cpu",
        block_size=16,
        num_blocks=None,
        kv_cache_bytes=1024**3,
        max_model_len=None,
        kernels=args.kernels,
    )
    print(f"model {model_dir}, dtype {runner.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    first, apply = apply_times(runner.config.vocab_size)
    print("first TokenMasks.apply calls in this process (torch.compile):", _ms(first))
    print("TokenMasks.apply, median:", {f"{rows} rows": f"{s * 1000:.2f} ms" for rows, s in apply.items()})

    compiler = grammar_compiler_for(model_dir, runner.config)
    compiler.compile(CONSTRAINT).result()  # the tokenizer and the schema: not in any timed step
    # (batch, constrained, overlap: None the engine's way, False the fill before the forward)
    runs: list[tuple[int, int, bool | None]] = [
        (64, 0, None),
        (64, 32, None),
        (64, 64, None),
        (64, 32, False),
        (64, 64, False),
        (1, 0, None),
        (1, 1, None),
        (1, 1, False),
    ]
    results: dict[tuple[int, int, bool | None], list[RunResult]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        for run in runs:
            results[run].append(decode_run(runner, compiler, run[0], run[1], args, overlap=run[2]))
        print(f"repeat {repeat + 1}/{args.repeats} done")
    print()
    print(
        "| batch | constrained | fill | step (ms) | batch tokens/s | unconstrained row tokens/s "
        "| fill (ms/step) | wait (ms/step) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        batch, constrained, overlap = run
        found = results[run]
        step = statistics.median(r.step_s for r in found)
        fill = statistics.median(r.fill_s for r in found)
        wait = statistics.median(r.wait_s for r in found)
        free = f"{1 / step:.1f}" if constrained < batch else "-"
        share = f"{constrained / batch:.0%}"
        mode = "-" if not constrained else ("before the forward" if overlap is False else "during the forward")
        print(
            f"| {batch} | {share} | {mode} | {step * 1000:.1f} | {batch / step:.0f} | {free} | "
            f"{fill * 1000:.3f} | {wait * 1000:.3f} |"
        )
    base = statistics.median(r.step_s for r in results[64, 0, None])
    half = statistics.median(r.step_s for r in results[64, 32, None])
    print(f"\nunconstrained rows at 64: {1 / half:.1f} tokens/s each in the 50% batch, {1 / base:.1f} in the 0% batch")
    print(f"({base / half:.1%} of the speed)")
    if args.profile:
        for constrained in (0, 64):
            profile = cProfile.Profile()
            decode_run(runner, compiler, 64, constrained, args, profile=profile)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
            print(f"\n--- profile, 64 sequences, {constrained} constrained, {args.steps} steps ---")
            print(text.getvalue())
    compiler.close()


def _ms(times: dict[str, float]) -> dict[str, str]:
    return {name: f"{s * 1000:.0f} ms" for name, s in times.items()}


if __name__ == "__main__":
    main()
