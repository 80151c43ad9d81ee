"""The project's modules import each other without cycles, lazy (function-level) imports included.

Read with ``ast`` (nothing is imported): an edge ``a -> b`` for every
``import``/``from ... import`` of a project module anywhere in ``a``, plus
the packages whose ``__init__`` that import runs (those not already running
above ``a``). ``flax_resnet/__init__``'s PEP 562 table (strings, resolved on
first attribute access) is no import.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flax_resnet", "parity", "torch_ref")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """``{module: {project modules its code imports, and the packages that import runs}}``."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        running = set(_ancestors(name)) | {name}  # packages already importing while this module runs
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package of this module
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                if target in modules:
                    targets |= {t for t in (*_ancestors(target), target) if t in modules and t not in running}
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself), as a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
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
            if len(comp) > 1 or v in graph[v]:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["flax_resnet.io.resolve"], "the reader found the project's modules and their imports"
    assert find_cycles(graph) == []


def test_cycle_finder_sees_lazy_imports(tmp_path):
    """The checker is not vacuous: a function-level import closing a loop is a cycle; the package rule holds."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    src = ast.parse("def f():\n    from flax_resnet.io.report import convert\n")
    (node,) = [n for n in ast.walk(src) if isinstance(n, ast.ImportFrom)]
    assert node.module == "flax_resnet.io.report"  # what import_graph reads inside functions
    real = import_graph()
    assert "flax_resnet.nnx" in real["flax_resnet.builder"]  # importing flax_resnet.nnx.model runs flax_resnet/nnx/__init__
    assert "flax_resnet" not in real["flax_resnet.config"]  # ... but not a package already running
