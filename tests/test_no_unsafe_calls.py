"""No code in ``autoseg/`` may unpickle, eval, or load YAML unsafely (an AST scan: comments and strings don't count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"

BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}
BANNED_CALLS = {"eval", "exec", "builtins.eval", "builtins.exec", "pandas.read_pickle",
                "yaml.unsafe_load", "yaml.unsafe_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}
DEFAULT_ALIASES = {"np": "numpy", "pd": "pandas"}  # resolved even if the import is somewhere we did not see


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str):
        self.filename = filename
        self.aliases: dict[str, str] = dict(DEFAULT_ALIASES)
        self.problems: list[str] = []

    def flag(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.filename}:{node.lineno}: {message}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in BANNED_MODULES:
                self.flag(node, f"import {alias.name} (pickle-based deserialisation is not allowed)")
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] in BANNED_MODULES:
            self.flag(node, f"from {module} import ... (pickle-based deserialisation is not allowed)")
        for alias in node.names:
            if node.level == 0 and module and alias.name != "*":
                self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def dotted(self, node: ast.AST) -> str | None:
        """``np.load`` -> ``numpy.load`` (through import aliases); None for anything not a plain dotted name."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        splat = any(k.arg is None for k in node.keywords)
        if name in BANNED_CALLS:
            self.flag(node, f"call to {name}()")
        elif name == "torch.load":
            if not _is_const(keywords.get("weights_only"), True):
                self.flag(node, "torch.load() without weights_only=True")
        elif name == "numpy.load":
            if not _is_const(keywords.get("allow_pickle"), False):
                self.flag(node, "numpy.load() without an explicit allow_pickle=False")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            loader_name = self.dotted(loader) if loader is not None else None
            if loader_name is None or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                self.flag(node, f"{name}() without Loader=yaml.SafeLoader")
        if splat and name in ("torch.load", "numpy.load", "yaml.load", "yaml.load_all"):
            self.flag(node, f"{name}(**kwargs) cannot be checked; pass the safety keyword explicitly")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<string>") -> list[str]:
    """Every unsafe import or call in ``source`` as ``file:line: what``."""
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.problems


def test_package_has_no_unsafe_calls():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5 and (PACKAGE / "bundle.py") in files
    problems = [p for f in files
                for p in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))]
    assert not problems, "unsafe deserialisation or eval in the package:\n" + "\n".join(problems)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(f)\n",
    "import torch\ntorch.load(f, weights_only=False)\n",
    "import torch as th\nth.load(f, map_location='cpu')\n",
    "from torch import load\nload(f)\n",
    "import torch\ntorch.load(f, **kw)\n",
    "import numpy as np\nnp.load(p)\n",
    "import numpy\nnumpy.load(p, allow_pickle=True)\n",
    "import pickle\n",
    "from pickle import loads\n",
    "import cPickle\n",
    "import dill\n",
    "import joblib\n",
    "import os.path, pickle as pk\n",
    "eval('1+1')\n",
    "exec(code)\n",
    "import yaml\nyaml.load(s)\n",
    "import yaml\nyaml.load(s, Loader=yaml.FullLoader)\n",
    "import yaml\nyaml.unsafe_load(s)\n",
    "def f():\n    import torch\n    return torch.load(p)\n",
])
def test_scanner_flags_unsafe_code(source):
    problems = scan_source(source, "snippet.py")
    assert problems and all(p.startswith("snippet.py:") for p in problems), problems


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n",
    "import numpy as np\nnp.load(p, mmap_mode='r', allow_pickle=False)\n",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\n",
    "import yaml\nyaml.load(s, yaml.CSafeLoader)\n",
    "model.eval()\nnet.eval()\n",
    "'''torch.load(f) and eval(x) and import pickle in a docstring'''\n# torch.load(f)  # comment\n",
    "from . import pickle_free\nimport json\njson.loads(s)\n",
])
def test_scanner_accepts_safe_code(source):
    assert scan_source(source, "snippet.py") == []


def test_scanner_reports_file_and_line():
    assert scan_source("x = 1\n\nimport torch\ntorch.load(f)\n", "autoseg/evil.py") == [
        "autoseg/evil.py:4: torch.load() without weights_only=True"]
