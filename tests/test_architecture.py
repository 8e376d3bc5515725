"""The package reads as the pipeline: no import cycles, no stage importing a later one, one home for the command line.

Imports are read with ``ast`` (module-level and function-level, absolute and relative), so nothing is imported to
check them.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autoseg"

# Stage of every module, by its dotted name under ``autoseg`` (a subpackage's modules share its stage). A module may
# import its own stage or an earlier one, never a later one.
#   0 shared owners: errors, atomic writes, worker pools (processes, Ray), JSON schemas, label meaning, the folder layout, masks, the
#     network, its numeric precision and its checkpoints; each is used by several stages and knows none of them.
#   1 io: images and raw datasets.
#   2 phantom: writes raw datasets only, so it sits just above io (the tests and benchmarks use it on their own).
#   3 planning, 4 preprocessing: in pipeline order.
#   5 inference before 6 training: training validates each fold with the inference code path (one sliding window,
#     one resampling back), while inference needs only the network and its checkpoint, never the trainer.
#   7 evaluation: scores what inference wrote.
#   8 pipeline and bundle: the stage functions the commands run; a bundle packs trained results for predict.
#   9 demo and api: run the pipeline functions end to end (the api for one image from Python).
#  10 cli: every parser and the only reader of sys.argv and the environment; 11 ``python -m autoseg``.
STAGES = {
    "": 0, "errors": 0, "atomic": 0, "parallel": 0, "cluster": 0, "schemas": 0, "labels": 0, "layout": 0,
    "masks": 0, "network": 0, "precision": 0, "checkpoint": 0, "jsonfile": 0, "memory": 0, "version": 0,
    "io": 1,
    "phantom": 2,
    "planning": 3,
    "preprocessing": 4,
    "inference": 5,
    "training": 6,
    "evaluation": 7,
    "pipeline": 8, "bundle": 8, "nnunet": 8, "transfer": 8,
    "demo": 9, "api": 9,
    "cli": 10,
    "__main__": 11,
}
# The package root re-exports the Python API lazily (PEP 562 ``__getattr__``): ``autoseg.segment`` loads
# ``autoseg.api`` on first use only, so importing any module never loads a later stage through the root (tested below).
LAZY_EXPORTS = {"autoseg": {"autoseg.api"}}
# The trainer reads the variables torchrun sets for each process (and respects a user's OMP_NUM_THREADS).
ENVIRON_ALLOWED = {"autoseg.training.trainer": {"RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS"}}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imports(name: str) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its code."""
    is_package = MODULES[name].name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # ``import autoseg.x.y`` also imports autoseg.x; keep the deepest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _stage(name: str) -> int:
    parts = name.split(".")[1:]
    key = parts[0] if parts else ""
    assert key in STAGES, f"{name}: give its stage in STAGES of tests/test_architecture.py"
    return STAGES[key]


def test_every_module_has_a_stage():
    for name in MODULES:
        _stage(name)


def test_no_import_cycles():
    """Depth-first search for a back edge; reports one cycle by name."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m] - LAZY_EXPORTS.get(m, set())):  # a lazy export runs after every import finished
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_module_imports_a_later_stage():
    wrong = [f"{m} (stage {_stage(m)}) imports {t} (stage {_stage(t)})"
             for m, targets in GRAPH.items() for t in sorted(targets)
             if _stage(t) > _stage(m) and t not in LAZY_EXPORTS.get(m, set())]
    assert not wrong, "\n".join(wrong)


def _in_cli(name: str) -> bool:
    return name == "autoseg.cli" or name.startswith("autoseg.cli.")


def test_only_cli_imports_argparse():
    users = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                users.append(name)
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse" and not node.level:
                users.append(name)
    assert sorted({u for u in users if not _in_cli(u)}) == []


def _read_key(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    """The variable name an environment access reads when it is a constant (``environ.get("X")``, ``environ["X"]``,
    ``"X" in environ``, ``getenv("X")``), else None (the whole environment, or a computed name)."""
    parent = parents.get(node)
    key = None
    if isinstance(parent, ast.Attribute) and parent.attr == "get" and isinstance(parents.get(parent), ast.Call):
        key = parents[parent].args[0] if parents[parent].args else None
    elif isinstance(parent, ast.Call) and parent.func is node:
        key = parent.args[0] if parent.args else None
    elif isinstance(parent, ast.Subscript) and parent.value is node:
        key = parent.slice
    elif isinstance(parent, ast.Compare) and node in parent.comparators:
        key = parent.left
    return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def _environment_reads(tree: ast.AST) -> list[tuple[ast.AST, str | None]]:
    """Every use of ``os.environ`` / ``os.getenv`` (or their ``from os import`` names) with the variable it reads."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv") for a in node.names):
            reads.append((node, None))
        elif ((isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
               and isinstance(node.value, ast.Name) and node.value.id == "os")
              or (isinstance(node, ast.Name) and node.id in ("environ", "getenv"))):
            reads.append((node, _read_key(node, parents)))
    return reads


def test_only_cli_reads_the_environment():
    wrong = []
    for name, tree in TREES.items():
        if _in_cli(name):
            continue
        allowed = ENVIRON_ALLOWED.get(name, set())
        for node, key in _environment_reads(tree):
            if key not in allowed:
                wrong.append(f"{name}:{node.lineno} reads {key or 'the environment'}")
    assert not wrong, "\n".join(wrong)


def test_the_environment_check_sees_reads():
    tree = ast.parse("import os\nx = os.environ.get('AUTOSEG_RAW', '1')\ny = os.getenv('HOME')\nz = 'A' in os.environ\n"
                     "os.environ.update(B='1')\nw = os.environ['C']\n")
    assert sorted(str(key) for _, key in _environment_reads(tree)) == ["A", "AUTOSEG_RAW", "C", "HOME", "None"]


def test_predictor_does_not_load_the_trainer():
    code = ("import sys, autoseg.inference.predictor; "
            "print(sorted(m for m in sys.modules if m == 'autoseg.training' or m.startswith('autoseg.training.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_api_export_is_lazy():
    code = ("import sys, autoseg, autoseg.errors; assert 'autoseg.api' not in sys.modules; "
            "assert callable(autoseg.segment) and 'autoseg.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
