"""The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM2), written out in torch.

Weights are plain tensors, not nn.Modules: the decode step is a long chain of
small ops, and module call overhead per op is a visible share of it at this
model size. q/k/v are one fused matmul, gate/up another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.model.attention import AttentionMetadata, paged_attention
from services.engine.model.config import ModelConfig, RopeScaling
from services.engine.model.kv_cache import KVCache
from services.engine.model.linear import Bf16Linear, ConversionBuffer, Linear, QuantizedLinear
from services.engine.model.plan import KernelPlan
from services.engine.model.quantized import QuantizedMatrix
from services.engine.model.reference import apply_rope, rms_norm, silu_mul


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    # The matrices are float tensors, or GGUF blocks (quantized.py) with quantization on.
    qkv: torch.Tensor | QuantizedMatrix  # [(H + 2 * KV) * D, hidden]: q, k, v projections stacked
    qkv_bias: torch.Tensor | None  # [(H + 2 * KV) * D]
    o: torch.Tensor | QuantizedMatrix  # [hidden, H * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor | QuantizedMatrix  # [2 * intermediate, hidden]: gate and up stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | QuantizedMatrix  # [hidden, intermediate]
    down_bias: torch.Tensor | None


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor | QuantizedMatrix  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor | QuantizedMatrix  # [vocab, hidden]; the same object as embed when tied


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by the factor, short ones kept; in between, blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryTable:
    """cos / sin for every position up to max_positions, looked up per step."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device) -> None:
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = freqs.cos().to(device)  # [max_positions, D / 2] float32
        self.sin = freqs.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D / 2] in dtype, ready to broadcast over heads."""
        cos = self.cos.index_select(0, positions).to(dtype)[:, None, :]
        sin = self.sin.index_select(0, positions).to(dtype)[:, None, :]
        return cos, sin


AnyLinear = Linear | Bf16Linear | QuantizedLinear


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: AnyLinear
    o: AnyLinear
    post_norm: torch.Tensor
    gate_up: AnyLinear
    down: AnyLinear


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, rotary: RotaryTable, plan: KernelPlan) -> None:
        self.config = config
        self.rotary = rotary
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.embed = weights.embed
        # A quantized embedding is looked up row by row (dequantized rows), in the norms' dtype.
        embed = weights.embed
        self.dtype = weights.final_norm.dtype if isinstance(embed, QuantizedMatrix) else embed.dtype
        self.native_layers = plan.native_layers
        self.norm = self.native_layers.rms_norm if self.native_layers else rms_norm

        conversion = ConversionBuffer(plan.compute_dtype) if plan.compute_dtype != plan.dtype else None

        def linear(weight: torch.Tensor | QuantizedMatrix, bias: torch.Tensor | None) -> AnyLinear:
            if isinstance(weight, QuantizedMatrix):
                if plan.quantized is None:
                    raise ValueError("GGUF block weights need the plan's quantized kernels")
                return QuantizedLinear(weight, bias, plan.quantized)
            if plan.native_linears is not None:
                return Bf16Linear(weight, bias, plan.native_linears, conversion)
            return Linear(weight, bias, packed=plan.prepacked_linears, convert_into=conversion)

        self.layers = [
            _Layer(
                input_norm=layer.input_norm,
                qkv=linear(layer.qkv, layer.qkv_bias),
                o=linear(layer.o, layer.o_bias),
                post_norm=layer.post_norm,
                gate_up=linear(layer.gate_up, layer.gate_up_bias),
                down=linear(layer.down, layer.down_bias),
            )
            for layer in weights.layers
        ]
        self.final_norm = weights.final_norm
        self.lm_head = linear(weights.lm_head, None)

    def matmul_params(self) -> int:
        """Weights touched by matmuls per token (for FLOP accounting)."""
        per_layer = sum(
            layer.qkv.numel + layer.o.numel + layer.gate_up.numel + layer.down.numel for layer in self.layers
        )
        return per_layer + self.lm_head.numel

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        logits_indices: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        padded_rows: int | None = None,
    ) -> torch.Tensor:
        """input_ids, positions, slots: [T] int64 (positions and slots contiguous);
        logits_indices: [S]. Returns [S, vocab] float32 logits.

        padded_rows (>= T; see shapes.py): run the matmuls on that many rows, the
        T tokens followed by padding rows that attention and the KV pool never see."""
        cfg = self.config
        eps = cfg.rms_norm_eps
        norm = self.norm
        num_tokens = input_ids.shape[0]
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        native = self.native_layers
        if native is None:
            cos, sin = self.rotary.lookup(positions, self.dtype)
        padding = (padded_rows or num_tokens) - num_tokens
        if padding < 0:
            raise ValueError(f"padded_rows {padded_rows} is fewer than the step's {num_tokens} tokens")
        ids = F.pad(input_ids, (0, padding)) if padding else input_ids
        if isinstance(self.embed, QuantizedMatrix):
            hidden = self.embed.dequantize_rows(ids).to(self.dtype)
        else:
            hidden = F.embedding(ids, self.embed)
        # Attention's output for the real tokens, then zero rows for the padding: [T + padding, H * D].
        attn_rows = hidden.new_zeros(num_tokens + padding, self.q_size) if padding else None
        qk_size = self.q_size + self.kv_size
        for index, layer in enumerate(self.layers):
            normed = norm(hidden, layer.input_norm, eps)
            qkv = layer.qkv(normed)[:num_tokens]  # a contiguous view: the real tokens' rows
            k_cache, v_cache = kv_cache.layer(index)
            if native is not None:
                # Rotates q, k in place and stores k, v in the pool in one pass.
                native.rope_store(qkv, positions, self.rotary.cos, self.rotary.sin, slots, k_cache, v_cache, heads)
                qk = qkv[:, :qk_size].view(num_tokens, heads + kv_heads, head_dim)
            else:
                # q and k are rotated together: they are adjacent in the fused output.
                qk = apply_rope(qkv[:, :qk_size].view(num_tokens, heads + kv_heads, head_dim), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, qk_size:].view(num_tokens, kv_heads, head_dim)
            # meta.store_kv (from the same plan) is False exactly when rope_store has stored k, v.
            attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            if attn_rows is not None:
                attn_rows[:num_tokens] = attn
                attn = attn_rows
            hidden = layer.o.add_to(hidden, attn)
            normed = norm(hidden, layer.post_norm, eps)
            gate_up = layer.gate_up(normed)
            activated = native.silu_mul(gate_up) if native is not None else silu_mul(gate_up)
            hidden = layer.down.add_to(hidden, activated)
        last = hidden.index_select(0, logits_indices)
        return self.lm_head(norm(last, self.final_norm, eps)).float()
