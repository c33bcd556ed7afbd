"""Load a Hugging Face safetensors checkpoint into ModelWeights.

Handles a single model.safetensors, a sharded checkpoint with
model.safetensors.index.json, tied embeddings (no lm_head.weight stored), and
fuses q/k/v and gate/up into single matrices as they are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.model.config import ModelConfig, UnsupportedModelError
from services.engine.model.llama import LayerWeights, ModelWeights
from services.engine.model.quantized import QuantizedMatrix

# (label, the checkpoint's tensor) -> the matrix as the model keeps it (int8_weights.py quantizes here).
MatrixHook = Callable[[str, torch.Tensor], torch.Tensor | QuantizedMatrix]


class WeightsError(ValueError):
    """The checkpoint is missing, unreadable, or does not match config.json."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise WeightsError(f"cannot read {index}: {exc}") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir} holds no *.safetensors weights")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"checkpoint shards listed in the index are missing: {', '.join(missing)}")
    return files


class _Tensors:
    """Name -> tensor across all shards, read lazily, with the "model." prefix optional."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self._where: dict[str, object] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types
                raise WeightsError(f"cannot open {path}: {exc}") from exc
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                self._where[name] = handle
                if name.startswith("model."):
                    self._where.setdefault(name[len("model.") :], handle)

    def has(self, name: str) -> bool:
        return f"model.{name}" in self._where or name in self._where

    def get(self, name: str) -> torch.Tensor:
        for key in (f"model.{name}", name):
            handle = self._where.get(key)
            if handle is not None:
                # safetensors' handle is stored as object (safe_open ships no usable type).
                tensor: torch.Tensor = handle.get_tensor(key)  # type: ignore[attr-defined]
                return tensor
        raise WeightsError(f"the checkpoint has no tensor {name!r}")

    def names(self) -> Iterator[str]:
        return iter(self._where)


def load_weights(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, *, matrix: MatrixHook | None = None
) -> ModelWeights:
    """matrix: what becomes of each weight matrix (linears, embedding, LM head) as it is read,
    in the checkpoint's dtype; default: dtype on device, like every other tensor."""
    with ExitStack() as stack:
        tensors = _Tensors(checkpoint_files(model_dir), stack)

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            tensor = tensors.get(name)
            if tuple(tensor.shape) != shape:
                raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
            return tensor

        def put(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device, dtype=dtype).contiguous()

        def put_matrix(label: str, tensor: torch.Tensor) -> torch.Tensor | QuantizedMatrix:
            return put(tensor) if matrix is None else matrix(label, tensor)

        hidden, inter = config.hidden_size, config.intermediate_size
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        embed = put_matrix("embedding", get("embed_tokens.weight", (config.vocab_size, hidden)))
        layers = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv = torch.cat(
                [
                    get(attn + "q_proj.weight", (q_size, hidden)),
                    get(attn + "k_proj.weight", (kv_size, hidden)),
                    get(attn + "v_proj.weight", (kv_size, hidden)),
                ]
            )
            qkv_bias = None
            if config.qkv_bias:
                qkv_bias = put(
                    torch.cat(
                        [
                            get(attn + "q_proj.bias", (q_size,)),
                            get(attn + "k_proj.bias", (kv_size,)),
                            get(attn + "v_proj.bias", (kv_size,)),
                        ]
                    )
                )
            gate_up = torch.cat(
                [get(mlp + "gate_proj.weight", (inter, hidden)), get(mlp + "up_proj.weight", (inter, hidden))]
            )
            gate_up_bias = down_bias = None
            if config.mlp_bias:
                gate_up_bias = put(
                    torch.cat([get(mlp + "gate_proj.bias", (inter,)), get(mlp + "up_proj.bias", (inter,))])
                )
                down_bias = put(get(mlp + "down_proj.bias", (hidden,)))
            layers.append(
                LayerWeights(
                    input_norm=put(get(p + "input_layernorm.weight", (hidden,))),
                    qkv=put_matrix(f"layer {i} q/k/v", qkv),
                    qkv_bias=qkv_bias,
                    o=put_matrix(f"layer {i} o", get(attn + "o_proj.weight", (hidden, q_size))),
                    o_bias=put(get(attn + "o_proj.bias", (hidden,))) if config.o_bias else None,
                    post_norm=put(get(p + "post_attention_layernorm.weight", (hidden,))),
                    gate_up=put_matrix(f"layer {i} gate/up", gate_up),
                    gate_up_bias=gate_up_bias,
                    down=put_matrix(f"layer {i} down", get(mlp + "down_proj.weight", (hidden, inter))),
                    down_bias=down_bias,
                )
            )
        final_norm = put(get("norm.weight", (hidden,)))
        # lm_head sits outside "model." in HF checkpoints; a tied model may omit it.
        if tensors.has("lm_head.weight") and not config.tie_word_embeddings:
            lm_head = put_matrix("LM head", get("lm_head.weight", (config.vocab_size, hidden)))
        elif config.tie_word_embeddings:
            lm_head = embed
        else:
            raise WeightsError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


__all__ = ["UnsupportedModelError", "WeightsError", "checkpoint_files", "load_weights"]
