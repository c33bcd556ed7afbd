"""The real default model (SmolLM2-135M-Instruct): greedy tokens equal transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.model.batch import ForwardBatch
from services.engine.model.runner import ModelRunner
from shared.model_files import resolve_model_dir
from shared.settings import CommonSettings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BLOCK = 16
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n']


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(CommonSettings(), weights=True)


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=hf.config.eos_token_id
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def our_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Both prompts in one batch: one prefill step, then batched decode steps."""
    runner = ModelRunner(
        model_dir,
        dtype="float32",
        device="cpu",
        block_size=BLOCK,
        num_blocks=32,
        kv_cache_bytes=None,
        max_model_len=512,
    )
    eos = set(runner.config.eos_token_ids)
    tables = [list(range(8 * i + 7, 8 * i - 1, -1)) for i in range(len(prompts))]  # reversed blocks
    seqs = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    cached = [0] * len(prompts)
    for _ in range(NEW_TOKENS):
        live = [i for i in range(len(prompts)) if len(outputs[i]) < NEW_TOKENS and not eos & set(outputs[i])]
        if not live:
            break
        ids, pos, slots, q_lens, last = [], [], [], [], []
        for i in live:
            for p in range(cached[i], len(seqs[i])):
                ids.append(seqs[i][p])
                pos.append(p)
                slots.append(tables[i][p // BLOCK] * BLOCK + p % BLOCK)
            q_lens.append(len(seqs[i]) - cached[i])
            last.append(len(ids) - 1)
        logits = runner.forward(
            ForwardBatch(
                input_ids=torch.tensor(ids),
                positions=torch.tensor(pos),
                slot_mapping=torch.tensor(slots),
                query_lens=q_lens,
                context_lens=[len(seqs[i]) for i in live],
                block_tables=[tables[i] for i in live],
                logits_indices=torch.tensor(last),
            )
        )
        for row, i in enumerate(live):
            cached[i] = len(seqs[i])
            token = int(logits[row].argmax())
            seqs[i].append(token)
            outputs[i].append(token)
    return outputs


def test_greedy_tokens_equal_transformers_generate(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    expected = hf_greedy(model_dir, prompts)
    assert all(len(tokens) > 4 for tokens in expected)  # the comparison is not vacuous
    assert our_greedy(model_dir, prompts) == expected
