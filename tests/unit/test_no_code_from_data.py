"""No code from data: nothing in services/ or shared/ can turn bytes into code or objects.

Every service reads the network or the streams, so the rule holds for all their code, not only the
decoding paths: no pickle (or its relatives), marshal, eval, exec, compile of strings, unsafe YAML
loading, or torch.load / numpy.load that unpickles. The scanner reads the AST, so a comment or a
string that names these does not count, and ``model.eval()`` or Redis's EVAL (method calls on other
objects) are not the builtins.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

SCANNED = ("services", "shared")
# Modules whose whole purpose is to make objects (or code) from bytes.
FORBIDDEN_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "jsonpickle", "shelve", "marshal"}
)
FORBIDDEN_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})
# yaml's loaders that build arbitrary Python objects; yaml.safe_load is fine.
UNSAFE_YAML = frozenset({"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"})
SAFE_YAML_LOADERS = frozenset({"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class CodeFromDataScanner(ast.NodeVisitor):
    """Collects each use of a way to run code or build objects from data in one module."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.findings: list[Finding] = []
        # Local names bound to modules or functions of interest: {"yaml": "yaml", "ld": "yaml.load"}.
        self._aliases: dict[str, str] = {}

    def _find(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in FORBIDDEN_MODULES:
                self._find(node, f"import {alias.name}")
            self._aliases[alias.asname or root] = alias.name if alias.asname else root
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for alias in node.names:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                self._find(node, f"from {module} import {alias.name}")
            elif module == "builtins" and alias.name in FORBIDDEN_BUILTINS:
                self._find(node, f"from builtins import {alias.name}")
            self._aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def _qualified(self, node: ast.expr) -> str | None:
        """``yaml.load`` for ``yaml.load`` or an alias of it; None for anything but names and attributes."""
        if isinstance(node, ast.Name):
            return self._aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._qualified(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualified(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_BUILTINS and name == node.func.id:
            self._find(node, f"{node.func.id}()")
        elif name in {f"builtins.{b}" for b in FORBIDDEN_BUILTINS}:
            self._find(node, f"{name}()")
        elif name is not None and name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            loader_name = self._qualified(loader) if loader is not None else None
            if loader_name is None or loader_name.rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                self._find(node, f"{name}() without a safe Loader")
        elif name == "torch.load" and not _is_true(keywords.get("weights_only")):
            self._find(node, "torch.load() without weights_only=True")
        elif name in ("numpy.load", "np.load") and _is_true(keywords.get("allow_pickle")):
            self._find(node, f"{name}(allow_pickle=True)")
        self.generic_visit(node)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, path: str = "<source>") -> list[Finding]:
    scanner = CodeFromDataScanner(path)
    scanner.visit(ast.parse(source, filename=path))
    return scanner.findings


def scan_tree(root: Path, packages: tuple[str, ...] = SCANNED) -> list[Finding]:
    findings: list[Finding] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            findings += scan_source(path.read_text(), str(path.relative_to(root)))
    return findings


def test_services_and_shared_never_make_code_or_objects_from_data() -> None:
    files = [p for package in SCANNED for p in (REPO / package).rglob("*.py")]
    assert len(files) > 40  # the scan really read the packages
    findings = scan_tree(REPO)
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import marshal as m",
        "from pickle import loads",
        "from _pickle import loads as l",
        "import dill",
        "from shelve import open",
        "eval('1')",
        "exec(code)",
        "compile(text, 'f', 'exec')",
        "__import__(name)",
        "import builtins\nbuiltins.eval(x)",
        "from builtins import exec",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.load(text, yaml.UnsafeLoader)",
        "import yaml as y\ny.unsafe_load(text)",
        "import yaml\nyaml.full_load(text)",
        "from yaml import load\nload(text)",
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
    ],
)
def test_the_scanner_finds_each_way(source: str) -> None:
    assert len(scan_source(source)) == 1, source


@pytest.mark.parametrize(
    "source",
    [
        "model.eval()",
        "await self._redis.eval(script, 1, key)",
        "re.compile(pattern)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "from yaml import CSafeLoader\nimport yaml\nyaml.load(text, CSafeLoader)",
        "import torch\ntorch.load(path, weights_only=True)",
        "import numpy as np\nnp.load(path)",
        "msgpack.unpackb(data, raw=False)",
        "# never pickle, never eval\ntext = 'exec'",
    ],
)
def test_the_scanner_leaves_safe_code_alone(source: str) -> None:
    assert scan_source(source) == []
