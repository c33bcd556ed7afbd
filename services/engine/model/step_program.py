"""A decode step's layer loop as one native call (``DecodeProgram``, csrc/step_program.c).

At a few rows each layer kernel does microseconds of work and each ctypes call costs ~5 us
of Python and argument conversion: ~1 ms of the ~10 ms batch-1 step of a 30-layer model, 7
calls a layer (AMD EPYC, Zen 3, avx2). The program is the same calls laid out as records
(the kernel's address and its arguments) that one native loop makes in order: the same
kernels on the same buffers, so the same bits as LlamaModel's Python loop over LayerStep
and StepLinears.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np
import torch

from services.engine.model.layer_step import LayerStep
from services.engine.model.step_linears import StepLinears

# int64 cells per record (step_program.c's StepOp): kind, address, 22 arguments.
RECORD_WIDTH = 24


class DecodeProgram:
    """The layer loop of a step of decodes only with GGUF linears on one int8 kernel: per layer
    RMSNorm, qkv, RoPE + KV store + decode attention, o + residual, RMSNorm, SwiGLU gate_up,
    down + residual, as LlamaModel.forward runs them. Built once for a batch size and its
    buffers; each step rewrites the cells that change (the step's tables, the embedding's
    address) and runs it in one call. The buffers given and the weights must outlive it."""

    __slots__ = ("_hidden_cells", "_ops", "_rope_rows", "_run", "_status")

    def __init__(
        self,
        run: Callable[..., int],
        step: LayerStep,
        linears: StepLinears,
        norms: Sequence[tuple[torch.Tensor, torch.Tensor]],
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """run: step_program.c's run_step_program; step: a decode step's LayerStep (its layer
        records are the same every step but for LayerStep.STEP_COLUMNS); linears: the step's
        StepLinears (program_ready); norms: per layer (input_norm, post_norm) weights;
        buffers: the step's (normed, qkv, attention, after_attn, activated, after_mlp) outputs,
        those LayerStep and StepLinears were built with."""
        if not linears.program_ready():
            raise ValueError("the program makes qlinear's int8 calls with the fused SwiGLU only")
        normed, qkv, attn, after_attn, activated, after_mlp = (buffer.data_ptr() for buffer in buffers)
        records: list[list[int]] = []
        rope_rows: list[int] = []
        # The embedding's rows (first layer's input and residual) change every step: 0 until run.
        hidden = 0
        self._hidden_cells = [(0, 3), (3, 12)]  # (record, cell): norm's x, o's residual
        for layer, (input_norm, post_norm) in enumerate(norms):
            rope_rows.append(len(records) + 2)
            records += [
                step.norm_record(hidden, input_norm),
                linears.record("qkv", layer, normed),
                step.rope_attend_record(layer, qkv),
                linears.record("o", layer, attn, hidden),
                step.norm_record(after_attn, post_norm),
                linears.record("swiglu", layer, normed),
                linears.record("down", layer, activated, after_attn),
            ]
            hidden = after_mlp
        self._ops = np.zeros((len(records), RECORD_WIDTH), dtype=np.int64)
        for index, record in enumerate(records):
            self._ops[index, : len(record)] = record
        self._rope_rows = np.array(rope_rows)
        self._run = run
        self._status = ctypes.c_int32(0)

    def run(self, step: LayerStep, hidden: torch.Tensor) -> None:
        """The layers over hidden [rows, hidden size] (contiguous bfloat16, the embedding) with
        this step's tables (step: this step's LayerStep); the result is in the after_mlp buffer."""
        ops = self._ops
        for column, value in zip(LayerStep.STEP_COLUMNS, step.step_values, strict=True):
            ops[self._rope_rows, column] = value
        for row, cell in self._hidden_cells:
            ops[row, cell] = hidden.data_ptr()
        failed = self._run(ops.ctypes.data, ops.shape[0], ctypes.byref(self._status))
        if failed:
            kind = ("RMSNorm", "linear", "RoPE + attention")[int(ops[failed - 1, 0])]
            raise RuntimeError(
                f"decode step: the {kind} call of layer {(failed - 1) // 7} failed ({self._status.value})"
            )
