"""A non-editable install carries what the engine compiles at run time."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = Path("services/engine/model/csrc")


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build the wheel")
def test_the_wheel_holds_every_native_kernel_source_and_header(tmp_path: Path) -> None:
    # Without a header the kernels do not compile and the engine serves on the slower torch kernels.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    for package in ("shared", "services", "bench"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(CSRC / path.name) for path in (ROOT / CSRC).iterdir() if path.suffix in (".c", ".h")}
    assert any(name.endswith(".h") for name in expected)
    assert expected <= packaged, f"missing from the wheel: {sorted(expected - packaged)}"
