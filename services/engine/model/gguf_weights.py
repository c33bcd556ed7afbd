"""Load a GGUF checkpoint into ModelWeights, keeping Q4_0 / Q4_1 / Q8_0 matrices in block form.

The linears (q/k/v fused, o, gate/up fused, down) and the embedding / LM head
stay QuantizedMatrix (quantized.py) when their GGUF type is one the kernels
take; every other tensor (F16, F32, K-quants, norms) is dequantized with the
gguf package, exactly as transformers' GGUF conversion does for the float path.
The report says which matrices were kept and which were not, and why.

Like transformers, q and k of a "llama" GGUF are un-permuted: llama.cpp's
converter interleaves the two rotary halves of every head's rows. That is a
reordering of whole rows, so it applies to block rows unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.model.config import ModelConfig
from services.engine.model.llama import LayerWeights, ModelWeights
from services.engine.model.loader import WeightsError
from services.engine.model.quantized import FORMATS, QuantizedMatrix


@dataclass(slots=True)
class GgufReport:
    """What the loader kept quantized ({kind: matrices}) and what it dequantized ("name: type, why")."""

    kept: dict[str, int] = field(default_factory=dict)
    dequantized: list[str] = field(default_factory=list)
    kept_bytes: int = 0

    def summary(self) -> str:
        kept = ", ".join(f"{count} {kind}" for kind, count in sorted(self.kept.items())) or "none"
        text = f"kept in GGUF blocks: {kept} matrices ({self.kept_bytes / 2**20:.1f} MiB)"
        if self.dequantized:
            text += f"; dequantized: {'; '.join(self.dequantized)}"
        return text


class _Gguf:
    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except Exception as exc:  # the reader raises bare ValueErrors and numpy errors alike
            raise WeightsError(f"cannot read the GGUF file {path}: {exc}") from exc
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        field_ = self.reader.fields.get("general.architecture")
        self.architecture = str(field_.contents()) if field_ is not None else ""

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Any:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise WeightsError(f"the GGUF file has no tensor {name!r}")
        return tensor


def _rows_cols(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary interleave of q/k rows (transformers' reverse_permute_weights)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class _Loader:
    def __init__(self, gguf: _Gguf, config: ModelConfig, dtype: torch.dtype, device: torch.device, keep: bool) -> None:
        self.gguf, self.config, self.dtype, self.device, self.keep = gguf, config, dtype, device, keep
        self.report = GgufReport()

    def _checked(self, name: str, shape: tuple[int, ...]) -> Any:
        tensor = self.gguf.get(name)
        if _rows_cols(tensor) != shape:
            raise WeightsError(f"{name} has shape {_rows_cols(tensor)}, config.json implies {shape}")
        return tensor

    def _float_rows(self, tensor: Any, heads: int | None) -> np.ndarray:
        from gguf import dequantize

        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        return _unpermute(values, heads) if heads else values

    def vector(self, name: str, size: int) -> torch.Tensor:
        values = self._float_rows(self._checked(name, (size,)), None).reshape(size)
        return torch.from_numpy(values.copy()).to(device=self.device, dtype=self.dtype)

    def matrix(self, label: str, parts: list[tuple[str, int, int | None]], cols: int) -> torch.Tensor | QuantizedMatrix:
        """The parts (name, rows, heads to un-permute or None) stacked by rows: in blocks when
        all share a kind the kernels take, else dequantized."""
        tensors = [self._checked(name, (rows, cols)) for name, rows, _ in parts]
        kinds = {tensor.tensor_type.name for tensor in tensors}
        kind = next(iter(kinds))
        why = None
        if not self.keep:
            why = "quantization off"
        elif len(kinds) > 1:
            why = f"parts of mixed types {'/'.join(sorted(kinds))}"
        elif kind not in FORMATS:
            why = f"{kind} is not one of {', '.join(FORMATS)}"
        if why is None:
            blocks = [
                _unpermute(tensor.data, heads) if heads else np.asarray(tensor.data)
                for tensor, (_, _, heads) in zip(tensors, parts, strict=True)
            ]
            matrix = QuantizedMatrix.from_gguf_blocks(kind, np.concatenate(blocks), cols)
            self.report.kept[kind] = self.report.kept.get(kind, 0) + 1
            self.report.kept_bytes += matrix.nbytes
            return matrix
        if self.keep:
            self.report.dequantized.append(f"{label}: {'/'.join(sorted(kinds))}, {why}")
        values = np.concatenate([self._float_rows(t, heads) for t, (_, _, heads) in zip(tensors, parts, strict=True)])
        return torch.from_numpy(values).to(device=self.device, dtype=self.dtype)


def load_gguf_weights(
    path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, *, keep_quantized: bool = True
) -> tuple[ModelWeights, GgufReport]:
    """The model's weights from a GGUF file; config: the model folder's config.json (converted from it).

    keep_quantized: False dequantizes everything (the float weights transformers' conversion gives)."""
    gguf = _Gguf(Path(path))
    if keep_quantized and device.type != "cpu":
        raise WeightsError("GGUF block weights are computed on the CPU only")
    if config.qkv_bias or config.o_bias or config.mlp_bias:
        raise WeightsError("GGUF loading covers Llama-style models without linear biases")
    loader = _Loader(gguf, config, dtype, device, keep_quantized)
    cfg = config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    permute = gguf.architecture == "llama"
    q_heads, k_heads = (cfg.num_heads, cfg.num_kv_heads) if permute else (None, None)
    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                input_norm=loader.vector(p + "attn_norm.weight", hidden),
                qkv=loader.matrix(
                    f"layer {i} q/k/v",
                    [
                        (p + "attn_q.weight", q_size, q_heads),
                        (p + "attn_k.weight", kv_size, k_heads),
                        (p + "attn_v.weight", kv_size, None),
                    ],
                    hidden,
                ),
                qkv_bias=None,
                o=loader.matrix(f"layer {i} o", [(p + "attn_output.weight", hidden, None)], q_size),
                o_bias=None,
                post_norm=loader.vector(p + "ffn_norm.weight", hidden),
                gate_up=loader.matrix(
                    f"layer {i} gate/up",
                    [(p + "ffn_gate.weight", inter, None), (p + "ffn_up.weight", inter, None)],
                    hidden,
                ),
                gate_up_bias=None,
                down=loader.matrix(f"layer {i} down", [(p + "ffn_down.weight", hidden, None)], inter),
                down_bias=None,
            )
        )
    embed = loader.matrix("embedding", [("token_embd.weight", cfg.vocab_size, None)], hidden)
    # llama.cpp stores no output.weight for a tied model.
    untied = gguf.has("output.weight") and not cfg.tie_word_embeddings
    lm_head = loader.matrix("LM head", [("output.weight", cfg.vocab_size, None)], hidden) if untied else embed
    weights = ModelWeights(
        embed=embed, layers=layers, final_norm=loader.vector("output_norm.weight", hidden), lm_head=lm_head
    )
    return weights, loader.report
