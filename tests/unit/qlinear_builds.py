"""The GGUF linear kernel's library (csrc/qlinear.c) built for several -march targets, once per test session.

conftest.py's qlinear_library fixture builds through build_qlinear into the session's kernel_cache_dir,
so test_quant_kernels.py, test_fused_swiglu.py and the plans of other modules (choose_plan builds the
same -march=native library under the same name there) share one compile per target.

What -march changes: the code compiled without target attributes (qlinear_portable.c): the portable
path's kernels (gemm_portable, fgemm_portable) and the activation quantization (quantize_rows) and bf16
widening that the portable path runs too. The other paths' int8 kernels are compiled for their
instruction set by function attributes (qlinear.h: T256, T512, ...), whatever the target, and below
AVX-512 the float variant runs fgemm_portable, the portable path's float variant. So the portable path
is tested on every target, the other paths on -march=native (what the engine builds) only: MARCH_PATHS.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from services.engine.model import quant_kernels
from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import _build
from services.engine.model.quant_kernels import PATH_FLAGS, PATHS, QuantKernels

# -march targets, each with the flags a CPU needs to run its (portable) code.
MARCH_NEEDS = {"native": (), "x86-64-v3": ("avx2", "fma", "bmi2", "f16c", "movbe"), "x86-64": ()}
MARCHES = list(MARCH_NEEDS)
HOST = CpuFeatures.detect()
# (march, path): the portable path on every target, the paths compiled by target attributes on native only.
MARCH_PATHS = [(march, "portable") for march in MARCHES] + [("native", path) for path in PATHS[1:]]
# The stem quant_kernels.build_and_check gives the library: with the same cache folder, the plan's
# -march=native build is this one.
STEM = "scalellm_qlinear"


def build_qlinear(march: str, cache_dir: Path) -> ctypes.CDLL:
    """The library for -march=<march>, compiled into cache_dir (or found there); skips the test
    where this machine cannot build or run that target."""
    if platform.machine() != "x86_64" and march != "native":
        pytest.skip(f"-march={march} is an x86-64 target; this machine is {platform.machine()}")
    missing = [flag for flag in MARCH_NEEDS[march] if flag not in HOST.flags]
    if missing:
        pytest.skip(f"-march={march} code needs {' '.join(missing)}, which this CPU lacks")
    so = _build(march, cache_dir, sources=quant_kernels.SOURCES, flags=quant_kernels.FLAGS, stem=STEM)
    return ctypes.CDLL(str(so))


def kernels_on(library: ctypes.CDLL, path: str, variant: str = "int8") -> QuantKernels:
    """The path's kernels; amx_int8 with tiles from one row on, so every row count below runs them."""
    if variant == "auto" and path != "amx_int8":
        pytest.skip(f"auto is the int8 variant on the {path} path, tested as such")
    kernels = QuantKernels(library, path, variant, amx_min_rows=1)
    if path not in kernels.runnable_paths():
        lacking = [flag for flag in PATH_FLAGS[path] if flag not in HOST.flags]
        if lacking:
            pytest.skip(f"the {path} path needs {' '.join(lacking)}, which this CPU lacks")
        unseen = "the kernel's leave to use the AMX tile state (arch_prctl)" if path == "amx_int8" else "cpuid"
        pytest.skip(f"the {path} path needs {' '.join(PATH_FLAGS[path])}: /proc/cpuinfo has them, {unseen} not")
    return kernels
