"""Fixtures shared by several unit-test modules; the fakes behind them live in tests/fakes/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.engine_service import RunningEngine, engine_starter


@pytest.fixture
def anyio_backend() -> str:
    """The gateway's async tests (pytest.mark.anyio) run on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module of small ops: on the shared 2-core machine a second OpenMP
    thread only adds barrier waits. The native kernels' own OpenMP loops still run on both."""
    import torch  # here, not at the top: the gateway's and tokenizer's tests need no torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def start_engine() -> Iterator[Callable[..., RunningEngine]]:
    """Starts engine services in-process (see tests.fakes.engine_service.engine_starter); stops them after the test."""
    yield from engine_starter()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A two-layer Llama with GQA (4 heads, 2 KV heads) saved to a folder, for the KV format tests' runners;
    one torch thread while the module runs."""
    import torch  # here, not at the top: most modules this conftest serves need neither
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(99)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(config)  # only saved: the runners load it
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(previous)
