"""Wiring the torch backend: model folder -> ModelRunner (weights, KV pool) -> EngineCore."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from services.engine.core.engine_core import EngineCore, EngineCoreConfig
from services.engine.model.config import ModelConfig
from services.engine.model.cpu import CpuFeatures
from services.engine.model.device import resolve_device
from services.engine.model.runner import ModelRunner
from services.engine.structured import GrammarCompiler
from shared.model_files import resolve_model_dir
from shared.settings import EngineSettings

log = logging.getLogger(__name__)

# How long start-up waits for the structured-output warm-up (a few seconds on 2 cores).
GRAMMAR_READY_TIMEOUT_S = 120.0


def available_memory_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory the KV pool may come from: free GPU memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_bytes(settings: EngineSettings, device: torch.device) -> int:
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes
    return int(available_memory_bytes(device) * settings.kv_cache_memory_fraction)


def engine_core_for(
    runner: ModelRunner,
    *,
    max_num_batched_tokens: int,
    max_running_requests: int,
    enable_prefix_caching: bool,
    num_blocks: int | None = None,
    grammars: GrammarCompiler | None = None,
    kernels: str = "",
) -> EngineCore:
    """An EngineCore around a loaded runner (tests and benchmarks build runners themselves).

    num_blocks: use only that many of the runner's KV blocks (a smaller pool
    without reloading the model); default all of them. grammars: structured outputs
    (grammar_compiler_for); without it constrained requests are refused. kernels: the runner's
    compute paths in words, for the heartbeat.
    """
    if num_blocks is not None and not 1 <= num_blocks <= runner.num_blocks:
        raise ValueError(f"num_blocks must be between 1 and the runner's {runner.num_blocks}, got {num_blocks}")
    config = EngineCoreConfig(
        num_blocks=num_blocks or runner.num_blocks,
        block_size=runner.block_size,
        vocab_size=runner.config.vocab_size,
        max_model_len=runner.max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        max_running_requests=max_running_requests,
        enable_prefix_caching=enable_prefix_caching,
        default_eos_token_ids=list(runner.config.eos_token_ids),
        sampler_device=str(runner.device),
        kernels=kernels,
    )
    return EngineCore(runner, config, grammars=grammars)


def grammar_compiler_for(model_dir: Path, config: ModelConfig) -> GrammarCompiler:
    """Structured outputs for the model in ``model_dir``: its tokenizer is read on the compile thread."""

    def load_tokenizer() -> object:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    return GrammarCompiler.for_model(load_tokenizer, config.vocab_size, list(config.eos_token_ids))


def create_torch_backend(settings: EngineSettings) -> EngineCore:
    """The default engine backend, configured by SCALELLM_* settings."""
    model_dir = resolve_model_dir(settings, weights=True)
    # Started first, so that its start-up work (the tokenizer, torch.compile of the mask kernel:
    # ~3 s of Python) overlaps the weights' load instead of the first requests' forwards.
    grammars = grammar_compiler_for(model_dir, ModelConfig.from_dir(model_dir))
    try:
        core = _build_core(settings, model_dir, grammars)
    except BaseException:
        grammars.close()
        raise
    if not grammars.wait_ready(timeout=GRAMMAR_READY_TIMEOUT_S):
        log.warning("structured outputs still warming up after %.0f s; serving anyway", GRAMMAR_READY_TIMEOUT_S)
    return core


def _build_core(settings: EngineSettings, model_dir: Path, grammars: GrammarCompiler) -> EngineCore:
    device = resolve_device(settings.device)
    runner = ModelRunner(
        model_dir,
        dtype=settings.dtype,
        device=settings.device,
        block_size=settings.block_size,
        num_blocks=None,
        kv_cache_bytes=kv_cache_bytes(settings, device),
        max_model_len=settings.max_model_len,
        kernels=settings.kernels,
        kernel_cache_dir=settings.kernel_cache_dir,
        quantization=settings.quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
    )
    core = engine_core_for(
        runner,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_running_requests=settings.max_running_requests,
        enable_prefix_caching=settings.enable_prefix_caching,
        grammars=grammars,
        kernels=f"{runner.device}: {runner.plan.describe()}; CPU flags: {CpuFeatures.detect().describe()}",
    )
    log.info(
        "torch engine ready: context %d tokens, %d KV blocks (%d tokens), budget %d tokens/step, "
        "at most %d running, prefix caching %s",
        core.max_model_len,
        runner.num_blocks,
        runner.num_blocks * runner.block_size,
        settings.max_num_batched_tokens,
        core.scheduler.max_running,
        "on" if settings.enable_prefix_caching else "off",
    )
    return core
