"""The engine alone, side by side with transformers, in one run (issue 3's speed targets).

    python -m bench.offline                       # everything, default model, dtype auto
    python -m bench.offline --only throughput --num-requests 64

Parts (--only picks some):
  throughput  N requests, prompt lengths uniform in [32, 512], output lengths uniform in
              [32, 256] with ignore_eos, at most 64 running: output tokens/s of EngineCore
              against transformers generate on the same requests in padded batches of 64
              (each batch runs to its longest output; only requested tokens are counted).
  efficiency  decode steps at 64 running sequences (context ~300): achieved model FLOP/s as a
              share of this machine's bf16 matmul rate measured here (2048^3 torch.mm).
  single      decode tokens/s at batch 1: EngineCore against generate.
  prefix      time to first token of a request whose 512-token prefix is cached, against the
              same request cold.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.engine.contract import EngineRequest
from services.engine.core.build import engine_core_for
from services.engine.core.engine_core import EngineCore
from services.engine.model.native import KERNEL_CHOICES
from services.engine.model.runner import ModelRunner
from shared.messages import SamplingParams

PARTS = ("throughput", "efficiency", "single", "prefix")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_requests(count: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab) for _ in range(rng.randint(32, 512))], rng.randint(32, 256)) for _ in range(count)
    ]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_engine(core: EngineCore, requests: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Submit everything at once and step until done: (seconds, output tokens)."""
    for i, (prompt, out_len) in enumerate(requests):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(out_len)))
    produced = 0
    start = time.perf_counter()
    while core.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in core.step())
    return time.perf_counter() - start, produced


def run_hf(model: torch.nn.Module, requests: list[tuple[list[int], int]], batch: int, pad_id: int) -> tuple[float, int]:
    """transformers generate on padded (left) batches: (seconds, requested output tokens)."""
    total = 0.0
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        new = max(n for _, n in chunk)
        with torch.inference_mode():
            total += timed(
                functools.partial(
                    model.generate,
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            )
    return total, sum(n for _, n in requests)


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    seconds = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / seconds


def model_flops_per_token(runner: ModelRunner, context: int) -> float:
    """2 FLOPs per weight (the LM head included, embeddings lookups excluded) + attention."""
    cfg = runner.config
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter
    weights = layers * per_layer + cfg.vocab_size * hidden
    attention = layers * 4 * context * cfg.num_heads * cfg.head_dim
    return 2 * weights + attention


def part_efficiency(runner: ModelRunner, args: argparse.Namespace) -> None:
    core = engine_core_for(
        runner, max_num_batched_tokens=args.budget, max_running_requests=64, enable_prefix_caching=False
    )
    rng = random.Random(1)
    for i in range(64):
        core.add_request(EngineRequest(f"e{i}", [rng.randrange(100, 40000) for _ in range(280)], greedy(64)))
    started: set[str] = set()
    while len(started) < 64:  # prefill everyone, so the timed steps are pure decode
        started.update(o.request_id for o in core.step() if o.new_token_ids)
    step_times = []
    for _ in range(20):
        step_times.append(timed(core.step))
    step = statistics.median(step_times)
    flops = 64 * model_flops_per_token(runner, 300) / step
    peak = matmul_rate(torch.bfloat16)
    print(
        f"[efficiency] 64 running, context ~300, {runner.dtype}: median step {step * 1000:.1f} ms = "
        f"{64 / step:.0f} tokens/s, {flops / 1e9:.0f} GFLOP/s; bf16 mm rate {peak / 1e9:.0f} GFLOP/s; "
        f"share {flops / peak:.0%}"
    )


def part_throughput(runner: ModelRunner, hf_model: torch.nn.Module, args: argparse.Namespace) -> None:
    requests = make_requests(args.num_requests, args.seed, runner.config.vocab_size)
    core = engine_core_for(
        runner, max_num_batched_tokens=args.budget, max_running_requests=64, enable_prefix_caching=True
    )
    ours_s, ours_tokens = run_engine(core, requests)
    print(f"[throughput] ours: {ours_tokens} tokens in {ours_s:.1f} s = {ours_tokens / ours_s:.1f} tokens/s")
    if args.skip_hf:
        return
    hf_s, hf_tokens = run_hf(hf_model, requests, 64, args.pad_id)
    print(
        f"[throughput] transformers generate (padded batches of 64): {hf_tokens} tokens in {hf_s:.1f} s "
        f"= {hf_tokens / hf_s:.1f} tokens/s; ratio ours/hf = {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}"
    )


def part_single(runner: ModelRunner, hf_model: torch.nn.Module, args: argparse.Namespace) -> None:
    prompt = [random.Random(2).randrange(100, 40000) for _ in range(128)]
    new = 128
    core = engine_core_for(
        runner, max_num_batched_tokens=args.budget, max_running_requests=64, enable_prefix_caching=False
    )
    core.add_request(EngineRequest("single", prompt, greedy(new)))
    core.step()  # prefill and first token
    decode_s = timed(lambda: [core.step() for _ in range(new - 1)])
    ours = (new - 1) / decode_s
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        first = timed(lambda: hf_model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False))
        full = timed(lambda: hf_model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False))
    hf = (new - 1) / (full - first)
    print(f"[single] decode at batch 1: ours {ours:.1f} tokens/s, generate {hf:.1f} tokens/s, ratio {ours / hf:.2f}")


def part_prefix(runner: ModelRunner, args: argparse.Namespace) -> None:
    rng = random.Random(3)
    prefix = [rng.randrange(100, 40000) for _ in range(512)]

    def ttft(core: EngineCore, request_id: str, suffix: list[int]) -> float:
        core.add_request(EngineRequest(request_id, prefix + suffix, greedy(1)))
        start = time.perf_counter()
        while core.has_unfinished():
            core.step()
        return time.perf_counter() - start

    cold, warm = [], []
    for trial in range(5):
        core = engine_core_for(
            runner, max_num_batched_tokens=args.budget, max_running_requests=64, enable_prefix_caching=True
        )
        cold.append(ttft(core, f"cold{trial}", [1000 + trial] * 16))
        warm.append(ttft(core, f"warm{trial}", [2000 + trial] * 16))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"[prefix] TTFT with a cached 512-token prefix {w * 1000:.1f} ms vs cold {c * 1000:.1f} ms: {w / c:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES, help="auto, torch, native")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--pad-id", type=int, default=2)
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
        kv_cache_bytes=2 * 1024**3,
        max_model_len=None,
        kernels=args.kernels,
    )
    print(f"model {model_dir}, dtype {runner.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    hf_model = None
    if {"throughput", "single"} & set(args.only) and not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=runner.dtype).eval()
    if "efficiency" in args.only:
        part_efficiency(runner, args)
    if "single" in args.only and hf_model is not None:
        part_single(runner, hf_model, args)
    if "prefix" in args.only:
        part_prefix(runner, args)
    if "throughput" in args.only:
        part_throughput(runner, hf_model, args)


if __name__ == "__main__":
    main()
