"""Grammar compile time and per-step token-mask time of xgrammar and llguidance (issue 10, item 1).

    python -m bench.structured_masks                     # both libraries, batch 1 and 64
    python -m bench.structured_masks --libraries llguidance --batch 1 64 --steps 32

With the default model's tokenizer (SmolLM2-135M-Instruct, 49152 tokens). For each library:

- compile: a typical JSON schema (an object of 6 fields: strings with lengths, an integer range,
  an enum, an array of strings, a nested object) to what the library matches with, median of 5,
  with a fresh compiler each time (no cache) and the tokenizer already prepared;
- mask: one mask fill per sequence per step for ``batch`` sequences, each walking a valid
  instance of the schema token by token (the decode loop's work: fill the masks, then advance
  each matcher with its token). The median step time over ``--steps`` steps is printed, and the
  time per sequence. llguidance fills a batch in its own thread pool (LLExecutor, GIL released);
  xgrammar fills row by row, as vLLM's CPU path does.

Neither library is imported unless asked for (xgrammar pulls triton, ~1 GB installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "role", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "role": "admin",
    "tags": ["math", "engines"],
    "address": {"city": "London", "zip": "12345"},
}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench_llguidance(hf_tokenizer: Any, vocab: int, batches: list[int], steps: int, tokens: list[int]) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
    print(
        f"llguidance {llguidance.get_version() if hasattr(llguidance, 'get_version') else ''}: "
        f"tokenizer prepared in {(time.perf_counter() - start) * 1000:.0f} ms (once per process)"
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})

    def compile_once() -> object:
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        # The lexer is built lazily: the first mask is part of the compile.
        mask = llguidance.torch.allocate_token_bitmask(1, vocab)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        return matcher

    print(f"  compile (matcher + first mask): {_median_ms(compile_once, 5):.1f} ms")
    pristine = compile_once()
    print(f"  deep_copy of a compiled matcher: {_median_ms(lambda: pristine.deep_copy(), 20) * 1000:.0f} us")
    executor = llguidance.LLExecutor()
    for batch in batches:
        matchers = [pristine.deep_copy() for _ in range(batch)]
        mask = llguidance.torch.allocate_token_bitmask(batch, vocab)
        fill_times = []
        for step in range(min(steps, len(tokens))):
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
            fill_times.append(time.perf_counter() - start)
            for m in matchers:
                if not m.consume_token(tokens[step]):
                    raise RuntimeError(f"llguidance refused token {step} of the instance")
        fill = statistics.median(fill_times) * 1000
        print(f"  batch {batch:3d}: mask fill {fill:.3f} ms/step ({fill / batch * 1000:.0f} us per sequence)")


def bench_xgrammar(hf_tokenizer: Any, vocab: int, batches: list[int], steps: int, tokens: list[int]) -> None:
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
    print(f"xgrammar: tokenizer prepared in {(time.perf_counter() - start) * 1000:.0f} ms (once per process)")

    def compile_once() -> object:
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    print(f"  compile (compiled grammar, no cache): {_median_ms(compile_once, 5):.1f} ms")
    compiled = compile_once()
    for batch in batches:
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        mask = xgrammar.allocate_token_bitmask(batch, vocab)
        fill_times = []
        for step in range(min(steps, len(tokens))):
            start = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
            fill_times.append(time.perf_counter() - start)
            for m in matchers:
                if not m.accept_token(tokens[step]):
                    raise RuntimeError(f"xgrammar refused token {step} of the instance")
        fill = statistics.median(fill_times) * 1000
        print(f"  batch {batch:3d}: mask fill {fill:.3f} ms/step ({fill / batch * 1000:.0f} us per sequence)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--libraries", nargs="+", default=["llguidance", "xgrammar"], choices=["llguidance", "xgrammar"]
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    torch.set_num_threads(1)
    hf_tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(CommonSettings(), weights=False))
    vocab = len(hf_tokenizer)
    tokens = hf_tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    print(f"vocabulary {vocab} tokens; the instance walked is {len(tokens)} tokens")
    for library in args.libraries:
        bench = bench_llguidance if library == "llguidance" else bench_xgrammar
        bench(hf_tokenizer, vocab, args.batch, args.steps, tokens)


if __name__ == "__main__":
    main()
