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


class FakeGrammarCompiler:
    """Records when build.py starts it, waits for it and closes it, in one shared event list."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        events.append("grammars started")

    def wait_ready(self, timeout: float | None = None) -> bool:
        self.events.append("grammars waited for")
        return True

    def close(self) -> None:
        self.events.append("grammars closed")


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, object], list[str]]:
    """create_torch_backend without a model: the runner's arguments and the order of events."""
    seen: dict[str, object] = {}
    events: list[str] = []

    def runner(model_dir: Path, **kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        events.append("runner built")
        if seen.get("kernel_cache_dir") == "/unreadable":
            raise RuntimeError("the weights do not load")
        return fake_runner()

    monkeypatch.setattr("services.engine.core.build.resolve_model_dir", lambda settings, weights: tmp_path)
    monkeypatch.setattr("services.engine.core.build.ModelConfig.from_dir", lambda path: fake_runner().config)
    monkeypatch.setattr("services.engine.core.build.ModelRunner", runner)
    monkeypatch.setattr(
        "services.engine.core.build.grammar_compiler_for", lambda model_dir, config: FakeGrammarCompiler(events)
    )
    return seen, events


def test_the_kernel_settings_reach_the_model_runner(
    tmp_path: Path, fake_build: tuple[dict[str, object], list[str]]
) -> None:
    seen, _ = fake_build
    settings = EngineSettings(kernels="torch", kernel_cache_dir=str(tmp_path / "kernels"), kv_cache_bytes=1 << 20)
    core = create_torch_backend(settings)
    assert seen["kernels"] == "torch" and seen["kernel_cache_dir"] == str(tmp_path / "kernels")
    # The heartbeat names the runner's plan and the CPU it was chosen for.
    assert core.load().kernels.startswith("cpu: dtype float32, linears: torch F.linear; CPU flags: ")


def test_structured_outputs_warm_up_beside_the_weights_load_and_are_ready_before_the_engine_serves(
    fake_build: tuple[dict[str, object], list[str]],
) -> None:
    # Warming up while the first requests ran made their forwards twice as slow (GIL, second core).
    _, events = fake_build
    core = create_torch_backend(EngineSettings(kv_cache_bytes=1 << 20))
    assert events == ["grammars started", "runner built", "grammars waited for"]
    assert core.grammars is not None


def test_a_failed_build_stops_the_structured_output_threads(fake_build: tuple[dict[str, object], list[str]]) -> None:
    _, events = fake_build
    with pytest.raises(RuntimeError, match="the weights do not load"):
        create_torch_backend(EngineSettings(kernel_cache_dir="/unreadable", kv_cache_bytes=1 << 20))
    assert events == ["grammars started", "runner built", "grammars closed"]
