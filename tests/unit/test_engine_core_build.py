"""build.py: KV pool sizing and wiring a runner into an EngineCore (no model needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.engine.core.build import available_memory_bytes, create_torch_backend, engine_core_for, kv_cache_bytes
from shared.settings import EngineSettings


def test_pool_size_from_bytes_or_a_share_of_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   10000000 kB\n")
    assert available_memory_bytes(torch.device("cpu"), meminfo) == 10_000_000 * 1024
    assert kv_cache_bytes(EngineSettings(kv_cache_bytes=123_456), torch.device("cpu")) == 123_456
    monkeypatch.setattr("services.engine.core.build.available_memory_bytes", lambda device: 1_000_000)
    assert kv_cache_bytes(EngineSettings(kv_cache_memory_fraction=0.25), torch.device("cpu")) == 250_000


def fake_runner(num_blocks: int = 100) -> SimpleNamespace:
    config = SimpleNamespace(vocab_size=1000, eos_token_ids=(2, 7))
    plan = SimpleNamespace(describe=lambda: "dtype float32, linears: torch F.linear")
    return SimpleNamespace(
        num_blocks=num_blocks, block_size=16, config=config, max_model_len=4096, device="cpu", plan=plan
    )


def test_engine_core_takes_the_runners_pool_limits_and_eos() -> None:
    core = engine_core_for(
        fake_runner(),  # type: ignore[arg-type]
        max_num_batched_tokens=256,
        max_running_requests=32,
        enable_prefix_caching=False,
    )
    assert core.block_manager.num_blocks == 100 and core.block_manager.block_size == 16
    assert core.config.default_eos_token_ids == [2, 7]
    # The context is capped by the pool: 100 blocks x 16 tokens.
    assert core.max_model_len == 1600
    assert core.scheduler.max_running == 32 and not core.block_manager.enable_prefix_caching


def test_a_smaller_pool_than_the_runners_can_be_chosen_but_not_a_larger_one() -> None:
    core = engine_core_for(
        fake_runner(),  # type: ignore[arg-type]
        max_num_batched_tokens=64,
        max_running_requests=8,
        enable_prefix_caching=True,
        num_blocks=10,
    )
    assert core.block_manager.num_blocks == 10
    with pytest.raises(ValueError, match="between 1 and the runner's 100"):
        engine_core_for(
            fake_runner(),  # type: ignore[arg-type]
            max_num_batched_tokens=64,
            max_running_requests=8,
            enable_prefix_caching=True,
            num_blocks=101,
        )


def test_the_kernel_settings_reach_the_model_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def runner(model_dir: Path, **kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        return fake_runner()

    monkeypatch.setattr("services.engine.core.build.resolve_model_dir", lambda settings, weights: tmp_path)
    monkeypatch.setattr("services.engine.core.build.ModelRunner", runner)
    settings = EngineSettings(kernels="torch", kernel_cache_dir=str(tmp_path / "kernels"), kv_cache_bytes=1 << 20)
    core = create_torch_backend(settings)
    assert seen["kernels"] == "torch" and seen["kernel_cache_dir"] == str(tmp_path / "kernels")
    # The heartbeat names the runner's plan and the CPU it was chosen for.
    assert core.load().kernels.startswith("cpu: dtype float32, linears: torch F.linear; CPU flags: ")
