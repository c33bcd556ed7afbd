"""The engine's CUDA path against transformers on the same GPU (issue 8, item 6): one command, a few minutes.

    python -m bench.cuda_check                       # the default model, on the GPU
    python -m bench.cuda_check --random-weights      # the default model's shape, seeded weights: no weights file
    python -m bench.cuda_check --model-dir DIR --num-requests 512 --output-len 256

Parts:
  equality    float32 (matmuls in full IEEE float32, no TF32): --equality-prompts prompts of random
              tokens, lengths uniform in [8, 256], continued greedily for --equality-tokens tokens by
              EngineCore (all at once, continuously batched) and by transformers generate (one
              prompt at a time) on the GPU. Prints how many continuations are equal token for
              token; where one is not, the first position that differs and transformers' logit gap
              there between its token and ours. A gap within --tie-tolerance is a near-tie that
              batched and unbatched float32 sums may break either way; a larger one is a bug.
  throughput  --throughput-dtype (bfloat16): --num-requests requests, prompt lengths uniform in
              [32, 512], --output-len tokens each with EOS ignored, all submitted at once; output
              tokens/s of EngineCore and of transformers' own continuous batching (generate_batch,
              paged KV cache), both given the same KV memory (--kv-cache-gib) and the same token
              budget a step (--budget). transformers' time includes what generate_batch does on
              each call (its cache allocation and CUDA graph capture); ours excludes the runner's
              load, as a server's start-up does.

Exit status: 0 when every float32 continuation is equal or differs only at a near-tie, 1 when one
differs beyond that, 2 when torch sees no CUDA device (--device cpu runs the same script on the
CPU: a dry run of the script, not a check of the CUDA path).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.offline import make_requests, run_engine, timed
from services.engine.contract import EngineRequest
from services.engine.core.build import engine_core_for
from services.engine.model.native import KERNEL_CHOICES
from services.engine.model.runner import ModelRunner
from shared.messages import SamplingParams

if TYPE_CHECKING:  # transformers loads in ~5 s: only where a part needs it
    from transformers import ContinuousBatchingConfig, PreTrainedModel
    from transformers.generation.continuous_batching.requests import GenerationOutput

PARTS = ("equality", "throughput")
BLOCK_SIZE = 16

# SmolLM2-135M, the default model: --random-weights builds this shape when no --model-dir is given.
DEFAULT_MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where one greedy continuation first differs from transformers', and by how much there."""

    prompt_index: int
    position: int
    ours: int
    theirs: int
    logit_gap: float  # transformers' logit of its token minus that of ours, at that position

    def is_near_tie(self, tolerance: float) -> bool:
        return self.logit_gap <= tolerance


def first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """The first index where the two differ (a length difference counts); None when equal."""
    for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return index
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def equality_verdict(total: int, divergences: Sequence[Divergence], tolerance: float) -> tuple[bool, str]:
    """(passed, the line to print): passed unless a continuation differs beyond a near-tie."""
    real = [d for d in divergences if not d.is_near_tie(tolerance)]
    line = f"[equality] {total - len(divergences)}/{total} continuations equal token for token"
    if divergences:
        line += f"; {len(divergences) - len(real)} differ only at a near-tie (logit gap <= {tolerance:g})"
    if real:
        line += f"; {len(real)} DIFFER"
    return not real, line


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 3 up: skips the special tokens of the default model (0-2), so no prompt holds an EOS.
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def write_random_model(folder: Path, config_source: Path | None, seed: int) -> None:
    """A Llama with seeded random weights (the default model's shape, or config_source's) saved to folder."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(config_source) if config_source else LlamaConfig(**DEFAULT_MODEL_SHAPE)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)


def load_runner(model_dir: Path, dtype: str, device: str, args: argparse.Namespace) -> ModelRunner:
    return ModelRunner(
        model_dir,
        dtype=dtype,
        device=device,
        block_size=BLOCK_SIZE,
        num_blocks=None,
        kv_cache_bytes=int(args.kv_cache_gib * 1024**3),
        max_model_len=None,
        kernels=args.kernels,
    )


def load_transformers(model_dir: Path, dtype: torch.dtype, device: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers' wrapper types its self argument only
    model.eval()  # type: ignore[no-untyped-call]
    return model


def release_memory(device: str) -> None:
    """Give the memory of the models the caller dropped back to the device, for the next one to load."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def engine_greedy(
    runner: ModelRunner, prompts: list[list[int]], tokens: int, args: argparse.Namespace
) -> list[list[int]]:
    core = engine_core_for(
        runner, max_num_batched_tokens=args.budget, max_running_requests=len(prompts), enable_prefix_caching=True
    )
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        core.add_request(EngineRequest(f"q{i}", prompt, params))
    produced: dict[str, list[int]] = {f"q{i}": [] for i in range(len(prompts))}
    while core.has_unfinished():
        for output in core.step():
            produced[output.request_id].extend(output.new_token_ids)
    return [produced[f"q{i}"] for i in range(len(prompts))]


def transformers_greedy(model: PreTrainedModel, prompt: list[int], tokens: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    continuation: list[int] = out[0, len(prompt) :].tolist()
    return continuation


def logit_gap(model: PreTrainedModel, context: list[int], theirs: int, ours: int, device: str) -> float:
    """transformers' logit of its token minus ours, after context (float32, like the continuation)."""
    logits = model(torch.tensor([context], device=device)).logits[0, -1].float()
    return float(logits[theirs] - logits[ours])


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matmuls in IEEE float32 (no TF32 on the GPU) while the equality part runs."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def part_equality(model_dir: Path, args: argparse.Namespace) -> bool:
    runner = load_runner(model_dir, "float32", args.device, args)
    prompts = random_prompts(args.equality_prompts, 8, 256, runner.config.vocab_size, args.seed)
    print(f"[equality] float32, {len(prompts)} prompts x {args.equality_tokens} greedy tokens")
    with full_float32(), torch.inference_mode():
        ours = engine_greedy(runner, prompts, args.equality_tokens, args)
        del runner
        release_memory(args.device)
        model = load_transformers(model_dir, torch.float32, args.device)
        divergences = []
        for index, prompt in enumerate(prompts):
            theirs = transformers_greedy(model, prompt, args.equality_tokens, args.device)
            position = first_difference(ours[index], theirs)
            if position is None:
                continue
            # -1: that continuation ended there; one of the wrong length is never a near-tie.
            ours_token = ours[index][position] if position < len(ours[index]) else -1
            theirs_token = theirs[position] if position < len(theirs) else -1
            gap = (
                logit_gap(model, prompt + theirs[:position], theirs_token, ours_token, args.device)
                if ours_token >= 0 and theirs_token >= 0
                else float("inf")
            )
            divergences.append(Divergence(index, position, ours_token, theirs_token, gap))
        del model
        release_memory(args.device)
    for d in divergences:
        print(
            f"[equality] prompt {d.prompt_index}: first differs at token {d.position}: "
            f"ours {d.ours}, transformers {d.theirs}, logit gap {d.logit_gap:.3g}"
        )
    passed, line = equality_verdict(len(prompts), divergences, args.tie_tolerance)
    print(line)
    return passed


def continuous_batching_config(kv_tokens: int, args: argparse.Namespace) -> ContinuousBatchingConfig:
    """transformers' ContinuousBatchingConfig with our KV size and token budget (its fields vary by version)."""
    from transformers import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    config = ContinuousBatchingConfig()
    tokens_per_block = getattr(config, "page_size", None) or config.block_size or BLOCK_SIZE
    wanted = {
        "num_blocks": max(1, kv_tokens // tokens_per_block),
        "max_batch_tokens": args.budget,
        "max_requests_per_batch": args.num_requests,
    }
    return ContinuousBatchingConfig(**{name: value for name, value in wanted.items() if name in fields})


def transformers_throughput(
    model: PreTrainedModel, prompts: list[list[int]], args: argparse.Namespace, kv_tokens: int
) -> tuple[float, int]:
    from transformers import GenerationConfig

    # eos_token_id -1: no token ends a request, as ignore_eos does for ours.
    generation = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1)  # type: ignore[no-untyped-call]
    config = continuous_batching_config(kv_tokens, args)

    def run(batch: list[list[int]]) -> dict[str, GenerationOutput]:
        return model.generate_batch(  # type: ignore[operator,no-any-return]
            batch, generation_config=generation, continuous_batching_config=config, progress_bar=False
        )

    run(prompts[:4])  # CUDA context, cuBLAS handles and kernels loaded before the timed call
    outputs: dict[str, GenerationOutput] = {}
    seconds = timed(lambda: outputs.update(run(prompts)))
    return seconds, sum(len(output.generated_tokens) for output in outputs.values())


def part_throughput(model_dir: Path, args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.throughput_dtype)
    runner = load_runner(model_dir, args.throughput_dtype, args.device, args)
    cfg = runner.config
    kv_tokens = runner.num_blocks * runner.block_size
    requests = [(prompt, args.output_len) for prompt, _ in make_requests(args.num_requests, args.seed, cfg.vocab_size)]
    with torch.inference_mode():
        core = engine_core_for(
            runner,
            max_num_batched_tokens=args.budget,
            max_running_requests=args.num_requests,
            enable_prefix_caching=True,
        )
        run_engine(core, requests[:4])  # warm-up, as transformers gets
        ours_s, ours_tokens = run_engine(core, requests)
        del core, runner
        release_memory(args.device)
        model = load_transformers(model_dir, dtype, args.device)
        hf_s, hf_tokens = transformers_throughput(model, [prompt for prompt, _ in requests], args, kv_tokens)
        del model
        release_memory(args.device)
    wanted = args.num_requests * args.output_len
    ours_rate, hf_rate = ours_tokens / ours_s, hf_tokens / hf_s
    print(
        f"[throughput] {args.num_requests} requests x {args.output_len} tokens, {args.throughput_dtype}, "
        f"KV {kv_tokens} tokens, budget {args.budget} tokens a step"
    )
    print(f"[throughput] ours: {ours_tokens}/{wanted} tokens in {ours_s:.2f} s = {ours_rate:.1f} tokens/s")
    print(
        f"[throughput] transformers generate_batch: {hf_tokens}/{wanted} tokens in {hf_s:.2f} s = "
        f"{hf_rate:.1f} tokens/s; ratio ours/transformers {ours_rate / hf_rate:.2f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the default model")
    parser.add_argument("--random-weights", action="store_true", help="seeded weights in the model's shape")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--equality-prompts", type=int, default=16)
    parser.add_argument("--equality-tokens", type=int, default=64)
    parser.add_argument("--tie-tolerance", type=float, default=1e-3)
    parser.add_argument("--throughput-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048, help="tokens a step (max_num_batched_tokens)")
    parser.add_argument("--kv-cache-gib", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench.cuda_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
            "run it on a machine with an NVIDIA GPU, or with --device cpu for a dry run of the script",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="cuda_check_") as scratch:
        model_dir = args.model_dir
        if args.random_weights:
            write_random_model(Path(scratch), model_dir, args.seed)
            model_dir = Path(scratch)
        elif model_dir is None:
            from shared.model_files import resolve_model_dir
            from shared.settings import CommonSettings

            model_dir = resolve_model_dir(CommonSettings(), weights=True)
        where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
        import transformers

        print(
            f"model {model_dir}{' (random weights)' if args.random_weights else ''}, {where}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}"
        )
        passed = part_equality(model_dir, args) if "equality" in args.only else True
        if "throughput" in args.only:
            part_throughput(model_dir, args)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
