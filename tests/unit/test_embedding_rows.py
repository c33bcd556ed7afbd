"""QuantizedMatrix.dequantize_rows (the GGUF embedding lookup) against the straightforward
computation it replaced: whole panels gathered, scales and quants picked out per lane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine.model.quantized import BLOCK, FORMATS, PANEL_ROWS, QuantizedMatrix


def reference_rows(matrix: QuantizedMatrix, ids: torch.Tensor) -> torch.Tensor:
    """float32 [len(ids), cols]: the previous dequantize_rows, op for op."""
    panel, lane = ids // PANEL_ROWS, ids % PANEL_ROWS
    data = matrix.data.index_select(0, panel)  # [n, nb, bytes]
    count, nb = ids.shape[0], matrix.blocks
    at = torch.arange(count)
    d = data[..., 0:32].contiguous().view(torch.float16).float()[at, :, lane]  # [n, nb]
    offset = 64 if matrix.kind == "Q4_1" else 32
    if matrix.kind == "Q8_0":
        quants = data[..., offset:].reshape(count, nb, 8, PANEL_ROWS, 4)[at, :, :, lane]  # [n, nb, 8, 4]
        values = quants.reshape(count, nb, BLOCK).view(torch.int8).float()
        return (values * d[..., None]).reshape(count, matrix.cols)
    quants = data[..., offset:].reshape(count, nb, 4, PANEL_ROWS, 4)[at, :, :, lane].reshape(count, nb, 16)
    values = torch.cat([quants & 0x0F, quants >> 4], dim=-1).float()
    if matrix.kind == "Q4_1":
        m = data[..., 32:64].contiguous().view(torch.float16).float()[at, :, lane]
        return (values * d[..., None] + m[..., None]).reshape(count, matrix.cols)
    return ((values - 8) * d[..., None]).reshape(count, matrix.cols)


def random_matrix(kind: str, rows: int, cols: int, seed: int = 0) -> QuantizedMatrix:
    """Random GGUF blocks: every quant byte value, finite float16 scales (of both signs, subnormals
    and zeros among them) and minimums."""
    rng = np.random.default_rng(seed)
    gguf_bytes, _ = FORMATS[kind]
    nb = cols // BLOCK
    blocks = rng.integers(0, 256, size=(rows, nb, gguf_bytes), dtype=np.uint8)
    scale_count = 2 if kind == "Q4_1" else 1
    scales = (rng.standard_normal((rows, nb, scale_count)) * 0.05).astype(np.float16)
    scales[0, 0, 0] = 0
    scales[1 % rows, 0, 0] = np.float16(3e-6)  # subnormal
    blocks[..., : 2 * scale_count] = scales.view(np.uint8).reshape(rows, nb, 2 * scale_count)
    return QuantizedMatrix.from_gguf_blocks(kind, blocks.reshape(rows, nb * gguf_bytes), cols)


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize(("rows", "cols"), [(37, 96), (64, 32), (200, 576)])
def test_rows_are_exactly_the_reference(kind: str, rows: int, cols: int) -> None:
    matrix = random_matrix(kind, rows, cols)
    every = torch.arange(rows)
    assert torch.equal(matrix.dequantize_rows(every), reference_rows(matrix, every))
    ids = torch.tensor([rows - 1, 0, 17, 17, 5, 16, 15])
    got = matrix.dequantize_rows(ids)
    assert got.dtype == torch.float32 and got.shape == (7, cols) and got.is_contiguous()
    assert torch.equal(got, reference_rows(matrix, ids))
    # Tail rows past the matrix's end (inside its last panel) are zero, as before.
    padded = (rows + PANEL_ROWS - 1) // PANEL_ROWS * PANEL_ROWS
    if padded > rows:
        tail = torch.tensor([padded - 1])
        assert torch.equal(matrix.dequantize_rows(tail), reference_rows(matrix, tail))


@pytest.mark.parametrize("kind", list(FORMATS))
def test_any_index_dtype_and_batch_and_the_whole_matrix(kind: str) -> None:
    matrix = random_matrix(kind, 100, 64, seed=3)
    ids = torch.tensor([99, 3, 50, 64, 1])
    want = reference_rows(matrix, ids)
    assert torch.equal(matrix.dequantize_rows(ids.int()), want)
    assert torch.equal(matrix.dequantize_rows(ids[:1]), want[:1])
    assert matrix.dequantize_rows(ids[:0]).shape == (0, 64)
    whole = reference_rows(matrix, torch.arange(100))
    assert torch.equal(matrix.dequantize(), whole)


def test_nan_and_infinite_scales_pass_through_as_before() -> None:
    matrix = random_matrix("Q4_1", 16, 32, seed=1)
    data = matrix.data.clone()
    data[0, 0, 0:2] = torch.tensor([np.inf], dtype=torch.float16).view(torch.uint8)  # row 0's d
    data[0, 0, 34:36] = torch.tensor([np.nan], dtype=torch.float16).view(torch.uint8)  # row 1's m
    odd = QuantizedMatrix("Q4_1", 16, 32, data)
    ids = torch.arange(16)
    torch.testing.assert_close(odd.dequantize_rows(ids), reference_rows(odd, ids), equal_nan=True, rtol=0, atol=0)
