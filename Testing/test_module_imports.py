"""The engine's modules import one another one way: no circle, not even through an import
inside a function (a lazy import hides a circle until the day someone moves it to the top)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import BrainLobeSegLib

PACKAGE = Path(BrainLobeSegLib.__file__).parent


def package_imports() -> Dict[str, Set[str]]:
    """Module name -> the package's modules it imports anywhere in its source."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names if a.name in modules)
        graph[path.stem] = found - {path.stem}
    return graph


def find_circle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle (its modules, the first repeated at the end), or [] if none."""
    state: Dict[str, int] = {}            # 1: on the current path, 2: done

    def visit(module: str, path: List[str]) -> List[str]:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [module, nxt] if nxt in path else [module, nxt]
            if nxt not in state:
                circle = visit(nxt, path + [module])
                if circle:
                    return circle
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            if circle:
                return circle
    return []


def test_find_circle_sees_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_engine_imports_run_one_way():
    graph = package_imports()
    assert {"alignment", "head_grid", "symmetry_plane", "reference_registration"} <= set(graph)
    assert find_circle(graph) == []
