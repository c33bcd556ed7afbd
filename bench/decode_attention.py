"""Time of the paged decode attention (csrc/paged_attention*.c) over a c64 decode step's layers.

    python -m bench.decode_attention                                   # this tree's kernels
    python -m bench.decode_attention --build HEAD~1 --build .          # A/B against a revision, alternated
    python -m bench.decode_attention --build . --build .:-DPUMP=0      # A/B a compile-time variant
    python -m bench.decode_attention --build HEAD~1 --build . --check  # outputs bitwise equal?
    python -m bench.decode_attention --kv bf16 int8 fp8_e5m2           # the pool's formats, alternated

The default engine's shapes: bf16 pool with block size 16, 9 query heads over 3 KV heads of
64 dims, 30 layers, batch 64, each sequence at --context tokens (or, with --vary, contexts
spread evenly over 1..context). Each layer has a pool of its own (K [blocks, 3, 64, 16],
V [blocks, 3, 16, 64]; --pool-factor times the blocks the batch uses; --kv int8: chunks of
(64 + 4) * 16 bytes, values and scales, kv_cache.py), and the calls go
through the layers in order as a decode step's do, so every call reads its blocks from
memory, not from a cache. Block tables: "contiguous" (each sequence's blocks side by side,
as after one prefill) and "scattered" (a random permutation of the pool's blocks, as after
much churn).

Each --build (SRC[:CFLAGS]; SRC: "." for this tree's csrc, a directory holding the kernel
sources, or a git revision whose csrc is taken) and each --kv format (bf16, fp8_e5m2, int8:
SCALELLM_KV_CACHE_DTYPE's pools; a revision must know the format) runs in its own process
(two builds of one library in one process slow each other down); with several, the rounds
alternate between them. Prints per build, format and layout the median ms per step (the sum
of the 30 layers' calls, over rounds x passes steps) and the K/V bytes read per second at
that median (int8: values and scales).

The pools are torch allocations, on 4 KB pages unless THP_MEM_ALLOC_ENABLE=1 is set (torch then
backs large allocations with 2 MB pages): both ways are worth a look, since on this VM the page
walks of a pool read in KB-sized runs cost 13-15% of the kernel's time (Intel Xeon SPR, 2 threads,
context 192: 12.25-12.89 -> 10.64-10.99 ms contiguous, 14.81-15.53 -> 12.72-13.10 scattered).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.engine.model.cpu import CpuFeatures
from services.engine.model.kv_cache import quantize_int8_pool
from services.engine.model.native import _build, _declare, _resolve_cache_dir
from services.engine.model.native_build import CSRC, FLAGS, PATHS, path_for

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16
LAYOUTS = ("contiguous", "scattered")
# The pool formats (SCALELLM_KV_CACHE_DTYPE's names) and their paged_decode_attention codes (csrc/simd.h,
# csrc/paged_attention.h).
KV_FORMATS = {"bf16": 1, "fp8_e5m2": 2, "int8": 3}


def sources_of(src: str, workdir: Path) -> Path:
    """The csrc directory a build spec names: this tree's, a directory, or a revision's (extracted)."""
    if src in ("", "."):
        return CSRC
    if Path(src).is_dir():
        return Path(src)
    target = workdir / hashlib.sha256(src.encode()).hexdigest()[:12]
    target.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    relative = CSRC.relative_to(root)
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{src}:{relative}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in names:
        data = subprocess.run(["git", "show", f"{src}:{relative}/{name}"], cwd=root, capture_output=True, check=True)
        (target / name).write_bytes(data.stdout)
    return target


# paged_decode_attention's codes (csrc/simd.h): the fastest path this CPU runs, bfloat16 q / out and pool.
PATH, FMT_BF16 = PATHS.index(path_for(CpuFeatures.detect())), 1


def load(csrc: Path, cflags: list[str]) -> Callable[..., int]:
    """paged_decode_attention built from csrc's attention sources alone, with extra cflags (alone:
    another revision's other kernels need not match this tree's NativeKernels)."""
    names = ("paged_attention.c", "paged_attention_avx.c", "paged_attention_b16.c", "kv_int8.c")
    sources = [csrc / name for name in names if (csrc / name).is_file()]
    so = _build("native", _resolve_cache_dir(None), sources=sources, flags=[*FLAGS, *cflags], stem="bench_attention")
    library = ctypes.CDLL(str(so))
    c, p, i = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64
    return _declare(
        library.paged_decode_attention, c, c, c, c, p, i, i, p, p, p, i, p, p, i, i, i, i, i, ctypes.c_float
    )


def attend(
    fn: Callable[..., int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    kv: str = "bf16",
) -> torch.Tensor:
    """q: [B, H, D] bfloat16, k: [blocks, KV, D, 16], v: [blocks, KV, 16, D] (bf16 or fp8_e5m2; int8:
    both [blocks, KV, (D + 4) * 16] chunks), table: [B, max_blocks], lens: [B] (int64) -> [B, H * D] bfloat16."""
    batch, heads, dim = q.shape
    out = q.new_empty(batch, heads * dim)
    status = fn(
        PATH,
        FMT_BF16,
        KV_FORMATS[kv],
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k.data_ptr(),
        v.data_ptr(),
        table.data_ptr(),
        table.shape[1],
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        v.shape[1],
        dim,
        BLOCK,
        dim**-0.5,
    )
    if status != 0:
        raise RuntimeError(f"paged_decode_attention failed (status {status})")
    return out


def contexts(batch: int, context: int, vary: bool) -> torch.Tensor:
    """int64 [batch]: every sequence at context, or spread evenly over 1..context."""
    if not vary:
        return torch.full((batch,), context, dtype=torch.int64)
    return torch.tensor([1 + (context - 1) * ((b * 37) % batch) // (batch - 1) for b in range(batch)])


def pools(blocks: int, kv: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's K and V pool in format kv, random values."""
    k = (torch.randn(LAYERS, blocks, KV_HEADS, HEAD_DIM, BLOCK, generator=gen) * 0.5).bfloat16()
    v = (torch.randn(LAYERS, blocks, KV_HEADS, BLOCK, HEAD_DIM, generator=gen) * 0.5).bfloat16()
    if kv == "fp8_e5m2":
        return k.to(torch.float8_e5m2), v.to(torch.float8_e5m2)
    if kv == "int8":
        return quantize_int8_pool(k, dim_major=True), quantize_int8_pool(v, dim_major=False)
    return k, v


def child(csrc: Path, cflags: list[str], args: argparse.Namespace) -> dict[str, object]:
    """One build's result per layout: step times in ms, or with --check the outputs' sha256."""
    fn = load(csrc, cflags)
    gen = torch.Generator().manual_seed(0)
    lens = contexts(args.batch, args.context, args.vary)
    per_seq = -(-args.context // BLOCK)
    used = args.batch * per_seq
    blocks = max(used, int(used * args.pool_factor))
    kv = args.kv[0]
    k, v = pools(blocks, kv, gen)
    q = torch.randn(args.batch, HEADS, HEAD_DIM, generator=gen).bfloat16()
    per_token = {"bf16": 2 * HEAD_DIM, "fp8_e5m2": HEAD_DIM, "int8": HEAD_DIM + 4}[kv]  # bytes a vector
    bytes_read = int(lens.sum()) * LAYERS * 2 * KV_HEADS * per_token  # K and V
    result: dict[str, object] = {"bytes": bytes_read}
    for layout in LAYOUTS:
        order = torch.arange(blocks) if layout == "contiguous" else torch.randperm(blocks, generator=gen)
        table = order[:used].view(args.batch, per_seq).contiguous()
        if args.check:
            digest = hashlib.sha256()
            for layer in (0, LAYERS - 1):
                out = attend(fn, q, k[layer], v[layer], table, lens, kv)
                digest.update(out.view(torch.int16).numpy().tobytes())
            result[layout] = digest.hexdigest()
            continue
        steps = []
        for step in range(args.passes + 1):  # the first pass warms up (pages, the scratch), untimed
            total = 0.0
            for layer in range(LAYERS):
                start = time.perf_counter()
                attend(fn, q, k[layer], v[layer], table, lens, kv)
                total += time.perf_counter() - start
            if step:
                steps.append(total * 1e3)
        result[layout] = steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", help="SRC[:CFLAGS], repeatable (default: '.')")
    parser.add_argument("--kv", nargs="+", default=["bf16"], choices=list(KV_FORMATS), help="the pool's formats")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--vary", action="store_true", help="contexts spread over 1..context, not all equal")
    parser.add_argument("--pool-factor", type=float, default=2.0, help="pool blocks per block the batch uses")
    parser.add_argument("--rounds", type=int, default=3, help="processes per build, alternated")
    parser.add_argument("--passes", type=int, default=10, help="timed steps (30 layers each) per process")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the kernel")
    parser.add_argument("--check", action="store_true", help="compare the builds' outputs bit for bit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-cflags", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(Path(args.child), args.child_cflags.split(), args)))
        return
    builds = args.build or ["."]
    # One variant per build and pool format; a label names the format when several are compared.
    variants = {(f"{build} {kv}" if len(args.kv) > 1 else build): (build, kv) for build in builds for kv in args.kv}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    samples: dict[str, dict[str, list[float]]] = {label: {layout: [] for layout in LAYOUTS} for label in variants}
    digests: dict[str, object] = {}
    bytes_read: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as workdir:
        specs = {
            build: (sources_of(build.partition(":")[0], Path(workdir)), build.partition(":")[2]) for build in builds
        }
        for _ in range(1 if args.check else args.rounds):
            for label, (build, kv) in variants.items():
                csrc, flags = specs[build]
                command = [sys.executable, "-m", "bench.decode_attention", f"--child={csrc}", f"--child-cflags={flags}"]
                command += ["--batch", str(args.batch), "--context", str(args.context), "--passes", str(args.passes)]
                command += ["--pool-factor", str(args.pool_factor), "--kv", kv]
                command += ["--vary"] * args.vary + ["--check"] * args.check
                run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    raise SystemExit(f"{label}: the child failed:\n{run.stderr[-3000:]}")
                result = json.loads(run.stdout.strip().splitlines()[-1])
                bytes_read[label] = int(result.pop("bytes"))
                if args.check:
                    digests[label] = result
                    continue
                for layout in LAYOUTS:
                    samples[label][layout].extend(result[layout])
    if args.check:
        for label, digest in digests.items():
            print(f"{label:>30}: {digest}")
        # Builds are compared on the same pool format (formats hold different values).
        same = all(
            len({json.dumps(digests[label], sort_keys=True) for label, (_, fmt) in variants.items() if fmt == kv}) == 1
            for kv in args.kv
        )
        print("outputs bitwise equal (per format)" if same else "OUTPUTS DIFFER")
        sys.exit(0 if same else 1)
    shape = f"batch {args.batch}, context {args.context}{' (varied)' if args.vary else ''}, {LAYERS} layers"
    print(f"ms per step, median ({shape}; {args.threads} threads; {args.rounds} rounds x {args.passes} steps)")
    print(f"{'build':>30} {'layout':>11} {'median':>8} {'min':>8} {'GB/s':>6}")
    for layout in LAYOUTS:
        for label in variants:
            times = samples[label][layout]
            median = statistics.median(times)
            print(f"{label:>30} {layout:>11} {median:8.2f} {min(times):8.2f} {bytes_read[label] / median / 1e6:6.1f}")


if __name__ == "__main__":
    main()
