"""The package's layout rules, checked on the source: no import cycles, no private cross-module imports.

The import graph is built from every ``import`` statement in the package (module level,
function level and ``TYPE_CHECKING`` blocks alike: a cycle of types is still a cycle of
concepts). ``passes/`` is installed as ``onnxprune.passes``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_files() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "onnxprune").rglob("*.py")) + sorted((ROOT / "passes").glob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "passes":
            parts = ["onnxprune", "passes", *parts[1:]]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, str, int]]]:
    """Module -> [(imported module, imported name or '', line)] for imports of package modules."""
    edges: dict[str, list[tuple[str, str, int]]] = {}
    for mod, path in modules.items():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in modules:  # from package import module
                        found.append((full, "", node.lineno))
                    elif node.module in modules:
                        found.append((node.module, a.name, node.lineno))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        found.append((a.name, "", node.lineno))
        edges[mod] = found
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _module_files()
    graph: dict[str, set[str]] = {}
    for mod, found in _imports(modules).items():
        # a package's __init__ is imported with any of its submodules: count the edge to it
        graph[mod] = {target for target, _, _ in found if target != mod}
    return graph


def test_import_graph_has_no_cycles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules() -> None:
    bad = [f"{mod} imports {target}.{name} (line {line})"
           for mod, found in _imports(_module_files()).items()
           for target, name, line in found if name.startswith("_") and target != mod]
    assert bad == []


def test_import_graph_sees_the_package() -> None:
    graph = _graph()
    assert "onnxprune.passes.masks" in graph and "onnxprune.ir.model" in graph["onnxprune.passes.masks"]
