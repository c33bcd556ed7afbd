"""ModelConfig: the parts of a Hugging Face config.json our forward pass needs.

Only the Llama family is supported (Llama, Mistral, Qwen2, SmolLM2). Anything
else is refused here, at start-up, with a message naming what was found, so a
wrong model never gets as far as producing garbage tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architecture class name -> model_type, for configs that carry only one of them
# (a config converted from GGUF has a model_type but no "architectures").
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The model folder holds something this engine cannot run."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Mistral v0.1 attends only this far back; None means full attention.
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # The dtype the checkpoint was saved in (informational), e.g. "bfloat16".
    checkpoint_dtype: str | None

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read config.json (and generation_config.json's EOS ids, if present)."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir} has no config.json; expected a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UnsupportedModelError(f"cannot read {path}: {exc}") from exc
        extra_eos: list[int] = []
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            try:
                extra_eos = _int_list(json.loads(gen_path.read_text()).get("eos_token_id"))
            except (OSError, json.JSONDecodeError, ValueError):
                extra_eos = []  # a broken generation config only loses extra EOS ids
        return cls.from_dict(raw, extra_eos_token_ids=extra_eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, extra_eos_token_ids: list[int] | None = None) -> ModelConfig:
        architecture, model_type = _check_architecture(raw)
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            num_layers = int(raw["num_hidden_layers"])
            intermediate = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as exc:
            raise UnsupportedModelError(f"config.json lacks {exc.args[0]!r}") from None
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        rope_theta, rope_scaling = _rope(raw)
        sliding_window = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding_window = None  # Qwen2 carries a window size but only uses it when told to
        eos = _int_list(raw.get("eos_token_id"))
        for token in extra_eos_token_ids or []:
            if token not in eos:
                eos.append(token)
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o_proj bias; Llama's
            # attention_bias covers all four projections.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            eos_token_ids=tuple(eos),
            bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
            checkpoint_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _check_architecture(raw: dict[str, Any]) -> tuple[str, str]:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if architectures:
        for arch in architectures:
            if arch in SUPPORTED_ARCHITECTURES:
                return arch, SUPPORTED_ARCHITECTURES[arch]
        raise UnsupportedModelError(
            f"unsupported model architecture {', '.join(map(str, architectures))}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type], model_type
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r} (config.json names no architecture); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 writes "rope_parameters" (theta and scaling together);
    # older configs have a top-level rope_theta and an optional "rope_scaling".
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict) or "full_attention" in params:
        raise UnsupportedModelError("per-layer rope_parameters are not supported")
    scaling = raw.get("rope_scaling") or params
    theta = raw.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor other than 1.0 is not supported")
    if rope_type == "default":
        return float(theta), RopeScaling("default")
    try:
        factor = float(scaling["factor"])
        if rope_type == "linear":
            return float(theta), RopeScaling("linear", factor=factor)
        return float(theta), RopeScaling(
            "llama3",
            factor=factor,
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise UnsupportedModelError(f"rope scaling {rope_type!r} lacks {exc.args[0]!r}") from None


def _int_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"expected a token id or a list of them, got {value!r}")
