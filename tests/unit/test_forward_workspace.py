"""The forward's linears writing into its workspace (llama.py: the GGUF linears given output
buffers) and the LM head's float32 logits, against the forward as it was: a new tensor per
linear and bf16 logits widened afterwards. Same kernels on the same inputs, so bit for bit;
the float32 logits are the sums the bf16 logits were rounded from.

bf16 activations on GGUF blocks (the default config), on a small Llama GGUF written by
test_gguf_weights.write_model: Q4_1 everywhere, and mixed block types (a float q/k/v beside
Q4_0 / Q8_0 blocks); batch 1 and 64, prefills, a mixed prefill + decode step, padded rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine.model.batch import ForwardBatch
from services.engine.model.linear import QuantizedLinear
from services.engine.model.plan import choose_plan
from services.engine.model.quantized import QuantizedMatrix
from services.engine.model.runner import ModelRunner
from tests.unit.test_gguf_weights import TYPES, VOCAB, write_model

BLOCK = 4
NUM_BLOCKS = 400  # 64 sequences of 6 blocks
Q4_1 = {name: "Q4_1" for name in TYPES}

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["Q4_1", "mixed"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"gguf-{request.param}")
    write_model(path, Q4_1 if request.param == "Q4_1" else TYPES)
    return path


def _runner(path: Path) -> ModelRunner:
    plan = choose_plan("bfloat16", torch.device("cpu"), "auto", quantization="gguf", gguf_available=True)
    if plan.quantized is None or plan.native_layers is None:
        # Without the block kernel the runner would fall back to safetensors weights, which this folder lacks.
        pytest.skip("the GGUF or native layer kernels do not build here")
    runner = ModelRunner(
        path,
        dtype="bfloat16",
        device="cpu",
        block_size=BLOCK,
        num_blocks=NUM_BLOCKS,
        kv_cache_bytes=None,
        max_model_len=None,
        quantization="gguf",
        gguf_file=path / "tiny.gguf",
    )
    assert runner.plan.quantized is not None and runner.plan.native_layers is not None
    return runner


def forward(runner: ModelRunner, batch: ForwardBatch, padding: int) -> torch.Tensor:
    """runner.forward with `padding` extra matmul rows (the runner pads only float linears)."""
    return runner.model.forward(
        batch.input_ids,
        batch.positions,
        batch.slot_mapping,
        batch.logits_indices,
        runner.attention_metadata(batch),
        runner.kv_cache,
        padded_rows=batch.input_ids.shape[0] + padding,
    )


def fresh_forward(runner: ModelRunner, batch: ForwardBatch, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaModel.forward as it was before the workspace outputs: every linear returns a new
    tensor. Returns the final norm's output [S, hidden] and the LM head's bf16 logits [S, vocab]."""
    model = runner.model
    num_tokens = batch.input_ids.shape[0]
    embed = model.embed
    assert isinstance(embed, QuantizedMatrix)
    hidden = embed.dequantize_rows(F.pad(batch.input_ids, (0, padding))).to(model.dtype)
    meta = runner.attention_metadata(batch)  # alive for the step: the bound kernels hold its tensors' addresses
    norm, attend, silu_mul, _ = model._layer_ops(
        batch.positions, batch.slot_mapping, meta, runner.kv_cache, num_tokens, padding
    )
    for index, layer in enumerate(model.layers):
        qkv = layer.qkv(norm(hidden, layer.input_norm))
        hidden = layer.o.add_to(hidden, attend(index, qkv))
        gate_up = layer.gate_up(norm(hidden, layer.post_norm))
        hidden = layer.down.add_to(hidden, silu_mul(gate_up))
    normed = model.norm(hidden.index_select(0, batch.logits_indices), model.final_norm, runner.config.rms_norm_eps)
    return normed, model.lm_head(normed)


Seq = tuple[list[int], list[int]]  # tokens, blocks


def _batch(steps: list[tuple[Seq, int, int]]) -> ForwardBatch:
    """(sequence, cached, new) per sequence -> the step computing `new` tokens after `cached`."""
    ids, positions, slots, last = [], [], [], []
    for (tokens, blocks), cached, new in steps:
        for pos in range(cached, cached + new):
            ids.append(tokens[pos])
            positions.append(pos)
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
        last.append(len(ids) - 1)
    return ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_lens=[new for *_, new in steps],
        context_lens=[cached + new for _, cached, new in steps],
        block_tables=[blocks for (_, blocks), _, _ in steps],
        logits_indices=torch.tensor(last),
    )


def _sequences(count: int, length: int, rng: random.Random) -> list[Seq]:
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    blocks = -(-length // BLOCK)
    return [([rng.randrange(VOCAB) for _ in range(length)], [free.pop() for _ in range(blocks)]) for _ in range(count)]


def _steps(seqs: list[Seq]) -> Iterator[list[tuple[Seq, int, int]]]:
    """Sequence 0's prefill (20 rows: AMX tiles where they run), a mixed prefill + decode step,
    decodes of 3, the 61 others' prefills beside those 3 decodes, decodes of 64, then of 1."""
    cached = [0] * len(seqs)
    rest = range(3, len(seqs))
    plan = [
        [(0, 20)],
        [(0, 1), (1, 9), (2, 3)],
        [(0, 1), (1, 1), (2, 1)],
        [(0, 1), (1, 1), (2, 1), *((i, 12) for i in rest)],
        [(i, 1) for i in range(len(seqs))],
        [(2, 1)],
    ]
    for step in plan:
        yield [(seqs[i], cached[i], new) for i, new in step]
        for i, new in step:
            cached[i] += new


@pytest.mark.parametrize("padding", [0, 3])
def test_workspace_forward_equals_the_fresh_tensor_forward(model_dir: Path, padding: int) -> None:
    """Every step's float32 logits are the kernel's unrounded sums: rounded to bf16 they are the old
    forward's logits bit for bit, and both runners leave the same bytes in the KV pool."""
    ours, theirs = _runner(model_dir), _runner(model_dir)
    assert all(isinstance(layer.gate_up, QuantizedLinear) for layer in ours.model.layers)
    lm_head = ours.model.lm_head
    assert isinstance(lm_head, QuantizedLinear)
    for step in _steps(_sequences(64, 24, random.Random(7))):
        batch = _batch(step)
        with torch.inference_mode():
            got = forward(ours, batch, padding)
            normed, want = fresh_forward(theirs, batch, padding)
            # The LM head's float32 output as the old forward's rows would have had it.
            want_f32 = lm_head.kernels.linear(
                normed, lm_head.weight, out=torch.empty(normed.shape[0], VOCAB, dtype=torch.float32)
            )
        assert got.dtype == torch.float32 and got.shape == (len(step), VOCAB)
        assert torch.equal(got, want_f32)
        assert torch.equal(got.to(torch.bfloat16), want)
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))


def test_logits_kept_by_the_caller_survive_the_next_forward(model_dir: Path) -> None:
    """The engine samples a step's logits after its forward and may keep rows (prompt logprobs):
    each forward returns a new tensor, never a workspace view the next one overwrites."""
    runner = _runner(model_dir)
    seqs = _sequences(64, 24, random.Random(8))
    with torch.inference_mode():
        runner.forward(_batch([(seq, 0, 20) for seq in seqs]))
        first = runner.forward(_batch([(seq, 20, 1) for seq in seqs]))
        kept = first.clone()
        second = runner.forward(_batch([(seq, 21, 1) for seq in seqs]))
    assert torch.equal(first, kept)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert not torch.equal(first, second)  # the steps' tokens differ, so would their logits


def test_quantized_linear_writes_into_the_given_output(model_dir: Path) -> None:
    """out= holds the result (same values as a new tensor) and is what is returned."""
    runner = _runner(model_dir)
    layer = runner.model.layers[0]
    assert isinstance(layer.gate_up, QuantizedLinear) and isinstance(layer.o, QuantizedLinear)
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 20):
        x = torch.randn(rows, layer.gate_up.in_features, generator=gen).to(torch.bfloat16)
        out = torch.full((rows, layer.gate_up.out_features), float("nan"), dtype=torch.bfloat16)
        assert layer.gate_up(x, out) is out and torch.equal(out, layer.gate_up(x))
        attn = torch.randn(rows, layer.o.in_features, generator=gen).to(torch.bfloat16)
        residual = torch.randn(rows, layer.o.out_features, generator=gen).to(torch.bfloat16)
        out = torch.full_like(residual, float("nan"))
        assert layer.o.add_to(residual, attn, out) is out
        assert torch.equal(out, layer.o.add_to(residual, attn))
