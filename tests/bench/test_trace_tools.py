"""The reading of a trace (bench/fuse_trace.py, and
keyfence.testing.bench.kernel_trace for its ``--day``),
bench/fs_handlers.py run small, and the order the side-by-side benches
run their systems in (keyfence.testing.bench.results.rotated).

The trace is a few lines in the kernel's format (tracefs ``trace``, padding
and lengths left out), so the figures can be checked by hand; the handler
bench runs for real, in this process, over a temporary backing directory
(20 files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keyfence.testing.bench.kernel_trace import fuse_requests
from keyfence.testing.bench.results import rotated

from .test_suite import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench"
fuse_trace = load_script(BENCH / "fuse_trace.py", "bench_fuse_trace")
fs_handlers = load_script(BENCH / "fs_handlers.py", "bench_fs_handlers")

TRACE = """\
# tracer: nop
python-100 [001] ...1. 10.000000: fuse_request_send: connection 40 req 2 opcode 1 (FUSE_LOOKUP)
keyfence-200 [000] ..... 10.000030: fuse_request_end: connection 40 req 2 error 0
<idle>-0 [001] dNh2. 10.000048: sched_wakeup: comm=python pid=100 target_cpu=001
python-100 [001] ...1. 10.000050: fuse_request_send: connection 40 req 4 opcode 35 (FUSE_CREATE)
python-100 [001] ...2. 10.000051: fuse_request_send: connection 40 req 6 opcode 18 (FUSE_RELEASE)
keyfence-200 [001] ..... 10.000090: fuse_request_end: connection 40 req 4 error 0
keyfence-200 [001] dN.4. 10.000092: sched_wakeup: comm=python pid=100 target_cpu=001
keyfence-200 [001] ..... 10.000100: fuse_request_end: connection 40 req 6 error 0
python-300 [000] ...1. 10.000200: fuse_request_send: connection 40 req 8 opcode 1 (FUSE_LOOKUP)
keyfence-200 [001] ..... 10.000220: fuse_request_end: connection 40 req 8 error -2
"""


def test_a_trace_gives_latency_by_opcode_and_where_the_caller_woke() -> None:
    out = fuse_trace.analyse(TRACE.splitlines(), caller=100, files=1)
    assert out["ops"]["LOOKUP"] == {"per_file": 2.0, "median_us": 25.0}  # 30 and 20 us
    assert out["ops"]["CREATE"] == {"per_file": 1.0, "median_us": 40.0}
    assert out["ops"]["RELEASE"] == {"per_file": 1.0, "median_us": 49.0}
    # the LOOKUP answered on CPU 0 woke the caller on CPU 1 after 18 us;
    # the CREATE answered on CPU 1 woke it there after 2 us
    assert out["wake"]["other CPU"] == {"share": 0.5, "median_us": 18.0}
    assert out["wake"]["same CPU"] == {"share": 0.5, "median_us": 2.0}


def test_a_trace_without_wakes_has_no_wake_figures() -> None:
    lines = TRACE.splitlines()[:3]
    out = fuse_trace.analyse([line for line in lines if "wakeup" not in line], 100, 1)
    assert out["wake"]["same CPU"] == {"share": 0.0, "median_us": None}


def test_the_handler_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--plain"], ["--tar"]):
        assert fs_handlers.main(["--scratch", str(tmp_path), "--files", "20", *extra]) == 0
        printed = capsys.readouterr().out
        for op in fs_handlers.CYCLE:
            assert printed.count(f"{op} ") == 1, printed
        assert ("SETATTR times" in printed) == (extra == ["--tar"]), printed
        assert (" 3/file" in printed) == (extra == ["--tar"]), printed  # tar's three writes
        assert "sum of the medians" in printed
    assert list(tmp_path.iterdir()) == []  # the backing directory went with it


def test_the_day_trace_gives_requests_and_mean_server_time_by_opcode() -> None:
    ops = fuse_requests(TRACE.splitlines())
    assert ops == {
        "LOOKUP": {"count": 2, "mean_us": 25.0},  # 30 and 20 us
        "RELEASE": {"count": 1, "mean_us": 49.0},
        "CREATE": {"count": 1, "mean_us": 40.0},
    }
    assert list(ops) == ["LOOKUP", "RELEASE", "CREATE"]  # by time spent


def test_each_system_leads_a_round_in_turn() -> None:
    names = ["keyfence", "keyfence-before", "gocryptfs"]
    rounds = [rotated(names, run) for run in range(3)]
    assert rounds == [
        ["keyfence", "keyfence-before", "gocryptfs"],
        ["keyfence-before", "gocryptfs", "keyfence"],
        ["gocryptfs", "keyfence", "keyfence-before"],
    ]
    for place in range(3):  # every place in the order once each
        assert sorted(r[place] for r in rounds) == sorted(names)
    assert rotated(names, 4) == rounds[1] and rotated([], 2) == []
