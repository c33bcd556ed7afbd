"""ModelRunner against transformers on the same tiny random-weight checkpoints, float32.

Block tables are shuffled and non-contiguous, blocks hold 4 tokens, so every
test crosses block boundaries and reads the pool out of order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from services.engine.model.batch import ForwardBatch
from services.engine.model.cpu import CpuFeatures
from services.engine.model.linear import NATIVE_BF16_MAX_ROWS
from services.engine.model.runner import ModelRunner

BLOCK = 4
NUM_BLOCKS = 96
VOCAB = 256
ATOL = 1e-4
# An AMD Zen 3 as /proc/cpuinfo shows it: AVX2 and FMA, no AVX-512, no native bf16.
AVX2_ONLY = CpuFeatures.simulated("avx", "avx2", "fma", "f16c", "bmi2", "movbe")
# The error torch raises when oneDNN's bf16 prepacking meets such a CPU.
ONEDNN_REFUSAL = (
    "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
)

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}
VARIANTS = {
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=10000.0)),
    "llama-untied-llama3rope": lambda: LlamaForCausalLM(
        LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    ),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1e6)),
}

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Model:
    hf: PreTrainedModel
    path: Path


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Model:
    torch.manual_seed(1234)
    hf = VARIANTS[request.param]().eval()
    # Random init leaves biases at zero; make them matter.
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return Model(hf, path)


@pytest.fixture(scope="module", params=["torch", "native"])
def attention(request: pytest.FixtureRequest) -> str:
    """Both paths: plain torch, and the compiled native kernels (SCALELLM_KERNELS)."""
    return str(request.param)


def make_runner(path: Path, attention: str, dtype: str = "float32", cpu: CpuFeatures | None = None) -> ModelRunner:
    return ModelRunner(
        path,
        dtype=dtype,
        device="cpu",
        block_size=BLOCK,
        num_blocks=NUM_BLOCKS,
        kv_cache_bytes=None,
        max_model_len=None,
        kernels=attention,
        cpu=cpu,
    )


def hf_logits(hf: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] next-token logits at every position."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the pool


class Pool:
    """Hands out blocks in shuffled order, like a block manager after some churn."""

    def __init__(self, seed: int = 0) -> None:
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def schedule(self, steps: list[tuple[Seq, int]], want_all_logits: bool = False) -> tuple[ForwardBatch, list[int]]:
        """One forward over (sequence, new token count) pairs; returns the batch
        and, per sequence, the index in T of its last token."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for seq, n in steps:
            end = seq.cached + n
            while len(seq.blocks) * BLOCK < end:
                seq.blocks.append(self.free.pop())
            for pos in range(seq.cached, end):
                ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
            last.append(len(ids) - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots),
            query_lens=[n for _, n in steps],
            context_lens=[seq.cached + n for seq, n in steps],
            block_tables=[list(seq.blocks) for seq, _ in steps],
            logits_indices=torch.arange(len(ids)) if want_all_logits else torch.tensor(last),
        )
        for seq, n in steps:
            seq.cached += n
        return batch, last


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def test_prefill_logits_match_transformers_at_every_position(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    seq = Seq(prompt(13, seed=1))
    batch, _ = Pool().schedule([(seq, 13)], want_all_logits=True)
    ours = runner.forward(batch)
    assert ours.dtype == torch.float32 and ours.shape == (13, VOCAB)
    torch.testing.assert_close(ours, hf_logits(model.hf, seq.tokens), atol=ATOL, rtol=0)


def test_greedy_decode_step_by_step_matches_transformers(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    pool = Pool(seed=2)
    seq = Seq(prompt(6, seed=3))
    batch, _ = pool.schedule([(seq, 6)])
    logits = runner.forward(batch)
    for _ in range(10):  # crosses two block boundaries
        seq.tokens.append(int(logits[0].argmax()))
        batch, _ = pool.schedule([(seq, 1)])
        logits = runner.forward(batch)
        torch.testing.assert_close(logits[0], hf_logits(model.hf, seq.tokens)[-1], atol=ATOL, rtol=0)


def test_prefill_in_three_chunks_matches_one_pass(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    pool = Pool(seed=4)
    seq = Seq(prompt(23, seed=5))
    reference = hf_logits(model.hf, seq.tokens)
    for size, end in ((7, 7), (9, 16), (7, 23)):  # chunk edges fall inside blocks
        batch, _ = pool.schedule([(seq, size)], want_all_logits=True)
        torch.testing.assert_close(runner.forward(batch), reference[end - size : end], atol=ATOL, rtol=0)


def test_mixed_batch_of_decodes_and_prefills_matches_each_sequence_alone(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    pool = Pool(seed=6)
    decode_a, decode_b = Seq(prompt(9, seed=7)), Seq(prompt(3, seed=8))
    chunked = Seq(prompt(14, seed=9))
    fresh = Seq(prompt(5, seed=10))
    warmup, _ = pool.schedule([(decode_a, 8), (decode_b, 2), (chunked, 6)])
    runner.forward(warmup)
    # Decodes and prefills interleaved: decode, prefill with a cached prefix, decode, fresh prefill.
    batch, _ = pool.schedule([(decode_a, 1), (chunked, 8), (decode_b, 1), (fresh, 5)])
    ours = runner.forward(batch)
    for row, seq in enumerate((decode_a, chunked, decode_b, fresh)):
        torch.testing.assert_close(ours[row], hf_logits(model.hf, seq.tokens)[-1], atol=ATOL, rtol=0)


def test_shared_prefix_blocks_are_read_not_recomputed(model: Model, attention: str) -> None:
    """A second sequence whose first blocks are another's (a prefix-cache hit)
    only computes its suffix and still gets the full sequence's logits."""
    runner = make_runner(model.path, attention)
    pool = Pool(seed=11)
    first = Seq(prompt(12, seed=12))
    runner.forward(pool.schedule([(first, 12)])[0])
    second = Seq(first.tokens[:8] + prompt(5, seed=13), blocks=first.blocks[:2], cached=8)
    batch, _ = pool.schedule([(second, 5)])
    torch.testing.assert_close(runner.forward(batch)[0], hf_logits(model.hf, second.tokens)[-1], atol=ATOL, rtol=0)


def test_batch_of_decodes_with_different_lengths(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    pool = Pool(seed=14)
    seqs = [Seq(prompt(n, seed=20 + n)) for n in (1, 4, 11, 17)]
    runner.forward(pool.schedule([(s, len(s.tokens)) for s in seqs])[0])
    for step in range(3):
        for s in seqs:
            s.tokens.append((7 * step + len(s.tokens)) % VOCAB)
        ours = runner.forward(pool.schedule([(s, 1) for s in seqs])[0])
        for row, s in enumerate(seqs):
            torch.testing.assert_close(ours[row], hf_logits(model.hf, s.tokens)[-1], atol=ATOL, rtol=0)


def test_step_padded_to_a_bucket_gives_the_same_logits_and_touches_only_its_slots(model: Model, attention: str) -> None:
    """73 tokens run as 80 rows on the CPU (shapes.py); the padding rows change
    no logit and write nothing into the KV pool."""
    runner = make_runner(model.path, attention)
    decode, long, short = Seq(prompt(9, seed=40)), Seq(prompt(60, seed=41)), Seq(prompt(12, seed=42))
    pool = Pool(seed=43)
    runner.forward(pool.schedule([(decode, 8)])[0])
    batch, _ = pool.schedule([(decode, 1), (long, 60), (short, 12)])
    assert batch.input_ids.shape[0] == 73 and runner._padded_rows(73) == 80
    ours = runner.forward(batch)
    for row, seq in enumerate((decode, long, short)):
        torch.testing.assert_close(ours[row], hf_logits(model.hf, seq.tokens)[-1], atol=ATOL, rtol=0)
    used = {block for seq in (decode, long, short) for block in seq.blocks}
    unused = [block for block in range(NUM_BLOCKS) if block not in used]
    for index in range(runner.config.num_layers):
        k_cache, v_cache = runner.kv_cache.layer(index)
        assert not k_cache[unused].any() and not v_cache[unused].any()


@pytest.fixture(params=["onednn-bf16", "avx2-only"])
def bf16_cpu(request: pytest.FixtureRequest) -> CpuFeatures:
    """The CPU to plan bfloat16 for: this one when oneDNN multiplies bf16 here (prepacked
    linears), and a simulated AVX2-only CPU (bf16 storage, float32 math) on every machine."""
    if request.param == "avx2-only":
        return AVX2_ONLY
    host = CpuFeatures.detect()
    if not host.onednn_bf16:
        pytest.skip("oneDNN's bf16 matmul needs avx512bw+avx512vl+avx512dq or avx_ne_convert; this CPU lacks them")
    return host


def test_bfloat16_mixed_batch_stays_close_to_float32(model: Model, attention: str, bf16_cpu: CpuFeatures) -> None:
    """bfloat16 (with the native path: fused norm / rope / SiLU kernels too) on
    decode, a chunk after a cached prefix, and a fresh prefill."""
    runner = make_runner(model.path, attention, dtype="bfloat16", cpu=bf16_cpu)
    assert runner.plan.prepacked_linears == (bf16_cpu is not AVX2_ONLY)
    pool = Pool(seed=40)
    decode, chunked, fresh = Seq(prompt(9, seed=41)), Seq(prompt(14, seed=42)), Seq(prompt(5, seed=43))
    runner.forward(pool.schedule([(decode, 8), (chunked, 6)])[0])
    ours = runner.forward(pool.schedule([(decode, 1), (chunked, 8), (fresh, 5)])[0])
    assert ours.dtype == torch.float32
    reference = torch.stack([hf_logits(model.hf, seq.tokens)[-1] for seq in (decode, chunked, fresh)])
    # Observed error is about 4e-3 on logits of magnitude ~1; a broken kernel is off by far more.
    torch.testing.assert_close(ours, reference, atol=2e-2, rtol=0)


def test_avx2_plan_widens_for_long_prefills_and_uses_the_native_bf16_linear_for_decodes(model: Model) -> None:
    """The AVX2 plan's bf16 linears on both sides of NATIVE_BF16_MAX_ROWS: a 70-token prefill
    (widened weights, torch's matmul) then its decode (native kernel), against float32."""
    runner = make_runner(model.path, "native", dtype="auto", cpu=AVX2_ONLY)
    assert runner.plan.native is not None and runner.plan.native_linears is runner.plan.native
    # dtype auto is bf16; its KV cache int8 (plan.auto_kv_cache_dtype: bf16 on the native kernels).
    assert runner.plan.dtype == torch.bfloat16 and runner.kv_cache.layer(0)[0].dtype == torch.int8
    pool = Pool(seed=50)
    long = Seq(prompt(70, seed=51))
    assert 70 >= NATIVE_BF16_MAX_ROWS
    prefill = runner.forward(pool.schedule([(long, 70)])[0])
    torch.testing.assert_close(prefill[-1], hf_logits(model.hf, long.tokens)[-1], atol=2e-2, rtol=0)
    long.tokens.append(int(prefill[-1].argmax()))
    step = runner.forward(pool.schedule([(long, 1)])[0])
    torch.testing.assert_close(step[-1], hf_logits(model.hf, long.tokens)[-1], atol=2e-2, rtol=0)


def test_bfloat16_on_a_cpu_without_bf16_never_asks_onednn_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What crashed engines on Zen 3: now the plan keeps away from oneDNN's bf16 path and says why."""
    torch.manual_seed(0)
    hf = VARIANTS["llama-tied"]().eval()
    hf.save_pretrained(tmp_path / "model")

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(ONEDNN_REFUSAL)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    with caplog.at_level(logging.INFO, logger="services.engine.model.runner"):
        runner = make_runner(tmp_path / "model", "torch", dtype="bfloat16", cpu=AVX2_ONLY)
    assert runner.kv_cache.layer(0)[0].dtype == torch.bfloat16
    assert "avx512bw+avx512vl+avx512dq" in caplog.text and "CPU flags: " in caplog.text
    seq = Seq(prompt(11, seed=1))
    logits = runner.forward(Pool().schedule([(seq, 11)])[0])
    torch.testing.assert_close(logits[0], hf_logits(hf, seq.tokens)[-1], atol=2e-2, rtol=0)


def test_sharded_checkpoint_loads_like_a_single_file(model: Model, attention: str, tmp_path: Path) -> None:
    model.hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    seq = Seq(prompt(7, seed=31))
    batch, _ = Pool().schedule([(seq, 7)])
    torch.testing.assert_close(
        make_runner(tmp_path, attention).forward(batch)[0], hf_logits(model.hf, seq.tokens)[-1], atol=ATOL, rtol=0
    )


def test_malformed_batch_is_refused_with_a_message(model: Model, attention: str) -> None:
    runner = make_runner(model.path, attention)
    batch, _ = Pool().schedule([(Seq(prompt(9, seed=32)), 9)])
    batch.block_tables = [batch.block_tables[0][:1]]  # 4 slots for 9 tokens
    with pytest.raises(ValueError, match="blocks cannot hold 9 tokens"):
        runner.forward(batch)
    batch, _ = Pool().schedule([(Seq(prompt(3, seed=33)), 3)])
    batch.query_lens = [2]
    with pytest.raises(ValueError, match="query_lens sum to 2"):
        runner.forward(batch)
