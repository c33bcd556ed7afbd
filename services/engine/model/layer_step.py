"""The bf16 layer kernels of one forward step bound once (``LayerStep``): the step path of
the kernels whose checked fronts are native_kernels.NativeKernels' methods."""

from __future__ import annotations

import ctypes
import functools
import struct

import torch

from services.engine.model.native_kernels import FORMAT_CODES, POOL_DTYPES, NativeKernels, pool_geometry


@functools.lru_cache(maxsize=8)
def _layer_pools(k_base: int, v_base: int, num_layers: int, k_layer: int, v_layer: int) -> tuple[tuple[int, int], ...]:
    """Each layer's (K, V) addresses in pools laid out [layers, ...], k_layer / v_layer bytes per
    layer: a pure function of its arguments, so the engine's one pool costs it once, not per step."""
    return tuple((k_base + i * k_layer, v_base + i * v_layer) for i in range(num_layers))


class LayerStep:
    """The bf16 layer kernels of one forward step (RMSNorm, RoPE + KV store, or RoPE + KV store +
    decode attention, SiLU-mul) with every argument that is fixed for the step resolved once:
    shapes, strides, the positions, slots and block tables, each layer's place in the pool, and
    the output buffers. A call in the layer loop then reads its input's address and nothing
    else: the checked fronts (NativeKernels) spend ~15-20 us of Python per call (shape and layout checks,
    torch.empty, data_ptr, argument conversion) on ~0.4 us of kernel at one row.

    Every input must be a contiguous bfloat16 tensor of the step's rows, as the step's linears
    return them (not checked per call); the outputs are the given buffers, overwritten by the
    next call of the same kernel. The caller keeps every tensor given here alive for the step."""

    __slots__ = (
        "_activated",
        "_attn",
        "_code",
        "_decode_layers",
        "_head",
        "_layers",
        "_norm",
        "_normed",
        "_pools",
        "_rms",
        "_rope",
        "_rope_decode",
        "_shape",
        "_silu",
        "_silu_args",
        "_tables",
    )

    # The columns of a rope_attend record (``rope_attend_record``) that change from step to step:
    # positions, slots, block tables, their width, context lengths (the rest is the layer's).
    STEP_COLUMNS = (5, 8, 17, 18, 19)

    def __init__(
        self,
        kernels: NativeKernels,
        *,
        tokens: int,
        normed: torch.Tensor,
        activated: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        num_heads: int,
        eps: float,
        decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
    ) -> None:
        """normed [rows, hidden], activated [rows, intermediate]: contiguous bfloat16 buffers, one
        row per matmul row (the step's tokens, then any padding); tokens: the real ones, which
        rope and attention see; positions, slots: int64 [tokens]; cos, sin: float32
        [max_positions, D / 2]; k_pool, v_pool: every layer's pool ([layers, ...] as kv_cache.py
        lays it out, K dim-major; bfloat16, float8_e5m2 or int8 chunks). decode: (block_table [tokens, max_blocks], context_lens
        [tokens], out [tokens, H * D] bfloat16, scale) when every token is its sequence's one
        decode token, which ``rope_attend`` needs."""
        rows = normed.shape[0]
        if normed.dtype != torch.bfloat16 or activated.dtype != torch.bfloat16:
            raise ValueError("the layer kernels take bfloat16 activations")
        if not (normed.is_contiguous() and activated.is_contiguous()) or activated.shape[0] != rows or rows < tokens:
            raise ValueError("the step's buffers must be contiguous, with one row per matmul row")
        if k_pool.dtype != v_pool.dtype or k_pool.dtype not in POOL_DTYPES:
            raise ValueError(f"the layer kernels store into a bfloat16, float8_e5m2 or int8 pool, not {k_pool.dtype}")
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("the layer kernels need a contiguous pool")
        if positions.shape[0] != tokens or slots.shape[0] != tokens:
            raise ValueError("one position and one slot per token")
        num_layers, head_dim = v_pool.shape[0], 2 * cos.shape[1]
        num_kv_heads, block_size = pool_geometry(k_pool, v_pool, head_dim)
        self._code = kernels._code
        self._rms, self._silu = kernels._rms_norm, kernels._silu_mul
        self._rope, self._rope_decode = kernels._rope_store, kernels._rope_store_decode
        self._normed, self._activated = normed, activated
        hidden, inter = normed.shape[1], activated.shape[1]
        self._norm = (normed.data_ptr(), rows, hidden, eps)
        self._silu_args = (activated.data_ptr(), rows, inter)
        # Contiguous pools: a layer's bytes are its stride.
        k_layer, v_layer = k_pool.stride(0) * k_pool.element_size(), v_pool.stride(0) * v_pool.element_size()
        self._pools = _layer_pools(k_pool.data_ptr(), v_pool.data_ptr(), num_layers, k_layer, v_layer)
        # Per layer, every argument after qkv's address: its row stride ... the pool's block size.
        self._shape = (tokens, num_heads, num_kv_heads, head_dim, block_size)
        tables = (positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), FORMAT_CODES[k_pool.dtype])
        self._head = ((num_heads + 2 * num_kv_heads) * head_dim, *tables)
        self._attn: torch.Tensor | None = None
        self._tables: tuple[int, ...] = ()
        # Only the arguments the step's kind calls for: a decode step's rope_attend (rope_store's
        # are then built if it is called after all), or rope_store's.
        self._layers: list[tuple[int, ...]] = []
        self._decode_layers: list[tuple[int | float, ...]] = []
        if decode is None:
            self._layers = self._store_layers()
        else:
            table, context_lens, out, scale = decode
            if table.shape[0] != tokens or context_lens.shape[0] != tokens or not table.is_contiguous():
                raise ValueError("decode needs one contiguous block table row and context length per token")
            if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.shape != (tokens, num_heads * head_dim):
                raise ValueError("the decode output must be contiguous bfloat16 [tokens, H * D]")
            self._attn = out
            attention = (table.data_ptr(), table.shape[1], context_lens.data_ptr(), out.data_ptr(), scale)
            self._tables = (positions.data_ptr(), slots.data_ptr(), *attention[:3])
            head, shape = self._head, self._shape
            self._decode_layers = [(*head, k, v, *shape, *attention) for k, v in self._pools]

    def _store_layers(self) -> list[tuple[int, ...]]:
        """rope_store's arguments after qkv's address, per layer."""
        head, shape = self._head, self._shape
        self._layers = [(*head, k, v, *shape) for k, v in self._pools]
        return self._layers

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x [rows, hidden] with weight [hidden] into the step's normed buffer, returned."""
        out, rows, hidden, eps = self._norm
        self._rms(self._code, x.data_ptr(), hidden, weight.data_ptr(), out, rows, hidden, eps)
        return self._normed

    def rope_store(self, layer: int, qkv: torch.Tensor) -> None:
        """Rotate q and k in place in qkv [>= tokens, (H + 2 KV) * D] and store the tokens' k and v
        in the pool of that layer."""
        self._rope(self._code, qkv.data_ptr(), *(self._layers or self._store_layers())[layer])

    def rope_attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """``rope_store``, then every token's decode attention over the layer's pool, into the
        decode output buffer [tokens, H * D], returned. Only for a step built with ``decode``."""
        if self._attn is None:
            raise RuntimeError("this step was not built for decode attention")
        status = self._rope_decode(self._code, qkv.data_ptr(), *self._decode_layers[layer])
        if status != 0:
            raise RuntimeError(f"native rope + decode attention failed with status {status}")
        return self._attn

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of gate_up [rows, 2 * intermediate] into the step's activated buffer, returned."""
        out, rows, inter = self._silu_args
        self._silu(self._code, gate_up.data_ptr(), out, rows, inter)
        return self._activated

    # ---- step_program.DecodeProgram's records: these calls as data, for one native loop ----

    @property
    def step_values(self) -> tuple[int, ...]:
        """The values of STEP_COLUMNS in this step's rope_attend records."""
        return self._tables

    def norm_record(self, x: int, weight: torch.Tensor) -> list[int]:
        """``norm`` of the rows at address x as a step_program record (OP_RMS_NORM)."""
        out, rows, hidden, eps = self._norm
        fn = ctypes.cast(self._rms, ctypes.c_void_p).value or 0
        return [0, fn, self._code, x, hidden, weight.data_ptr(), out, rows, hidden, _f32_bits(eps)]

    def rope_attend_record(self, layer: int, qkv: int) -> list[int]:
        """``rope_attend`` of the qkv rows at address qkv as a step_program record (OP_ROPE_DECODE)."""
        if self._attn is None:
            raise RuntimeError("this step was not built for decode attention")
        *args, scale = self._decode_layers[layer]
        fn = ctypes.cast(self._rope_decode, ctypes.c_void_p).value or 0
        return [2, fn, self._code, qkv, *(int(a) for a in args), _f32_bits(float(scale))]


def _f32_bits(value: float) -> int:
    """A float argument as step_program.c reads it: its float32 bits."""
    return int(struct.unpack("<I", struct.pack("<f", value))[0])
