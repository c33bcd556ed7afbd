"""Per-call time of the GGUF linears (csrc/qlinear*.c) at the model's shapes, on this CPU's path.

    python -m bench.qlinear_calls                                  # rows 1/16/64, this CPU's path, variant auto
    python -m bench.qlinear_calls --path amx_int8 --variant float --rows 16 64 128   # the AMX-BF16 tiles
    python -m bench.qlinear_calls --rows 1 --cflags= --cflags=-DQLINEAR_ROW_KERNEL=0 --rounds 5   # A/B, alternated
    python -m bench.qlinear_calls --rows 1 --check --cflags= --cflags=-DQLINEAR_ROW_KERNEL=0     # outputs bitwise equal?

The weights are fake (random quants, plausible float16 scales: the kernel's time does not
depend on their values) in the model's layout: 30 layers of qkv (960 x 576), o (576 x 576),
gate_up (3072 x 576) and down (576 x 1536) in Q4_1, then the LM head (49152 x 576, Q8_0),
called in the model's order so each call's weights come from memory, as in a decode step
(~84 MB of layer weights between two uses of one). o and down add a residual, as the model's do.
bf16 activations, bf16 output, as the engine's step calls them; --variant picks int8 or float
activations (auto: the engine's choice at each row count).

Each --cflags value is a build of the library with those extra compiler flags, run in its own
process (two builds of one library in one process slow each other down); with several, the
rounds alternate between them. Prints, per build, shape and row count, the median us per call
over rounds x layers calls, and per build the sum over a step's linears (30 layers + LM head).
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
import time

import torch

from services.engine.model import quant_kernels
from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import _build, _resolve_cache_dir
from services.engine.model.quant_kernels import QuantKernels
from services.engine.model.quantized import BLOCK, FORMATS, PANEL_ROWS, QuantizedMatrix

# name -> (kind, rows, cols, residual): one layer's linears in call order, then the LM head.
LAYER = {
    "qkv": ("Q4_1", 960, 576, False),
    "o": ("Q4_1", 576, 576, True),
    "gate_up": ("Q4_1", 3072, 576, False),
    "down": ("Q4_1", 576, 1536, True),
}
HEAD = {"lm_head": ("Q8_0", 49152, 576, False)}


def fake_matrix(kind: str, rows: int, cols: int, generator: torch.Generator) -> QuantizedMatrix:
    """Random quants with float16 scales d in [1e-3, 2e-2) (and Q4_1's m = -8 d), in panel layout."""
    panels, blocks = -(-rows // PANEL_ROWS), cols // BLOCK
    data = torch.randint(0, 256, (panels, blocks, FORMATS[kind][1]), dtype=torch.uint8, generator=generator)
    scales = 2 if kind == "Q4_1" else 1
    d = torch.rand(panels, blocks, PANEL_ROWS, generator=generator) * 0.019 + 0.001
    parts = [d, -8 * d][:scales]
    data[:, :, : 32 * scales] = torch.cat(parts, dim=-1).half().view(torch.uint8)
    return QuantizedMatrix(kind, rows, cols, data)


def load(cflags: list[str], path: str, variant: str) -> QuantKernels:
    """The library built with cflags (cached like the engine's), bound to path and variant."""
    flags = [*quant_kernels.FLAGS, *cflags]
    so = _build("native", _resolve_cache_dir(None), sources=quant_kernels.SOURCES, flags=flags, stem="bench_qlinear")
    kernels = QuantKernels(ctypes.CDLL(str(so)), path, variant)
    if path not in kernels.runnable_paths():
        raise SystemExit(f"this CPU does not run the {path} path (it runs {', '.join(kernels.runnable_paths())})")
    return kernels


def child(
    cflags: list[str], path: str, variant: str, rows_list: list[int], layers: int, passes: int, check: bool
) -> dict[str, object]:
    """One build's timings: {"name rows": [us per call, ...]}, or with check the outputs' sha256."""
    kernels = load(cflags, path, variant)
    gen = torch.Generator().manual_seed(0)
    model = [(name, fake_matrix(*LAYER[name][:3], gen)) for _ in range(layers) for name in LAYER]
    model += [(name, fake_matrix(*HEAD[name][:3], gen)) for name in HEAD]
    residual_of = {**{n: v[3] for n, v in LAYER.items()}, **{n: v[3] for n, v in HEAD.items()}}
    result: dict[str, object] = {}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in {m.cols for _, m in model}}
        outs = {n: torch.empty(rows, m.rows, dtype=torch.bfloat16) for n, m in model}
        residuals = {n: torch.randn(rows, m.rows, generator=gen).bfloat16() for n, m in model if residual_of[n]}
        if check:
            digest = hashlib.sha256()
            for name, matrix in model[:4] + model[-1:]:
                kernels.linear(xs[matrix.cols], matrix, None, residuals.get(name), outs[name])
                digest.update(outs[name].view(torch.int16).numpy().tobytes())
            result[str(rows)] = digest.hexdigest()
            continue
        times: dict[str, list[float]] = {}
        for step in range(passes + 1):  # the first pass warms up (pages, the scratch), untimed
            for name, matrix in model:
                x, out, residual = xs[matrix.cols], outs[name], residuals.get(name)
                start = time.perf_counter()
                kernels.linear(x, matrix, None, residual, out)
                elapsed = time.perf_counter() - start
                if step:
                    times.setdefault(f"{name} {rows}", []).append(elapsed * 1e6)
        result.update(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--path", choices=quant_kernels.PATHS, help="default: this CPU's fastest")
    parser.add_argument("--variant", choices=quant_kernels.VARIANTS, default="auto")
    parser.add_argument(
        "--cflags", action="append", help="extra compiler flags of one build, repeatable: --cflags= --cflags=-DVARIANT"
    )
    parser.add_argument("--rounds", type=int, default=3, help="processes per build, alternated")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the model per process")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the kernel")
    parser.add_argument("--check", action="store_true", help="compare the builds' outputs bit for bit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.path or quant_kernels.path_for(CpuFeatures.detect())
    if args.child is not None:
        result = child(args.child.split(), path, args.variant, args.rows, args.layers, args.passes, args.check)
        print(json.dumps(result))
        return
    args.cflags = args.cflags or [""]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    samples: dict[str, dict[str, list[float]]] = {flags: {} for flags in args.cflags}
    digests: dict[str, object] = {}
    for _ in range(1 if args.check else args.rounds):
        for flags in args.cflags:
            command = [sys.executable, "-m", "bench.qlinear_calls", f"--child={flags}", "--rows", *map(str, args.rows)]
            command += ["--path", path, "--variant", args.variant]
            command += ["--layers", str(args.layers), "--passes", str(args.passes)] + (
                ["--check"] if args.check else []
            )
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            if args.check:
                digests[flags] = result
                continue
            for key, values in result.items():
                samples[flags].setdefault(key, []).extend(values)
    if args.check:
        for flags, digest in digests.items():
            print(f"{flags or '(default)':>30}: {digest}")
        same = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
        print("outputs bitwise equal" if same else "OUTPUTS DIFFER")
        sys.exit(0 if same else 1)
    names = [*LAYER, *HEAD]
    print(
        f"{path}, variant {args.variant}: us per call, median ({args.threads} threads; {args.layers} layers cycled, rounds {args.rounds})"
    )
    print(f"{'build':>30} {'rows':>5} " + " ".join(f"{n:>9}" for n in names) + f" {'step ms':>8}")
    for rows in args.rows:
        for flags in args.cflags:
            medians = {n: statistics.median(samples[flags][f"{n} {rows}"]) for n in names}
            step = (sum(medians[n] for n in LAYER) * args.layers + sum(medians[n] for n in HEAD)) / 1000
            cells = " ".join(f"{medians[n]:9.1f}" for n in names)
            print(f"{flags or '(default)':>30} {rows:5d} {cells} {step:8.2f}")


if __name__ == "__main__":
    main()
