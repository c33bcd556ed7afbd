"""The step's GGUF linears bound once (``StepLinears``): the step path of QuantKernels.linear,
as layer_step.LayerStep is of the layer kernels."""

from __future__ import annotations

import torch

from services.engine.model.linear import QuantizedLinear
from services.engine.model.quant_kernels import (
    SWIGLU_PANEL,
    ActivationScratch,
    LinearCall,
    QuantKernels,
    raise_for_status,
)
from services.engine.model.quantized import KIND_CODES

# linear_weights: (cols, weight address, weight rows, kind code, bias address or None).
LinearWeights = tuple[int, int, int, int, int | None]
# Per layer: the LinearWeights of (qkv, o, gate_up, down), what StepLinears binds.
LayerLinears = tuple[LinearWeights, LinearWeights, LinearWeights, LinearWeights]
# A bound call's arguments around x's and the residual's addresses, and its weight's rows (StepLinears._run).
_Bound = tuple[tuple[int | None, ...], tuple[int, ...], int]


def linear_weights(linear: QuantizedLinear) -> LinearWeights:
    """What the qlinear call reads of a layer's weights, fixed for the model's life:
    (cols, weight address, weight rows, block kind code, float32 bias address or None)."""
    weight = linear.weight
    bias = None if linear.bias is None else linear.bias.data_ptr()
    return (weight.cols, weight.data.data_ptr(), weight.rows, KIND_CODES[weight.kind], bias)


class StepLinears:
    """The step's GGUF linears (each layer's qkv, o, gate_up, down) as QuantKernels.linear calls
    them, with every argument fixed for the step resolved once: the path and variant the step's
    row count takes, the weights, the output buffers and the activation scratch. A call then reads
    its input's (and residual's) address and nothing else: QuantKernels.linear spends ~8-11 us of
    Python per call in the engine's step (checks, the variant and scratch, argument conversion;
    Intel Xeon SPR, avx512f/amx), 120 calls a step for a 30-layer model.

    Every input and residual must be a contiguous bfloat16 [rows, width] tensor of the step's rows
    (not checked per call); outputs are the given buffers, overwritten by the next layer's call."""

    __slots__ = (
        "_activated",
        "_call",
        "_down",
        "_gate_up",
        "_o",
        "_outs",
        "_qkv",
        "_scratch",
        "_swiglu",
        "_swiglu_call",
    )

    def __init__(
        self,
        kernels: QuantKernels,
        weights: list[LayerLinears],
        scratch: ActivationScratch,
        *,
        rows: int,
        outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        activated: torch.Tensor | None = None,
    ) -> None:
        """weights: per layer, linear_weights of (qkv, o, gate_up, down); outs: their output
        buffers (qkv [rows, qkv width], after_attn and after_mlp [rows, hidden], gate_up), each
        contiguous bfloat16 with `rows` rows; o and down write after_attn and after_mlp.
        activated: [rows, intermediate], where ``swiglu`` writes silu(gate) * up; given, and with
        every layer's gate_up in whole panel pairs (QuantKernels.fuses_swiglu), ``fused_swiglu``."""
        buffers = outs if activated is None else (*outs, activated)
        if any(out.dtype != torch.bfloat16 or not out.is_contiguous() or out.shape[0] != rows for out in buffers):
            raise ValueError("the bound linears write contiguous bfloat16 buffers of the step's rows")
        call = kernels.call_for(rows, torch.bfloat16)
        # The SwiGLU entry point runs on the same path, variant and scratch as the plain one.
        self._swiglu_call = kernels.call_for(rows, torch.bfloat16, swiglu=True)
        self._activated = activated
        widest = max(w[0] for layer in weights for w in layer)
        # The scratch tensors are kept here too: the calls hold only their addresses.
        self._scratch = tuple(scratch.take(dtype, numel) for dtype, numel in call.scratch_sizes(widest, bf16=True))
        scratch_args = tuple(buffer.data_ptr() for buffer in self._scratch)
        self._call = call
        self._outs = outs
        qkv_out, after_attn, gate_up_out, after_mlp = outs

        def bind(weight: LinearWeights, out: torch.Tensor, residual: bool) -> _Bound:
            # The qlinear arguments after x's address: its stride, bf16 in, rows, cols, the weight's
            # four; after the residual's: its stride (0: none), out, its stride, bf16 out, scratch.
            res_stride = out.shape[1] if residual else 0
            return (
                (weight[0], 1, rows, *weight),
                (res_stride, out.data_ptr(), out.stride(0), 1, *scratch_args),
                weight[2],
            )

        self._qkv = [bind(layer[0], qkv_out, False) for layer in weights]
        self._o = [bind(layer[1], after_attn, True) for layer in weights]
        self._gate_up = [bind(layer[2], gate_up_out, False) for layer in weights]
        self._down = [bind(layer[3], after_mlp, True) for layer in weights]
        self._swiglu: list[_Bound] = []
        gate_up_rows = [layer[2][2] for layer in weights]
        if activated is not None and all(rows_ > 0 and rows_ % (2 * SWIGLU_PANEL) == 0 for rows_ in gate_up_rows):
            if any(activated.shape[1] * 2 != rows_ for rows_ in gate_up_rows):
                raise ValueError("activated must be [rows, intermediate], half of gate_up's rows")
            self._swiglu = [bind(layer[2], activated, False) for layer in weights]

    @property
    def fused_swiglu(self) -> bool:
        """Whether ``swiglu`` runs: gate_up with silu(gate) * up in its epilogue (no silu_mul pass)."""
        return bool(self._swiglu)

    def _run(self, bound: _Bound, x: torch.Tensor, residual: int | None, call: LinearCall | None = None) -> None:
        mid, tail, outputs = bound
        call = call or self._call
        status = call.function(call.path_code, x.data_ptr(), *mid, residual, *tail)
        if status != 0:
            raise_for_status(status, call.path, call.rows, x.shape[1], outputs)

    def qkv(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] @ qkv.T into the qkv buffer, returned."""
        self._run(self._qkv[layer], x, None)
        return self._outs[0]

    def o(self, layer: int, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual [rows, hidden] + x [rows, H * D] @ o.T into after_attn (never residual), returned."""
        self._run(self._o[layer], x, residual.data_ptr())
        return self._outs[1]

    def gate_up(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] @ gate_up.T into the gate_up buffer, returned."""
        self._run(self._gate_up[layer], x, None)
        return self._outs[2]

    def swiglu(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of x [rows, hidden] @ gate_up.T into the activated buffer [rows,
        intermediate], returned: the bits of ``gate_up`` then LayerStep.silu_mul on the same
        instruction set. Only where ``fused_swiglu``."""
        if not self._swiglu or self._activated is None:
            raise RuntimeError("these linears were bound without the fused SwiGLU")
        self._run(self._swiglu[layer], x, None, self._swiglu_call)
        return self._activated

    def down(self, layer: int, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual [rows, hidden] + x [rows, intermediate] @ down.T into after_mlp (never residual), returned."""
        self._run(self._down[layer], x, residual.data_ptr())
        return self._outs[3]

    # ---- step_program.DecodeProgram's records: these calls as data, for one native loop ----

    def program_ready(self) -> bool:
        """Whether every call is qlinear's signature (int8 activations, the fused SwiGLU), the one
        step_program.c makes: the float variant's entry points take other scratch."""
        return self.fused_swiglu and not (self._call.float_activations or self._swiglu_call.float_activations)

    def record(self, name: str, layer: int, x: int, residual: int | None = None) -> list[int]:
        """The call ``name`` (qkv, o, swiglu or down) of a layer on the rows at address x (and the
        residual's) as a step_program record (OP_QLINEAR)."""
        bound, call = {
            "qkv": (self._qkv, self._call),
            "o": (self._o, self._call),
            "swiglu": (self._swiglu, self._swiglu_call),
            "down": (self._down, self._call),
        }[name]
        mid, tail, _ = bound[layer]
        return [1, call.address, call.path_code, x, *(a or 0 for a in mid), residual or 0, *tail]
