"""Readahead of backing files (fs/readahead.py) and the window a sequential
reader of the page cache announces (PageCache._readahead_range_locked).

The announcements are recorded by a wrapper that still calls the real
``posix_fadvise``: what is checked is which thread announces what.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import record_offset
from keyfence.fs.pagecache import PAGE_SIZE, PageCache
from keyfence.fs.readahead import BackingReadahead

MASTER = MasterKey(bytes(range(64)))
KEY = "keyfence:" + MASTER.identifier
MIB = 1 << 20


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int, int]]]:
    """(thread ident, fd, offset, length) of every WILLNEED, in order."""
    calls: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((threading.get_ident(), fd, offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    yield calls


def test_announcements_run_in_order_on_another_thread(
    advised: list[tuple[int, int, int, int]], tmp_path: Path
) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4 * MIB))
    fd = os.open(path, os.O_RDONLY)
    ra = BackingReadahead()
    try:
        for k in range(5):
            ra.announce(fd, k * MIB, MIB)
        ra.stop()
    finally:
        os.close(fd)
    assert [(off, n) for _, _, off, n in advised] == [(k * MIB, MIB) for k in range(5)]
    assert {ident for ident, *_ in advised} == {advised[0][0]}
    assert advised[0][0] != threading.get_ident()
    assert ra.announced == 5


def test_bad_descriptors_are_ignored_and_stop_is_final(
    advised: list[tuple[int, int, int, int]],
) -> None:
    ra = BackingReadahead()
    r, w = os.pipe()
    os.close(w)
    ra.announce(r, 0, MIB)  # a pipe: ESPIPE
    os.close(r)
    ra.announce(r, 0, MIB)  # closed: EBADF
    ra.stop()
    ra.stop()
    assert ra.announced == 2
    ra.announce(0, 0, MIB)  # after stop: dropped, no thread started again
    assert ra.announced == 2 and len(advised) == 2


def test_a_sequential_reader_announces_each_byte_once_ahead_of_it(
    advised: list[tuple[int, int, int, int]], tmp_path: Path
) -> None:
    path = tmp_path / "f"
    prefetch = 4 * MIB
    cache = PageCache(dirty_limit=64 * MIB, expire=60, write_through=0, prefetch=prefetch)
    f = cache.open(1, KEY, MASTER, lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    size = 16 * MIB
    cache.write(f, 0, bytes(range(256)) * (size // 256))
    cache.flush(f)
    reads = 0
    for off in range(0, size, MIB):
        assert bytes(cache.read(f, off, MIB))[:256] == bytes(range(256))
        reads += 1
        # whatever was announced stays within one window past the next block
        if advised:
            _, fd, start, n = advised[-1]
            assert fd == f.fd
            assert start + n <= record_offset((off + MIB) // PAGE_SIZE) + prefetch
    # a reader that jumps around announces nothing more
    cache.read(f, 5 * MIB, MIB)
    cache.read(f, 2 * MIB, MIB)
    cache.release(f)
    cache.readahead.stop()  # runs what was announced first
    ranges = [(start, start + n) for _, _, start, n in advised]
    # back to back from the second read's next block: nothing twice, no gap
    assert ranges[0][0] == record_offset(2 * MIB // PAGE_SIZE)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert ranges[-1][1] <= record_offset(size // PAGE_SIZE) + prefetch
    # topped up half a window at a time: fewer announcements than reads
    assert 1 < len(ranges) < reads
    assert all(n >= prefetch // 2 for _, _, _, n in advised)
