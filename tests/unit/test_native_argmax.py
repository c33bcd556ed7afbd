"""The native argmax (csrc/layers.c: argmax_f32), the sampler's greedy pick, against torch on every path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from services.engine.core.engine_core import _native_argmax
from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import PATH_FLAGS, PATHS, NativeKernels, load_native_kernels


@pytest.fixture(scope="module", params=PATHS)
def kernel(request: pytest.FixtureRequest) -> NativeKernels:
    """The kernels bound to each code path; a path this CPU cannot run, or no compiler, is skipped."""
    loaded = load_native_kernels("auto")
    if loaded is None:
        pytest.skip("no native kernels on this machine (no C compiler)")
    path: str = request.param
    if path not in loaded.runnable_paths():
        missing = [flag for flag in PATH_FLAGS[path] if flag not in CpuFeatures.detect().flags]
        pytest.skip(f"the {path} kernels need {' '.join(missing or PATH_FLAGS[path])}, which this CPU lacks")
    return loaded.with_path(path)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """The kernel splits a row between threads when there are fewer rows than threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_pick(logits: torch.Tensor) -> list[int]:
    return logits.max(dim=-1).indices.tolist()


# Widths around the vector paths' blocks (8, 16, 32, 64 lanes), the engine's vocabulary, one
# not a multiple of any width, and rows long enough to be split between threads.
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 63, 64, 65, 200, 49_152, 49_157, 100_003])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_matches_torch_on_random_rows(kernel: NativeKernels, rows: int, cols: int, threads: int) -> None:
    logits = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + threads))
    with torch_threads(threads):
        got = kernel.argmax(logits)
    assert got.dtype == torch.int64
    assert got.tolist() == torch_pick(logits)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_ties_take_the_first_index_in_any_lane_and_span(kernel: NativeKernels, threads: int) -> None:
    """Equal highest values in different lanes, accumulators, vector blocks, the scalar tail and
    the spans a split row is cut into: the lowest index wins, as torch picks it."""
    cols = 70_001
    logits = torch.randn(6, cols, generator=torch.Generator().manual_seed(7))
    places = [[5, 3], [100, 37, 69_999], [69_999, 50_000], [40_000, 35_001], [1, 0], [64 + 17, 64 + 16 + 17]]
    for row, columns in enumerate(places):
        logits[row, columns] = 9.0
    logits[4] = 0.0  # all equal: index 0
    with torch_threads(threads):
        got = kernel.argmax(logits)
    assert got.tolist() == torch_pick(logits) == [3, 37, 50_000, 35_001, 0, 81]


@pytest.mark.parametrize("cols", [5, 40, 1000, 49_157])
@pytest.mark.parametrize("threads", [1, 2])
def test_infinities_and_nan_as_torch(kernel: NativeKernels, cols: int, threads: int) -> None:
    """-inf rows pick 0; +inf beats every finite value; the first NaN beats everything, whether in
    the vectors, the scalar tail or the first element."""
    logits = torch.randn(7, cols, generator=torch.Generator().manual_seed(cols))
    logits[0] = float("-inf")
    logits[1, cols // 2 :] = float("-inf")
    logits[2, [cols - 1, cols // 3]] = float("inf")
    logits[3, [cols - 1, cols // 2]] = float("nan")
    logits[4, 0] = float("nan")
    logits[5, cols - 1] = float("nan")  # in the scalar tail when cols is not a multiple of the width
    logits[6, cols // 4] = float("inf")
    logits[6, cols - 2] = float("nan")
    with torch_threads(threads):
        got = kernel.argmax(logits)
    assert got.tolist() == torch_pick(logits) == logits.argmax(dim=-1).tolist()


def test_strided_and_sliced_rows(kernel: NativeKernels) -> None:
    """A padded vocabulary is sliced off (rows strided), and a row subset is taken."""
    full = torch.randn(9, 1030, generator=torch.Generator().manual_seed(3))
    full[:, 1024:] = 100.0  # the padding columns: never picked once sliced off
    sliced = full[:, :1024]
    assert kernel.argmax(sliced).tolist() == torch_pick(sliced)
    assert kernel.argmax(full[::2, :1024]).tolist() == torch_pick(full[::2, :1024])
    transposed = torch.randn(300, 4).t()  # columns not contiguous: copied first
    assert kernel.argmax(transposed).tolist() == torch_pick(transposed)


def test_empty_batch_and_refusals(kernel: NativeKernels) -> None:
    assert kernel.argmax(torch.empty(0, 10)).tolist() == []
    with pytest.raises(ValueError, match="float32"):
        kernel.argmax(torch.zeros(2, 10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-d"):
        kernel.argmax(torch.zeros(10))
    with pytest.raises(ValueError, match="columns"):
        kernel.argmax(torch.zeros(2, 0))


class _Plan:
    def __init__(self, native: NativeKernels | None) -> None:
        self.native = native


class _Runner:
    def __init__(self, native: NativeKernels | None) -> None:
        self.plan = _Plan(native)

    def forward(self, batch: object) -> torch.Tensor:
        raise NotImplementedError


def test_engine_core_takes_the_runners_native_argmax_only_when_it_has_one(kernel: NativeKernels) -> None:
    picked = _native_argmax(_Runner(kernel))
    assert picked is not None
    logits = torch.randn(4, 300)
    assert picked(logits).tolist() == torch_pick(logits)
    assert _native_argmax(_Runner(None)) is None
    assert _native_argmax(object()) is None  # type: ignore[arg-type]
