"""The import graph of fastenc's own modules has no cycle, and the library never imports its applications.

Edges come from the source (``ast``), not from running it: every ``import`` and ``from ... import``
anywhere in a file (module level, inside functions, under ``if TYPE_CHECKING``), relative imports
resolved against the file's package.  ``from pkg import name`` points at ``pkg.name`` when that is a
module of fastenc, else at ``pkg``.  Importing a module also runs its parent packages' ``__init__``;
those implicit edges are not counted (every module would then share a cycle with ``fastenc``).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> installed package name (setup.py's package_dir).
SOURCES = {"fastenc": ROOT / "fastenc", "fastenc.triton_kernels": ROOT / "triton_kernels"}
EXTENSIONS = ("fastenc._C",)  # compiled (setup.py): leaves of the graph


def fastenc_modules() -> Dict[str, Path]:
    """Module name -> file, for every .py file of fastenc (packages by their ``__init__.py``)."""
    mods = {}
    for pkg, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """fastenc modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "import fastenc.ops.attention as a" -> the module itself
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = fastenc_modules()
    known = set(mods) | set(EXTENSIONS)
    return {**{m: imports_of(m, p, known) for m, p in mods.items()}, **{e: set() for e in EXTENSIONS}}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, sorted by first name."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "fastenc"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import models\n")
    (pkg / "convert.py").write_text("def f():\n    from .models import helper\n")
    (pkg / "models" / "__init__.py").write_text("from .helper import x\n")
    (pkg / "models" / "helper.py").write_text("def g():\n    from ..convert import f\n    import fastenc.convert\n")
    mods = {"fastenc": pkg / "__init__.py", "fastenc.convert": pkg / "convert.py",
            "fastenc.models": pkg / "models" / "__init__.py", "fastenc.models.helper": pkg / "models" / "helper.py"}
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert graph == {"fastenc": {"fastenc.models"}, "fastenc.convert": {"fastenc.models.helper"},
                     "fastenc.models": {"fastenc.models.helper"}, "fastenc.models.helper": {"fastenc.convert"}}
    assert cycles(graph) == [["fastenc.convert", "fastenc.models.helper"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among fastenc modules:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("library", ["fastenc.models", "fastenc.ops", "fastenc.modules", "fastenc.backends",
                                     "fastenc.reference", "fastenc.triton_kernels"])
def test_library_does_not_import_applications(library):
    """Layers point from user to kernel: the library never reaches ``convert``'s callers or the apps."""
    graph = import_graph()
    forbidden = ("fastenc.apps", "fastenc.bench", "fastenc.inspect", "fastenc.__main__", "fastenc.convert")
    for mod, deps in graph.items():
        if mod == library or mod.startswith(library + "."):
            bad = sorted(d for d in deps if d.startswith(forbidden))
            assert not bad, f"{mod} imports {bad}"
