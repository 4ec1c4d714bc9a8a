"""No ``sys.path`` edits in src/, bench/ or tests/, and no bench script
imports another (issue 15).

What tests and benchmarks share lives in the ``keyfence.testing`` package;
bench/ scripts import only ``keyfence``, the standard library and third-party
packages, and tests load a bench script from its file (docs/design.md,
"Tests and benchmarks").  An edit hides a dependency the layers cannot see:
this test fails on the first one, code strings for child processes included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("src", "bench", "tests")

_PATH = r"\bsys\s*\.\s*path\s*"
EDIT = re.compile(
    _PATH + r"(\.\s*(insert|append|extend|remove|pop|clear)\s*\(|\[[^\]]*\]\s*=[^=]|\+=|=[^=])"
    r"|\baddsitedir\s*\("
)
"""A call that changes the list, an assignment to it or an item, or site's way."""


def path_edits(root: Path) -> list[str]:
    """``file:line: text`` of every edit under ``root``'s trees."""
    found = []
    for tree in TREES:
        for path in sorted((root / tree).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if EDIT.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_the_pattern_finds_each_kind_of_edit() -> None:
    dot = "."  # spelt apart so that this file does not match itself
    for line in (
        f"sys{dot}path.insert(0, str(BENCH))",
        f'    f"import sys; sys{dot}path.insert(0, {{src!r}});"',
        f"sys{dot}path.append('x')",
        f"sys{dot}path[:0] = ['x']",
        f"sys{dot}path += ['x']",
        f"sys{dot}path = ['x']",
        "site.addsite" + "dir('x')",
    ):
        assert EDIT.search(line), line
    for line in (f"if 'x' in sys{dot}path:", f"list(sys{dot}path)", "without sys.path edits"):
        assert not EDIT.search(line), line


LAUNCHER = "src/keyfence/cli/launcher.py"
"""The one allowed: the installed ``kfctl`` script it writes runs ``python
-IS`` (no ``site``, so no site-packages on the path; docs/performance.md) and
must name the directory that holds ``keyfence`` itself.  That is the
product's entry point, not a test or a benchmark reaching into a sibling."""


def test_no_sys_path_edits() -> None:
    assert [edit for edit in path_edits(ROOT) if not edit.startswith(LAUNCHER + ":")] == []


def sibling_imports(root: Path) -> list[str]:
    """``file:line: module`` of every import in a bench/ script of another
    script (Python finds those through the script's own directory, no edit
    needed) or of ``tests``."""
    bench = root / "bench"
    scripts = {path.stem for path in bench.glob("*.py")}
    found = []
    for path in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in scripts or top == "tests":
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_bench_scripts_import_no_other_script() -> None:
    assert sibling_imports(ROOT) == []
