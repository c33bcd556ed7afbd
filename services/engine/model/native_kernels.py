"""The ctypes front of the compiled kernels (native.py loads them): one method per kernel,
each checking the layout it needs, and the bf16 weight packing of the bf16 linear."""

from __future__ import annotations

import ctypes

import torch

from services.engine.model.kv_cache import int8_pool_geometry
from services.engine.model.native_build import PATHS, _declare

# bf16_linear.c: output rows per weight panel.
PANEL = 16


_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weight [n, k] -> the panels bf16_linear reads: [ceil(n / 16), k, 8, 2], element
    [p, j, i, half] = weight[16 p + 8 half + i, j] (zero rows past n)."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.nn.functional.pad(weight.to(torch.bfloat16), (0, 0, 0, panels * PANEL - n))
    return padded.view(panels, 2, PANEL // 2, k).permute(0, 3, 2, 1).contiguous()


class NativeKernels:
    """ctypes front of the compiled kernels, bound to one path (``PATHS``). Tensors
    must live on the CPU; each method states the layout it needs."""

    def __init__(self, library: ctypes.CDLL, path: str = "portable") -> None:
        if path not in PATHS:
            raise ValueError(f"unknown kernel path {path!r}; expected one of {', '.join(PATHS)}")
        self._library = library
        self.path = path
        self._code = PATHS.index(path)
        self._paths = _declare(library.native_paths, _C)
        self._attention = _declare(
            library.paged_decode_attention, _C, _C, _C, _C, _P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _F
        )
        self._rms_norm = _declare(library.rms_norm_bf16, None, _C, _P, _I, _P, _P, _I, _I, _F)
        # path, qkv, its row stride, positions, cos, sin, slots, the pool's format, k, v, then the shape.
        rope = (_C, _P, _I, _P, _P, _P, _P, _C, _P, _P, _I, _I, _I, _I, _I)
        self._rope_store = _declare(library.rope_store_bf16, None, *rope)
        # ... then block tables, their width, context lengths, out, scale.
        self._rope_store_decode = _declare(library.rope_store_decode_bf16, _C, *rope, _P, _I, _P, _P, _F)
        self._silu_mul = _declare(library.silu_mul_bf16, None, _C, _P, _P, _I, _I)
        self._linear = _declare(library.bf16_linear, _C, _C, _P, _I, _C, _I, _I, _P, _I, _P, _P, _I, _P, _I, _C, _P)
        self._unpack = _declare(library.bf16_unpack_f32, None, _C, _P, _I, _I, _P)
        self._argmax = _declare(library.argmax_f32, _C, _C, _P, _I, _I, _I, _P)
        # step_program.c: records, their count, the failed call's status -> 0 or 1 + its index.
        self.run_step_program = _declare(library.run_step_program, _I, _P, _I, _P)
        self._scratch = torch.empty(0, dtype=torch.float32)

    def runnable_paths(self) -> tuple[str, ...]:
        """The paths this machine can run (cpuid, as the C runtime sees it)."""
        bits = self._paths()
        return tuple(path for index, path in enumerate(PATHS) if bits >> index & 1)

    def with_path(self, path: str) -> NativeKernels:
        """The same library bound to another path; raises if this CPU cannot run it."""
        if path not in self.runnable_paths():
            raise RuntimeError(f"this CPU cannot run the {path} kernels (it runs {', '.join(self.runnable_paths())})")
        return NativeKernels(self._library, path)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """bfloat16 x: [T, dim] (rows may be strided), weight: [dim] -> [T, dim]."""
        rows, dim = x.shape
        if x.stride(1) != 1:
            raise ValueError("rms_norm needs contiguous rows")
        out = torch.empty(rows, dim, dtype=x.dtype)
        self._rms_norm(self._code, x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps)
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
    ) -> None:
        """Rotate q and k in place in bfloat16 qkv [T, (H + 2 KV) * D] (contiguous), and
        store k, v at slots [T] in the caches (k [blocks, KV, D, block_size],
        v [blocks, KV, block_size, D]; both bfloat16 or both float8_e5m2, rounded from
        the rotated bf16 k; or both int8 chunks [blocks, KV, (D + 4) * block_size], quantized
        as kv_cache.quantize_int8). positions, slots: int64 [T]; cos, sin: float32 [max_positions, D / 2]."""
        if not qkv.is_contiguous():
            raise ValueError("rope_store needs a contiguous qkv tensor")
        if k_cache.dtype != v_cache.dtype or k_cache.dtype not in POOL_DTYPES:
            raise ValueError(f"rope_store stores into a bfloat16, float8_e5m2 or int8 pool, not {k_cache.dtype}")
        head_dim = 2 * cos.shape[1]
        num_kv_heads, block_size = pool_geometry(k_cache, v_cache, head_dim)
        self._rope_store(
            self._code,
            qkv.data_ptr(),
            qkv.stride(0),
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            FORMAT_CODES[k_cache.dtype],
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            qkv.shape[0],
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
        )

    def rope_store_decode(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``rope_store`` and then ``decode`` in one call, for a step in which token t is sequence
        t's one new token: arguments as theirs (block_table [T, max_blocks], context_lens [T]);
        returns the attention output [T, H * D] bfloat16. The caller's q is the rotated qkv rows."""
        tokens = qkv.shape[0]
        if not (qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("rope_store_decode needs a contiguous qkv tensor and pool")
        if qkv.dtype != torch.bfloat16 or k_cache.dtype != v_cache.dtype or k_cache.dtype not in POOL_DTYPES:
            raise ValueError(
                f"rope_store_decode takes bfloat16 qkv and a bfloat16, float8_e5m2 or int8 pool, not {k_cache.dtype}"
            )
        head_dim = 2 * cos.shape[1]
        num_kv_heads, block_size = pool_geometry(k_cache, v_cache, head_dim)
        if block_table.shape[0] != tokens or context_lens.shape[0] != tokens:
            raise ValueError("rope_store_decode needs one block table row and context length per token")
        out = qkv.new_empty(tokens, num_heads * head_dim)
        status = self._rope_store_decode(
            self._code,
            qkv.data_ptr(),
            qkv.stride(0),
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            FORMAT_CODES[k_cache.dtype],
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            tokens,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            block_table.data_ptr(),
            block_table.shape[1],
            context_lens.data_ptr(),
            out.data_ptr(),
            scale,
        )
        if status != 0:
            raise RuntimeError(f"native rope + decode attention ({self.path}) failed with status {status}")
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """bfloat16 gate_up: [T, 2 * inter] contiguous -> silu(gate) * up: [T, inter]."""
        rows, width = gate_up.shape
        if not gate_up.is_contiguous():
            raise ValueError("silu_mul needs a contiguous input")
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(self._code, gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, H, D] (rows may be strided, D contiguous); k_cache: [blocks, KV, D, block_size],
        v_cache: [blocks, KV, block_size, D], both contiguous, in q's dtype (float32 or
        bfloat16) or float8_e5m2 (the 8-bit KV cache), or both int8 chunks [blocks, KV,
        (D + 4) * block_size] (the int8 KV cache, kv_cache.py); block_table: [B, max_blocks]
        int64; context_lens: [B] int64. Returns [B, H * D] in q's dtype."""
        batch, num_heads, head_dim = q.shape
        if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("native attention needs contiguous head rows and a contiguous pool")
        if (
            q.dtype not in (torch.float32, torch.bfloat16)
            or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (q.dtype, torch.float8_e5m2, torch.int8)
        ):
            raise ValueError(
                f"native attention takes float32 or bfloat16 q with a pool in q's dtype, float8_e5m2 or int8, not "
                f"{q.dtype}/{k_cache.dtype}/{v_cache.dtype}"
            )
        num_kv_heads, block_size = pool_geometry(k_cache, v_cache, head_dim)
        out = q.new_empty(batch, num_heads * head_dim)
        status = self._attention(
            self._code,
            FORMAT_CODES[q.dtype],
            FORMAT_CODES[k_cache.dtype],
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_table.data_ptr(),
            block_table.shape[1],
            context_lens.data_ptr(),
            out.data_ptr(),
            batch,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
        )
        if status != 0:
            raise RuntimeError(
                f"native attention ({self.path}) failed (status {status}: head_dim or group too large, "
                "out of memory, or a path this CPU cannot run)"
            )
        return out

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual + bias + x @ weight.T on a weight packed by ``pack_bf16_weight``.
        x: [T, in] float32 or bfloat16 (rows may be strided); bias: float32 [out];
        residual: [T, out] in x's dtype. Returns [T, out] in x's dtype."""
        if x.dtype not in FORMAT_CODES:
            raise ValueError(f"the bf16 linear takes float32 or bfloat16 activations, not {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        tokens, cols = x.shape
        if cols != packed.shape[1]:
            raise ValueError(f"x has {cols} columns, the weight {packed.shape[1]}")
        if residual is not None and (residual.dtype != x.dtype or residual.stride(1) != 1):
            residual = residual.to(x.dtype).contiguous()
        bf16 = int(x.dtype == torch.bfloat16)
        if bf16 and self._scratch.numel() < tokens * cols:
            self._scratch = torch.empty(tokens * cols, dtype=torch.float32)
        out = torch.empty(tokens, out_features, dtype=x.dtype)
        status = self._linear(
            self._code,
            x.data_ptr(),
            x.stride(0),
            bf16,
            tokens,
            cols,
            packed.data_ptr(),
            out_features,
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            out.data_ptr(),
            out.stride(0),
            bf16,
            self._scratch.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"bf16 linear ({self.path}) failed with status {status}")
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits [S, V] (rows may be strided) -> int64 [S]: each row's first highest
        value, a NaN counting as the highest, as logits.max(dim=-1).indices. The sampler's greedy
        pick: 64 x 49152 read at memory speed, 0.6 ms at 2 threads where torch's max(dim) takes 2.0
        ms on logits that are not in cache, as the LM head leaves them (0.25 against 0.9 ms on
        cached ones; Intel Xeon SPR, avx512f/amx)."""
        if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
            raise ValueError(f"argmax takes 2-d float32 CPU logits, not {logits.dtype} {tuple(logits.shape)}")
        rows, cols = logits.shape
        if cols < 1 or cols >= 1 << 31:
            raise ValueError(f"argmax takes 1 to 2^31 - 1 columns, not {cols}")
        if logits.stride(1) != 1 or (rows > 1 and logits.stride(0) < cols):
            logits = logits.contiguous()
        out = torch.empty(rows, dtype=torch.int64)
        if rows and self._argmax(self._code, logits.data_ptr(), logits.stride(0), rows, cols, out.data_ptr()) != 0:
            raise RuntimeError(f"native argmax ({self.path}) refused a [{rows}, {cols}] input")
        return out

    def unpack_into(self, packed: torch.Tensor, out_features: int, out: torch.Tensor) -> torch.Tensor:
        """The packed weight as float32 [out_features, in] written into out (contiguous, at least that big)."""
        cols = packed.shape[1]
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < out_features * cols:
            raise ValueError("unpack_into needs a contiguous float32 buffer of the weight's size")
        self._unpack(self._code, packed.data_ptr(), out_features, cols, out.data_ptr())
        return out.view(-1)[: out_features * cols].view(out_features, cols)


# simd.h: FMT_*, and paged_attention.h's FMT_I8 (int8 values with scales in the pool, kv_cache.py).
FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e5m2: 2, torch.int8: 3}
# What the RoPE kernels store into.
POOL_DTYPES = (torch.bfloat16, torch.float8_e5m2, torch.int8)


def pool_geometry(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> tuple[int, int]:
    """(num_kv_heads, block_size) of one layer's pool (or, with a leading layers dimension,
    every layer's), checking that K and V match: [..., blocks, KV, D, block_size] and
    [..., blocks, KV, block_size, D], or int8 chunks [..., blocks, KV, (D + 4) * block_size] both."""
    if v_cache.dtype == torch.int8:
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"int8 K and V pools differ: {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        return v_cache.shape[-2], int8_pool_geometry(v_cache.shape[-1], head_dim)
    *_, num_kv_heads, block_size, dim = v_cache.shape
    if dim != head_dim or k_cache.shape[-3:] != (num_kv_heads, head_dim, block_size):
        raise ValueError(
            f"a pool of K {tuple(k_cache.shape)}, V {tuple(v_cache.shape)} does not hold head_dim {head_dim}"
        )
    return num_kv_heads, block_size
