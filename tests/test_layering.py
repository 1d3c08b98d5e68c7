"""The house's layout holds: dependencies point one way, there is no import circle, and the core stays free of
the network. Read from the source (``tests/layering.py``), so a new import that breaks a rule fails here."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from tests.layering import ENTRY_POINTS, ROOM_RANK, ROOT, cycles, read_graph, room, upward_imports

MODULES, EDGES = read_graph()
NETWORK = ("grpc", "google.protobuf", "ef21_wire", "ef21_server", "ef21_worker")


def test_core_rooms_import_downward_only():
    assert upward_imports(EDGES) == []


def test_no_import_circles_in_the_project():
    """No circle among ef21, ef21_wire, the master and the worker, counting type-only imports too (none is needed
    today; one that is the honest shape may be allowed here by name, with the reason)."""
    assert cycles(MODULES, EDGES) == []
    assert cycles(MODULES, [replace(e, type_only=False) for e in EDGES]) == []


def test_core_imports_no_network():
    """ef21/ runs in one process without gRPC: only the command's entry point registers the service's commands."""
    bad = []
    for path in sorted((ROOT / "ef21").rglob("*.py")):
        if path == ROOT / "ef21" / "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in {x.split(".")[0] for x in NETWORK} and (n == "google.protobuf" or
                                                                                  not n.startswith("google."))]
    assert bad == []


def test_core_top_level_holds_only_rooms_and_entry_points():
    top = {m for m in MODULES if m.startswith("ef21.") and m.count(".") == 1} | {"ef21"}
    loose = top - ENTRY_POINTS - set(ROOM_RANK)
    assert loose == set(), f"modules at ef21/'s top level that belong in a room: {sorted(loose)}"
    for m in MODULES:
        if m.startswith("ef21.") and m not in ENTRY_POINTS:
            assert room(m) is not None, m


@pytest.mark.parametrize("pkg", sorted(p for p in ROOM_RANK if (ROOT / p.replace(".", "/")).is_dir()))
def test_every_room_says_what_lives_there_and_what_it_may_import(pkg):
    init = ROOT / pkg.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert "may import" in doc.lower(), f"{init.relative_to(ROOT)}: its docstring should say what it may import"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    """The rules above can fail: a planted upward import, a planted circle and a type-only import are seen."""
    root = _tree(tmp_path, {
        "ef21/__init__.py": "",
        "ef21/errors.py": "",
        "ef21/compression/__init__.py": "",
        "ef21/compression/codec.py": "from ef21.engine.nodes import X\n",  # upward
        "ef21/methods/__init__.py": "",
        "ef21/methods/a.py": "def f():\n    from . import b\n",  # a lazy import is an import
        "ef21/methods/b.py": "from .a import f\n",
        "ef21/problems/__init__.py": "",
        "ef21/problems/p.py": "from ef21.methods.a import f\n",  # beside, not below
        "ef21/engine/__init__.py": "",
        "ef21/engine/nodes.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ef21.cli.x import Y\n",
        "ef21/cli/__init__.py": "",
        "ef21/cli/x.py": "",
    })
    modules, edges = read_graph(root, {"ef21": "ef21"})
    up = upward_imports(edges)
    assert any("ef21.compression.codec" in u for u in up)
    assert any("ef21.problems.p" in u for u in up)
    assert any("ef21.engine.nodes" in u and "ef21.cli.x" in u for u in up)  # type-only: still the wrong room
    assert cycles(modules, edges) == [["ef21.methods.a", "ef21.methods.b"]]
