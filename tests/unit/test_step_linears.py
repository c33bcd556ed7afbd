"""layer_step.StepLinears (the step's GGUF linears bound once) against the QuantizedLinear calls
it replaces in LlamaModel.forward: the same kernel call with the same arguments, so bit for bit,
on every step shape of test_forward_workspace (AMX float rows, int8 rows under 16, padding)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.engine.model.linear import QuantizedLinear
from services.engine.model.quant_kernels import ActivationScratch
from services.engine.model.step_linears import StepLinears, linear_weights
from tests.unit.test_forward_workspace import (
    Q4_1,
    _batch,
    _runner,
    _sequences,
    _steps,
    forward,
)
from tests.unit.test_gguf_weights import TYPES, write_model

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def q4_1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf-q4_1-bound")
    write_model(path, Q4_1)
    return path


@pytest.mark.parametrize("padding", [0, 3])
def test_bound_linears_forward_equals_the_unbound_forward(q4_1_dir: Path, padding: int) -> None:
    """Every step's logits and the KV pool, bit for bit, with and without the bound table."""
    ours, theirs = _runner(q4_1_dir), _runner(q4_1_dir)
    assert ours.model._bound_weights is not None
    theirs.model._bound_weights = None
    steps = list(_steps(_sequences(64, 24, random.Random(9))))
    # The 64 decodes again, twice (the same K/V rewritten): the same rows and buffers, so the
    # second reuses the first's binding.
    steps += [steps[-2], steps[-2]]
    bindings = []
    for step in steps:
        batch = _batch(step)
        with torch.inference_mode():
            assert torch.equal(forward(ours, batch, padding), forward(theirs, batch, padding))
        bindings.append(ours.model._last_linears)
    assert bindings[-1] is bindings[-2] and bindings[-2] is not bindings[-3]
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))


@pytest.mark.parametrize("padding", [0, 3])
def test_the_fused_swiglu_forward_equals_gate_up_then_silu_mul(
    q4_1_dir: Path, padding: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SwiGLU in gate_up's epilogue (StepLinears.swiglu) against the bound gate_up then LayerStep's
    silu_mul: every step's logits and the KV pool bit for bit (int8 rows under 16, AMX-BF16 from 16)."""
    ours, theirs = _runner(q4_1_dir), _runner(q4_1_dir)
    steps = list(_steps(_sequences(64, 24, random.Random(10))))
    for step in steps:
        batch = _batch(step)
        with torch.inference_mode():
            monkeypatch.setattr(type(theirs.model), "fuse_swiglu", False)
            want = forward(theirs, batch, padding)
            assert theirs.model._last_linears is not None and not theirs.model._last_linears[1].fused_swiglu
            monkeypatch.setattr(type(ours.model), "fuse_swiglu", True)
            got = forward(ours, batch, padding)
            assert ours.model._last_linears is not None and ours.model._last_linears[1].fused_swiglu
        assert torch.equal(got, want)
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_each_bound_linear_equals_its_quantized_linear(q4_1_dir: Path, rows: int) -> None:
    """qkv, o (+ residual), gate_up, down (+ residual) of one layer: the values QuantizedLinear writes."""
    model = _runner(q4_1_dir).model
    layer = model.layers[1]
    linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
    assert all(isinstance(m, QuantizedLinear) for m in linears)
    gen = torch.Generator().manual_seed(rows)
    xs = [torch.randn(rows, m.in_features, generator=gen).to(torch.bfloat16) for m in linears]
    residual = torch.randn(rows, layer.o.out_features, generator=gen).to(torch.bfloat16)
    outs = tuple(torch.full((rows, m.out_features), float("nan"), dtype=torch.bfloat16) for m in linears)
    qkv_out, o_out, gate_up_out, down_out = outs
    table = [tuple(linear_weights(m) for m in linears)]  # type: ignore[arg-type]
    kernels = layer.qkv.kernels  # type: ignore[union-attr]
    bound = StepLinears(kernels, table, ActivationScratch(), rows=rows, outs=(qkv_out, o_out, gate_up_out, down_out))  # type: ignore[arg-type]
    assert bound.qkv(0, xs[0]) is qkv_out and torch.equal(qkv_out, layer.qkv(xs[0]))
    assert bound.o(0, xs[1], residual) is o_out and torch.equal(o_out, layer.o.add_to(residual, xs[1]))
    assert bound.gate_up(0, xs[2]) is gate_up_out and torch.equal(gate_up_out, layer.gate_up(xs[2]))
    assert bound.down(0, xs[3], residual) is down_out and torch.equal(down_out, layer.down.add_to(residual, xs[3]))


def test_a_model_with_a_float_linear_is_not_bound(tmp_path: Path) -> None:
    """A float q/k/v beside the GGUF blocks: no table, the forward calls each linear."""
    write_model(tmp_path, TYPES)
    assert _runner(tmp_path).model._bound_weights is None


def test_bound_linears_refuse_buffers_of_other_rows() -> None:
    with pytest.raises(ValueError, match="step's rows"):
        StepLinears(
            None,  # type: ignore[arg-type]
            [],
            ActivationScratch(),
            rows=4,
            outs=tuple(torch.empty(3, 8, dtype=torch.bfloat16) for _ in range(4)),  # type: ignore[arg-type]
        )
