"""Per-channel int8 weights for a safetensors model (SCALELLM_QUANTIZATION=int8), quantized at load.

Every linear matrix, the embedding and the LM head (once when tied) become int8
with one symmetric scale per output channel (row): d = max|w| / 127, q =
round(w / d). They are stored as the Q8_0 panels of quantized.py with each row's
scale repeated in all of its 32-column blocks, so the GGUF block kernel
(csrc/qlinear.c) computes on them unchanged: Q8_0 is ``d * u + m`` with a scale
per block, and a row whose blocks share one scale is per-channel int8. The
repetition costs 2 bytes per 32 weights (6%) over a scale per row.

The scale is stored in float16 (the panel's format). It is rounded up, never
down, so that max|w| / d <= 127 and no weight is clipped: every weight is within
d / 2 of its int8 value. Matrices whose columns are not a whole number of
32-blocks stay float, and the report says so.

Each matrix is quantized from the checkpoint's own values (float32 for the default
model, whatever SCALELLM_DTYPE is) as it is read, a slice of rows at a time, and
its float copy is dropped at once; the norms and biases are copied off the
checkpoint's memory map, so that the map is closed too: only the panels stay
resident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.engine.model.config import ModelConfig
from services.engine.model.llama import ModelWeights
from services.engine.model.loader import WeightsError, load_weights
from services.engine.model.quantized import BLOCK, PANEL_ROWS, QuantizedMatrix

# Rows quantized at a time: bounds the float32 temporaries to a few MB whatever the matrix.
CHUNK_ROWS = 256 * PANEL_ROWS
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(slots=True)
class Int8Report:
    """What was quantized (matrices, their float bytes in the checkpoint and their int8 bytes) and what stayed float."""

    quantized: int = 0
    float_bytes: int = 0
    int8_bytes: int = 0
    kept_float: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"quantized to int8 per output channel: {self.quantized} matrices "
            f"({self.float_bytes / 2**20:.1f} MiB in the checkpoint -> {self.int8_bytes / 2**20:.1f} MiB)"
        )
        if self.kept_float:
            text += f"; kept float: {'; '.join(self.kept_float)}"
        return text


def row_scales(weight: torch.Tensor) -> np.ndarray:
    """float16 [rows]: per row the smallest float16 d with max|w| / d <= 127 (0 for an all-zero row)."""
    amax = weight.float().abs().amax(dim=1).numpy()
    if not np.isfinite(amax).all():
        raise WeightsError("a weight matrix holds inf or NaN; it cannot be quantized to int8")
    if (amax / 127 > _FLOAT16_MAX).any():
        raise WeightsError(f"a weight row exceeds {_FLOAT16_MAX * 127:.3g}: its int8 scale overflows float16")
    scales = (amax / 127).astype(np.float16)
    # Rounded to nearest, a scale can fall below max|w| / 127 and clip the row's largest weight.
    low = scales.astype(np.float32) * 127 < amax
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    return scales


def _q8_0_blocks(weight: torch.Tensor) -> np.ndarray:
    """uint8 [rows, cols / 32 * 34]: GGUF Q8_0 blocks (float16 d, 32 int8) with d the row's scale."""
    rows, cols = weight.shape
    scales = row_scales(weight)
    d = scales.astype(np.float32)[:, None]
    inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(weight.float().numpy() * inverse), -127, 127).astype(np.int8)
    nb = cols // BLOCK
    blocks = np.empty((rows, nb, 2 + BLOCK), dtype=np.uint8)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, 1, 2)
    blocks[..., 2:] = q.view(np.uint8).reshape(rows, nb, BLOCK)
    return blocks.reshape(rows, nb * (2 + BLOCK))


def quantize_per_channel(weight: torch.Tensor) -> QuantizedMatrix:
    """[rows, cols] float (cols a multiple of 32) -> int8 with one scale per row, in Q8_0 panels."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} columns are not a whole number of {BLOCK}-blocks")
    # Slices of whole panels: their panels, stacked, are the whole matrix's.
    parts = [
        QuantizedMatrix.from_gguf_blocks("Q8_0", _q8_0_blocks(weight[start : start + CHUNK_ROWS]), cols).data
        for start in range(0, rows, CHUNK_ROWS)
    ]
    return QuantizedMatrix("Q8_0", rows, cols, parts[0] if len(parts) == 1 else torch.cat(parts))


def load_int8_weights(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> tuple[ModelWeights, Int8Report]:
    """The safetensors weights with every matrix quantized (dtype: norms, biases and any matrix left float)."""
    if device.type != "cpu":
        raise WeightsError("int8 weights are computed on the CPU only")
    report = Int8Report()

    def matrix(label: str, weight: torch.Tensor) -> torch.Tensor | QuantizedMatrix:
        if weight.shape[1] % BLOCK:
            report.kept_float.append(f"{label}: {weight.shape[1]} columns, not a multiple of {BLOCK}")
            return weight.to(device=device, dtype=dtype).contiguous()
        quantized = quantize_per_channel(weight)
        report.quantized += 1
        report.float_bytes += weight.numel() * weight.element_size()
        report.int8_bytes += quantized.nbytes
        return quantized

    weights = _off_the_checkpoint(load_weights(model_dir, config, dtype, device, matrix=matrix))
    _return_freed_memory()
    return weights, report


def _off_the_checkpoint(weights: ModelWeights) -> ModelWeights:
    """The same weights with every tensor in memory of its own.

    safetensors hands out tensors backed by its memory map of the file, and a tensor
    already in the wanted dtype stays one: a single norm vector would keep the whole
    mapping, and every page of the checkpoint read while quantizing, resident."""

    def own(value: torch.Tensor | QuantizedMatrix) -> torch.Tensor | QuantizedMatrix:
        return value.clone() if isinstance(value, torch.Tensor) else value

    layers = [
        dataclasses.replace(
            layer,
            **{
                f.name: getattr(layer, f.name).clone()
                for f in dataclasses.fields(layer)
                if isinstance(getattr(layer, f.name), torch.Tensor)
            },
        )
        for layer in weights.layers
    ]
    embed = own(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else own(weights.lm_head)
    return ModelWeights(embed=embed, layers=layers, final_norm=weights.final_norm.clone(), lm_head=lm_head)


def _return_freed_memory() -> None:
    """Hand the freed float matrices' pages back to the OS.

    glibc keeps freed heap memory for reuse, and after the first large free it serves
    allocations of up to that size from the heap (its mmap threshold adapts), so the
    checkpoint's float copies would otherwise stay in the resident set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
