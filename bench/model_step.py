"""Decode step time of the torch ModelRunner at several batch sizes.

    python -m bench.model_step            # default model, float32 and bfloat16, batch 1/16/64
    python -m bench.model_step --dtype bfloat16 --batch 64 --context 300 --kernels torch native
    python -m bench.model_step --dtype bfloat16 float32 --plan-for-cpu avx2,fma   # plan as on an AVX2-only CPU
    python -m bench.model_step --quantization none gguf --batch 1 64   # float vs the GGUF's blocks
    python -m bench.model_step --quantization gguf --gguf-variant int8 float --amx-min-rows 16 1000
    python -m bench.model_step --quantization int8 --batch 1 64 --threads 1   # per-channel int8 weights
    python -m bench.model_step --dtype bfloat16 --kv-cache-dtype auto fp8_e5m2 --batch 1 64 --threads 1
    python -m bench.model_step --dtype bfloat16 --quantization gguf --kv-cache-dtype bfloat16 int8 --batch 1 64 --threads 2
    python -m bench.model_step --dtype bfloat16 --quantization none gguf --prefill 128 --batch   # one prompt's prefill
    python -m bench.model_step --dtype bfloat16 --batch 64 --block-layout contiguous interleaved   # KV blocks' places
    python -m bench.model_step --dtype bfloat16 --quantization gguf --batch 1 4 --decode-program on off   # one native call per step

Every sequence decodes one token per step with ~context tokens already in the
KV cache (the cache holds zeros: the step's cost does not depend on the values).
Prints ms per step, tokens/s (a prefill's: prompt tokens), and the model's matmul FLOP/s (2 * weights * tokens).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from services.engine.model import llama
from services.engine.model.batch import ForwardBatch
from services.engine.model.cpu import CpuFeatures
from services.engine.model.linear import QuantizedLinear
from services.engine.model.native import KERNEL_CHOICES
from services.engine.model.plan import QUANTIZATION_CHOICES
from services.engine.model.quant_kernels import VARIANTS
from services.engine.model.runner import ModelRunner

BLOCK_LAYOUTS = ("contiguous", "interleaved")


def decode_batch(batch: int, context: int, block_size: int, layout: str = "contiguous") -> ForwardBatch:
    """``batch`` sequences of ``context`` tokens. layout: where their KV blocks lie in the pool,
    contiguous (each sequence's side by side, as a prompt's blocks allocated at once) or interleaved
    (block j of sequence i at j * batch + i, as blocks grown one at a time by concurrent decodes)."""
    blocks_per_seq = (context + block_size - 1) // block_size
    if layout == "interleaved":
        tables = [[j * batch + i for j in range(blocks_per_seq)] for i in range(batch)]
    else:
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    pos = context - 1
    slots = [table[pos // block_size] * block_size + pos % block_size for table in tables]
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (batch,)),
        positions=torch.full((batch,), pos, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_lens=[1] * batch,
        context_lens=[context] * batch,
        block_tables=tables,
        logits_indices=torch.arange(batch),
    )


def prefill_batch(length: int, block_size: int) -> ForwardBatch:
    """One prompt of ``length`` tokens, none cached: a request's prefill at concurrency 1."""
    table = list(range((length + block_size - 1) // block_size))
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (length,)),
        positions=torch.arange(length),
        slot_mapping=torch.arange(length),
        query_lens=[length],
        context_lens=[length],
        block_tables=[table],
        logits_indices=torch.tensor([length - 1]),
    )


def use_quant_kernels(runner: ModelRunner, variant: str, amx_min_rows: int | None) -> str:
    """Rebind the runner's quantized linears to the kernel variant (and AMX row threshold); its label."""
    plan_kernels = runner.plan.quantized
    if plan_kernels is None:
        return ""
    kernels = plan_kernels.with_variant(variant)
    if amx_min_rows is not None:
        kernels = kernels.with_amx_min_rows(amx_min_rows)
    model = runner.model
    linears = [
        model.lm_head,
        *(part for layer in model.layers for part in (layer.qkv, layer.o, layer.gate_up, layer.down)),
    ]
    for linear in linears:
        if isinstance(linear, QuantizedLinear):
            linear.kernels = kernels
    label = kernels.path + ("" if variant == "int8" else f"-{variant}")
    if kernels.path == "amx_int8" and variant != "float":
        label += f"(tiles>={kernels.amx_min_rows})"
    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="HF folder; default: the cached default model")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--prefill", type=int, nargs="*", default=[], help="also time one prompt of this many tokens")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--block-layout",
        nargs="+",
        default=["contiguous"],
        choices=BLOCK_LAYOUTS,
        help="decode batches' KV blocks: each sequence's side by side, or interleaved across sequences",
    )
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=KERNEL_CHOICES, help="auto, torch, native")
    parser.add_argument(
        "--plan-for-cpu",
        default=None,
        help="comma-separated CPU flags to plan kernels for instead of this CPU's (e.g. avx2,fma: AMD Zen 3)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=QUANTIZATION_CHOICES,
        help="none: float weights; gguf: the linears on the GGUF's Q4/Q8 blocks; int8: the safetensors "
        "weights quantized at load to int8 per output channel (SCALELLM_QUANTIZATION)",
    )
    parser.add_argument(
        "--gguf-variant",
        nargs="+",
        default=["int8"],
        choices=VARIANTS,
        help="int8: activations quantized to int8 per block; float: weights dequantized in registers",
    )
    parser.add_argument(
        "--amx-min-rows",
        type=int,
        nargs="+",
        default=[None],
        help="amx_int8 path: tiles from this many rows on (default quant_kernels.AMX_MIN_ROWS)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        default=["auto"],
        choices=["auto", "bfloat16", "fp8_e5m2", "int8"],
        help="SCALELLM_KV_CACHE_DTYPE: auto (the engine's choice), bfloat16 (a bf16 model's cache unquantized), "
        "fp8_e5m2 or int8 (one byte per value; int8 with a scale per token and KV head)",
    )
    parser.add_argument(
        "--decode-program",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="a decode step's layer loop as one native call (LlamaModel.decode_program), or the Python loop; "
        "both: timed one after the other on the same runner",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    if model_dir is None:
        from shared.model_files import resolve_model_dir
        from shared.settings import CommonSettings

        model_dir = resolve_model_dir(CommonSettings(), weights=True)
    tokens_needed = max([b * (args.context + 1) for b in args.batch] + args.prefill)
    blocks_needed = (tokens_needed + args.block_size - 1) // args.block_size + max(args.batch, default=1)
    print(f"model {model_dir}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype, kernels, quantization, kv_cache_dtype in itertools.product(
        args.dtype, args.kernels, args.quantization, args.kv_cache_dtype
    ):
        runner = ModelRunner(
            model_dir,
            dtype=dtype,
            device="cpu",
            block_size=args.block_size,
            num_blocks=blocks_needed,
            kv_cache_bytes=None,
            max_model_len=None,
            kernels=kernels,
            cpu=CpuFeatures.simulated(*args.plan_for_cpu.split(",")) if args.plan_for_cpu else None,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
        )
        params = runner.model.matmul_params()
        print(f"{dtype} {kernels} quantization {quantization} KV {kv_cache_dtype}: {runner.plan.describe()}")
        variants = itertools.product(args.gguf_variant, args.amx_min_rows) if runner.plan.quantized else [("", None)]
        shapes = [("decode", b, layout) for b in args.batch for layout in args.block_layout]
        shapes += [("prefill", n, "") for n in args.prefill]
        for (variant, amx_min_rows), (shape, batch, layout) in itertools.product(variants, shapes):
            kind = "native" if runner.plan.native else "torch"
            if runner.plan.quantized is not None:
                kind = f"{runner.plan.quantization}-{use_quant_kernels(runner, variant, amx_min_rows)}"
            kind += f" kv-{str(runner.plan.kv_cache_dtype).removeprefix('torch.')}"
            if shape == "prefill":
                step, what = prefill_batch(batch, args.block_size), f"prefill {batch:4d}"
            else:
                step, what = decode_batch(batch, args.context, args.block_size, layout), f"batch {batch:3d}"
                if len(args.block_layout) > 1 or layout != "contiguous":
                    what += f" {layout}"
            for program in args.decode_program:
                llama.LlamaModel.decode_program = program == "on"
                label = f" program {program}" if len(args.decode_program) > 1 else ""
                for _ in range(3):
                    runner.forward(step)
                times, cpu_times = [], []
                for _ in range(args.steps):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    runner.forward(step)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
                median = statistics.median(times)
                # CPU time per step says how much work a step is even when other
                # processes share the cores (wall time then mostly measures them).
                print(
                    f"{dtype:9s} {kind:6s} {what}{label} context {args.context}: {median * 1e3:7.2f} ms/step "
                    f"(min {min(times) * 1e3:7.2f}, cpu {statistics.median(cpu_times) * 1e3:7.2f}), "
                    f"{batch / median:7.1f} tok/s, {2 * params * batch / median / 1e9:6.1f} GFLOP/s matmul",
                    flush=True,
                )
        del runner


if __name__ == "__main__":
    main()
