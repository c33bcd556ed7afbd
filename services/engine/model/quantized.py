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

from dataclasses import dataclass, field

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
    # dequantize_rows' views of data (_lane_views), made once: building them is a few microseconds,
    # a visible share of a step's embedding lookup.
    _lanes: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lanes", _lane_views(self.kind, self.data))

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
        """float32 [len(ids), cols]: the given rows (ids: [n] integers), dequantized (embedding lookups, tests).

        Exactly GGUF's dequantization, in float32, in few torch ops (at a step's few rows their
        overhead is the cost): one strided gather of the rows' scales and one of their quants
        (``_lane_views``, kept in ``_lanes``), each reading only the rows' own bytes, then widening
        and scaling. (It gathered the rows' whole 16-row panels before, and picked them apart in ~15 ops.)"""
        scale_view, quant_view = self._lanes
        count = ids.shape[0]
        # Row 16p + r is lane r of panel p; [p, :, :, r] through both views (aten's index: no Python
        # indexing parse per call): [n, nb, 1 or 2] float16 scales (d, or d and m), [n, nb, words] quants.
        at = [ids >> 4, None, None, ids & (PANEL_ROWS - 1)]
        scales: torch.Tensor = _index(scale_view, at).view(torch.float16)
        quants: torch.Tensor = _index(quant_view, at).view(
            torch.int8 if self.kind == "Q8_0" else torch.uint8
        )  # [n, nb, 32 or 16]
        if self.kind == "Q8_0":
            return (quants.float() * scales).view(count, self.cols)
        # GGUF's byte i holds column i (low nibble) and 16 + i (high nibble).
        values = torch.cat([quants & 0x0F, quants >> 4], dim=-1).float()  # [n, nb, 32]
        if self.kind == "Q4_0":
            values.sub_(8)
        out = values * scales[..., 0:1]  # float32: the float16 d widens exactly
        if self.kind == "Q4_1":
            out.add_(scales[..., 1:2])
        return out.view(count, self.cols)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]."""
        return self.dequantize_rows(torch.arange(self.rows, device=self.data.device))


_index = torch.ops.aten.index.Tensor


def _lane_views(kind: str, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """data: a QuantizedMatrix's uint8 [panels, nb, panel block bytes]. Views of it with a row's lane
    as the last dimension: int16 [panels, nb, 1 or 2, 16] (d, and Q4_1's m: half r of each 16) and
    int32 [panels, nb, chunks, 16] (quants: word r of each 64-byte chunk holds lane r's 4 bytes of
    the chunk, in GGUF's order)."""
    scale_count = 2 if kind == "Q4_1" else 1
    chunks = 8 if kind == "Q8_0" else 4
    panels, nb = data.shape[0], data.shape[1]
    halves = data.view(torch.int16)[:, :, : scale_count * PANEL_ROWS]
    words = data.view(torch.int32)[:, :, scale_count * PANEL_ROWS // 2 :]
    return halves.view(panels, nb, scale_count, PANEL_ROWS), words.view(panels, nb, chunks, PANEL_ROWS)


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
