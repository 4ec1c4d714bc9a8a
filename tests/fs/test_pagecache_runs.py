"""Write-back by runs of pages (docs/performance.md "Fewer Python steps per
page"): a written page's plaintext is zeroed, a whole write's buffer at once
where possible, and never a buffer a still-dirty page lives in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyfence.fs import writeback
from keyfence.fs.pagecache import PAGE_SIZE, PageCache
from tests.fs.test_pagecache import KEY, Opened, decrypt_backing


def _buffers(cache: PageCache, f: Opened) -> list[bytearray | memoryview]:
    with cache.lock:
        return [f.file.pages[i].data for i in sorted(f.file.pages)]


@pytest.mark.parametrize("chunk_pages", [3, 8, 256])
@pytest.mark.parametrize("offset", [0, 5 * PAGE_SIZE, 12345])
def test_written_pages_are_zeroed_whatever_the_runs(
    tmp_path: Path, chunk_pages: int, offset: int
) -> None:
    # large writes (pages are views into one buffer per write), unaligned to
    # the batches, plus small ones: every plaintext buffer ends zeroed
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=chunk_pages)
    f = Opened(cache, tmp_path / "a")
    want = bytearray(offset)
    for n in (40 * PAGE_SIZE, 9 * PAGE_SIZE + 7, 100, 33 * PAGE_SIZE):
        data = os.urandom(n)
        cache.write(f.file, len(want), data)
        want += data
    buffers = _buffers(cache, f)
    owners = [b.obj if isinstance(b, memoryview) else b for b in buffers]
    cache.flush(f.file)
    assert cache.dirty_bytes == 0
    assert decrypt_backing(f.path) == bytes(want)
    # kept until the backing store has them (PageCache.retain_locked)
    assert cache.stored_bytes == len(buffers) * PAGE_SIZE
    cache.fsync(f.file)
    assert cache.stored_bytes == 0
    assert all(not any(b) for b in buffers)
    assert all(not any(o) for o in owners)  # the whole write buffers too


def test_a_rewritten_page_keeps_its_write_buffer_alive(tmp_path: Path) -> None:
    # a page rewritten in place after the snapshot stays dirty, in the large
    # write's buffer: writing back the others of that buffer must not zero it
    # (write_through=0: the large write stays in the cache)
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=16, write_through=0)
    f = Opened(cache, tmp_path / "a")
    data = bytearray(os.urandom(16 * PAGE_SIZE))
    cache.write(f.file, 0, data)
    order = sorted(f.file.pages)
    with cache.lock:
        chunk, _ = writeback.next_chunk_locked(cache, f.file, order, 0)
    assert chunk is not None
    records = chunk.cipher.encrypt_blocks(chunk.first, b"".join(chunk.blocks))
    cache.write(f.file, 15 * PAGE_SIZE + 1, b"x")  # the last page, after the snapshot
    data[15 * PAGE_SIZE + 1] = ord("x")
    assert writeback.store_batch(cache, f.file, [chunk], [memoryview(records)]) == 15 * PAGE_SIZE
    assert cache.dirty_bytes == PAGE_SIZE
    assert f.read_all() == bytes(data)
    cache.flush(f.file)
    assert decrypt_backing(f.path) == bytes(data)


def test_a_page_forgotten_mid_run_ends_the_run(tmp_path: Path) -> None:
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=64)
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, os.urandom(20 * PAGE_SIZE))
    order = sorted(f.file.pages)
    cache.truncate(f.file, 7 * PAGE_SIZE + 10)  # pages 8.. go after order was taken
    with cache.lock:
        chunk, pos = writeback.next_chunk_locked(cache, f.file, order, 0)
    assert chunk is not None and chunk.first == 0 and len(chunk.pages) == 8 and pos == 8
    assert chunk.last_len == 10


def test_an_emergency_drop_zeroes_scattered_pages_and_write_buffers(tmp_path: Path) -> None:
    cache = PageCache(dirty_limit=64 << 20, expire=60)
    f = Opened(cache, tmp_path / "a")
    for start in (0, 50, 200):  # large writes with gaps between them, and small ones
        cache.write(f.file, start * PAGE_SIZE, os.urandom(20 * PAGE_SIZE))
    cache.write(f.file, 30 * PAGE_SIZE + 9, b"small")
    cache.write(f.file, 55 * PAGE_SIZE, b"inside a large write's page")
    buffers = _buffers(cache, f)
    owners = [b.obj if isinstance(b, memoryview) else b for b in buffers]
    busy, dropped = cache.drop_key(KEY)
    assert busy == [1] and dropped == {1: 61 * PAGE_SIZE}
    assert all(not any(b) for b in buffers)
    assert all(not any(o) for o in owners)
    assert cache.dirty_bytes == 0
