"""The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM2), written out in torch.

Weights are plain tensors, not nn.Modules: the decode step is a long chain of
small ops, and module call overhead per op is a visible share of it at this
model size. q/k/v are one fused matmul, gate/up another.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.model.attention import paged_attention
from services.engine.model.attention_metadata import AttentionMetadata
from services.engine.model.config import ModelConfig
from services.engine.model.kv_cache import KVCache
from services.engine.model.layer_step import LayerStep
from services.engine.model.linear import Bf16Linear, ConversionBuffer, Linear, QuantizedLinear
from services.engine.model.plan import KernelPlan
from services.engine.model.prefill_attention import NativeFreshPrefill
from services.engine.model.quant_kernels import ActivationScratch, QuantKernels
from services.engine.model.quantized import QuantizedMatrix
from services.engine.model.reference import apply_rope, rms_norm, silu_mul
from services.engine.model.rotary import RotaryTable
from services.engine.model.step_linears import LayerLinears, StepLinears, linear_weights
from services.engine.model.step_program import DecodeProgram


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


AnyLinear = Linear | Bf16Linear | QuantizedLinear
# A step's layer ops (LlamaModel._layer_ops): norm(x, weight), attend(layer, qkv), silu_mul(gate_up).
_Norm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_Attend = Callable[[int, torch.Tensor], torch.Tensor]
_SiluMul = Callable[[torch.Tensor], torch.Tensor]


class _Workspace:
    """Buffers for what the native layer kernels write (RMSNorm's and SiLU-mul's outputs, the
    decode attention's) and the GGUF linears' outputs, kept across layers and steps: at a few rows
    a fresh tensor per call costs more than the kernel. Each named buffer only grows (to the
    largest step's rows); a step takes views of it, so a model runs one forward at a time (as the
    engine's one loop thread does)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, width: int) -> torch.Tensor:
        """A contiguous [rows, width] view of the named buffer (its contents are left over)."""
        flat = self._flat.get(name)
        if flat is None or flat.numel() < rows * width:
            flat = self._flat[name] = torch.empty(rows * width, dtype=self.dtype, device=self.device)
        return flat[: rows * width].view(rows, width)


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: AnyLinear
    o: AnyLinear
    post_norm: torch.Tensor
    gate_up: AnyLinear
    down: AnyLinear


class LlamaModel:
    # The bound GGUF linears compute silu(gate) * up in gate_up's epilogue (StepLinears.swiglu)
    # instead of gate_up then silu_mul: the same bits. Off only to measure the difference
    # (bench/prefill_step.py --ab swiglu).
    fuse_swiglu = True
    # A step of decodes only runs its layer loop as one native call (step_program.DecodeProgram)
    # where every call is one the program makes: the same bits. Off only to measure the difference.
    decode_program = True

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
        self._prefill_kernels = plan.prefill
        self.norm = self.native_layers.rms_norm if self.native_layers else rms_norm
        self._workspace = _Workspace(self.dtype, weights.final_norm.device)

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
        matmuls = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self._outputs_in_workspace = any(isinstance(m, QuantizedLinear) for m in matmuls)
        # Every linear on one GGUF kernel, bf16 activations: bound once per step (StepLinears).
        self._linear_kernels = next((m.kernels for m in matmuls if isinstance(m, QuantizedLinear)), None)
        self._bound_weights = self._linear_table() if self.dtype == torch.bfloat16 else None
        self._linear_scratch = ActivationScratch()
        self._last_linears: tuple[tuple[int | None, ...], StepLinears] | None = None
        self._last_program: tuple[tuple[object, ...], DecodeProgram] | None = None

    def _bound_linears(
        self,
        kernels: QuantKernels,
        table: list[LayerLinears],
        rows: int,
        outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        activated: torch.Tensor | None,
    ) -> StepLinears:
        """The step's StepLinears: the last step's where its rows and output buffers are this one's
        (a run of decode steps of one batch size), saving its ~75 us build (Intel Xeon SPR, avx512f/amx)."""
        key = (rows, *(out.data_ptr() for out in outs), None if activated is None else activated.data_ptr())
        cached = self._last_linears
        if cached is None or cached[0] != key:
            linears = StepLinears(kernels, table, self._linear_scratch, rows=rows, outs=outs, activated=activated)
            cached = self._last_linears = (key, linears)
        return cached[1]

    def _linear_table(self) -> list[LayerLinears] | None:
        """Per layer, linear_weights of (qkv, o, gate_up, down); None unless every one is a
        QuantizedLinear on the model's one kernel."""
        table = []
        for layer in self.layers:
            row = []
            for matmul in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if not isinstance(matmul, QuantizedLinear) or matmul.kernels is not self._linear_kernels:
                    return None
                row.append(linear_weights(matmul))
            table.append((row[0], row[1], row[2], row[3]))
        return table

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
        logits_indices: [S]. Returns [S, vocab] float32 logits, a new tensor each call (the caller
        may keep it across steps; the workspace is reused by the next forward).

        padded_rows (>= T; see shapes.py): run the matmuls on that many rows, the
        T tokens followed by padding rows that attention and the KV pool never see."""
        eps = self.config.rms_norm_eps
        num_tokens = input_ids.shape[0]
        padding = (padded_rows or num_tokens) - num_tokens
        if padding < 0:
            raise ValueError(f"padded_rows {padded_rows} is fewer than the step's {num_tokens} tokens")
        ids = F.pad(input_ids, (0, padding)) if padding else input_ids
        if isinstance(self.embed, QuantizedMatrix):
            hidden = self.embed.dequantize_rows(ids).to(self.dtype)
        else:
            hidden = F.embedding(ids, self.embed)
        norm, attend, silu_and_mul, decode_step = self._layer_ops(positions, slots, meta, kv_cache, num_tokens, padding)
        # The linears' outputs, in the workspace where a layer writes into it (QuantizedLinear; the
        # float linears return new tensors, so their models keep no buffers for them). The residual
        # adds read hidden while they write the new one, so o and down write two different buffers:
        # o reads down's (or the embedding) and down reads o's, never in place.
        qkv_out = gate_up_out = after_attn = after_mlp = None
        outs = None
        if self._outputs_in_workspace:
            rows, width, take = num_tokens + padding, self.config.hidden_size, self._workspace.take
            qkv_out = take("qkv", rows, self.q_size + 2 * self.kv_size)
            gate_up_out = take("gate_up", rows, 2 * self.config.intermediate_size)
            after_attn, after_mlp = take("after_attn", rows, width), take("after_mlp", rows, width)
            outs = (qkv_out, after_attn, gate_up_out, after_mlp)
        kernels, table = self._linear_kernels, self._bound_weights
        if table is not None and kernels is not None and outs is not None:
            rows = num_tokens + padding
            # silu(gate) * up from gate_up's epilogue, into the buffer silu_mul would write.
            activated = self._workspace.take("activated", rows, self.config.intermediate_size)
            linears = self._bound_linears(kernels, table, rows, outs, activated if self.fuse_swiglu else None)
            fused = linears.fused_swiglu
            hidden = hidden.contiguous()  # the bound calls read rows at the hidden width
            program = self._program(decode_step, linears, rows, outs, activated)
            if program is not None and decode_step is not None:
                program.run(decode_step, hidden)  # the loop below's calls, in one native call
                hidden = outs[3]
            else:
                for index, layer in enumerate(self.layers):
                    qkv = linears.qkv(index, norm(hidden, layer.input_norm))
                    hidden = linears.o(index, attend(index, qkv), hidden)
                    if fused:
                        mlp_in = linears.swiglu(index, norm(hidden, layer.post_norm))
                    else:
                        mlp_in = silu_and_mul(linears.gate_up(index, norm(hidden, layer.post_norm)))
                    hidden = linears.down(index, mlp_in, hidden)
        else:
            for index, layer in enumerate(self.layers):
                qkv = layer.qkv(norm(hidden, layer.input_norm), qkv_out)
                hidden = layer.o.add_to(hidden, attend(index, qkv), after_attn)
                gate_up = layer.gate_up(norm(hidden, layer.post_norm), gate_up_out)
                hidden = layer.down.add_to(hidden, silu_and_mul(gate_up), after_mlp)
        # A copy: the logits below (a new tensor per step) owe nothing to the workspace.
        last = hidden.index_select(0, logits_indices)
        return self.lm_head.logits(self.norm(last, self.final_norm, eps))

    def _program(
        self,
        step: LayerStep | None,
        linears: StepLinears,
        rows: int,
        outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        activated: torch.Tensor,
    ) -> DecodeProgram | None:
        """The layer loop of a step of decodes only (step: its LayerStep) as one native call,
        where the program makes every call; the last step's where its buffers are this one's."""
        native = self.native_layers
        if step is None or native is None or not self.decode_program or not linears.program_ready():
            return None
        take = self._workspace.take
        normed, attn = take("normed", rows, self.config.hidden_size), take("attn", rows, self.q_size)
        qkv_out, after_attn, _, after_mlp = outs
        buffers = (normed, qkv_out, attn, after_attn, activated, after_mlp)
        key = (linears, *(buffer.data_ptr() for buffer in buffers))
        cached = self._last_program
        if cached is None or cached[0] != key:
            norms = [(layer.input_norm, layer.post_norm) for layer in self.layers]
            cached = self._last_program = (key, DecodeProgram(native.run_step_program, step, linears, norms, buffers))
        return cached[1]

    def _layer_ops(
        self,
        positions: torch.Tensor,
        slots: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        num_tokens: int,
        padding: int,
    ) -> tuple[_Norm, _Attend, _SiluMul, LayerStep | None]:
        """The step's norm(x, weight), attend(layer, qkv) -> [T + padding, H * D] and
        silu_mul(gate_up): with the native kernels, bound once for the step (layer_step.LayerStep),
        and that LayerStep where the step is decodes only (its rope_attend is attend)."""
        cfg = self.config
        eps, heads, kv_heads, head_dim = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        native = self.native_layers
        qk_size = self.q_size + self.kv_size
        rows = num_tokens + padding
        # Attention's output for the real tokens, then zero rows for the padding: [T + padding, H * D].
        attn_rows = self._workspace.take("attn", rows, self.q_size) if padding else None
        if attn_rows is not None:
            attn_rows[num_tokens:].zero_()
        step = None
        if native is not None:
            decode = meta.decode
            bound = None
            # A step of decodes only: rope_store and the decode attention in one kernel per layer.
            if decode is not None and decode.num_seqs == num_tokens and not padding and not meta.store_kv:
                out = self._workspace.take("attn", num_tokens, self.q_size)
                bound = (decode.block_table, decode.context_lens, out, self.scale)
            step = LayerStep(
                native,
                tokens=num_tokens,
                normed=self._workspace.take("normed", rows, cfg.hidden_size),
                activated=self._workspace.take("activated", rows, cfg.intermediate_size),
                positions=positions,
                cos=self.rotary.cos,
                sin=self.rotary.sin,
                slots=slots,
                k_pool=kv_cache.k,
                v_pool=kv_cache.v,
                num_heads=heads,
                eps=eps,
                decode=bound,
            )
            if bound is not None:
                return step.norm, step.rope_attend, step.silu_mul, step
            fresh = meta.fresh_prefill()
            # A lone prompt's chunk (the first token's step at concurrency 1): rope_store has
            # stored its K/V, and FreshPrefill attends over its views (as paged_attention would).
            if fresh is not None and not meta.store_kv and fresh.mask.dtype == self.dtype:
                return step.norm, self._fresh_attend(step, num_tokens, attn_rows), step.silu_mul, None
        else:
            cos, sin = self.rotary.lookup(positions, self.dtype)

        def attend(index: int, qkv: torch.Tensor) -> torch.Tensor:
            qkv = qkv[:num_tokens]  # a contiguous view: the real tokens' rows
            k_cache, v_cache = kv_cache.layer(index)
            if step is not None:
                # Rotates q, k in place and stores k, v in the pool in one pass.
                step.rope_store(index, qkv)
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
                return attn_rows
            return attn

        if step is not None:
            return step.norm, attend, step.silu_mul, None
        return functools.partial(rms_norm, eps=eps), attend, silu_mul, None

    def _fresh_attend(self, step: LayerStep, num_tokens: int, attn_rows: torch.Tensor | None) -> _Attend:
        """attend(layer, qkv) of a step that is one fresh prefill chunk: rope_store, then the native
        prefill attention (prefill_attention.NativeFreshPrefill on the plan's kernels: AMX-BF16 tiles where the
        CPU has them, else FreshPrefill's SDPA), into attn_rows [T + padding, H * D] where the step has padding rows."""
        cfg = self.config
        fresh = NativeFreshPrefill(
            num_tokens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.scale, self._prefill_kernels
        )
        rope_store = step.rope_store

        def attend(index: int, qkv: torch.Tensor) -> torch.Tensor:
            rope_store(index, qkv)
            if attn_rows is None:
                return fresh(qkv)
            attn_rows[:num_tokens] = fresh(qkv)
            return attn_rows

        return attend
