"""The machine's roofline, measured with torch: the best matmul rate and the memory read bandwidth.

    python -m bench.peers.roofline [--quick] [--json]

- matmul: square ``torch.mm`` in float32 and bfloat16 (oneDNN takes AMX where the CPU has it)
  and ``torch._int_mm`` in int8 where this torch has it on CPU; each the best of a few timed
  repeats after a warm-up, in GFLOP/s (2 n^3 per product; int8 counts its multiply-adds the same).
  Each is probed at 512 first; one under a quarter of the best probe is not timed at the larger sizes.
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


# Each dtype is first timed at this size; one far below the best (bf16 through torch on a CPU without bf16
# instructions, ~1 GFLOP/s on an AMD Zen 3, where one 4096 product takes minutes) is not timed larger.
PROBE_SIZE = 512
SLOW_SHARE = 0.25


def _products() -> dict[str, Callable[[int], Callable[[], object]]]:
    """A square product of size n per dtype, where this torch has it on the CPU."""
    import torch

    def floats(dtype: torch.dtype) -> Callable[[int], Callable[[], object]]:
        def make(n: int) -> Callable[[], object]:
            return functools.partial(torch.mm, torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype))

        return make

    def int8(n: int) -> Callable[[], object]:
        a8 = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        b8 = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        return functools.partial(torch._int_mm, a8, b8)

    return {"float32": floats(torch.float32), "bfloat16": floats(torch.bfloat16), "int8": int8}


def matmul_rates(sizes: tuple[int, ...], repeats: int, min_s: float) -> dict[str, float]:
    """GFLOP/s per dtype: the best over the probe size and ``sizes`` (a slow dtype: the probe's only)."""
    rates: dict[str, float] = {}
    products = _products()
    for name, make in list(products.items()):
        try:
            seconds = _best_seconds(make(PROBE_SIZE), repeats, min_s / 4)
        except (RuntimeError, NotImplementedError, AttributeError):  # torch._int_mm is not on every CPU build
            del products[name]
            continue
        rates[name] = 2 * PROBE_SIZE**3 / seconds / 1e9
    fast = [name for name in products if rates[name] >= SLOW_SHARE * max(rates.values())]
    for n in sizes:
        for name in fast:
            seconds = _best_seconds(products[name](n), repeats, min_s)
            rates[name] = max(rates[name], 2 * n**3 / seconds / 1e9)
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
