"""The import graph: layers point down (pyproject's import-linter contracts,
checked by `make lint`) and no module imports itself back through others.

A cycle means two modules are really one, or that a shared contract
(``internal.h`` in the kernel's words) is missing between them.  Imports
made only for the type checker count: they are the same dependency.
``KNOWN_CYCLES`` is empty (issue 15 took the last ones apart) and stays so:
a new cycle fails.
"""

from __future__ import annotations

import sys

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the test extra)")

KNOWN_CYCLES: list[set[str]] = []


def _cycles() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = grimp.build_graph("keyfence", cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = set()
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.add(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for module in sorted(graph.modules):
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_new_import_cycles() -> None:
    new = [c for c in _cycles() if not any(c <= known for known in KNOWN_CYCLES)]
    assert new == [], f"new import cycles: {new}"
