"""Compiling and caching the native kernel libraries (csrc/*.c), and the CPU paths they hold.

Every library is compiled on first use with the system C compiler, cached per
source text, flags, compiler version and CPU (seconds to a minute, once), and loaded
with ctypes. native.py builds csrc's layer, attention and bf16 linear kernels
with it; quant_kernels.py builds qlinear.c the same way.
"""

from __future__ import annotations

import _ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_args

from services.engine.model.cpu import CpuFeatures

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "paged_attention.c",
        "paged_attention_avx.c",
        "paged_attention_b16.c",
        "kv_int8.c",
        "layers.c",
        "bf16_linear.c",
        "argmax.c",
        "step_program.c",
    )
]
FLAGS = ["-O3", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# Each kernel holds every path, compiled for its instruction set by function
# attributes (csrc/simd.h); -march only decides what the portable path may use.
# "native" is this CPU; tests build for other targets too, e.g. x86-64-v3 (AVX2 + FMA).
DEFAULT_MARCH = "native"
# Path names in the kernels' order (simd.h: PATH_*), slowest first, with the CPU
# flags (/proc/cpuinfo names) each needs.
PATHS = ("portable", "avx2", "avx512")
PATH_FLAGS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("avx2", "fma", "f16c"),  # f16c: the fp8 e5m2 KV loads
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
# SCALELLM_KERNELS (shared/settings.py declares the same choices without importing torch).
KernelChoice = Literal["auto", "torch", "native"]
KERNEL_CHOICES: tuple[str, ...] = get_args(KernelChoice)
_COMPILE_TIMEOUT_S = 120


def path_for(cpu: CpuFeatures) -> str:
    """The fastest kernel path the CPU's flags allow."""
    return next(path for path in reversed(PATHS) if cpu.has(*PATH_FLAGS[path]))


def _declare(fn: _ctypes.CFuncPtr, restype: type | None, *argtypes: type) -> _ctypes.CFuncPtr:
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/scalellm/kernels, or ~/.cache/scalellm/kernels."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "scalellm", "kernels").expanduser()


def _resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(
    march: str,
    cache_dir: Path,
    *,
    sources: list[Path] | None = None,
    flags: list[str] | None = None,
    stem: str = "scalellm_kernels",
) -> Path:
    """Compile (or find already compiled) the kernels; -march=native ties them to this CPU.

    sources, flags, stem: another library built the same way (quant_kernels.py); default these kernels."""
    sources = SOURCES if sources is None else sources
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    # The headers beside the sources count too: an edit there must rebuild.
    headers = sorted({header for source in sources for header in source.parent.glob("*.h")})
    texts = [source.read_text() for source in [*sources, *headers]]
    flags = [f"-march={march}", *(FLAGS if flags is None else flags)]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir / f"{stem}-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders each publish a whole file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        _compile(compiler, flags, sources, Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled native kernels %s", target)
    return target


def _compile(compiler: str, flags: list[str], sources: list[Path], out: Path) -> None:
    """Each source to an object file, up to one compiler per core at a time, then one link: the same
    library as one compiler call on all the sources, in about the slowest source's time instead of
    their sum (qlinear's AVX2 file alone is half of its ~50 s, on a 2-core AMD EPYC Zen 3)."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".objects-") as folder:
        objects = [Path(folder) / f"{index}-{source.stem}.o" for index, source in enumerate(sources)]
        jobs = [
            [compiler, *flags, "-c", str(source), "-o", str(obj)] for source, obj in zip(sources, objects, strict=True)
        ]
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            list(pool.map(_run_compiler, jobs))  # list(): raises the first failure
        _run_compiler([compiler, *flags, *map(str, objects), "-o", str(out), "-lm"])


def _run_compiler(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()[-2000:]}")
