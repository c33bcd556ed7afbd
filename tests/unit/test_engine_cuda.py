"""The engine on CUDA: runs where a GPU exists, skipped elsewhere (the CPU path is tested everywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.contract import EngineRequest
from services.engine.core.build import engine_core_for
from services.engine.model.runner import ModelRunner
from shared.messages import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_greedy_on_cuda_equals_transformers_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    prompts = [[1, 5, 9, 17, 33], list(range(3, 60)), [7] * 20]
    runner = ModelRunner(
        tmp_path, dtype="float32", device="cuda", block_size=16, num_blocks=64, kv_cache_bytes=None, max_model_len=None
    )
    assert runner.device.type == "cuda"
    core = engine_core_for(runner, max_num_batched_tokens=64, max_running_requests=8, enable_prefix_caching=True)
    for i, prompt in enumerate(prompts):
        core.add_request(
            EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        )
    produced: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished():
        for output in core.step():
            produced[output.request_id].extend(output.new_token_ids)
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert produced[f"r{i}"] == expected[0, len(prompt) :].tolist()
