"""keyfence.testing.bench.quiet: the wait before each timed run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.testing.bench import quiet


def _stat(written: int, in_flight: int) -> str:
    # Documentation/block/stat.rst: 17 fields; 7th write sectors, 9th in_flight
    fields = [0] * 17
    fields[6], fields[8] = written, in_flight
    return " ".join(f"{v:>8}" for v in fields) + "\n"


def test_disk_activity_sums_the_disks_but_ram_disks(tmp_path: Path) -> None:
    for name, written, in_flight in (("vda", 100, 1), ("loop0", 20, 2), ("ram0", 999, 9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stat").write_text(_stat(written, in_flight))
    (tmp_path / "gone").mkdir()  # a device without its stat: skipped
    assert quiet.disk_activity(tmp_path) == (120, 3)


def test_disk_activity_of_this_machine() -> None:
    written, in_flight = quiet.disk_activity()
    assert written >= 0 and in_flight >= 0


def _readings(values: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    yield from values
    while True:
        yield values[-1]


def test_the_wait_ends_after_a_quiet_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    # pairs of (before, after) a spell: written back, in flight, then quiet
    readings = _readings([(0, 0), (5000, 0), (5000, 0), (5100, 3), (5100, 0), (5200, 0)])
    monkeypatch.setattr(quiet, "disk_activity", lambda: next(readings))
    monkeypatch.setattr(quiet.os, "sync", lambda: None)
    spells = []
    monkeypatch.setattr(quiet.time, "sleep", spells.append)
    quiet.wait_for_quiet_disks(spell=0.25)
    assert spells == [0.25, 0.25, 0.25]


def test_disks_that_never_go_quiet_are_waited_for_at_most_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = iter(range(0, 10**9, 10_000))
    monkeypatch.setattr(quiet, "disk_activity", lambda: (next(counter), 0))
    monkeypatch.setattr(quiet.os, "sync", lambda: None)
    waited = quiet.wait_for_quiet_disks(spell=0.01, most=0.1)
    assert 0.1 <= waited < 5
