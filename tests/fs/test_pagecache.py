"""The worker's page cache on real files with real keys (no FUSE here).

Every test writes through :class:`PageCache`, reads back, and checks the
backing file with the format's own cipher: what is on disk is exactly the
format of docs/format.md, whatever mix of writes, truncations and flushes
made it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyfence.fs import pagecache, writeback
from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import (
    FILE_HEADER_SIZE,
    RECORD_SIZE,
    FileHeader,
    IntegrityError,
    backing_size,
    plaintext_size,
    record_offset,
)
from keyfence.fs.pagecache import (
    PAGE_SIZE,
    WRITE_THROUGH_BYTES,
    CachedFile,
    Flusher,
    PageCache,
    lenient_plaintext_size,
)

MASTER = MasterKey(bytes(range(64)))
KEY = "keyfence:" + MASTER.identifier


def decrypt_backing(path: Path, master: MasterKey = MASTER) -> bytes:
    """The plaintext of a backing file, read with the format alone."""
    raw = path.read_bytes()
    if len(raw) in (0, FILE_HEADER_SIZE):
        return b""
    header = FileHeader.parse(raw[:FILE_HEADER_SIZE])
    cipher = master.file_cipher(header.file_id)
    size = plaintext_size(len(raw))
    return bytes(cipher.decrypt_blocks(0, raw[FILE_HEADER_SIZE:]))[:size]


class Opened:
    def __init__(self, cache: PageCache, path: Path, ino: int = 1) -> None:
        self.cache = cache
        self.path = path
        self.file: CachedFile = cache.open(
            ino, KEY, MASTER, lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        )

    def read_all(self) -> bytes:
        return bytes(self.cache.read(self.file, 0, self.file.size + 10))


@pytest.fixture
def cache() -> Iterator[PageCache]:
    # write_through=0: a first write stays dirty too (what these tests are about)
    c = PageCache(
        dirty_limit=1 << 20, expire=60, label_of=lambda ino: f"file{ino}", write_through=0
    )
    yield c


def test_reads_see_unflushed_writes_and_nothing_is_on_disk(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(3 * PAGE_SIZE + 100)
    assert cache.write(f.file, 0, data) == len(data)
    assert f.read_all() == data
    assert cache.read(f.file, 5000, 10) == data[5000:5010]
    assert f.path.stat().st_size == 0
    assert cache.dirty_bytes == 4 * PAGE_SIZE
    assert cache.flush(f.file) == len(data)
    assert cache.dirty_bytes == 0
    assert f.path.stat().st_size == backing_size(len(data))
    assert decrypt_backing(f.path) == data
    assert data[:64] not in f.path.read_bytes()
    assert f.read_all() == data


@pytest.mark.parametrize(
    "size", [1, PAGE_SIZE - 1, PAGE_SIZE, 3 * PAGE_SIZE + 5, WRITE_THROUGH_BYTES]
)
def test_a_small_files_first_write_is_stored_at_once(tmp_path: Path, size: int) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(size)
    before = time.time_ns()
    assert cache.write(f.file, 0, data) == size
    assert cache.dirty_bytes == 0 and not cache.has_write_back(f.file)
    st = f.path.stat()
    assert st.st_size == backing_size(size)
    assert st.st_mtime_ns >= before - 10_000_000  # the write's own (coarse clock)
    assert decrypt_backing(f.path) == data
    assert f.read_all() == data
    assert cache.flush(f.file) == 0  # nothing left for close(2)
    assert f.path.stat().st_mtime_ns == st.st_mtime_ns


def test_writes_after_a_stored_first_write_go_through_the_cache(tmp_path: Path) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    model = bytearray(os.urandom(5000))  # a short second block on disk
    cache.write(f.file, 0, model)
    cache.write(f.file, 5000, b"appended")  # into the short block: read back first
    model += b"appended"
    cache.write(f.file, 10, b"x" * 3)  # an overwrite
    model[10:13] = b"x" * 3
    assert cache.dirty_bytes == 2 * PAGE_SIZE
    assert f.read_all() == model
    cache.flush(f.file)
    assert decrypt_backing(f.path) == model


@pytest.mark.parametrize(
    "first",
    [(1, b"not at 0"), (0, os.urandom(WRITE_THROUGH_BYTES + 1))],
    ids=["offset", "large"],
)
def test_other_first_writes_stay_in_the_cache(tmp_path: Path, first: tuple[int, bytes]) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    off, data = first
    cache.write(f.file, off, data)
    assert cache.dirty_bytes > 0 and f.path.stat().st_size == 0
    cache.flush(f.file)
    assert decrypt_backing(f.path) == bytes(off) + data


def test_an_emptied_file_is_stored_at_once_under_a_new_file_id(tmp_path: Path) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"first")
    old_id = f.path.read_bytes()[:FILE_HEADER_SIZE]
    cache.truncate(f.file, 0)
    cache.write(f.file, 0, b"second")
    assert cache.dirty_bytes == 0
    assert f.path.read_bytes()[:FILE_HEADER_SIZE] != old_id
    assert decrypt_backing(f.path) == b"second"


def test_a_first_write_during_a_removal_is_refused(tmp_path: Path) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    cache.close_key(KEY)
    with pytest.raises(OSError) as err:
        cache.write(f.file, 0, b"late")
    assert err.value.errno == errno.ENOKEY
    assert f.path.stat().st_size == 0


def test_a_failed_first_write_leaves_the_file_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = PageCache()
    f = Opened(cache, tmp_path / "a")
    real = os.pwritev

    def full(fd: int, buffers: list[bytes | memoryview], offset: int) -> int:
        real(fd, [bytes(buffers[0])[:10]], offset)  # a torn start, then no room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError) as err:
        cache.write(f.file, 0, b"no room")
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert f.path.stat().st_size == 0 and f.file.size == 0 and cache.dirty_bytes == 0
    assert cache.write(f.file, 0, b"room again") == 10
    assert decrypt_backing(f.path) == b"room again"


def test_read_modify_write_after_flush(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    model = bytearray(os.urandom(10000))
    cache.write(f.file, 0, model)
    cache.flush(f.file)
    cache.write(f.file, 4090, b"x" * 20)  # straddles blocks 0 and 1
    model[4090:4110] = b"x" * 20
    assert f.read_all() == model
    cache.flush(f.file)
    assert decrypt_backing(f.path) == model


def test_extending_past_a_partial_block_rewrites_it_and_leaves_holes(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"hello")
    cache.fsync(f.file)
    assert f.path.stat().st_size == backing_size(5)
    far = 50 * PAGE_SIZE + 7
    cache.write(f.file, far, b"end")
    model = bytearray(far + 3)
    model[:5] = b"hello"
    model[far:] = b"end"
    assert f.read_all() == model
    cache.fsync(f.file)
    assert decrypt_backing(f.path) == model
    st = f.path.stat()
    assert st.st_size == backing_size(len(model))
    assert st.st_blocks * 512 < 20 * PAGE_SIZE  # the middle is a hole
    fresh = Opened(PageCache(), f.path, ino=2)
    assert fresh.read_all() == model


def test_one_aligned_page_past_a_partial_block(cache: PageCache, tmp_path: Path) -> None:
    """PageCache.write's one-page path (random 4 KiB writes) keeps the
    generic path's rules: the old partial last block is written again."""
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"hello")
    cache.fsync(f.file)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    cache.write(f.file, 3 * PAGE_SIZE, page)
    cache.write(f.file, 3 * PAGE_SIZE, page[::-1])  # again: the same page, in place
    model = bytearray(4 * PAGE_SIZE)
    model[:5] = b"hello"
    model[3 * PAGE_SIZE :] = page[::-1]
    assert f.file.size == len(model)
    assert f.read_all() == model
    cache.fsync(f.file)
    assert decrypt_backing(f.path) == model


def test_truncate_shrink_grow_and_zero(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(5 * PAGE_SIZE)
    cache.write(f.file, 0, data)
    cache.fsync(f.file)
    cache.truncate(f.file, 6000)
    assert f.read_all() == data[:6000]
    cache.fsync(f.file)
    assert decrypt_backing(f.path) == data[:6000]
    cache.truncate(f.file, 3 * PAGE_SIZE + 1)
    expect = data[:6000] + bytes(3 * PAGE_SIZE + 1 - 6000)
    assert f.read_all() == expect
    cache.fsync(f.file)
    assert f.path.stat().st_size == backing_size(len(expect))
    assert decrypt_backing(f.path) == expect
    old_id = FileHeader.parse(f.path.read_bytes()[:FILE_HEADER_SIZE]).file_id
    cache.truncate(f.file, 0)
    assert f.path.stat().st_size == 0
    cache.write(f.file, 0, b"again")
    cache.fsync(f.file)
    new_id = FileHeader.parse(f.path.read_bytes()[:FILE_HEADER_SIZE]).file_id
    assert new_id != old_id
    assert decrypt_backing(f.path) == b"again"


def test_truncate_grow_only_writes_header_and_size(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.truncate(f.file, 1 << 20)
    assert f.read_all() == bytes(1 << 20)
    cache.fsync(f.file)
    st = f.path.stat()
    assert st.st_size == backing_size(1 << 20)
    assert st.st_blocks * 512 <= 8192
    assert decrypt_backing(f.path) == bytes(1 << 20)


def test_tampered_block_is_eio_naming_the_file(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(3 * PAGE_SIZE)
    cache.write(f.file, 0, data)
    cache.fsync(f.file)
    cache.release(f.file)
    raw = bytearray(f.path.read_bytes())
    raw[record_offset(1) + 100] ^= 1
    f.path.write_bytes(raw)
    g = Opened(cache, f.path)
    assert cache.read(g.file, 0, PAGE_SIZE) == data[:PAGE_SIZE]
    assert cache.read(g.file, 2 * PAGE_SIZE, PAGE_SIZE) == data[2 * PAGE_SIZE :]
    with pytest.raises(IntegrityError) as info:
        cache.read(g.file, 0, 3 * PAGE_SIZE)
    assert info.value.errno == errno.EIO
    assert info.value.block == 1
    assert info.value.filename == "file1"
    # a partial write into the damaged block cannot be merged: EIO too
    with pytest.raises(IntegrityError):
        cache.write(g.file, PAGE_SIZE + 1, b"x")


def test_truncated_backing_file_is_eio_in_the_last_block(tmp_path: Path) -> None:
    path = tmp_path / "a"
    cache = PageCache()
    f = Opened(cache, path)
    cache.write(f.file, 0, os.urandom(2 * PAGE_SIZE))
    cache.fsync(f.file)
    cache.release(f.file)
    os.truncate(path, record_offset(1) + 20)  # a torn last record
    g = Opened(PageCache(), path)
    assert g.file.size == lenient_plaintext_size(record_offset(1) + 20)
    with pytest.raises(IntegrityError):
        g.cache.read(g.file, PAGE_SIZE, 10)


def test_version_check_keeps_a_page_written_during_write_back(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"a" * PAGE_SIZE)
    order = sorted(f.file.pages)
    with cache.lock:
        chunk, _ = writeback.next_chunk_locked(cache, f.file, order, 0)
    assert chunk is not None
    records = chunk.cipher.encrypt_blocks(chunk.first, b"".join(chunk.blocks))
    cache.write(f.file, 0, b"b" * 10)  # written again after the snapshot
    assert writeback.store_batch(cache, f.file, [chunk], [memoryview(records)]) == 0
    assert cache.dirty_bytes == PAGE_SIZE
    cache.flush(f.file)
    assert decrypt_backing(f.path) == b"b" * 10 + b"a" * (PAGE_SIZE - 10)


@pytest.mark.parametrize("pipelined", [False, True])
def test_scattered_pages_are_written_back_in_batches(tmp_path: Path, pipelined: bool) -> None:
    # random 4 KiB writes leave runs of one page: a batch holds several runs
    # (one encrypt call), each still lands at its own record offset
    chunk_pages = 8
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=chunk_pages)
    f = Opened(cache, tmp_path / "a")
    size = 64 * PAGE_SIZE + 123  # a short last block
    base = os.urandom(size)
    cache.write(f.file, 0, base)
    cache.flush(f.file)
    want = bytearray(base)
    indexes = [3, 5, 6, 9, 17, 30, 31, 32, 40, 44, 50, 63]
    if pipelined:
        indexes += [1, 11, 13, 22, 25, 27, 35, 37, 42, 47, 52, 55, 57, 60]
    for idx in indexes:
        page = os.urandom(PAGE_SIZE)
        cache.write(f.file, idx * PAGE_SIZE, page)
        want[idx * PAGE_SIZE : (idx + 1) * PAGE_SIZE] = page
    cache.write(f.file, 64 * PAGE_SIZE, b"z" * 100)  # the short last page, dirty too
    want[64 * PAGE_SIZE : 64 * PAGE_SIZE + 100] = b"z" * 100
    cache.flush(f.file)
    assert cache.dirty_bytes == 0
    assert decrypt_backing(f.path) == bytes(want)
    assert os.path.getsize(f.path) == backing_size(size)
    assert f.read_all() == bytes(want)


class _CountingPwrite:
    """``os.pwrite`` that records the storing threads, can fail once, and
    can take ``delay`` seconds (a slow disk)."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.real = os.pwrite
        self.delay = delay
        self.calls = 0
        self.offsets: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __call__(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        with self.lock:
            self.calls += 1
            self.offsets.append(offset)
            self.threads.add(threading.current_thread().name)
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.delay:
            time.sleep(self.delay)
        return self.real(fd, data, offset)


@pytest.mark.skipif(not writeback._TWO_SEALERS, reason="one CPU or no native sealer: one thread")
def test_a_long_pass_seals_and_stores_on_two_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each thread seals a batch and stores it itself: the flushing thread
    # stores too, not only the store thread (before: only the store thread);
    # and in order, so that a worker dying between two stores leaves no
    # hole in a growing file (tests/fs/test_faults.py, killed mid-flush)
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=4)
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(256 * PAGE_SIZE + 77)
    cache.write(f.file, 0, data)
    # a store that takes 10 ms: the pass (64 stores) lasts long enough for
    # both threads to be scheduled (at full speed, on a loaded machine, the
    # store thread once did the whole pass before the flushing thread first
    # ran; 2 ms a store left ~130 ms for it, too little on a busy CI host)
    pwrite = _CountingPwrite(delay=0.01)
    monkeypatch.setattr(os, "pwrite", pwrite)
    cache.flush(f.file)
    monkeypatch.undo()
    assert cache.dirty_bytes == 0
    assert decrypt_backing(f.path) == data
    assert len(pwrite.threads) == 2, pwrite.threads
    assert pwrite.offsets == sorted(pwrite.offsets)


@pytest.mark.parametrize("fail_at", [1, 2, 7, 30])
def test_a_failed_store_in_a_long_pass_fails_the_flush_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    cache = PageCache(dirty_limit=64 << 20, expire=60, chunk_pages=4)
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(200 * PAGE_SIZE + 5)
    cache.write(f.file, 0, data)
    monkeypatch.setattr(os, "pwrite", _CountingPwrite(fail_at))
    with pytest.raises(OSError) as err:
        cache.flush(f.file)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert cache.dirty_bytes > 0  # what was not stored is still dirty
    assert f.read_all() == data
    cache.flush(f.file)  # the disk has room again
    assert cache.dirty_bytes == 0
    assert decrypt_backing(f.path) == data


def test_batch_encryption_matches_the_records_of_single_blocks() -> None:
    cipher = MASTER.file_cipher(bytes(16))
    indexes = [7, 2, 1000, 3]
    blocks = [os.urandom(PAGE_SIZE) for _ in indexes[:-1]] + [b"end"]
    out = memoryview(bytearray(len(indexes) * RECORD_SIZE))
    n = cipher.encrypt_indexed_into(indexes, blocks, out)
    assert n == 3 * RECORD_SIZE + 3 + RECORD_SIZE - PAGE_SIZE
    for k, (idx, block) in enumerate(zip(indexes, blocks, strict=True)):
        record = out[k * RECORD_SIZE : min(n, (k + 1) * RECORD_SIZE)]
        assert cipher.decrypt_block(idx, record) == block
        with pytest.raises(IntegrityError):  # sealed to its own index
            cipher.decrypt_block(idx + 1, record)
    with pytest.raises(ValueError):
        cipher.encrypt_indexed_into([-1], [b"x"], out)
    with pytest.raises(ValueError):
        cipher.encrypt_indexed_into([1, 2], [b"x"], out)


def test_concurrent_flushers_and_writer_lose_nothing(tmp_path: Path) -> None:
    cache = PageCache(dirty_limit=256 * PAGE_SIZE, expire=0.01, chunk_pages=8)
    f = Opened(cache, tmp_path / "a")
    model = bytearray()
    stop = threading.Event()
    errors: list[BaseException] = []

    def flusher() -> None:
        while not stop.is_set():
            try:
                cache.flush(f.file)
                cache.flush_until(0)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)
                return

    threads = [threading.Thread(target=flusher) for _ in range(3)]
    for t in threads:
        t.start()
    rng = __import__("random").Random(7)
    for _ in range(2000):
        off = rng.randrange(0, 64 * PAGE_SIZE)
        data = bytes([rng.randrange(256)]) * rng.randrange(1, 12 * PAGE_SIZE)
        cache.write(f.file, off, data)
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data
        if rng.random() < 0.02:
            size = rng.randrange(0, 64 * PAGE_SIZE)
            cache.truncate(f.file, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert f.read_all() == model
    cache.fsync(f.file)
    assert decrypt_backing(f.path) == model


_WRITES_AND_TRUNCATES = st.one_of(
    st.tuples(
        st.just("write"),
        st.one_of(st.integers(0, 6 * PAGE_SIZE), st.integers(0, 6).map(PAGE_SIZE.__mul__)),
        st.one_of(st.integers(1, 12 * PAGE_SIZE), st.integers(1, 12).map(PAGE_SIZE.__mul__)),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 7 * PAGE_SIZE), st.just(0)),
)
"""The model tests' writes (offset, length) and truncates (size)."""


def _write_or_truncate(
    cache: PageCache, f: Opened, model: bytearray, step: int, op: tuple[str, int, int]
) -> bool:
    """Apply a write or truncate of :data:`_WRITES_AND_TRUNCATES` to the
    file and to ``model``; False for any other step."""
    kind, a, b = op
    if kind == "write":
        data = bytes([step % 251 + 1]) * b
        cache.write(f.file, a, data)
        if len(model) < a:
            model.extend(bytes(a - len(model)))
        model[a : a + b] = data
    elif kind == "truncate":
        cache.truncate(f.file, a)
        del model[a:]
        model.extend(bytes(a - len(model)))
    else:
        return False
    return True


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            _WRITES_AND_TRUNCATES,
            st.tuples(st.just("flush"), st.just(0), st.just(0)),
            st.tuples(st.just("reopen"), st.just(0), st.just(0)),
        ),
        max_size=25,
    )
)
def test_model(tmp_path: Path, ops: list[tuple[str, int, int]]) -> None:
    path = tmp_path / f"m{time.monotonic_ns()}"
    cache = PageCache(chunk_pages=3, write_through=0)
    f = Opened(cache, path)
    model = bytearray()
    for step, (op, a, b) in enumerate(ops):
        if _write_or_truncate(cache, f, model, step, (op, a, b)):
            pass  # a write or truncate, applied to both
        elif op == "flush":
            cache.fsync(f.file)
            assert decrypt_backing(path) == model
        else:
            cache.fsync(f.file)
            cache.release(f.file)
            cache = PageCache(chunk_pages=3)
            f = Opened(cache, path)
        assert f.file.size == len(model)
        assert f.read_all() == model
    cache.fsync(f.file)
    assert path.stat().st_size == backing_size(len(model))
    assert decrypt_backing(path) == model


def test_flusher_writes_back_expired_pages(tmp_path: Path) -> None:
    cache = PageCache(expire=0.1, write_through=0)
    flusher = Flusher(cache)
    flusher.start()
    try:
        f = Opened(cache, tmp_path / "a")
        cache.write(f.file, 0, b"later")
        deadline = time.monotonic() + 5
        while cache.dirty_bytes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.dirty_bytes == 0
        assert decrypt_backing(f.path) == b"later"
    finally:
        flusher.stop()


def test_flusher_keeps_dirty_memory_under_the_limit(tmp_path: Path) -> None:
    cache = PageCache(dirty_limit=64 * PAGE_SIZE, expire=3600)
    flusher = Flusher(cache)
    flusher.start()
    try:
        f = Opened(cache, tmp_path / "a")
        cache.write(f.file, 0, os.urandom(48 * PAGE_SIZE))
        deadline = time.monotonic() + 5
        while cache.dirty_bytes > 16 * PAGE_SIZE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.dirty_bytes <= 16 * PAGE_SIZE
    finally:
        flusher.stop()


def test_the_heap_is_trimmed_when_idle_after_a_burst_never_while_dirty(
    cache: PageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagecache, "TRIM_AFTER_BYTES", 8 * PAGE_SIZE)
    trims: list[int] = []  # injected: the worker's malloc_trim (fs/syscalls.trim_heap)
    cache.trim_heap = lambda: trims.append(cache.dirty_bytes)
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, os.urandom(12 * PAGE_SIZE))
    assert not cache.trim_if_idle() and trims == []  # dirty: a removal may be under way
    cache.flush(f.file)
    # stored, kept until the backing store has written it: memory still in use
    assert not cache.trim_if_idle() and trims == []
    cache.fsync(f.file)
    assert cache.trim_if_idle() and trims == [0]
    assert not cache.trim_if_idle()  # nothing written back since
    cache.write(f.file, 0, os.urandom(4 * PAGE_SIZE))
    cache.fsync(f.file)
    assert not cache.trim_if_idle()  # 4 pages: less than a burst
    cache.write(f.file, 0, os.urandom(4 * PAGE_SIZE))
    cache.fsync(f.file)
    assert cache.trim_if_idle() and trims == [0, 0]


def test_the_flusher_trims_the_heap_after_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagecache, "TRIM_AFTER_BYTES", 8 * PAGE_SIZE)
    cache = PageCache(expire=0.1, write_through=0)
    cache.stored_wait = 0.1  # the pages stored go once the backing store has them
    trimmed = threading.Event()
    cache.trim_heap = trimmed.set
    flusher = Flusher(cache)
    flusher.start()
    try:
        f = Opened(cache, tmp_path / "a")
        cache.write(f.file, 0, os.urandom(16 * PAGE_SIZE))
        assert trimmed.wait(10)
        assert cache.dirty_bytes == 0
    finally:
        flusher.stop()


def test_flush_key_then_evict(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(10 * PAGE_SIZE)
    cache.write(f.file, 0, data)
    seen: list[int] = []
    cache.close_key(KEY)
    with pytest.raises(OSError) as info:
        cache.write(f.file, 0, b"no")
    assert info.value.errno == errno.ENOKEY
    assert cache.flush_key(KEY, seen.append) == len(data)
    assert seen and seen[-1] == len(data)
    busy, dropped = cache.evict_key(KEY)
    assert busy == [1] and dropped == {}
    with pytest.raises(OSError) as info:
        cache.read(f.file, 0, 1)
    assert info.value.errno == errno.ENOKEY
    assert decrypt_backing(f.path) == data
    # the key comes back: the open file works again
    again = cache.open(1, KEY, MASTER, lambda: -1)
    assert again is f.file
    assert cache.read(f.file, 0, len(data)) == data


def test_emergency_drop_counts_exact_bytes_and_zeroes_pages(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"kept")
    cache.fsync(f.file)
    cache.write(f.file, 0, b"x" * (2 * PAGE_SIZE + 5))
    pages = list(f.file.pages.values())
    busy, dropped = cache.drop_key(KEY)
    assert dropped == {1: 2 * PAGE_SIZE + 5}
    assert busy == [1]
    assert all(not any(p.data) for p in pages)
    assert cache.dirty_bytes == 0
    assert decrypt_backing(f.path) == b"kept"


def test_unlinked_file_pages_are_forgotten(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"gone" * 2000)
    cache.release(f.file)
    assert cache.get(1) is f.file  # dirty: still cached
    cache.forget_unlinked(f.file)
    assert cache.get(1) is None
    assert cache.dirty_bytes == 0


def test_release_of_a_clean_file_closes_it(cache: PageCache, tmp_path: Path) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"data")
    cache.fsync(f.file)
    fd = f.file.fd
    assert cache.release(f.file)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_file_closed_before_the_backing_store_wrote_it_closes_after(
    cache: PageCache, tmp_path: Path
) -> None:
    # stored, not yet written by the backing store: kept open (its pages are
    # to be written again if that write fails) until the flusher's wait
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"data")
    cache.flush(f.file)
    page = f.file.stored[0].data
    fd = f.file.fd
    assert not cache.release(f.file)
    assert cache.get(1) is f.file and not _closed(fd) and cache.stored_bytes == PAGE_SIZE
    assert cache.confirm_stored() == 0  # stored less than `stored_wait` (35 s) ago
    assert cache.confirm_stored(everything=True) == 1
    assert cache.stored_bytes == 0 and not any(page)
    assert cache.get(1) is None and _closed(fd)


def test_a_file_waiting_for_the_backing_store_may_be_idle_and_is_closed_after(
    tmp_path: Path,
) -> None:
    # idle while waiting; pushed out of the idle ones, still open until the
    # backing store has written what it stored, then closed
    cache = PageCache(idle_files=1)
    a = Opened(cache, tmp_path / "a", 1)
    cache.write(a.file, 0, b"a")
    fd = a.file.fd
    cache.release(a.file)
    assert cache.idle_inodes() == [1] and a.file.stored
    b = Opened(cache, tmp_path / "b", 2)
    cache.write(b.file, 0, b"b")
    cache.release(b.file)
    assert cache.idle_inodes() == [2]
    assert cache.get(1) is a.file and not _closed(fd)  # a still waits
    assert cache.confirm_stored(everything=True) == 2
    assert cache.get(1) is None and _closed(fd)
    assert cache.idle_inodes() == [2] and not b.file.stored


def test_a_file_kept_for_what_it_stored_is_closed_before_its_last_name_goes(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"data")
    cache.flush(f.file)
    page, fd = f.file.stored[0].data, f.file.fd
    assert not cache.release(f.file)
    cache.drop_idle(1, only_read_only=True)  # an open for writing: not this
    assert cache.get(1) is f.file
    cache.drop_idle(1)  # an unlink of its last name
    assert cache.get(1) is None and _closed(fd) and not any(page)
    assert cache.stored_bytes == 0


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_clean_files_stay_idle_for_the_next_open_least_recent_out_first(
    tmp_path: Path,
) -> None:
    cache = PageCache(idle_files=2)
    files = []
    for ino in (1, 2, 3):
        f = Opened(cache, tmp_path / f"f{ino}", ino)
        cache.write(f.file, 0, b"data %d" % ino)
        cache.fsync(f.file)
        files.append(f.file)
    assert not cache.release(files[0])  # kept: still in the cache
    assert cache.idle_inodes() == [1]
    assert not _closed(files[0].fd)

    def no_open() -> int:
        raise AssertionError("an idle file is not opened again")

    again = cache.open(1, KEY, MASTER, no_open)
    assert again is files[0] and cache.idle_inodes() == []
    assert cache.stats["idle_reopens"] == 1
    assert bytes(cache.read(again, 0, 100)) == b"data 1"
    fds = [f.fd for f in files]
    for f in files:  # 1, 2, 3 closed in turn: 1 is pushed out by 3
        cache.release(f)
    assert cache.idle_inodes() == [2, 3]
    assert cache.get(1) is None and _closed(fds[0]) and files[0].cipher is None
    assert not _closed(fds[1]) and not _closed(fds[2])


def test_an_idle_file_goes_with_its_key_and_when_unlinked(tmp_path: Path) -> None:
    cache = PageCache(idle_files=8)
    a = Opened(cache, tmp_path / "a", 1)
    b = Opened(cache, tmp_path / "b", 2)
    for f in (a, b):
        cache.write(f.file, 0, b"x")
        cache.fsync(f.file)
        cache.release(f.file)
    assert cache.idle_inodes() == [1, 2]
    fd_a, fd_b = a.file.fd, b.file.fd
    cache.forget_unlinked(a.file)
    assert cache.get(1) is None and _closed(fd_a) and cache.idle_inodes() == [2]
    busy, dropped = cache.evict_key(KEY)
    assert (busy, dropped) == ([], {})  # an idle file is not open: never "busy"
    assert cache.get(2) is None and _closed(fd_b) and cache.idle_inodes() == []
    assert b.file.cipher is None and b.file.master is None


def test_dirty_or_unreadable_files_are_not_kept_idle(tmp_path: Path) -> None:
    cache = PageCache(idle_files=8, write_through=0)
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, b"dirty")
    cache.release(f.file)
    assert cache.get(1) is f.file and cache.idle_inodes() == []  # dirty: kept for write-back
    (tmp_path / "bad").write_bytes(b"\xff" * (FILE_HEADER_SIZE + 40))  # no valid header
    bad = Opened(cache, tmp_path / "bad", 2)
    assert bad.file.header_error is not None
    fd = bad.file.fd
    assert cache.release(bad.file)
    assert _closed(fd) and cache.idle_inodes() == []


def test_lenient_sizes() -> None:
    assert lenient_plaintext_size(0) == 0
    assert lenient_plaintext_size(10) == 1
    assert lenient_plaintext_size(FILE_HEADER_SIZE) == 0
    assert lenient_plaintext_size(backing_size(5000)) == 5000
    assert lenient_plaintext_size(FILE_HEADER_SIZE + RECORD_SIZE + 3) == PAGE_SIZE + 1


class _FailingOnce:
    """os.fsync/fdatasync failing once with EIO, as after the backing
    store failed to write what it had taken (then the real call)."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.failed = False

    def __call__(self, fd: int) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real(fd)  # type: ignore[operator]


def test_a_failed_fsync_makes_what_was_stored_dirty_again(
    cache: PageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backing store failed the write-back of what the cache stored
    (its fsync says so once and forgets those pages): the pages are dirty
    again, so the next write-back (a retried key removal's) stores them
    again.  Before, the retry found nothing to write, its fsync returned 0,
    and the file read back as the disk had it (here: nothing).  A page
    written again since keeps its newer bytes."""
    f = Opened(cache, tmp_path / "a")
    data = bytearray(os.urandom(40 * PAGE_SIZE + 5))
    cache.write(f.file, 0, data)
    cache.flush(f.file)
    assert cache.dirty_bytes == 0 and cache.stored_bytes == 41 * PAGE_SIZE
    cache.write(f.file, 3 * PAGE_SIZE, b"newer")
    data[3 * PAGE_SIZE : 3 * PAGE_SIZE + 5] = b"newer"
    monkeypatch.setattr(os, "fsync", _FailingOnce(os.fsync))
    with pytest.raises(OSError) as failed:
        cache.fsync(f.file)
    assert failed.value.errno == errno.EIO
    assert f.file.sync_errors == 1 and f.file.sync_errno == errno.EIO
    assert cache.dirty_bytes == 41 * PAGE_SIZE and cache.stored_bytes == 0
    os.truncate(f.path, 0)  # what the disk has: the write-back never reached it
    assert f.read_all() == data  # the cache still has every byte
    cache.fsync(f.file)  # the disk works again
    assert cache.dirty_bytes == 0 and cache.stored_bytes == 0
    assert decrypt_backing(f.path) == data


def test_a_failed_wait_for_the_backing_store_makes_what_was_stored_dirty_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's wait (confirm_stored) sees the failure instead of an
    fsync: the same, for a small file stored at its write."""
    cache = PageCache(expire=60)
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(3 * PAGE_SIZE)  # stored at its write (write-through)
    cache.write(f.file, 0, data)
    assert cache.dirty_bytes == 0 and cache.stored_bytes == 3 * PAGE_SIZE

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pagecache, "wait_writeback", failing)
    assert cache.confirm_stored(everything=True) == 1
    monkeypatch.undo()
    assert cache.dirty_bytes == 3 * PAGE_SIZE and f.file.sync_errors == 1
    os.truncate(f.path, 0)
    cache.fsync(f.file)
    assert decrypt_backing(f.path) == data
    assert cache.stored_bytes == 0


def test_what_was_stored_goes_with_a_truncate_an_unlink_and_the_key(
    cache: PageCache, tmp_path: Path
) -> None:
    f = Opened(cache, tmp_path / "a")
    cache.write(f.file, 0, os.urandom(20 * PAGE_SIZE))
    cache.flush(f.file)
    kept = [f.file.stored[i].data for i in sorted(f.file.stored)]
    cache.truncate(f.file, 5 * PAGE_SIZE + 1)  # pages 5.. cut: no longer wanted
    assert sorted(f.file.stored) == list(range(6))  # page 5 is the cut record's now
    assert all(not any(k) for k in kept[6:]) and all(any(k) for k in kept[:5])
    busy, dropped = cache.evict_key(KEY)
    assert busy == [1] and dropped == {}
    assert cache.stored_bytes == 0 and all(not any(k) for k in kept)


def test_what_is_stored_during_an_fsync_is_not_let_go_by_it(
    cache: PageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync settles only what was stored before it began: a truncate's
    cut record stored meanwhile stays kept (its page not zeroed)."""
    f = Opened(cache, tmp_path / "a")
    data = os.urandom(3 * PAGE_SIZE)
    cache.write(f.file, 0, data)
    cache.fsync(f.file)
    assert cache.stored_bytes == 0
    real = os.fsync

    def fsync_with_a_truncate(fd: int) -> None:
        cache.truncate(f.file, PAGE_SIZE + 10)  # stores block 1's cut record
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_with_a_truncate)
    cache.fsync(f.file)
    monkeypatch.undo()
    assert sorted(f.file.stored) == [1]
    assert bytes(f.file.stored[1].data[:10]) == data[PAGE_SIZE : PAGE_SIZE + 10]
    cache.fsync(f.file)
    assert cache.stored_bytes == 0
    assert decrypt_backing(f.path) == data[: PAGE_SIZE + 10]


class _LossyStore:
    """A backing store that loses what it was given when it fails: the
    ranges written (``pwrite``/``pwritev``) since its last fsync or wait
    that succeeded are zeroed when one fails (what a disk that failed the
    write-back has there), as ext4 loses them after EIO."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.unwritten: list[tuple[int, int]] = []
        self.fail_next = False
        self._pwrite, self._pwritev = os.pwrite, os.pwritev
        self._fsync, self._fdatasync = os.fsync, os.fdatasync
        monkeypatch.setattr(os, "pwrite", self.pwrite)
        monkeypatch.setattr(os, "pwritev", self.pwritev)
        monkeypatch.setattr(os, "fsync", self.sync)
        monkeypatch.setattr(os, "fdatasync", self.sync)
        monkeypatch.setattr(pagecache, "wait_writeback", self.sync)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        n = self._pwrite(fd, data, offset)
        self.unwritten.append((offset, n))
        return n

    def pwritev(self, fd: int, buffers: list[bytes | memoryview], offset: int) -> int:
        n = self._pwritev(fd, buffers, offset)
        self.unwritten.append((offset, n))
        return n

    def sync(self, fd: int) -> None:
        if not self.fail_next:
            self._fsync(fd)
            self.unwritten.clear()
            return
        self.fail_next = False
        size = os.fstat(fd).st_size
        for offset, n in self.unwritten:
            n = min(n, size - offset)
            if n > 0:
                self._pwrite(fd, bytes(n), offset)
        self.unwritten.clear()
        raise OSError(errno.EIO, os.strerror(errno.EIO))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            _WRITES_AND_TRUNCATES,
            st.tuples(
                st.sampled_from(["flush", "fsync", "fsync fails", "wait", "wait fails"]),
                st.just(0),
                st.just(0),
            ),
        ),
        max_size=25,
    )
)
def test_model_with_a_backing_store_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ops: list[tuple[str, int, int]]
) -> None:
    """Whatever the backing store loses when its fsync (or the flusher's
    wait) fails, the cache still has, and the next fsync that succeeds
    leaves every byte on disk."""
    path = tmp_path / f"m{time.monotonic_ns()}"
    cache = PageCache(chunk_pages=3)
    f = Opened(cache, path)
    with monkeypatch.context() as patched:
        store = _LossyStore(path, patched)
        model = bytearray()
        for step, (op, a, b) in enumerate(ops):
            if _write_or_truncate(cache, f, model, step, (op, a, b)):
                pass  # a write or truncate, applied to both
            elif op == "flush":
                cache.flush(f.file)
            elif op.startswith("fsync"):
                store.fail_next = op.endswith("fails")
                with contextlib.suppress(OSError):
                    cache.fsync(f.file)
            else:
                store.fail_next = op.endswith("fails")
                cache.confirm_stored(everything=True)
            store.fail_next = False  # (nothing was stored to wait for)
            assert f.file.size == len(model)
            assert f.read_all() == model
        cache.fsync(f.file)
    assert decrypt_backing(path) == model
    assert cache.stored_bytes == 0


def test_closed_files_waiting_for_the_backing_store_are_bounded(tmp_path: Path) -> None:
    """Files made faster than the flusher's waits end keep descriptors:
    past twice the limit, a closed file goes without the wait (its pages
    zeroed), so the descriptors stay bounded."""
    cache = PageCache(idle_files=1)
    limit = cache.stored_files_limit
    kept = []
    for ino in range(1, 4 * limit):
        f = Opened(cache, tmp_path / f"f{ino}", ino)
        cache.write(f.file, 0, b"%d" % ino)
        kept.append(f.file.stored[0].data)
        cache.release(f.file)
    assert len(cache.files()) <= 2 * limit + 2
    assert cache._stored_files <= 2 * limit + 1
    assert sum(not any(page) for page in kept) >= len(kept) - 2 * limit - 2
    assert cache.confirm_stored(everything=True) > 0
    assert cache.stored_bytes == 0 and len(cache.files()) == 1  # the idle one


def test_pages_kept_for_the_backing_store_are_bounded(tmp_path: Path) -> None:
    """Past ``dirty_limit`` of kept pages, new ones are not kept (zeroed
    at once), so writers faster than the flusher's waits cannot grow the
    worker's memory; what is kept is still written again after a failure."""
    cache = PageCache(dirty_limit=16 * PAGE_SIZE, chunk_pages=4, write_through=0)
    files = [Opened(cache, tmp_path / f"f{i}", i + 1) for i in range(4)]
    for f in files:
        cache.write(f.file, 0, os.urandom(8 * PAGE_SIZE))
        cache.flush(f.file)
    assert cache.stored_bytes == 16 * PAGE_SIZE  # two files' worth, the rest not kept
    assert [len(f.file.stored) for f in files] == [8, 8, 0, 0]
    for f in files:
        cache.fsync(f.file)
    assert cache.stored_bytes == 0
