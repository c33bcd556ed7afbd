"""The machine's roofline, measured with torch: the best matmul rate and the memory read bandwidth.

    python -m bench.peers.roofline [--quick] [--json]

- matmul: square ``torch.mm`` in float32 and bfloat16 (oneDNN takes AMX where the CPU has it)
  and ``torch._int_mm`` in int8 where this torch has it on CPU; each the best of a few timed
  repeats after a warm-up, in GFLOP/s (2 n^3 per product; int8 counts its multiply-adds the same).
- memory read: ``sum()`` of a float32 tensor far larger than the caches, bytes read per second.

All on torch's default threads (one per core), as the servers run.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any


def _best_seconds(fn: Callable[[], object], repeats: int, min_s: float) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel
    best = float("inf")
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / calls)
    return best


def matmul_rates(sizes: tuple[int, ...], repeats: int, min_s: float) -> dict[str, float]:
    """GFLOP/s per dtype: the best over ``sizes``."""
    import torch

    rates: dict[str, float] = {}
    for n in sizes:
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            seconds = _best_seconds(functools.partial(torch.mm, a, b), repeats, min_s)
            rates[name] = max(rates.get(name, 0.0), 2 * n**3 / seconds / 1e9)
        try:
            a8 = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            b8 = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            seconds = _best_seconds(functools.partial(torch._int_mm, a8, b8), repeats, min_s)
            rates["int8"] = max(rates.get("int8", 0.0), 2 * n**3 / seconds / 1e9)
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    return rates


def read_bandwidth(gib: float, repeats: int) -> float:
    """GB/s (10^9 bytes) of the fastest ``sum()`` of a float32 tensor of ``gib`` GiB."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    seconds = _best_seconds(lambda: x.sum(), repeats, 0.0)
    return x.numel() * 4 / seconds / 1e9


def measure(quick: bool = False) -> dict[str, Any]:
    import torch

    sizes = (1024, 2048) if quick else (2048, 4096)
    rates = matmul_rates(sizes, repeats=2 if quick else 3, min_s=0.2 if quick else 1.0)
    best = max(rates, key=lambda k: rates[k])
    return {
        "matmul_gflops": rates,
        "best_matmul_gflops": rates[best],
        "best_matmul_dtype": best,
        "matmul_sizes": list(sizes),
        "read_gbps": read_bandwidth(0.5 if quick else 2.0, repeats=3 if quick else 8),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.roofline", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller and fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = measure(args.quick)
    if args.json:
        print(json.dumps(result))
        return
    for dtype, rate in result["matmul_gflops"].items():
        print(f"matmul {dtype:9s} {rate:8.1f} GFLOP/s")
    print(f"memory read      {result['read_gbps']:8.1f} GB/s  (torch {result['torch']}, {result['threads']} threads)")


if __name__ == "__main__":
    main()
