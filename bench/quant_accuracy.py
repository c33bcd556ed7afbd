"""Accuracy of the quantized path against the float path (issue 8, item 5), on the default model.

    python -m bench.quant_accuracy                      # float32, gguf and int8, 64 prompts x 64 tokens, perplexity
    python -m bench.quant_accuracy --dtype bfloat16 --threads 2 --quantization int8
    python -m bench.quant_accuracy --quantization gguf --gguf-variant int8 float   # the float-activation kernel
    python -m bench.quant_accuracy --dtype bfloat16 --quantization --kv-cache-dtype fp8_e5m2 --prefill-chunk 16
    python -m bench.quant_accuracy --dtype bfloat16 --quantization gguf --kv-cache-dtype auto int8 --prefill-chunk 16

Every runner starts from the same weights: the float path reads the safetensors
folder (the GGUF dequantized by transformers); gguf (SCALELLM_QUANTIZATION=gguf)
the GGUF's own blocks, so only how the linears compute differs (int8 activations
per block of 32); int8 (SCALELLM_QUANTIZATION=int8) those float weights quantized
again at load to int8 per output channel, so its weights differ too.

- top-1 agreement: 64 prompts (32-token windows of bench/data/coriolanus.txt) are
  continued greedily by the float path for 64 tokens; the quantized path, fed the
  same tokens, predicts each of them: the share it gets right. Also the mean number
  of tokens its own greedy continuation shares with the float one before they part.
- perplexity of each path on the whole text, in windows of --window tokens.

--kv-cache-dtype fp8_e5m2 / int8 adds runners with an 8-bit KV cache (SCALELLM_KV_CACHE_DTYPE),
each beside the same setup with the cache unquantized: "auto" here always means the model
dtype's cache (bfloat16 or float32), whatever the engine's auto picks, and the float path
every setup is compared with keeps it too. A prefill from scratch attends
over its fresh K/V, never the pool's, so only decode steps would see the 8-bit values:
--prefill-chunk N feeds the teacher-forced sequences N tokens per step, so every chunk
after the first reads the earlier tokens' K/V (and its own) back from the pool, as
chunked prefill and prefix-cache hits do.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.model_step import use_quant_kernels
from services.engine.model.batch import ForwardBatch
from services.engine.model.quant_kernels import VARIANTS
from services.engine.model.runner import ModelRunner

TEXT = Path(__file__).parent / "data" / "coriolanus.txt"
BLOCK = 16


def prefill_batch(sequences: list[list[int]], blocks_per_seq: int, logits: str) -> ForwardBatch:
    """Each sequence computed from scratch; logits at its last token, or ("all") at every token but the last."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    indices: list[int] = []
    for i, seq in enumerate(sequences):
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        start = len(ids)
        ids += seq
        positions += range(len(seq))
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(len(seq))]
        tables.append(table)
        indices += range(start, start + len(seq) - 1) if logits == "all" else [start + len(seq) - 1]
    return ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_lens=[len(s) for s in sequences],
        context_lens=[len(s) for s in sequences],
        block_tables=tables,
        logits_indices=torch.tensor(indices),
    )


def greedy(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, blocks_per_seq: int) -> list[list[int]]:
    """Batched greedy continuation: one prefill step for all prompts, then one decode step per token."""
    sequences = [list(p) for p in prompts]
    logits = runner.forward(prefill_batch(sequences, blocks_per_seq, "last"))
    for step in range(new_tokens):
        for seq, token in zip(sequences, logits.argmax(-1).tolist(), strict=True):
            seq.append(token)
        if step == new_tokens - 1:
            break
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(sequences))]
        pos = [len(s) - 1 for s in sequences]
        logits = runner.forward(
            ForwardBatch(
                input_ids=torch.tensor([s[-1] for s in sequences]),
                positions=torch.tensor(pos),
                slot_mapping=torch.tensor(
                    [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos, strict=True)]
                ),
                query_lens=[1] * len(sequences),
                context_lens=[p + 1 for p in pos],
                block_tables=tables,
                logits_indices=torch.arange(len(sequences)),
            )
        )
    return [s[len(p) :] for s, p in zip(sequences, prompts, strict=True)]


def teacher_forced(
    runner: ModelRunner, sequences: list[list[int]], blocks_per_seq: int, chunk: int, prefill_chunk: int | None = None
) -> torch.Tensor:
    """float32 logits predicting tokens 1.. of every sequence, concatenated: [sum(len - 1), vocab].
    chunk: sequences per batch; prefill_chunk: tokens per step (None: each sequence in one step)."""
    parts = []
    for start in range(0, len(sequences), chunk):
        group = sequences[start : start + chunk]
        if prefill_chunk is None:
            parts.append(runner.forward(prefill_batch(group, blocks_per_seq, "all")))
        else:
            parts.append(chunked_prefill(runner, group, blocks_per_seq, prefill_chunk))
    return torch.cat(parts)


def chunked_prefill(runner: ModelRunner, sequences: list[list[int]], blocks_per_seq: int, size: int) -> torch.Tensor:
    """As prefill_batch(..., "all") in one step, but size tokens of every (equally long) sequence per
    step: [len(sequences) * (len - 1), vocab], sequence-major."""
    length = len(sequences[0])
    if any(len(seq) != length for seq in sequences):
        raise ValueError("chunked_prefill takes sequences of one length")
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(sequences))]
    steps = []
    for first in range(0, length - 1, size):
        last = min(first + size, length)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        indices: list[int] = []
        for seq, table in zip(sequences, tables, strict=True):
            for p in range(first, last):
                if p < length - 1:
                    indices.append(len(ids))
                ids.append(seq[p])
                positions.append(p)
                slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        logits = runner.forward(
            ForwardBatch(
                input_ids=torch.tensor(ids),
                positions=torch.tensor(positions),
                slot_mapping=torch.tensor(slots),
                query_lens=[last - first] * len(sequences),
                context_lens=[last] * len(sequences),
                block_tables=tables,
                logits_indices=torch.tensor(indices),
            )
        )
        steps.append(logits.view(len(sequences), -1, logits.shape[-1]))
    return torch.cat(steps, dim=1).flatten(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--quantization",
        nargs="*",
        default=["gguf", "int8"],
        choices=["gguf", "int8"],
        help="compared to none (none given: only the KV cache formats)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        default=["auto"],
        choices=["auto", "fp8_e5m2", "int8"],
        help="KV cache formats (SCALELLM_KV_CACHE_DTYPE) of every setup; auto: the model dtype's, which the "
        "reference keeps",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="teacher-forced tokens per step, so that later chunks read the KV cache (default: one step)",
    )
    parser.add_argument(
        "--gguf-variant",
        nargs="+",
        default=["int8"],
        choices=VARIANTS,
        help="gguf kernel variants: int8 activations (gguf), float activations (gguf-float)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    model_dir = resolve_model_dir(CommonSettings(), weights=True)
    text = TEXT.read_text().split("\n\n", 1)[1]  # the header is not scored
    ids: list[int] = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    seq_len = args.prompt_tokens + args.tokens
    blocks_per_seq = max(-(-seq_len // BLOCK), -(-args.window // BLOCK))
    # name -> (SCALELLM_QUANTIZATION, gguf kernel variant, SCALELLM_KV_CACHE_DTYPE)
    setups = {"none": ("none", "int8", "auto")}
    for quantization in ["none", *args.quantization]:
        for variant in args.gguf_variant if quantization == "gguf" else ["int8"]:
            for kv in args.kv_cache_dtype:
                name = quantization if variant == "int8" else f"{quantization}-{variant}"
                setups.setdefault(name if kv == "auto" else f"{name}+kv-{kv}", (quantization, variant, kv))
    runners = {}
    # The model dtype's cache, unquantized, named: SCALELLM_KV_CACHE_DTYPE=auto may quantize it.
    unquantized = "bfloat16" if args.dtype == "bfloat16" else "auto"
    for name, (quantization, variant, kv) in setups.items():
        runners[name] = ModelRunner(
            model_dir,
            dtype=args.dtype,
            device="cpu",
            block_size=BLOCK,
            num_blocks=args.prompts * blocks_per_seq,
            kv_cache_bytes=None,
            max_model_len=None,
            quantization=quantization,
            kv_cache_dtype=unquantized if kv == "auto" else kv,
        )
        if variant != "int8":
            use_quant_kernels(runners[name], variant, None)
    float_runner = runners["none"]
    print(f"model {model_dir}, {args.dtype}, {torch.get_num_threads()} threads; text {len(ids)} tokens")

    stride = (len(ids) - args.prompt_tokens) // args.prompts
    prompts = [ids[i * stride : i * stride + args.prompt_tokens] for i in range(args.prompts)]
    reference = greedy(float_runner, prompts, args.tokens, blocks_per_seq)
    full = [p + r for p, r in zip(prompts, reference, strict=True)]
    for name in [name for name in runners if name != "none"]:
        quant_runner = runners[name]
        print(f"quantization {name} plan: {quant_runner.plan.describe()}")
        start = time.perf_counter()
        own = greedy(quant_runner, prompts, args.tokens, blocks_per_seq)
        logits = teacher_forced(quant_runner, full, blocks_per_seq, 8, args.prefill_chunk)
        predicted = logits.view(args.prompts, seq_len - 1, -1)[:, args.prompt_tokens - 1 :].argmax(-1)
        agreement = (predicted == torch.tensor(reference)).float().mean().item()
        shared = []
        for a, b in zip(reference, own, strict=True):
            shared.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
        print(
            f"quantization {name}: top-1 agreement with the float path {agreement:.4f} over {args.prompts} prompts "
            f"x {args.tokens} tokens; free-running greedy shares {sum(shared) / len(shared):.1f} tokens on average "
            f"({sum(s == args.tokens for s in shared)} of {args.prompts} identical) "
            f"[{time.perf_counter() - start:.0f} s]",
            flush=True,
        )

    windows = [ids[i : i + args.window] for i in range(0, len(ids) - 1, args.window)]
    windows = [w for w in windows if len(w) > 1]
    scored = sum(len(w) - 1 for w in windows)
    for name, runner in runners.items():
        nll = 0.0
        for window in windows:
            logits = teacher_forced(runner, [window], blocks_per_seq, 1, args.prefill_chunk)
            nll += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        print(f"perplexity, quantization {name}: {math.exp(nll / scored):.4f} over {scored} tokens", flush=True)


if __name__ == "__main__":
    main()
