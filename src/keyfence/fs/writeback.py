"""Write-back: dirty pages of a :class:`~keyfence.fs.pagecache.PageCache`
sealed and stored in the backing file.

Functions over the cache, under its one concurrency contract (the lock
protocol at the top of fs/pagecache.py, which this module keeps): the cache's
lock guards every field they read or change; sealing, ``fsync`` and starting
the disk writes run without it.  :func:`flush_file` is one file's write-back
with ``f.flushing`` held; a pass of more than one batch runs on two threads
alike (:func:`_flush_pipelined`), a shorter one on the caller's.

The cache is typed by the :class:`PageCache` protocol below, since
fs/pagecache.py imports this module; the records both use (a page, a cached
file) are fs/cachedfile.py's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol, cast

from keyfence.fs import sealer, wipe
from keyfence.fs.cachedfile import PAGE_SIZE, CachedFile, Page, Progress
from keyfence.fs.crypto import FileCipher, RecordBuffer
from keyfence.fs.format import (
    BLOCK_OVERHEAD,
    FILE_HEADER_SIZE,
    RECORD_SIZE,
    FileHeader,
    backing_size,
    record_offset,
)
from keyfence.fs.syscalls import set_mtime_ns
from keyfence.fs.writebehind import WriteBehind

__all__ = ["START_IO_BYTES", "flush_file", "next_chunk_locked", "store_batch", "zero_pages"]

_ZERO_PAGE = bytes(PAGE_SIZE)


class PageCache(Protocol):
    """What the write-back uses of :class:`keyfence.fs.pagecache.PageCache`
    (which imports this module): the lock of the protocol, the batch size,
    the count of dirty pages and of bytes written, the store thread, the
    thread that starts the disk writes (fs/writebehind.py)."""

    lock: threading.Lock
    chunk_pages: int
    _dirty_pages: int
    stats: dict[str, int]
    _store_thread: ThreadPoolExecutor | None
    _store_thread_lock: threading.Lock
    write_behind: WriteBehind

    def retain_locked(
        self, f: CachedFile, first: int, pages: list[Page]
    ) -> list[bytearray | memoryview]: ...


@dataclass
class _Chunk:
    first: int
    pages: list[Page]
    """The page objects of consecutive pages ``first, first+1, ...``."""
    versions: list[int]
    """Their versions, as snapshotted."""
    blocks: list[bytearray | memoryview]
    """Their buffers (not copied; the last one cut at end of file)."""
    last_len: int
    generation: int
    cipher: FileCipher

    def records_size(self) -> int:
        return (len(self.pages) - 1) * RECORD_SIZE + self.last_len + BLOCK_OVERHEAD


_version_of = attrgetter("version")
_data_of = attrgetter("data")


def zero_pages(buffers: list[bytearray | memoryview]) -> None:
    """Zero the plaintext of written pages, a whole write's buffer at once
    where the pages are all of it (docs/security.md).

    ``buffers`` are the data of distinct pages, all being let go.  A page
    made by a large write is a view into that write's buffer of ``m``
    pages, one view per page.  When ``m`` pages in a row are all views
    into the same buffer of ``m`` pages, they are all of its pages, so
    zeroing the whole buffer in one call touches no page still in use.
    (Checking only the first and the last is not enough: a page of the
    buffer may still be dirty, or kept stored, while an older page of
    another buffer at its index sits between them.)
    """
    k, count = 0, len(buffers)
    while k < count:
        data = buffers[k]
        if type(data) is memoryview:
            block = data.obj
            m = len(block) // PAGE_SIZE if type(block) is bytearray else 0
            if (
                m > 1
                and k + m <= count
                and all(
                    type(other) is memoryview and other.obj is block
                    for other in buffers[k + 1 : k + m]
                )
            ):
                wipe.zero(block)
                k += m
                continue
        data[:] = _ZERO_PAGE
        k += 1


class _StartIO:
    """Byte range of a backing file stored by one flush pass and not yet
    handed to the disk; handed over every :data:`START_IO_BYTES`."""

    __slots__ = ("hi", "lo", "stored")

    def __init__(self) -> None:
        self.lo = -1
        self.hi = -1
        self.stored = 0


class _Pass:
    """What the two threads of a pipelined flush pass share (under
    :attr:`PageCache.lock`): the dirty pages to go, where they are in it,
    the batches taken and stored (in that order), the bytes written, the
    disk writes to start, and whether one failed."""

    __slots__ = ("failed", "order", "pos", "started", "stored", "taken", "turns", "written")

    def __init__(self, order: list[int], started: _StartIO | None, lock: threading.Lock) -> None:
        self.order = order
        self.pos = 0
        self.taken = 0
        self.stored = 0
        self.turns = threading.Condition(lock)
        """Notified (under the cache's lock) when a batch is stored or a
        thread failed."""
        self.written = 0
        self.started = started
        self.failed = False


_TWO_SEALERS = len(os.sched_getaffinity(0)) > 1 and sealer.NATIVE is not None
"""Whether a pipelined pass takes a second thread: with two CPUs and the
native sealer, which lets the GIL go for a whole batch (the Python path
holds it per record, and two sealers taking turns at it seal slower than
one: docs/performance.md, "Crypto on every core").  Fixed at import."""

START_IO_BYTES = 8 << 20
"""Write-back that an fsync follows starts the disk writes every 8 MiB, so
the fsync finds the work under way instead of starting all of it."""


def flush_file(cache: PageCache, f: CachedFile, progress: Progress | None, start_io: bool) -> int:
    """:meth:`PageCache.flush` with ``f.flushing`` held."""
    written = 0
    mtime: int | None = None
    for _ in range(4):  # pages written meanwhile get another pass
        with cache.lock:
            if not f.pages:
                break
            order = sorted(f.pages)
            mtime = f.mtime_ns
        written += _flush_pass(cache, f, order, progress, written, start_io)
    finish_extension(cache, f)
    restore_mtime(cache, f, mtime if written else None)
    return written


def _flush_pass(
    cache: PageCache,
    f: CachedFile,
    order: list[int],
    progress: Progress | None,
    done: int,
    start_io: bool,
) -> int:
    if len(order) > cache.chunk_pages:
        return _flush_pipelined(cache, f, order, progress, done, start_io)
    written = 0
    pos = 0
    while pos < len(order):
        with cache.lock:
            batch, pos = _next_batch_locked(cache, f, order, pos)
        if not batch:
            continue
        records = _encrypt_batch(batch, RecordBuffer(sum(len(c.pages) for c in batch)))
        written += store_batch(cache, f, batch, records)
        if progress is not None:
            progress(done + written)
    return written


def _flush_pipelined(
    cache: PageCache,
    f: CachedFile,
    order: list[int],
    progress: Progress | None,
    done: int,
    start_io: bool,
) -> int:
    """A pass of several batches on two threads alike, this one and the
    store thread: each takes a batch (under the lock), seals it into a
    buffer of its own (no lock), then stores it (one ``pwrite``) and takes
    the next in one lock hold.  So one thread seals while the other
    stores, on two cores, and a thread done sealing waits for the other's
    store only to store its own.  Batches are stored in the order they
    were taken: a file growing out of order would leave a hole, which
    reads as zeros, if the worker died between the two stores (a
    thread waits for the other's store, not for its sealing).  On one
    CPU this thread does it all."""
    shared = _Pass(order, _StartIO() if start_io else None, cache.lock)
    helper: Future[None] | None = None
    if _TWO_SEALERS:
        helper = _store_executor(cache).submit(_flush_worker, cache, f, shared, None, 0)
    try:
        _flush_worker(cache, f, shared, progress, done)
    except BaseException:  # shared.failed is set
        # failing already: let the helper end first (cancel(): it had not
        # started, another file's pass has the thread)
        if helper is not None and not helper.cancel():
            with contextlib.suppress(Exception):
                helper.result()
        raise
    if helper is not None and not helper.cancel():
        helper.result()  # its error (ENOSPC...) is this pass's
    return shared.written


def _flush_worker(
    cache: PageCache, f: CachedFile, shared: _Pass, progress: Progress | None, done: int
) -> None:
    """One thread's part of :func:`_flush_pipelined`: take a batch, seal
    it, store it and take the next in one lock hold, so that the other
    thread, sealing meanwhile, never waits for this one's ``pwrite`` just to
    take its next batch (docs/performance.md, part 20)."""
    out = RecordBuffer(cache.chunk_pages)
    try:
        with cache.lock:
            batch, turn = _take_locked(cache, f, shared)
        while batch:
            records = _encrypt_batch(batch, out)
            stored, batch, turn = _store_and_start_io(cache, f, batch, records, shared, turn)
            if stored < 0:
                return  # the other thread failed
            if progress is not None:
                progress(done + stored)
    except BaseException:
        with cache.lock:
            shared.failed = True
            shared.turns.notify_all()
        raise


def _take_locked(cache: PageCache, f: CachedFile, shared: _Pass) -> tuple[list[_Chunk], int]:
    """The pass's next batch and its turn to be stored; none (``[]``)
    when the pass is done or the other thread failed."""
    order = shared.order
    while not shared.failed and shared.pos < len(order):
        batch, shared.pos = _next_batch_locked(cache, f, order, shared.pos)
        if batch:
            shared.taken += 1
            return batch, shared.taken - 1
    return [], -1


def _store_executor(cache: PageCache) -> ThreadPoolExecutor:
    with cache._store_thread_lock:
        if cache._store_thread is None:
            cache._store_thread = ThreadPoolExecutor(1, thread_name_prefix="keyfence-store")
        return cache._store_thread


def _store_and_start_io(
    cache: PageCache,
    f: CachedFile,
    batch: list[_Chunk],
    records: list[memoryview],
    shared: _Pass,
    turn: int,
) -> tuple[int, list[_Chunk], int]:
    """Store the pass's batch number ``turn`` once those before it are,
    and take the next batch in the same lock hold: the pass's bytes
    written so far (-1: the other thread failed), the next batch and its
    turn (:func:`_take_locked`).  Every :data:`START_IO_BYTES` stored,
    have the disk write them, and now and then flush the file
    (fs/writebehind.py, another thread)."""
    spent: list[list[bytearray | memoryview]] = []
    start: tuple[int, int, int, bool] | None = None
    try:
        with cache.lock:
            while shared.stored != turn and not shared.failed:
                shared.turns.wait()
            if shared.failed:
                return -1, [], -1
            total, start = _store_locked(cache, f, batch, records, shared, spent)
            shared.stored += 1
            shared.turns.notify_all()
            batch, turn = _take_locked(cache, f, shared)
    except BaseException:
        if start is not None:
            os.close(start[0])  # the descriptor handed over is not started
        raise
    finally:
        for pages in spent:
            zero_pages(pages)
    if start is not None:
        fd, lo, hi, flush = start
        cache.write_behind.start(fd, lo, hi - lo, flush=flush)  # takes fd
    return total, batch, turn


def _store_locked(
    cache: PageCache,
    f: CachedFile,
    batch: list[_Chunk],
    records: list[memoryview],
    shared: _Pass,
    spent: list[list[bytearray | memoryview]],
) -> tuple[int, tuple[int, int, int, bool] | None]:
    """:func:`_store_and_start_io` under the lock: the pass's bytes
    written so far and, when due, the range whose disk writes to start
    (with a descriptor of its own of the backing file, for
    fs/writebehind.py: the file's may be closed meanwhile) and whether to
    flush the file behind it."""
    written = _store_batch_locked(cache, f, batch, records, spent)
    shared.written += written
    total = shared.written
    started = shared.started
    if started is None:
        return total, None
    # the range spans the batches stored since the last start (with
    # gaps, for scattered pages: the kernel skips what is not dirty)
    lo = record_offset(batch[0].first)
    hi = record_offset(batch[-1].first) + len(records[-1])
    started.lo = lo if started.lo < 0 else min(started.lo, lo)
    started.hi = max(started.hi, hi)
    started.stored += sum(len(r) for r in records)
    if started.stored < START_IO_BYTES:
        return total, None
    lo, hi = started.lo, started.hi
    f.unsynced += started.stored  # across passes: the flusher's are short
    started.lo, started.hi, started.stored = -1, -1, 0
    if f.fd < 0:
        return total, None
    every = cache.write_behind.every
    flush = 0 < every <= f.unsynced
    if flush:
        f.unsynced = 0
    return total, (os.dup(f.fd), lo, hi, flush)


def _next_batch_locked(
    cache: PageCache, f: CachedFile, order: list[int], pos: int
) -> tuple[list[_Chunk], int]:
    """Runs of dirty pages from ``order[pos:]``, up to ``chunk_pages``
    pages in all, adjacent or not: scattered pages (random writes) are
    encrypted and stored a batch at a time, not a call and a thread hop
    per page.  The page at the end of file (maybe short) ends a batch."""
    batch: list[_Chunk] = []
    room = cache.chunk_pages
    n = len(order)
    while pos < n and room > 0:
        chunk, pos = next_chunk_locked(cache, f, order, pos, room)
        if chunk is None:
            continue
        batch.append(chunk)
        room -= len(chunk.pages)
        if chunk.last_len < PAGE_SIZE:
            break
    return batch, pos


def _encrypt_batch(batch: list[_Chunk], out: RecordBuffer) -> list[memoryview]:
    """Encrypt a batch's pages into ``out`` (one call for all its runs);
    the records of each run, in ``out``."""
    indexes: Sequence[int]
    blocks: list[bytearray | memoryview]
    if len(batch) == 1:  # one run (sequential writes): its indexes are a range
        indexes = range(batch[0].first, batch[0].first + len(batch[0].pages))
        blocks, batch[0].blocks = batch[0].blocks, []
    else:
        indexes, blocks = [], []
        for chunk in batch:
            indexes.extend(range(chunk.first, chunk.first + len(chunk.pages)))
            blocks.extend(chunk.blocks)
            chunk.blocks = []
    batch[0].cipher.encrypt_indexed_into(indexes, blocks, out, checked=True)
    views = []
    start = 0
    for chunk in batch:
        views.append(out.buffer[start : start + chunk.records_size()])
        start += len(chunk.pages) * RECORD_SIZE
    return views


def next_chunk_locked(
    cache: PageCache, f: CachedFile, order: list[int], pos: int, limit: int = 0
) -> tuple[_Chunk | None, int]:
    """The next run of consecutive dirty pages from ``order[pos:]``,
    snapshotted: page objects, versions and a copy of the bytes."""
    pages = f.pages
    n = len(order)
    while pos < n and order[pos] not in pages:
        pos += 1
    if pos >= n or f.master is None:
        return None, n
    size = f.size
    first = order[pos]
    if first * PAGE_SIZE >= size:  # beyond the end (truncated meanwhile)
        return None, pos + 1
    if f.cipher is None:
        f.cipher = f.master.new_file_cipher()
        f.header_on_disk = False
    # the run: as many of order[pos:] as are consecutive, dirty and
    # inside the file, found with slices and C loops, not a step per page
    count = min(limit or cache.chunk_pages, n - pos, (size - 1) // PAGE_SIZE - first + 1)
    if order[pos + count - 1] - first != count - 1:
        # a gap: order is sorted and unique, so order[pos + j] == first + j
        # holds for a prefix of j only, shorter than count
        count = 1
        while order[pos + count] == first + count:
            count += 1
    found = list(map(pages.get, range(first, first + count)))
    if None in found:  # a page forgotten meanwhile ends the run (Page has no __eq__)
        found = found[: found.index(None)]
    run = cast("list[Page]", found)
    pos += len(run)
    blocks: list[bytearray | memoryview] = list(map(_data_of, run))
    last_len = min(PAGE_SIZE, size - (first + len(run) - 1) * PAGE_SIZE)
    if last_len < PAGE_SIZE:
        blocks[-1] = memoryview(blocks[-1])[:last_len]
    # No copy: a page written (or zeroed) while it is being encrypted
    # gets a new version under the lock, so its record is not stored.
    versions = list(map(_version_of, run))
    return _Chunk(first, run, versions, blocks, last_len, f.generation, f.cipher), pos


def store_batch(
    cache: PageCache, f: CachedFile, batch: list[_Chunk], records: list[memoryview]
) -> int:
    """:func:`_store_chunk_locked` for every run of a batch, under one
    lock hold; the written pages are zeroed after it."""
    spent: list[list[bytearray | memoryview]] = []
    try:
        with cache.lock:
            return _store_batch_locked(cache, f, batch, records, spent)
    finally:
        for pages in spent:
            zero_pages(pages)


def _store_batch_locked(
    cache: PageCache,
    f: CachedFile,
    batch: list[_Chunk],
    records: list[memoryview],
    spent: list[list[bytearray | memoryview]],
) -> int:
    return sum(
        _store_chunk_locked(cache, f, chunk, rec, spent)
        for chunk, rec in zip(batch, records, strict=True)
    )


def _store_chunk_locked(
    cache: PageCache,
    f: CachedFile,
    chunk: _Chunk,
    records: bytearray | memoryview,
    spent: list[list[bytearray | memoryview]],
) -> int:
    """Write the records of the pages that did not change since the
    snapshot (same page object, same version) and forget those pages.

    Their buffers go to ``spent``, to be zeroed once the lock is let go
    (:func:`zero_pages`): out of the cache, nothing else refers to them,
    and the lock, which the other flushing thread and the writers wait
    for, is not held for a ``memset`` of each batch."""
    count = len(chunk.pages)
    if f.generation != chunk.generation or f.cipher is not chunk.cipher or f.fd < 0:
        return 0
    pages = f.pages
    first = chunk.first
    now = list(map(pages.get, range(first, first + count)))
    if now == chunk.pages and list(map(_version_of, now)) == chunk.versions:
        current = [True] * count  # the usual case: two C loops, not a step per page
    else:
        current = [
            page is was and page.version == v
            for page, was, v in zip(now, chunk.pages, chunk.versions, strict=True)
        ]
    header: bytes | None = None
    if not f.header_on_disk:
        header = FileHeader(chunk.cipher.file_id).serialize()
        if chunk.first != 0 or not current[0]:
            os.pwrite(f.fd, header, 0)
            header = None
        # else: it goes out with the first records, one pwritev
        # (a small file is then one write: header and its block)
        f.header_on_disk = True
        f.disk_size = max(f.disk_size, FILE_HEADER_SIZE)
    view = memoryview(records)
    k = 0
    written = 0
    while k < count:
        if not current[k]:
            k += 1
            continue
        try:  # the run of current pages from k ends before the next stale one
            j = current.index(False, k) - 1
        except ValueError:
            j = count - 1
        start = k * RECORD_SIZE
        stop = len(records) if j == count - 1 else (j + 1) * RECORD_SIZE
        offset = record_offset(chunk.first + k)
        data = view[start:stop]
        done = 0
        if header is not None:  # block 0 and the header, adjacent
            done = os.pwritev(f.fd, [header, data], 0) - len(header)
            header = None
            if done < 0:  # a short write inside the header: rewrite it all
                os.pwrite(f.fd, FileHeader(chunk.cipher.file_id).serialize(), 0)
                done = 0
        while done < len(data):
            done += os.pwrite(f.fd, data[done:], offset + done)
        f.disk_size = max(f.disk_size, offset + len(data))
        # stored: kept until the backing store has written it (to store
        # again if it failed); the pages it supersedes are zeroed by the
        # caller once the lock is let go (docs/security.md)
        spent.append(
            cache.retain_locked(f, first + k, list(map(pages.pop, range(first + k, first + j + 1))))
        )
        cache._dirty_pages -= j - k + 1
        written += (j - k) * PAGE_SIZE + (chunk.last_len if j == count - 1 else PAGE_SIZE)
        k = j + 1
    if not pages and f.disk_size >= backing_size(f.size):
        f.dirty_since = None
    cache.stats["written_bytes"] += written
    return written


def finish_extension(cache: PageCache, f: CachedFile) -> None:
    """After the pages: a file grown by truncate gets its header and size,
    a file whose header the backing store failed to write gets it again."""
    with cache.lock:
        if f.master is None or f.fd < 0 or f.pages or f.size == 0:
            return
        need = backing_size(f.size)
        if f.disk_size >= need and f.header_on_disk:
            f.dirty_since = None
            return
        if f.cipher is None:
            f.cipher = f.master.new_file_cipher()
            f.header_on_disk = False
        if not f.header_on_disk:  # also: its write-back failed in the backing store
            os.pwrite(f.fd, FileHeader(f.cipher.file_id).serialize(), 0)
            f.header_on_disk = True
        if f.disk_size < need:
            os.ftruncate(f.fd, need)
            f.disk_size = need
        f.dirty_since = None


def restore_mtime(cache: PageCache, f: CachedFile, mtime: int | None) -> None:
    """Write-back happens after the write: keep the write's mtime."""
    if mtime is None:
        return
    with cache.lock:
        if f.fd < 0:
            return
        try:
            set_mtime_ns(f.fd, mtime)
        except OSError:
            return
        if f.mtime_ns == mtime:
            f.mtime_ns = None
