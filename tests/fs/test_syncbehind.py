"""Flushes behind a long write-back (fs/syncbehind.py) and when the page
cache's write-back offers one (fs/writeback.py).

The flush is recorded by an injected ``datasync`` that still calls the real
``fdatasync``; the last test runs the real one against a disk that fails
its writes, to show an error it sees still reaches the cache's own fsync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.cachedfile import CachedFile
from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import PageCache
from keyfence.fs.syncbehind import SyncBehind
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


def wait_synced(sb: SyncBehind, n: int) -> None:
    deadline = time.monotonic() + 10
    while sb.synced < n:
        assert time.monotonic() < deadline, "the flush did not run"
        time.sleep(0.005)


def test_a_flush_runs_on_a_description_of_its_own_on_another_thread(tmp_path: Path) -> None:
    rec = Recorder()
    sb = SyncBehind(datasync=rec)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 5000)  # the offset is 5000 now; a dup would share it
        assert sb.offer(fd)
        sb.stop()
        [(ident, offset, mode, st)] = rec.calls
        assert ident != threading.get_ident()
        assert offset == 0  # a new open file description
        assert mode == os.O_RDONLY
        mine = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 5000  # the caller's is untouched
        os.fstat(fd)  # and still open
    finally:
        os.close(fd)
    assert sb.synced == 1


def test_an_offer_while_a_flush_is_under_way_is_declined(tmp_path: Path) -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    sb = SyncBehind(datasync=rec)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert sb.offer(fd)
        assert not sb.offer(fd)
        gate.set()
        wait_synced(sb, 1)
        assert sb.offer(fd)  # the next one is taken again
        wait_synced(sb, 2)
    finally:
        sb.stop()
        os.close(fd)
    assert len(rec.calls) == 2


def test_what_is_not_a_regular_file_of_ours_is_declined(tmp_path: Path) -> None:
    rec = Recorder()
    sb = SyncBehind(datasync=rec)
    r, w = os.pipe()
    try:
        assert not sb.offer(r)  # a pipe: reopened, not a regular file
    finally:
        os.close(r)
        os.close(w)
    assert not sb.offer(r)  # closed
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert sb.offer(fd)  # a decline left nothing busy
        sb.stop()
        assert not sb.offer(fd)  # stop is final
    finally:
        os.close(fd)
    assert len(rec.calls) == 1 and sb.synced == 1


def test_every_zero_never_offers(tmp_path: Path) -> None:
    sb = SyncBehind(every=0, datasync=Recorder())
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not sb.offer(fd)
    finally:
        os.close(fd)
        sb.stop()


@contextlib.contextmanager
def cached_file(cache: PageCache, path: Path) -> Iterator[tuple[int, CachedFile]]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    f = cache.open(1, KEY, MASTER, lambda: fd, disk_size=0)
    try:
        yield fd, f
    finally:
        cache.release(f)
        cache.sync_behind.stop()


def test_a_write_back_an_fsync_follows_offers_the_file_every_so_often(tmp_path: Path) -> None:
    cache = PageCache(dirty_limit=64 * MIB, expire=1e9)
    rec = Recorder()
    cache.sync_behind = SyncBehind(every=4 * MIB, datasync=rec)
    data = os.urandom(MIB)
    with cached_file(cache, tmp_path / "f") as (fd, f):
        for i in range(2):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        assert rec.calls == []  # less than ``every`` started
        for i in range(2, 32):
            cache.write(f, i * MIB, data)
        cache.flush(f)
        assert rec.calls == []  # nothing follows: no disk writes started, no flush
        for i in range(32, 64):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        wait_synced(cache.sync_behind, 1)
        mine = os.fstat(fd)
    assert rec.calls
    assert all((st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) for *_, st in rec.calls)


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on an ext4 whose disk (a loop device over a sparse image
    on a 24 MiB tmpfs) fails writes once the tmpfs is full: write(2) and
    the page cache take them, the write-back gets ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tmpfs, loop device, mount")
    small, mnt = tmp_path / "small", tmp_path / "mnt"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        with loop_ext4(small / "img", 128 * MIB, mnt):
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
    cache.sync_behind = SyncBehind(every=4 * MIB, datasync=rec)
    seen: list[int] = []
    real = rec.__call__

    def datasync(fd: int) -> None:
        try:
            real(fd)
        except OSError as err:
            seen.append(err.errno or 0)
            raise

    cache.sync_behind._datasync = datasync
    data = os.urandom(MIB)
    with cached_file(cache, failing_disk / "f") as (_fd, f):
        for i in range(40):
            cache.write(f, i * MIB, data)
        cache.flush(f, start_io=True)
        cache.sync_behind.stop()  # every flush behind has run
        assert seen and set(seen) <= {errno.ENOSPC, errno.EIO}
        with pytest.raises(OSError) as caught:
            cache.fsync(f)
        assert caught.value.errno in (errno.ENOSPC, errno.EIO)
