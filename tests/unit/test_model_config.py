"""ModelConfig parsing and refusal, dtype/device resolution, KV pool sizing, loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.engine.model.config import ModelConfig, UnsupportedModelError
from services.engine.model.cpu import CpuFeatures
from services.engine.model.device import resolve_device, resolve_dtype
from services.engine.model.kv_cache import kv_bytes_per_block, num_blocks_for
from services.engine.model.loader import WeightsError
from services.engine.model.rotary import rope_inv_freq
from services.engine.model.runner import ModelRunner

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "eos_token_id": 2,
}


def write_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**BASE, **changes}))
    return folder


def runner_for(folder: Path) -> ModelRunner:
    return ModelRunner(
        folder, dtype="float32", device="cpu", block_size=4, num_blocks=8, kv_cache_bytes=None, max_model_len=None
    )


def test_unsupported_architecture_is_refused_naming_it(tmp_path: Path) -> None:
    folder = write_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        runner_for(folder)


def test_config_without_architectures_falls_back_to_model_type(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict({**BASE, "architectures": None, "model_type": "mistral"})
    assert cfg.architecture == "MistralForCausalLM"
    with pytest.raises(UnsupportedModelError, match="'phi3'"):
        ModelConfig.from_dict({**BASE, "architectures": None, "model_type": "phi3"})


def test_unknown_rope_scaling_is_refused_naming_it() -> None:
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_non_silu_activation_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_dict({**BASE, "hidden_act": "gelu"})


def test_config_fields_from_old_and_new_rope_formats(tmp_path: Path) -> None:
    old = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling == new.rope_scaling
    assert old.head_dim == 16 and old.num_kv_heads == 2
    folder = write_config(tmp_path, eos_token_id=[2, 7])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.from_dir(folder).eos_token_ids == (2, 7, 9)


def test_qwen2_has_qkv_bias_and_ignores_its_unused_sliding_window() -> None:
    cfg = ModelConfig.from_dict(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 32}
    )
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_frequencies_match_transformers(rope: dict[str, object]) -> None:
    fields = {k: v for k, v in BASE.items() if k not in ("architectures", "model_type")}
    hf_config = LlamaConfig(**fields, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS[str(rope["rope_type"])](hf_config, "cpu")
    cfg = ModelConfig.from_dict({**BASE, "rope_parameters": rope})
    torch.testing.assert_close(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), expected)


def test_auto_dtype_follows_the_cpu_bf16_flags(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, CpuFeatures.detect(with_bf16)) == torch.bfloat16
    assert resolve_dtype("auto", cpu, CpuFeatures.detect(without)) == torch.float32
    assert resolve_dtype("auto", cpu, CpuFeatures.detect(tmp_path / "missing")) == torch.float32
    assert resolve_dtype("float32", cpu, CpuFeatures.detect(with_bf16)) == torch.float32
    assert resolve_dtype("bfloat16", cpu, CpuFeatures.detect(without)) == torch.bfloat16
    assert resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", cpu)


def test_pool_size_from_bytes() -> None:
    per_block = kv_bytes_per_block(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert (
        num_blocks_for(
            10 * per_block + 5, num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16
        )
        == 10
    )


def test_missing_weights_and_tiny_pool_are_refused_clearly(tmp_path: Path) -> None:
    folder = write_config(tmp_path)
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        runner_for(folder)
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner(
            folder, dtype="float32", device="cpu", block_size=4, num_blocks=None, kv_cache_bytes=100, max_model_len=None
        )
    with pytest.raises(ValueError, match="exceeds"):
        ModelRunner(
            folder, dtype="float32", device="cpu", block_size=4, num_blocks=8, kv_cache_bytes=None, max_model_len=4096
        )
