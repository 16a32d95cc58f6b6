"""The package's layers, read from the source with `ast` (no imports, no Ray): every import of a ranray
module, at the top of a file or inside a function, is an edge of one graph, and

- the graph has no cycle (a lazy import hiding one still counts);
- nothing under ranray/data or ranray/models imports ranray.train, ranray.commands, ranray.tune or
  ranray.tracking (the lower layers feed the upper ones, never the reverse);
- no module under ranray/ names a file under the repository's bench/ or tests/ (what the package needs,
  it ships).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ranray"
LOWER = ("ranray.data", "ranray.models")
UPPER = ("ranray.train", "ranray.commands", "ranray.tune", "ranray.tracking")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ranray modules an import statement loads (`from pkg import mod` names the module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("ranray"):
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= {t for t in imported(module, node) if t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_top_level_and_function_level_imports():
    graph = import_graph()
    assert "ranray.data.schema" in graph["ranray.data.loader"]  # top level
    assert "ranray.data.dali_pipeline" in graph["ranray.data.loader"]  # inside _iter_dali (DALI is slow to import)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_upper_ones():
    upward = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if m.startswith(LOWER)
                    for t in targets if t.startswith(UPPER))
    assert upward == []


def test_the_package_reads_nothing_under_bench_or_tests():
    # A path built from parts ("bench" / "x.json") or written whole ("bench/x.json").
    pattern = re.compile(r"""["'](bench|tests)["']|["'](bench|tests)/""")
    readers = sorted(str(p.relative_to(REPO)) for p in MODULES.values() if pattern.search(p.read_text()))
    assert readers == []
