"""The project's import graph, read from the source with ``ast`` (nothing is imported), and the rules it must keep.

An edge is one ``import`` statement, wherever it stands (a function-level import is an import all the same); an
import under ``if TYPE_CHECKING:`` is type-only and kept apart, since it never runs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder → the name it installs as (server/ and worker/ keep short folder names, see pyproject.toml).
PACKAGES = {"ef21": "ef21", "ef21_wire": "ef21_wire", "server": "ef21_server", "worker": "ef21_worker"}

# The core's rooms, bottom up. A room may import rooms of a lower rank, never one of its own rank or above;
# problems sit beside methods (same rank: neither imports the other).
ROOM_RANK = {
    "ef21.errors": 0,
    "ef21.compression": 1,
    "ef21.methods": 2,
    "ef21.problems": 2,
    "ef21.engine": 3,
    "ef21.cli": 4,
    "ef21.experiments": 5,
    "ef21.__main__": 6,
}
# Top-level modules of ef21/ besides the rooms: the package's public entry points.
ENTRY_POINTS = {"ef21", "ef21.__main__", "ef21.errors"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    type_only: bool


def module_name(path: Path, root: Path, packages: dict[str, str]) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = packages[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, bool]]:
    out: list[tuple[ast.stmt, bool]] = []

    def walk(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, type_only))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.body:
                    walk_stmt(n, True)
                for n in child.orelse:
                    walk_stmt(n, type_only)
            else:
                walk(child, type_only)

    def walk_stmt(node: ast.stmt, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, type_only))
        else:
            walk(node, type_only)

    walk(tree, False)
    return out


def read_graph(root: Path = ROOT, packages: dict[str, str] | None = None) -> tuple[set[str], list[Edge]]:
    """Every module of the project's packages, and every import among them."""
    packages = packages or PACKAGES
    files = {module_name(p, root, packages): p
             for folder in packages for p in sorted((root / folder).rglob("*.py"))}
    modules = set(files)
    edges: list[Edge] = []
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node, type_only in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` imports the module pkg.mod when there is one, else a name of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                # ``import a.b.c`` of a name inside a module: the longest prefix that is a module.
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.append(Edge(name, t, node.lineno, type_only))
    return modules, edges


def room(module: str) -> str | None:
    """The core room a module belongs to (None outside ef21)."""
    if module == "ef21":
        return None
    for r in sorted(ROOM_RANK, key=len, reverse=True):
        if module == r or module.startswith(r + "."):
            return r
    return None


def upward_imports(edges: list[Edge]) -> list[str]:
    """Imports between core rooms that do not point down (type-only ones included: they show a misplaced name)."""
    bad = []
    for e in edges:
        a, b = room(e.source), room(e.target)
        if a is None or b is None or a == b:
            continue
        if ROOM_RANK[b] >= ROOM_RANK[a]:
            bad.append(f"{e.source}:{e.line} imports {e.target} ({a} may not import {b})")
    return bad


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), over the imports that run."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if not e.type_only:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
