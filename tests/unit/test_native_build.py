"""native_build._build: several sources compiled at once into one cached library, and a failed build leaves nothing."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from services.engine.model.native_build import _build

FLAGS = ["-O2", "-shared", "-fPIC"]


def write_sources(folder: Path, second: str) -> list[Path]:
    folder.mkdir()
    (folder / "shared.h").write_text("int twice(int x);\n")
    (folder / "a.c").write_text('#include "shared.h"\nint twice(int x) { return 2 * x; }\n')
    (folder / "b.c").write_text(second)
    return [folder / "a.c", folder / "b.c"]


def test_sources_compiled_apart_link_into_one_library_found_again_in_the_cache(tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src", '#include "shared.h"\nint quadruple(int x) { return twice(twice(x)); }\n')
    cache = tmp_path / "cache"
    library = _build("native", cache, sources=sources, flags=FLAGS, stem="two")
    assert ctypes.CDLL(str(library)).quadruple(5) == 20  # b.c calls into a.c: one library
    assert [p.name for p in cache.iterdir()] == [library.name]  # no objects or partial builds left
    built = library.stat().st_ino
    assert _build("native", cache, sources=sources, flags=FLAGS, stem="two") == library
    assert library.stat().st_ino == built  # found, not built and renamed over it again


def test_a_source_that_does_not_compile_fails_with_the_compilers_message_and_leaves_nothing(tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src", "int broken(int x) { return x +; }\n")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="failed: .*b.c"):
        _build("native", cache, sources=sources, flags=FLAGS, stem="broken")
    assert list(cache.iterdir()) == []
