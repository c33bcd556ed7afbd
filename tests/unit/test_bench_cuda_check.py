"""bench/cuda_check.py, the prepared GPU script: what it does where there is no GPU, and its verdicts.

The CUDA run itself needs a GPU; --device cpu runs the same code paths on a tiny model here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import cuda_check
from bench.cuda_check import Divergence, equality_verdict, first_difference

DRY_RUN = [
    "--device", "cpu", "--kernels", "torch", "--equality-prompts", "3", "--equality-tokens", "8",
    "--num-requests", "6", "--output-len", "8", "--kv-cache-gib", "0.01",
]  # fmt: skip


# What decides the compute: the shape, the rotary base and the tied head.
DEFAULT_MODEL_SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_without_cuda_it_exits_2_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_check.main([]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err and "--device cpu" in err


def test_dry_run_reports_equality_and_both_throughputs(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cuda_check.main(["--model-dir", str(tiny_model), *DRY_RUN]) == 0
    out = capsys.readouterr().out
    assert "[equality] 3/3 continuations equal token for token" in out
    assert "ours: 48/48 tokens" in out
    assert "transformers generate_batch: 48/48 tokens" in out


def test_a_continuation_that_differs_fails_the_check(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = cuda_check.engine_greedy

    def one_token_off(*args: object, **kwargs: object) -> list[list[int]]:
        continuations = honest(*args, **kwargs)  # type: ignore[arg-type]
        continuations[1][3] = (continuations[1][3] + 1) % 512
        return continuations

    monkeypatch.setattr(cuda_check, "engine_greedy", one_token_off)
    assert cuda_check.main(["--model-dir", str(tiny_model), *DRY_RUN, "--only", "equality"]) == 1
    out = capsys.readouterr().out
    assert "prompt 1: first differs at token 3" in out
    assert "2/3 continuations equal" in out and "1 DIFFER" in out


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_a_near_tie_passes_and_a_larger_gap_does_not() -> None:
    tie = Divergence(prompt_index=0, position=5, ours=7, theirs=8, logit_gap=2e-4)
    wrong = Divergence(prompt_index=1, position=0, ours=7, theirs=9, logit_gap=0.5)
    passed, line = equality_verdict(4, [tie], tolerance=1e-3)
    assert passed and "3/4 continuations equal" in line and "1 differ only at a near-tie" in line
    passed, line = equality_verdict(4, [tie, wrong], tolerance=1e-3)
    assert not passed and "1 DIFFER" in line


def test_random_weights_take_the_default_models_shape() -> None:
    """--random-weights without --model-dir must build what the default model is, so its figures stand for it."""
    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    default = json.loads((resolve_model_dir(CommonSettings(), weights=False) / "config.json").read_text())
    built = LlamaConfig(**cuda_check.DEFAULT_MODEL_SHAPE).to_dict()
    for key in DEFAULT_MODEL_SHAPE_KEYS:
        assert built[key] == pytest.approx(default[key]), key
