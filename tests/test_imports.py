"""Imports inside the package point down: no module imports, directly or through others, a module
that imports it back. Module-level and in-function imports both count (an import inside a function
still closes a circle the moment it runs)."""
from __future__ import annotations

import ast
from pathlib import Path

import autocompress

PACKAGE = Path(autocompress.__file__).parent
ROOT = "autocompress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules: set[str]) -> set[str]:
    """The package modules an import statement loads (a package's parents' __init__ included,
    except the top-level package, whose __init__ only re-exports lazily)."""
    targets: list[str] = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level:
            base = current.split(".") if is_package else current.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        targets = [prefix]
        targets += [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in modules]
    found = set()
    for t in targets:
        while t and t not in modules:  # `import autocompress.cost.size.x` -> the module that exists
            t = t.rpartition(".")[0]
        while t and t != ROOT:
            found.add(t)
            t = t.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(name, path.name == "__init__.py", node, set(modules))
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "autocompress.orchestrate" in graph and graph["autocompress.api"]  # the walk sees the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_in_function_imports_are_seen():
    graph = import_graph()
    assert "autocompress.orchestrate" in graph["autocompress.api"]  # imported inside api.search


def test_the_worker_entry_point_is_imported_by_no_module():
    graph = import_graph()
    assert not [m for m, edges in graph.items() if "autocompress.worker_main" in edges]


def test_layers_point_down():
    """The orchestration layer's order: trials at the bottom, the CLI at the top."""
    graph = import_graph()
    order = ["trials", "storage", "tracking", "report", "refine", "review", "study", "objective", "orchestrate",
             "api", "cli"]
    for i, low in enumerate(order):
        for high in order[i + 1:]:
            assert f"autocompress.{high}" not in graph[f"autocompress.{low}"], f"{low} imports {high}"
