"""The native causal prefill attention (csrc/prefill_attention*.c): every path this machine runs, every
build target, against float32 SDPA on the same bf16 inputs; and NativeFreshPrefill, FreshPrefill's
drop-in. A path or target the CPU cannot run is skipped with the flags it lacks.

Tolerance: the kernels return bf16, so each output is off by up to half a bf16 ulp (2^-9 relative)
from the float result; the AMX path also rounds the softmax weights to bf16 for the tile product
(as torch's bf16 flash kernel does), a relative 2^-9 per weight that averages out over the keys.
Both stay below 2^-7 of (1 + |reference|): TOL below."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from services.engine.model import prefill_attention
from services.engine.model.attention import FreshPrefill
from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import _build
from services.engine.model.prefill_attention import (
    PATH_FLAGS,
    PATHS,
    NativeFreshPrefill,
    PrefillKernels,
    load_prefill_kernels,
    reference_prefill_attention,
)

# -march targets, each with the flags a CPU needs to run its (portable) code.
MARCH_NEEDS = {"native": (), "x86-64-v3": ("avx2", "fma", "bmi2", "f16c", "movbe"), "x86-64": ()}
HOST = CpuFeatures.detect()
TOL = 2**-7

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(MARCH_NEEDS))
def library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    march: str = request.param
    if platform.machine() != "x86_64" and march != "native":
        pytest.skip(f"-march={march} is an x86-64 target; this machine is {platform.machine()}")
    missing = [flag for flag in MARCH_NEEDS[march] if flag not in HOST.flags]
    if missing:
        pytest.skip(f"-march={march} code needs {' '.join(missing)}, which this CPU lacks")
    folder = tmp_path_factory.mktemp(f"prefill-{march}")
    so = _build(march, folder, sources=prefill_attention.SOURCES, flags=prefill_attention.FLAGS, stem="prefill")
    return ctypes.CDLL(str(so))


def kernels_on(library: ctypes.CDLL, path: str) -> PrefillKernels:
    kernels = PrefillKernels(library, path)
    if path not in kernels.runnable_paths():
        lacking = [flag for flag in PATH_FLAGS[path] if flag not in HOST.flags]
        if lacking:
            pytest.skip(f"the {path} path needs {' '.join(lacking)}, which this CPU lacks")
        pytest.skip(f"the {path} path needs the kernel's leave to use the AMX tile state (arch_prctl)")
    return kernels


def sdpa_float32(qkv: torch.Tensor, tokens: int, heads: int, kv_heads: int, dim: int) -> torch.Tensor:
    """torch's causal GQA SDPA in float32 on the same (bf16) values: [tokens, heads * dim]."""
    rows = qkv[:tokens, : (heads + 2 * kv_heads) * dim].float().view(tokens, -1, dim).transpose(0, 1)
    q, k, v = rows[None, :heads], rows[None, heads : heads + kv_heads], rows[None, heads + kv_heads :]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dim**-0.5, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(tokens, heads * dim)


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs() / (1 + want.double().abs())).max().item()


def test_reference_is_sdpa() -> None:
    qkv = torch.randn(40, 15 * 64).bfloat16()
    want = sdpa_float32(qkv, 37, 9, 3, 64)
    assert error(reference_prefill_attention(qkv, 37, 9, 3, 64**-0.5), want) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_every_path_equals_sdpa(library: ctypes.CDLL, path: str, dim: int, heads: int, kv_heads: int) -> None:
    kernels = kernels_on(library, path)
    gen = torch.Generator().manual_seed(dim + heads)
    width = (heads + 2 * kv_heads) * dim
    for tokens in (1, 15, 16, 17, 128, 300):
        # Rows wider than q, k, v (a strided view, as of a larger buffer) and spare rows after the chunk.
        buffer = (torch.randn(tokens + 3, width + 96, generator=gen) * 2).bfloat16()
        qkv = buffer[:, :width]
        out = torch.full((tokens, heads * dim + 32), 7.0, dtype=torch.bfloat16)
        got = kernels.attend(qkv, tokens, heads, kv_heads, dim, dim**-0.5, out=out[:, : heads * dim])
        want = sdpa_float32(qkv, tokens, heads, kv_heads, dim)
        assert error(got, want) < TOL, (tokens, error(got, want))
        assert torch.all(out[:, heads * dim :] == 7.0), "wrote past the output rows' H * D columns"


@pytest.mark.parametrize("path", PATHS)
def test_equal_scores_are_nan_free(library: ctypes.CDLL, path: str) -> None:
    """All scores of a row equal (zero q; then large equal q and k): uniform weights, the prefix mean of v."""
    kernels = kernels_on(library, path)
    tokens, heads, kv_heads, dim = 70, 6, 2, 64
    v = torch.randn(tokens, kv_heads * dim).bfloat16()
    mean = v.double().cumsum(0) / torch.arange(1, tokens + 1, dtype=torch.float64)[:, None]
    want = mean.view(tokens, kv_heads, 1, dim).expand(tokens, kv_heads, heads // kv_heads, dim).reshape(tokens, -1)
    for value in (0.0, 30.0):
        qk = torch.full((tokens, (heads + kv_heads) * dim), value, dtype=torch.bfloat16)
        got = kernels.attend(torch.cat([qk, v], 1), tokens, heads, kv_heads, dim, dim**-0.5)
        assert not got.isnan().any()
        assert error(got, want) < TOL


@pytest.mark.parametrize("path", PATHS)
def test_unsupported_head_dim_is_refused(library: ctypes.CDLL, path: str) -> None:
    kernels = kernels_on(library, path)
    qkv = torch.randn(8, 5 * 48).bfloat16()
    with pytest.raises(RuntimeError, match="unsupported head dim"):
        kernels.attend(qkv, 8, 3, 1, 48, 48**-0.5, scratch=kernels.scratch(8, 1, 64))


def test_no_reads_past_the_rows() -> None:
    """qkv's last row ends where an unreadable page starts: a read past it would crash the process (so
    in a child process), on every path this CPU runs, for chunks that end inside a 16- or 32-row tile."""
    script = textwrap.dedent(
        """
        import ctypes, mmap, torch
        from services.engine.model.prefill_attention import build_and_check, reference_prefill_attention
        libc = ctypes.CDLL(None)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        kernels = build_and_check("native")
        heads, kv_heads, dim = 9, 3, 64
        width = (heads + 2 * kv_heads) * dim
        for path in kernels.runnable_paths():
            for tokens in (1, 17, 33, 300):
                nbytes = tokens * width * 2
                pages = -(-nbytes // mmap.PAGESIZE)
                area = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
                base = ctypes.addressof(ctypes.c_char.from_buffer(area))
                assert libc.mprotect(base + pages * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
                start = pages * mmap.PAGESIZE - nbytes
                rows = torch.frombuffer(area, dtype=torch.bfloat16, count=tokens * width, offset=start)
                rows.copy_(torch.randn(tokens * width).bfloat16())
                qkv = rows.view(tokens, width)
                got = kernels.with_path(path).attend(qkv, tokens, heads, kv_heads, dim, 0.125).double()
                want = reference_prefill_attention(qkv, tokens, heads, kv_heads, 0.125)
                assert ((got - want).abs() / (1 + want.abs())).max() < 2**-7, (path, tokens)
                del qkv, rows, got
                print(path, tokens, "ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok") >= 4


def test_drop_in_matches_fresh_prefill() -> None:
    """bf16: the native kernel, within TOL of SDPA, into out= when given; float32: FreshPrefill's SDPA, bit for bit."""
    tokens, heads, kv_heads, dim = 45, 9, 3, 64
    qkv = torch.randn(tokens + 5, (heads + 2 * kv_heads) * dim)
    scale = dim**-0.5
    native = NativeFreshPrefill(tokens, heads, kv_heads, dim, scale, load_prefill_kernels())
    if not native.native:
        pytest.skip("the native prefill attention did not build here (see the warning)")
    sdpa = FreshPrefill(tokens, heads, kv_heads, dim, scale)
    assert torch.equal(native(qkv), sdpa(qkv))
    bf16 = qkv.bfloat16()
    got = native(bf16)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, heads * dim)
    assert error(got, sdpa_float32(bf16, tokens, heads, kv_heads, dim)) < TOL
    out = torch.empty(tokens + 3, heads * dim, dtype=torch.bfloat16)
    assert native(bf16, out[:tokens]).data_ptr() == out.data_ptr()
    assert torch.equal(out[:tokens], got)


def test_drop_in_keeps_sdpa_for_other_head_dims() -> None:
    tokens, heads, kv_heads, dim = 20, 4, 2, 48
    native = NativeFreshPrefill(tokens, heads, kv_heads, dim, dim**-0.5, load_prefill_kernels())
    assert not native.native
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    assert torch.equal(native(qkv), FreshPrefill(tokens, heads, kv_heads, dim, dim**-0.5)(qkv))


def test_without_kernels_the_drop_in_is_sdpa() -> None:
    """No kernels given (a plan without them: float32, no AMX, torch kernels): FreshPrefill, bit for bit."""
    tokens, heads, kv_heads, dim = 24, 9, 3, 64
    native = NativeFreshPrefill(tokens, heads, kv_heads, dim, dim**-0.5)
    assert not native.native
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    assert torch.equal(native(qkv), FreshPrefill(tokens, heads, kv_heads, dim, dim**-0.5)(qkv))


def test_the_plan_takes_the_kernel_only_where_it_beats_sdpa() -> None:
    """The engine's plan: the AMX path for a bf16 model on the native kernels, named in the heartbeat's
    kernels string and built at start-up; SDPA (no kernels) for float32, the torch kernels, or a CPU
    without AMX-BF16, with the reason in the plan."""
    from services.engine.model.plan import choose_plan

    cpu = torch.device("cpu")
    if not HOST.has(*PATH_FLAGS["amx_bf16"]):
        plan = choose_plan("bfloat16", cpu, "auto")
        assert plan.prefill is None
        if plan.native is not None:
            assert any("prefill attention: SDPA" in reason for reason in plan.reasons)
        return
    plan = choose_plan("bfloat16", cpu, "native")
    assert plan.prefill is not None and plan.prefill.path == "amx_bf16"
    assert "prefill attention native (amx_bf16)" in plan.describe()
    assert choose_plan("float32", cpu, "native").prefill is None
    assert choose_plan("bfloat16", cpu, "torch").prefill is None
    no_amx = CpuFeatures(frozenset(flag for flag in HOST.flags if not flag.startswith("amx")))
    without = choose_plan("bfloat16", cpu, "native", no_amx)
    assert without.prefill is None and any("prefill attention: SDPA" in reason for reason in without.reasons)
