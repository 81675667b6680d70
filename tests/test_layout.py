"""The import graph of the library and its callbacks, read from the source with `ast` (nothing is imported): no two
modules import each other, the rooms form a one-way graph (DESIGN.md, "Rooms"), and `kernels` stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# module prefix -> folder; callbacks/ installs as paretomerge.callbacks (setup.cfg package_dir)
FOLDERS = {"paretomerge": ROOT / "paretomerge", "paretomerge.callbacks": ROOT / "callbacks"}


def module_files() -> dict[str, Path]:
    files = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def imported_names(module: str, path: Path) -> list[str]:
    """Every name ``module`` (at ``path``) imports, at any depth (function-level imports too); ``from a import b``
    gives ``a.b``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchored at this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports (a name resolves to its longest prefix that is a module)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        edges = set()
        for name in imported_names(module, path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def room(module: str) -> str:
    """``paretomerge.modules.base`` -> ``paretomerge.modules``; a top-level module is its own room."""
    return ".".join(module.split(".")[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_known_edges(graph):
    assert "paretomerge.kernels.architecture" in graph["paretomerge.kernels.builders"]  # module level
    assert "paretomerge.modules.checkpoint" in graph["paretomerge.modules.base"]  # `from package import module`
    assert "paretomerge.callbacks.front_logger" in graph
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_modules_import_each_other(graph):
    assert cycles(graph) == []


def test_rooms_import_one_way(graph):
    rooms: dict[str, set[str]] = {}
    for module, edges in graph.items():
        rooms.setdefault(room(module), set()).update(room(other) for other in edges if room(other) != room(module))
    assert cycles(rooms) == []
    # kernels knows nothing of the rest of the library: it may use only leaves (rooms importing no other, `progress`)
    assert all(not rooms.get(other) for other in rooms["paretomerge.kernels"]), rooms["paretomerge.kernels"]
    # the callbacks import the library, not the reverse; only the console script, which builds the Trainer, uses them
    assert {name for name, edges in rooms.items() if "paretomerge.callbacks" in edges} <= {"paretomerge.cli"}


def test_kernels_know_nothing_of_lightning():
    files = {m: p for m, p in module_files().items() if m.startswith("paretomerge.kernels")}
    used = {name.split(".")[0] for module, path in files.items() for name in imported_names(module, path)}
    assert "torch" in used
    assert not used & {"lightning", "pytorch_lightning", "torchmetrics"}
