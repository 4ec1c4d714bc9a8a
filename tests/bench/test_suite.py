"""bench/suite.py: failures become error rows, tables and README block, charts.

Nothing here is timed: the scripts run are tiny stand-ins written by the tests.
bench/ is a directory of scripts, not a package: the suite script is loaded
from its file (importlib), as ``python bench/suite.py`` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from keyfence.testing.bench import results

SUITE = Path(__file__).resolve().parents[2] / "bench" / "suite.py"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script by its path, under ``name`` (no sys.path entry for it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


suite = load_script(SUITE, "bench_suite")


def script(tmp_path: Path, name: str, body: str) -> suite.Bench:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    # an absolute script path replaces bench/ in BENCH_DIR / script
    return suite.Bench(name.removesuffix(".py"), str(path), 60, "test stand-in")


GOOD = """
    import sys
    from keyfence.testing.bench import results as c
    path = sys.argv[sys.argv.index("--json") + 1]
    rows = [
        c.result("seq", "keyfence", "MB/s", [90, 100, 110], higher_is_better=True),
        c.result("seq", "gocryptfs", "MB/s", [50], higher_is_better=True),
        c.result("seq", "disk", "MB/s", [200], higher_is_better=True),
        c.result("lock-64MiB", "keyfence", "s", [2.0], higher_is_better=False),
        c.result("lock-64MiB", "gocryptfs", "s", [4.0], higher_is_better=False),
        c.result("lock-64MiB", "disk", "s", [1.0], higher_is_better=False),
        c.result("lock-256MiB", "keyfence", "s", [4.0], higher_is_better=False),
        c.result("lock-256MiB", "disk", "s", [3.0], higher_is_better=False),
    ]
    print("measuring", flush=True)
    c.write_json(path, c.report("toy", quick="--quick" in sys.argv, results=rows,
                                errors=[c.error("seq", "fscrypt", "no loop device")]))
"""


def test_missing_script_is_an_error_not_a_crash(tmp_path: Path) -> None:
    bench = suite.Bench("absent", str(tmp_path / "absent.py"), 60, "not written yet")
    record = suite.run_one(bench, 1, 1, True, tmp_path)
    assert record["status"] == "missing"
    merged = suite.merge([record], True, [], 0.0)
    assert merged["results"] == []
    assert [e["bench"] for e in merged["errors"]] == ["absent"]


def test_crash_and_no_json_are_reported(tmp_path: Path) -> None:
    crash = script(tmp_path, "crash.py", "raise SystemExit(3)\n")
    silent = script(tmp_path, "silent.py", "print('no results')\n")
    records = [suite.run_one(b, i, 2, True, tmp_path) for i, b in enumerate((crash, silent), 1)]
    assert [r["status"] for r in records] == ["failed", "no-json"]
    assert records[0]["returncode"] == 3
    log = (tmp_path / records[1]["log"]).read_text()
    assert "no results" in log


def test_timeout_stops_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "QUICK_TIMEOUT_S", 1.0)
    slow = script(tmp_path, "slow.py", "import time\ntime.sleep(60)\n")
    record = suite.run_one(slow, 1, 1, True, tmp_path)
    assert record["status"] == "timeout"
    assert record["seconds"] < 30


def test_leftover_processes_do_not_hang_the_suite(tmp_path: Path) -> None:
    leaves = script(
        tmp_path,
        "leaves.py",
        """
        import subprocess
        subprocess.Popen(["sleep", "120"])  # inherits stdout, outlives the script
        print("bye", flush=True)
        """,
    )
    record = suite.run_one(leaves, 1, 1, True, tmp_path)
    assert record["status"] == "no-json"
    assert record["seconds"] < 60


def good_merged(tmp_path: Path) -> dict[str, Any]:
    record = suite.run_one(script(tmp_path, "toy.py", GOOD), 1, 1, True, tmp_path)
    assert record["status"] == "ok", (tmp_path / record["log"]).read_text()
    return suite.merge([record], True, [], 0.0)


def test_rows_are_merged_with_ratios(tmp_path: Path) -> None:
    merged = good_merged(tmp_path)
    rows = {(r["group"], r["system"]): r for r in merged["results"]}
    kf = rows[("seq", "keyfence")]
    assert kf["bench"] == "toy"
    assert (kf["median"], kf["min"], kf["max"]) == (100, 90, 110)
    assert kf["ratios"] == {"gocryptfs": 2.0, "disk": 0.5}
    # times: that/this, so 2 s against a 1 s sync is 0.5 ("half as good")
    assert rows[("lock-64MiB", "keyfence")]["ratios"] == {"gocryptfs": 2.0, "disk": 0.5}
    assert merged["errors"] == [
        {"bench": "toy", "group": "seq", "system": "fscrypt", "error": "no loop device"}
    ]
    json.dumps(merged)  # serialisable as written


def test_malformed_rows_become_errors() -> None:
    rows, errors = suite.clean_rows(
        "x",
        {
            "results": [
                {"group": "g", "system": "s", "median": "fast"},
                "nonsense",
                {"group": "g", "system": "t", "median": 2, "metric": "ms"},
            ]
        },
    )
    assert [(r["system"], r["min"], r["max"]) for r in rows] == [("t", 2.0, 2.0)]
    assert len(errors) == 2


def test_markdown_and_readme_block(tmp_path: Path) -> None:
    merged = good_merged(tmp_path)
    md = suite.markdown(merged, [("toy: MB/s", "charts/toy-mb-per-s.png")])
    assert "| seq | keyfence | MB/s | **100** | 90 | 110 | 3 | 2.00x | 0.50x |" in md
    assert "![toy: MB/s](charts/toy-mb-per-s.png)" in md
    assert "no loop device" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\nhand\n{suite.BEGIN}\nold\n{suite.END}\nkept\n")
    block = suite.readme_block(merged, [("toy", "bench/results/charts/toy.png")], "latest.md")
    assert suite.rewrite_readme(block, readme)
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\nhand\n")
    assert text.endswith(f"{suite.END}\nkept\n")
    assert "old" not in text
    # the compact view: one line per group, a column per system that recurs
    assert "| seq | MB/s | 100 | 50 | 200 | 2.00x | 0.50x |" in text
    assert "| lock-256MiB | s | 4 |  | 3 |  | 0.75x |" in text
    assert "![toy](bench/results/charts/toy.png)" in text
    assert suite.rewrite_readme(block, readme)  # again: same result, markers kept
    assert readme.read_text() == text


def test_readme_without_markers_is_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert not suite.rewrite_readme("block", readme)
    assert readme.read_text() == "# x\n"


def test_charts_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    from keyfence.testing.bench import charts

    merged = good_merged(tmp_path)
    made = charts.render(merged, tmp_path / "charts")
    names = sorted(Path(p).name for _, p in made)
    assert names == ["toy-lock.png", "toy-mb-per-s.png"]  # lock groups: the curve only
    for name in names:
        assert (tmp_path / "charts" / name).read_bytes().startswith(b"\x89PNG")


def test_ratio_direction() -> None:
    assert results.ratio(200.0, 100.0, higher_is_better=True) == 2.0
    assert results.ratio(1.0, 2.0, higher_is_better=False) == 2.0
    assert results.ratio(1.0, 0.0, higher_is_better=True) is None
