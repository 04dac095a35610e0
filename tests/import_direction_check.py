"""The import graph of lorambo (and lorambo_kernels) and the checks of its direction.

Each module belongs to a *unit*: a subpackage of lorambo (``ops``), a top-level module
(``optimizer``), ``kernels`` for lorambo_kernels, or ``__init__`` for the package top. Units sit
on floors (docs/architecture.md) and may import only units on their own floor or below:

- :func:`floor_violations`: an import from a unit to a unit on a higher floor;
- :func:`same_floor_cycles`: units of one floor that import each other in a ring;
- :func:`module_cycles`: modules (files) whose top-level imports form a ring (a function-level
  import runs at call time, when every module is loaded, so it cannot deadlock an import).

Every ``import`` statement counts, wherever it stands (functions included), except inside
``if TYPE_CHECKING:`` blocks, which never run. ``from pkg import name`` is an edge to the module
``pkg.name`` when that is a module of the tree, else to ``pkg`` itself. Importing a submodule runs
its package's ``__init__`` first, but that is no edge here: a package's ``__init__`` re-exporting
its own submodules is not a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lorambo": ROOT / "lorambo", "lorambo_kernels": ROOT / "kernels" / "lorambo_kernels"}

FLOORS = {
    "distributed": 0, "sharding": 0, "ext": 0, "_C": 0, "kernels": 0, "version": 0, "optional": 0, "user_warnings": 0,
    "ops": 1, "dtensor_gather": 1,
    "nn": 2, "optim": 2,
    "model": 3, "adapters": 3,
    "sensitivity": 4,
    "allocation": 5,
    "optimizer": 6, "integrations": 6,
    "experiments": 7, "cli": 7,
    "__init__": 8, "__main__": 8,
}


@dataclass(frozen=True)
class Edge:
    """``source`` (a module) imports ``target`` (a module) at ``path``:``line``."""

    source: str
    target: str
    path: str
    line: int
    top_level: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def unit_of(module: str) -> str:
    """``lorambo.ops.backend`` -> ``ops``; ``lorambo`` -> ``__init__``; ``lorambo_kernels.x`` -> ``kernels``."""
    parts = module.split(".")
    if parts[0] == "lorambo_kernels":
        return "kernels"
    return parts[1] if len(parts) > 1 else "__init__"


def module_files(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its __init__)."""
    out = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((name, *rel))] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, top_level) for every import node, skipping ``if TYPE_CHECKING:`` bodies. Top level:
    not inside a function (class bodies, ``try`` and ``if`` at module level run at import)."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk_one(sub, in_function)
                continue
            yield from walk_one(child, in_function)

    def walk_one(node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, not in_function
        yield from walk(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


def edges_of(module: str, source: str, path: str, known: set[str]) -> list[Edge]:
    """The import edges of one module's source to modules in ``known`` (the others are outside)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node, top in _imports(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            while target and target not in known:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != module:
                out.append(Edge(module, target, path, node.lineno, top))
    return out


def import_graph(packages: dict[str, Path] = PACKAGES) -> list[Edge]:
    files = module_files(packages)
    known = set(files)
    edges = []
    for module, path in files.items():
        edges += edges_of(module, path.read_text(), str(path.relative_to(ROOT)), known)
    return edges


def floor_violations(edges: list[Edge], floors: dict[str, int] = FLOORS) -> list[str]:
    """One line per import from a unit to a unit on a higher floor, or from/to a unit without one."""
    out = []
    for e in edges:
        src, dst = unit_of(e.source), unit_of(e.target)
        if src not in floors or dst not in floors:
            missing = src if src not in floors else dst
            out.append(f"{e}: unit {missing!r} has no floor (add it to FLOORS and docs/architecture.md)")
        elif floors[dst] > floors[src]:
            out.append(f"{e}: {src} (floor {floors[src]}) must not import {dst} (floor {floors[dst]})")
    return out


def _cycles(nodes_edges: dict[str, list[tuple[str, Edge]]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(nodes_edges):
        if root in index:
            continue
        work = [(root, iter(nodes_edges.get(root, [])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt, _ in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(nodes_edges.get(nxt, []))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _describe(cycle: list[str], graph: dict[str, list[tuple[str, Edge]]], label: str) -> str:
    members = set(cycle)
    inner = sorted({str(e) for n in cycle for nxt, e in graph.get(n, []) if nxt in members})
    return f"{label} {' <-> '.join(cycle)}:\n    " + "\n    ".join(inner)


def module_cycles(edges: list[Edge]) -> list[str]:
    """One entry per ring of modules that import each other at top level, naming every import in it."""
    graph: dict[str, list[tuple[str, Edge]]] = {}
    for e in edges:
        if e.top_level:
            graph.setdefault(e.source, []).append((e.target, e))
    return [_describe(c, graph, "module cycle") for c in _cycles(graph)]


def same_floor_cycles(edges: list[Edge], floors: dict[str, int] = FLOORS) -> list[str]:
    """One entry per ring of distinct units on one floor that import each other (any import)."""
    graph: dict[str, list[tuple[str, Edge]]] = {}
    for e in edges:
        src, dst = unit_of(e.source), unit_of(e.target)
        if src != dst and src in floors and floors.get(dst) == floors[src]:
            graph.setdefault(src, []).append((dst, e))
    return [_describe(c, graph, f"floor {floors[c[0]]} unit cycle") for c in _cycles(graph)]
