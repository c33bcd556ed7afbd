"""The concurrency-1 prefill step in the engine (one prompt of --tokens random ids -> 1 token),
timed in situ: the engine built as the server builds it, --warmup requests first (the first ~25
after the build are slower: the background warm-up), then --requests timed ones.

    python -m bench.prefill_step --ab fresh    # FreshPrefill (B) against paged_attention (A), alternated
    python -m bench.prefill_step --ab linears  # StepLinears (B) against QuantizedLinear calls (A)
    python -m bench.prefill_step --ab both     # both (B) against neither (A)
    python -m bench.prefill_step --op-times    # per-op wall clock inside the step
    python -m bench.prefill_step --ab linears --decode 32  # the c1 decode steps after it instead
    python -m bench.prefill_step --ab reuse --decode 32    # StepLinears reused across steps, or rebuilt
    python -m bench.prefill_step --ab swiglu   # SwiGLU in gate_up's epilogue (B) against gate_up + silu_mul (A)
    python -m bench.prefill_step --ab prefill  # the native prefill attention (B) against SDPA (A)

Run it alone on the machine (``flock /tmp/bench.lock``): other processes on the cores make the
OpenMP kernels many times slower. --ab switches one change off for A at run time (fresh:
AttentionMetadata.fresh_prefill -> None; linears: the model's bound linear table -> None; swiglu:
LlamaModel.fuse_swiglu -> False; prefill: the model's native prefill kernels -> None, FreshPrefill's SDPA), so
both sides run in one process on the same warm engine.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from services.engine.contract import EngineRequest
from services.engine.core.build import create_torch_backend
from services.engine.model import attention, layer_step, linear, llama, step_linears
from services.engine.model.attention_metadata import AttentionMetadata
from shared.messages import SamplingParams
from shared.settings import EngineSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--requests", type=int, default=40, help="timed requests (per side with --ab)")
    parser.add_argument("--ab", choices=("fresh", "linears", "both", "reuse", "swiglu", "prefill"))
    parser.add_argument("--op-times", action="store_true")
    parser.add_argument(
        "--decode",
        type=int,
        default=0,
        help="time the decode steps after the prefill instead: the median of N per request",
    )
    args = parser.parse_args()
    core = create_torch_backend(EngineSettings(redis_url="redis://127.0.0.1:1/0"))
    rng = random.Random(0)
    counter = iter(range(1 << 30))

    def one() -> float:
        ids = [rng.randrange(100, 40000) for _ in range(args.tokens)]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        if args.decode:
            params = SamplingParams(max_tokens=args.decode + 1, temperature=0.0, ignore_eos=True)
        core.add_request(EngineRequest(f"r{next(counter)}", ids, params))
        if args.decode:
            core.step()  # the prefill
            steps = []
            while core.has_unfinished():
                start = time.perf_counter()
                core.step()
                steps.append(time.perf_counter() - start)
            return statistics.median(steps)
        start = time.perf_counter()
        while core.has_unfinished():
            core.step()
        return time.perf_counter() - start

    fresh = AttentionMetadata.fresh_prefill
    model = core.runner.model  # type: ignore[attr-defined]
    table = model._bound_weights
    prefill_kernels = model._prefill_kernels
    reuse = llama.LlamaModel._bound_linears

    def use_fresh(on: bool) -> None:
        if args.ab in ("fresh", "both"):
            AttentionMetadata.fresh_prefill = fresh if on else (lambda self: None)  # type: ignore[method-assign]
        if args.ab in ("linears", "both"):
            model._bound_weights = table if on else None
        if args.ab == "reuse":
            llama.LlamaModel._bound_linears = reuse if on else _rebuild  # type: ignore[method-assign]
        if args.ab == "swiglu":
            llama.LlamaModel.fuse_swiglu = on
        if args.ab == "prefill":
            model._prefill_kernels = prefill_kernels if on else None

    for i in range(args.warmup):
        use_fresh(bool(i & 1) or not args.ab)
        one()
    if args.ab:
        sides: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.requests):
            for on in (False, True) if i & 1 else (True, False):
                use_fresh(on)
                sides[on].append(one())
        a, b = (statistics.median(sides[on]) * 1e3 for on in (False, True))
        what = f"decode step after a {args.tokens}-token prompt" if args.decode else f"{args.tokens}-token prefill step"
        print(f"{what}, median of {args.requests} requests each, alternated:")
        print(f"  A without {args.ab} {a:.2f} ms   B with {b:.2f} ms   A - B {a - b:.2f} ms ({(a - b) / a:.1%})")
        return
    totals: collections.defaultdict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    if args.op_times:
        _time_ops(totals, calls)
    times = [one() for _ in range(args.requests)]
    print(f"{args.tokens}-token prefill step: median {statistics.median(times) * 1e3:.2f} ms of {args.requests}")
    for name in sorted(totals, key=lambda n: -totals[n]):
        per_step = totals[name] / args.requests * 1e3
        print(f"  {name:18s} {per_step:6.2f} ms/step  {totals[name] / calls[name] * 1e6:7.1f} us/call")


def _rebuild(
    self: llama.LlamaModel, kernels: Any, table: Any, rows: int, outs: Any, activated: Any
) -> step_linears.StepLinears:
    """LlamaModel._bound_linears without the reuse: a new binding every step."""
    return step_linears.StepLinears(kernels, table, self._linear_scratch, rows=rows, outs=outs, activated=activated)


def _time_ops(totals: collections.defaultdict[str, float], calls: collections.Counter[str]) -> None:
    """Wrap the step's ops with wall-clock timers (~0.3 us each)."""

    def wrap(owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            result = inner(*a, **k)
            totals[label] += time.perf_counter() - start
            calls[label] += 1
            return result

        setattr(owner, name, timed)

    wrap(llama.LlamaModel, "forward", "model forward")
    wrap(linear.QuantizedLinear, "__call__", "linear (qkv, gate_up)")
    wrap(linear.QuantizedLinear, "add_to", "linear (o, down)")
    wrap(linear.QuantizedLinear, "logits", "lm_head")
    for name in ("qkv", "o", "gate_up", "swiglu", "down"):
        wrap(step_linears.StepLinears, name, f"bound {name}")
    wrap(layer_step.LayerStep, "norm", "rms_norm")
    wrap(layer_step.LayerStep, "rope_store", "rope_store")
    wrap(layer_step.LayerStep, "silu_mul", "silu_mul")
    wrap(llama, "paged_attention", "paged_attention")
    wrap(attention.FreshPrefill, "__call__", "FreshPrefill")
    wrap(F, "scaled_dot_product_attention", "sdpa")


if __name__ == "__main__":
    main()
