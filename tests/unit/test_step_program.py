"""step_program.DecodeProgram (a decode step's layer loop as one native call) against the Python
loop over LayerStep and StepLinears it replaces: the same kernel calls on the same buffers, so
the same logits and KV pool bit for bit, on every step shape of test_forward_workspace."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine.model.step_program import RECORD_WIDTH
from tests.unit.test_forward_workspace import Q4_1, _batch, _runner, _sequences, _steps, forward
from tests.unit.test_gguf_weights import write_model

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def q4_1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf-q4_1-program")
    write_model(path, Q4_1)
    return path


def test_the_program_forward_equals_the_python_loop(q4_1_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefills, mixed steps and decodes of 3, 64 and 1 sequences: every step's logits and the
    pool, bit for bit; the decode steps ran as programs (where the linears are int8 calls)."""
    ours, theirs = _runner(q4_1_dir), _runner(q4_1_dir)
    steps = list(_steps(_sequences(64, 24, random.Random(12))))
    # Decodes of 64 twice more (the same K/V rewritten): the second reuses the first's program.
    steps += [steps[-2], steps[-2]]
    programs = []
    for step in steps:
        batch = _batch(step)
        with torch.inference_mode():
            monkeypatch.setattr(type(theirs.model), "decode_program", False)
            want = forward(theirs, batch, 0)
            monkeypatch.setattr(type(ours.model), "decode_program", True)
            got = forward(ours, batch, 0)
        assert torch.equal(got, want)
        programs.append(ours.model._last_program)
    assert theirs.model._last_program is None
    linears = ours.model._last_linears
    assert linears is not None
    if linears[1].program_ready():  # int8 calls at 64 rows (no AMX-BF16 tiles on this CPU)
        assert programs[-1] is programs[-2] and programs[-2] is not None
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))


def test_a_decode_of_one_sequence_runs_as_a_program(q4_1_dir: Path) -> None:
    """Batch 1 (concurrency 1's decode step) takes int8 calls on every path: the program runs,
    and gives the Python loop's logits."""
    ours, theirs = _runner(q4_1_dir), _runner(q4_1_dir)
    theirs.model.decode_program = False  # this instance only
    seqs = _sequences(3, 24, random.Random(13))
    for step in list(_steps(seqs))[:2]:  # a prefill, then a mixed step: the Python loop
        with torch.inference_mode():
            assert torch.equal(forward(ours, _batch(step), 0), forward(theirs, _batch(step), 0))
    assert ours.model._last_program is None
    with torch.inference_mode():
        decode = _batch([(seqs[2], 3, 1)])
        assert torch.equal(forward(ours, decode, 0), forward(theirs, decode, 0))
    assert ours.model._last_program is not None and theirs.model._last_program is None


def test_a_failed_call_stops_the_program_and_says_which(q4_1_dir: Path) -> None:
    """run_step_program returns 1 + the failed record's index, its status written (-100: an unknown kind)."""
    native = _runner(q4_1_dir).model.native_layers
    assert native is not None
    ops = np.zeros((3, RECORD_WIDTH), dtype=np.int64)
    ops[:, 0] = 9
    status = ctypes.c_int32(0)
    assert native.run_step_program(ops.ctypes.data, 3, ctypes.byref(status)) == 1
    assert status.value == -100
    assert native.run_step_program(ops.ctypes.data, 0, ctypes.byref(status)) == 0 and status.value == 0
