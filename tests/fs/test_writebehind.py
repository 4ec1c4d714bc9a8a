"""Disk writes started and flushed behind a long write-back
(fs/writebehind.py), and when the page cache's write-back asks for them
(fs/writeback.py).

The calls are recorded by wrappers that still make the real ones (an
injected ``datasync``, ``start_writeback`` patched in the module); the last
test runs them against a disk that fails its writes, to show that an error
the flush behind sees still reaches the cache's own fsync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyfence.fs import writebehind
from keyfence.fs.cachedfile import CachedFile
from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import PageCache
from keyfence.fs.writebehind import WriteBehind
from tests.fs.test_faults import loop_ext4

MASTER = MasterKey(bytes(range(64)))
KEY = "keyfence:" + MASTER.identifier
MIB = 1 << 20


class Recorder:
    """An injected ``datasync``: records, then does the real call."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[int, int, int, os.stat_result]] = []
        """(thread ident, file offset, access mode, fstat) per call."""
        self.gate = gate

    def __call__(self, fd: int) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        self.calls.append((threading.get_ident(), os.lseek(fd, 0, os.SEEK_CUR), mode, os.fstat(fd)))
        os.fdatasync(fd)


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """(thread ident, offset, length) of every start of disk writes, in order."""
    calls: list[tuple[int, int, int]] = []
    real = writebehind.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((threading.get_ident(), offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(writebehind, "start_writeback", spy)
    yield calls


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "the write-behind thread did not get there"
        time.sleep(0.005)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_starts_then_a_flush_run_in_order_on_another_thread(
    starts: list[tuple[int, int, int]], tmp_path: Path
) -> None:
    rec = Recorder()
    wb = WriteBehind(datasync=rec)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * (3 * MIB))  # the offset is 3 MiB now; a dup would share it
        before = open_fds()
        assert not wb.start(os.dup(fd), 0, MIB)
        assert not wb.start(os.dup(fd), MIB, MIB)
        assert wb.start(os.dup(fd), 2 * MIB, MIB, flush=True)
        wb.stop()
        assert open_fds() == before  # every descriptor handed over was closed
        assert [(off, n) for _, off, n in starts] == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)]
        [(ident, offset, mode, st)] = rec.calls
        assert {i for i, *_ in starts} == {ident} and ident != threading.get_ident()
        assert offset == 0  # a new open file description
        assert mode == os.O_RDONLY
        mine = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 3 * MIB  # the caller's is untouched
    finally:
        os.close(fd)
    assert (wb.started, wb.flushed) == (3, 1)


def test_a_flush_asked_for_while_one_is_under_way_is_declined_not_its_start(
    starts: list[tuple[int, int, int]], tmp_path: Path
) -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    wb = WriteBehind(datasync=rec)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert wb.start(os.dup(fd), 0, MIB, flush=True)
        wait_for(lambda: wb.started == 1)
        assert not wb.start(os.dup(fd), MIB, MIB, flush=True)  # the first still runs
        gate.set()
        wait_for(lambda: wb.flushed == 1 and wb.started == 2)
        assert wb.start(os.dup(fd), 2 * MIB, MIB, flush=True)  # taken again
        wait_for(lambda: wb.flushed == 2)
    finally:
        wb.stop()
        os.close(fd)
    assert len(rec.calls) == 2 and len(starts) == 3


def test_what_is_not_a_regular_file_of_ours_is_not_flushed(
    starts: list[tuple[int, int, int]], tmp_path: Path
) -> None:
    rec = Recorder()
    wb = WriteBehind(datasync=rec)
    r, w = os.pipe()
    try:
        assert not wb.start(os.dup(r), 0, MIB, flush=True)  # a pipe: ESPIPE, ignored
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert wb.start(os.dup(fd), 0, MIB, flush=True)  # a decline left nothing busy
        wb.stop()
        before = open_fds()
        assert not wb.start(os.dup(fd), 0, MIB, flush=True)  # stop is final
        assert open_fds() == before  # and what was handed over is closed
    finally:
        os.close(fd)
    assert len(rec.calls) == 1 and (wb.started, wb.flushed) == (2, 1)


def test_work_handed_over_while_stopping_is_closed_not_lost(
    starts: list[tuple[int, int, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop between start()'s decision and its queueing (here: during the
    reopen) leaves no descriptor behind a thread that has ended."""
    wb = WriteBehind(datasync=Recorder())
    real = writebehind.reopen_read_only

    def reopen_then_stop(fd: int) -> int:
        own = real(fd)
        threading.Thread(target=wb.stop).start()
        wait_for(lambda: wb._stopped)
        return own

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not wb.start(os.dup(fd), 0, MIB)  # the thread runs from here
        wait_for(lambda: wb.started == 1)
        before = open_fds()
        monkeypatch.setattr(writebehind, "reopen_read_only", reopen_then_stop)
        assert not wb.start(os.dup(fd), 0, MIB, flush=True)
        wb.stop()
        assert open_fds() == before
    finally:
        os.close(fd)
    assert (wb.started, wb.flushed) == (1, 0)


def test_every_zero_starts_but_never_flushes(
    starts: list[tuple[int, int, int]], tmp_path: Path
) -> None:
    rec = Recorder()
    wb = WriteBehind(every=0, datasync=rec)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not wb.start(os.dup(fd), 0, MIB, flush=True)
    finally:
        wb.stop()
        os.close(fd)
    assert rec.calls == [] and len(starts) == 1


@contextlib.contextmanager
def cached_file(cache: PageCache, path: Path) -> Iterator[tuple[int, CachedFile]]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    f = cache.open(1, KEY, MASTER, lambda: fd, disk_size=0)
    try:
        yield fd, f
    finally:
        cache.release(f)
        cache.write_behind.stop()


def test_a_write_back_an_fsync_follows_hands_the_disk_work_behind_it(
    starts: list[tuple[int, int, int]], tmp_path: Path
) -> None:
    cache = PageCache(dirty_limit=64 * MIB, expire=1e9)
    rec = Recorder()
    cache.write_behind = WriteBehind(every=16 * MIB, datasync=rec)
    data = os.urandom(MIB)
    with cached_file(cache, tmp_path / "f") as (fd, f):
        for i in range(2):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        assert (starts, rec.calls) == ([], [])  # less than START_IO_BYTES stored
        for i in range(2, 32):
            cache.write(f, i * MIB, data)
        cache.flush(f)
        assert (starts, rec.calls) == ([], [])  # nothing follows: nothing asked of the disk
        for i in range(32, 64):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        wait_for(lambda: cache.write_behind.flushed >= 1)
        mine = os.fstat(fd)
    assert starts and {i for i, *_ in starts} != {threading.get_ident()}
    assert 1 <= len(rec.calls) <= len(starts)
    assert all((st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) for *_, st in rec.calls)


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on an ext4 without a journal whose disk (a loop device
    over a sparse image on a 24 MiB tmpfs) fails writes once the tmpfs is
    full: write(2) and the page cache take them, the write-back gets
    ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tmpfs, loop device, mount")
    small, mnt = tmp_path / "small", tmp_path / "mnt"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        # no journal: with one, failed ordered data writes abort it and
        # the ext4 goes read-only (EROFS at the next write, seen 1 in 6)
        init = ["-O", "^has_journal", "-E", "lazy_itable_init=0"]
        with loop_ext4(small / "img", 128 * MIB, mnt, init):
            yield mnt
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, capture_output=True)


def test_an_error_the_flush_behind_sees_still_fails_the_fsync(failing_disk: Path) -> None:
    """Linux reports a write-back error once per open file description: the
    flush behind runs on a description of its own, so the cache's fsync
    still fails (a ``dup`` of the cache's descriptor would have taken the
    report).  A kernel fact this module relies on, checked on the kernel."""
    cache = PageCache(dirty_limit=128 * MIB, expire=1e9)
    rec = Recorder()
    cache.write_behind = WriteBehind(every=4 * MIB, datasync=rec)
    seen: list[int] = []
    real = rec.__call__

    def datasync(fd: int) -> None:
        try:
            real(fd)
        except OSError as err:
            seen.append(err.errno or 0)
            raise

    cache.write_behind._datasync = datasync
    wb = cache.write_behind
    data = os.urandom(MIB)
    with cached_file(cache, failing_disk / "f") as (fd, f):
        for i in range(40):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        # Flushes asked for while one ran were declined, so one more over
        # the whole file once none runs: it sees the error unless an
        # earlier flush behind did (a description opened after an error
        # another one saw is not told of it again).
        wait_for(lambda: not wb._flushing)
        assert wb.start(os.dup(fd), 0, 0, flush=True)
        wb.stop()  # every flush behind has run
        assert seen and set(seen) <= {errno.ENOSPC, errno.EIO}
        with pytest.raises(OSError) as caught:
            cache.fsync(f)
        assert caught.value.errno in (errno.ENOSPC, errno.EIO)
