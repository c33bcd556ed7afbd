"""Per-call time of a fresh prefill chunk's causal attention: SDPA (attention.FreshPrefill) against
the native kernel (prefill_attention.NativeFreshPrefill) on each of its paths, at the model's heads.

    python -m bench.prefill_attention                          # T = 16, 128, 512, 2048; SDPA, amx_bf16, avx512
    python -m bench.prefill_attention --tokens 128 --paths amx_bf16 avx2 --rounds 30 --flush-mb 16

SmolLM2-135M's heads: 9 query, 3 KV, head dim 64, bf16, from one fused qkv buffer with spare rows
(as the engine's workspace). The variants alternate call by call within each round (SDPA is torch's
library and the kernel its own: no two builds of one library share the process), and each round's
time is the mean of --calls calls; the medians over rounds are printed, with the ratio to SDPA.
--flush-mb streams that many MB through the caches before each call, as the layer's linears do
between two attentions in a step. Run it under the bench lock (flock /tmp/bench.lock ...).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from services.engine.model.attention import FreshPrefill
from services.engine.model.prefill_attention import PATHS, NativeFreshPrefill, load_prefill_kernels

HEADS, KV_HEADS, DIM = 9, 3, 64


def variants(tokens: int, paths: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> attend(qkv) for SDPA and each native path, bound as the engine binds them per step."""
    scale = DIM**-0.5
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "sdpa": FreshPrefill(tokens, HEADS, KV_HEADS, DIM, scale)
    }
    kernels = load_prefill_kernels()
    if kernels is None:
        raise SystemExit("the native prefill attention did not build or failed its check (see the log)")
    for path in paths:
        if path not in kernels.runnable_paths():
            print(f"skipping {path}: this CPU does not run it")
            continue
        out = torch.empty(tokens, HEADS * DIM, dtype=torch.bfloat16)
        fresh = NativeFreshPrefill(tokens, HEADS, KV_HEADS, DIM, scale, kernels.with_path(path))
        found[path] = lambda qkv, fresh=fresh, out=out: fresh(qkv, out)
    return found


def run(tokens: int, paths: list[str], rounds: int, calls: int, flush_mb: int) -> dict[str, float]:
    """Median us per call of each variant at this many tokens."""
    qkv = torch.randn(tokens + 16, (HEADS + 2 * KV_HEADS) * DIM).bfloat16()
    flush = torch.empty(flush_mb << 20 >> 2, dtype=torch.float32) if flush_mb else None
    timed = variants(tokens, paths)
    for attend in timed.values():  # warm-up: first-touch of buffers, OpenMP pools
        attend(qkv)
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        total = dict.fromkeys(timed, 0.0)
        for _ in range(calls):
            for name, attend in timed.items():
                if flush is not None:
                    flush.add_(1.0)
                start = time.perf_counter()
                attend(qkv)
                total[name] += time.perf_counter() - start
        for name in timed:
            times[name].append(total[name] / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512, 2048])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["amx_bf16", "avx512"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=0, help="calls per round (0: about 20 ms of SDPA per round)")
    parser.add_argument("--flush-mb", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (the kernel's: OMP_NUM_THREADS)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} torch threads; us per call, median of {args.rounds} rounds")
    for tokens in args.tokens:
        calls = args.calls or max(1, 20_000 // max(100, tokens * tokens // 100))
        result = run(tokens, args.paths, args.rounds, calls, args.flush_mb)
        base = result["sdpa"]
        cells = ", ".join(f"{name} {us:.1f} ({base / us:.2f}x)" for name, us in result.items())
        print(f"T={tokens:5d} ({calls} calls/round): {cells}", flush=True)


if __name__ == "__main__":
    main()
