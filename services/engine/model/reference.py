"""Plain-torch reference ops: the torch path of the forward pass, and what the native kernels are checked against.

Nothing here imports the rest of the model package, so everything may import it
(the import graph is reference <- native <- plan <- attention / llama <- runner).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] (may be a strided view), rotated by halves as in HF's rotate_half."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32 and scale in the model dtype, as transformers does."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * inter], gate and up side by side -> silu(gate) * up: [T, inter]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k_dim_major: bool,
) -> torch.Tensor:
    """Slow, obvious decode attention, one sequence at a time (for checks).

    q: [B, H, D]; v_cache: [blocks, KV, block_size, D], k_cache the same or
    dim-major [blocks, KV, D, block_size]; block_table: [B, max_blocks];
    context_lens: [B]. Returns [B, H * D].
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = v_cache.shape[1], v_cache.shape[2]
    if k_dim_major:
        k_cache = k_cache.transpose(2, 3)
    out = []
    for b in range(batch):
        n = int(context_lens[b])
        blocks = block_table[b, : (n + block_size - 1) // block_size]
        keys = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :n].float()
        values = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :n].float()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=0)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=0)
        probs = torch.softmax((q[b].float()[:, None, :] @ keys.transpose(1, 2)) * scale, dim=-1)
        out.append((probs @ values).reshape(-1))
    return torch.stack(out).to(q.dtype)
