"""The worker's log budget (fs/log_budget.py), alone and through a mount."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.log_budget import LogBudget
from keyfence.testing.mounting import Mount, fuse_available


def _logger(budget: LogBudget) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(budget)
    logger = logging.getLogger(f"test-budget-{id(budget)}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger, out


def test_a_burst_passes_then_the_rest_is_counted_on_the_next_line() -> None:
    budget = LogBudget(burst=10, per_second=0.0)
    logger, out = _logger(budget)
    for n in range(100):
        logger.error("line %d", n)
    assert out.getvalue().splitlines() == [f"line {n}" for n in range(10)]
    budget._tokens = 1.0  # as a second's refill would
    logger.error("after")
    assert out.getvalue().splitlines()[-1] == "(90 lines left out) after"


def test_past_the_total_one_line_says_so_and_nothing_follows() -> None:
    logger, out = _logger(LogBudget(burst=10**6, per_second=0.0, total_bytes=1 << 20))
    for _ in range(20_000):
        logger.error("x" * 100)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("log budget of 1 MiB spent: nothing more is logged")
    assert len(lines) < 10_000


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    why = fuse_available()
    if why is not None:
        pytest.skip(why)
    m = Mount(tmp_path)
    try:
        yield m
    finally:
        m.unmount()


def test_a_user_reading_its_corrupted_block_in_a_loop_cannot_fill_the_log(mount: Mount) -> None:
    """Each failed read was an ERROR line: 4.5 MB/s of log into the daemon's
    directory (the system daemon's is on /run: memory) from a loop reading
    a block the user corrupted (a helper's attack run, 2026-12-07; failed
    before: one line per read)."""
    master = MasterKey(os.urandom(64))
    mount.add_key(master)
    (mount.mnt / "enc").mkdir()
    os.setxattr(mount.mnt / "enc", "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
    (mount.mnt / "enc" / "f").write_bytes(os.urandom(64 << 10))
    fd = os.open(mount.mnt / "enc" / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    (backing,) = [p for p in (mount.backing / "enc").iterdir() if not p.name.startswith(".")]
    mount.unmount()  # nothing of it cached in the worker
    with open(backing, "r+b") as f:
        f.seek(5000)
        f.write(b"XXXXXXXX")
    mount.start()
    mount.add_key(master)
    fd = os.open(mount.mnt / "enc" / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = bytearray(4096)
        view = memoryview(buf)
        failed = 0
        for _ in range(3000):
            try:
                os.preadv(fd, [view], 4096)
            except OSError:
                failed += 1
    finally:
        os.close(fd)
    assert failed == 3000
    errors = [x for x in mount.log().splitlines() if "failed authentication" in x]
    assert 0 < len(errors) < 1500, len(errors)
