"""GGUF Q4_0 / Q4_1 / Q8_0 weights kept in block form, and the plain-torch reference on them.

A GGUF block holds 32 consecutive weights of one row: a float16 scale ``d``
(Q4_1 also a float16 minimum ``m``) and 32 4-bit or 8-bit integers. A weight is
``d * (q - 8)`` (Q4_0), ``d * q + m`` (Q4_1) or ``d * q`` with q signed (Q8_0).

``QuantizedMatrix`` keeps exactly those bytes (no float copy), rearranged once at
load into panels of 16 rows so that one 64-byte vector holds 4 weights of each
of 16 rows, the operand of a VNNI dot product (csrc/qlinear.c): per panel and
block of 32 columns

    d[16] float16 | m[16] float16 (Q4_1 only) | quants

where the quants are, for Q4_0/Q4_1, 4 chunks c of 64 bytes whose byte 4r + j is
GGUF's byte 4c + j of row r (low nibble: column 4c + j, high nibble: column
16 + 4c + j), and for Q8_0, 8 chunks g of 64 bytes whose byte 4r + j is row r's
int8 at column 4g + j. Rows past the matrix's end are zero (scale 0).

Every format is ``d * u + m`` with u unsigned: Q4_0's m is -8d, Q8_0's is -128d
once its int8 is flipped to u8 (x ^ 0x80). The kernels compute
sum_k w[n, k] x[t, k] over a block as d * dx * sum(u * qx) + m * dx * sum(qx),
with x quantized to int8 per block of 32 (scale dx, as llama.cpp's Q8_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PANEL_ROWS = 16
BLOCK = 32
# GGUF type name -> (bytes per GGUF block, bytes per panel block)
FORMATS = {"Q4_0": (18, 32 + 256), "Q4_1": (20, 64 + 256), "Q8_0": (34, 32 + 512)}
KIND_CODES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


@dataclass(frozen=True, slots=True)
class QuantizedMatrix:
    """A [rows, cols] weight in GGUF blocks, rearranged into 16-row panels (see the module doc)."""

    kind: str  # "Q4_0", "Q4_1" or "Q8_0"
    rows: int
    cols: int
    data: torch.Tensor  # uint8 [panels, cols / 32, panel block bytes], contiguous

    @property
    def panels(self) -> int:
        return self.data.shape[0]

    @property
    def blocks(self) -> int:
        return self.cols // BLOCK

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @classmethod
    def from_gguf_blocks(cls, kind: str, blocks: np.ndarray, cols: int) -> QuantizedMatrix:
        """blocks: uint8 [rows, cols / 32 * GGUF block bytes], as GGUFReader gives a tensor's data."""
        if kind not in FORMATS:
            raise ValueError(f"unsupported block type {kind}; expected one of {', '.join(FORMATS)}")
        gguf_bytes, _ = FORMATS[kind]
        if cols % BLOCK:
            raise ValueError(f"{cols} columns are not a whole number of {BLOCK}-blocks")
        rows, nb = blocks.shape[0], cols // BLOCK
        if blocks.shape != (rows, nb * gguf_bytes) or blocks.dtype != np.uint8:
            raise ValueError(f"{kind} blocks for {cols} columns must be uint8 [rows, {nb * gguf_bytes}]")
        panels = -(-rows // PANEL_ROWS)
        padded = np.zeros((panels * PANEL_ROWS, nb, gguf_bytes), dtype=np.uint8)
        padded[:rows] = blocks.reshape(rows, nb, gguf_bytes)
        # [panels, nb, 16 rows, block bytes]: a panel's rows side by side, block by block.
        grouped = padded.reshape(panels, PANEL_ROWS, nb, gguf_bytes).transpose(0, 2, 1, 3)
        parts = [grouped[..., 0:2].reshape(panels, nb, 32)]  # d of the 16 rows
        if kind == "Q4_1":
            parts.append(grouped[..., 2:4].reshape(panels, nb, 32))  # m of the 16 rows
        quants = grouped[..., gguf_bytes - (16 if kind != "Q8_0" else 32) :]
        # [.., 16 rows, chunks, 4 bytes] -> [.., chunks, 16 rows, 4 bytes]: 4 bytes of every row per chunk.
        chunks = quants.reshape(panels, nb, PANEL_ROWS, -1, 4).transpose(0, 1, 3, 2, 4)
        parts.append(chunks.reshape(panels, nb, -1))
        data = np.ascontiguousarray(np.concatenate(parts, axis=-1))
        return cls(kind, rows, cols, torch.from_numpy(data))

    def to(self, device: torch.device) -> QuantizedMatrix:
        return QuantizedMatrix(self.kind, self.rows, self.cols, self.data.to(device))

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), cols]: the given rows, dequantized (embedding lookups, tests)."""
        panel, lane = ids // PANEL_ROWS, ids % PANEL_ROWS
        data = self.data.index_select(0, panel)  # [n, nb, bytes]
        count, nb = ids.shape[0], self.blocks
        at = torch.arange(count)
        d = data[..., 0:32].contiguous().view(torch.float16).float()[at, :, lane]  # [n, nb]
        offset = 64 if self.kind == "Q4_1" else 32
        if self.kind == "Q8_0":
            quants = data[..., offset:].reshape(count, nb, 8, PANEL_ROWS, 4)[at, :, :, lane]  # [n, nb, 8, 4]
            values = quants.reshape(count, nb, BLOCK).view(torch.int8).float()
            return (values * d[..., None]).reshape(count, self.cols)
        quants = data[..., offset:].reshape(count, nb, 4, PANEL_ROWS, 4)[at, :, :, lane].reshape(count, nb, 16)
        values = torch.cat([quants & 0x0F, quants >> 4], dim=-1).float()  # columns 0..15, then 16..31
        if self.kind == "Q4_1":
            m = data[..., 32:64].contiguous().view(torch.float16).float()[at, :, lane]
            return (values * d[..., None] + m[..., None]).reshape(count, self.cols)
        return ((values - 8) * d[..., None]).reshape(count, self.cols)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]."""
        return self.dequantize_rows(torch.arange(self.rows))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> int8 values [T, K] and scales dx [T, K / 32], per block of 32, as the kernels do.

    dx = max|x| / 127 over the block, q = round(x / dx) (to nearest even), in float32."""
    rows, cols = x.shape
    blocks = x.float().reshape(rows, cols // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = torch.round(blocks * inverse[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(rows, cols), scale


def reference_linear(
    x: torch.Tensor, weight: QuantizedMatrix, variant: str = "int8", bf16_weights: bool = False
) -> torch.Tensor:
    """float64 [T, rows]: what the kernels compute without rounding of sums: with int8 activations per
    block (variant "int8"), or with the float activations as given ("float"; bf16_weights: on the
    weights rounded to bfloat16, as the AMX-BF16 tiles compute)."""
    if variant == "float":
        dequantized = weight.dequantize()
        if bf16_weights:
            dequantized = dequantized.bfloat16()
        return x.double() @ dequantized.double().T
    q, scale = quantize_activations(x)
    xq = (q.double().reshape(x.shape[0], -1, BLOCK) * scale.double()[..., None]).reshape(x.shape)
    return xq @ weight.dequantize().double().T
