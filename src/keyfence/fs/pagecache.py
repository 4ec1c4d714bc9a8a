"""The mount worker's write-back cache of plaintext pages (docs/fs.md).

Every encrypted regular file that is open (or still has dirty pages) has one
:class:`CachedFile`: the backing file descriptor, the per-file cipher, the
plaintext size, and a dict of **dirty** 4 KiB pages.  The page cache holds
only pages that still have to be written: a write lands in a page and
returns; the page is encrypted and written back later, by

* ``fsync``/``fdatasync`` (then the backing file is fsynced),
* close (the FUSE ``flush`` of every close, so close(2) reports errors),
* the flusher thread, for pages older than ``expire`` seconds or when the
  dirty memory passes ``dirty_limit / 2``; writers wait (flush themselves)
  past ``dirty_limit``; the flusher also waits for the backing store to
  have written what was stored :attr:`PageCache.stored_wait` seconds ago
  (or, past the limits, all),
* :meth:`PageCache.flush_key` when a key is going away.

The write-back itself (snapshot, seal, store, one or two threads) is
fs/writeback.py: functions over the cache, under the protocol below.

Clean pages are not kept (the kernel's page cache keeps what was read);
reads copy the dirty pages they overlap and decrypt the rest from the
backing file, so they always see unflushed writes.  A page whose record
was stored is kept aside (``CachedFile.stored``, never read from) until
the backing store has written that record: an fsync of the file, or the
flusher's wait for it (:meth:`PageCache.confirm_stored`), lets it go, and
a failure makes it dirty again (:meth:`PageCache.retain_locked`).

A file closed clean stays *idle* in the cache, descriptor and file key
with it, for the next open (up to ``idle_files`` of them, least recently
closed out first), as the kernel keeps an inode and its fscrypt key after
close: a file opened again (``grep`` after ``tar``, a compiler's headers)
costs no ``openat2``, ``fstat``, header read or key derivation.  An idle
file goes like any other when its key goes, and at once when it is unlinked.

Lock protocol (threads: the trio thread serving FUSE, the flusher, the
key-removal callback, worker threads of ``trio.to_thread``): one
``threading.Lock``, :attr:`PageCache.lock`, guards every field of every
:class:`CachedFile` and the cache's tables.  It is held for memory copies of
one request (at most ``max_write``), loading at most two edge blocks, taking
a snapshot of at most ``chunk`` pages, one ``pwrite`` of at most
``chunk`` records (in a long pass, with the next snapshot), and a ``stat``'s
walk of a dirty file's holes (:meth:`PageCache.unwritten_sectors`); never
while encrypting a chunk (a truncate seals the one block it cuts under it),
during ``fsync``, while looking up keys or while talking to the kernel.
Write-back therefore encrypts the page buffers (snapshotted with their
versions, not copied) outside the lock and, back under the lock, writes
only the pages whose version did not change meanwhile (every change of a
page's bytes bumps its version under the lock, so a record of a page
changed mid-encryption is never stored; the page stays dirty and is written
by a later pass; written pages are zeroed after the lock is let go, being
out of the cache).  A pass of several chunks runs on two threads alike (the
flushing thread and the store thread): each snapshots a chunk and encrypts
it, then stores it and snapshots its next one in one lock hold, so one
encrypts while the other stores; stores keep the order the chunks were taken
(a growing file never has a hole), and when an fsync follows they start the
disk writes (``sync_file_range``) every few MiB.  Truncation and a new file
id bump the file's generation, which discards chunks encrypted before.  So
flushes may run concurrently (on different threads) without losing or
reordering data; ``CachedFile.flushing`` keeps two threads from
encrypting the same pages twice, and is held through an fsync of the
backing file and the flusher's wait for its write-back (never with
:attr:`PageCache.lock`), so that the pages that wait settles are not
being stored meanwhile and a key removal's fsync comes after it.  Emergency drops take only
:attr:`PageCache.lock`, so they wait at most for one chunk's ``pwrite`` and
snapshot, whatever is dirty.  The readahead thread (fs/readahead.py) touches
no field: a read works out the range to announce under the lock
(``CachedFile.readahead_to``) and hands it over.  Nor does the write-behind
thread (fs/writebehind.py): a store counts the disk writes it asks for in
``CachedFile.unsynced`` under the lock and hands over a descriptor of its
own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from keyfence.errors import KeyfenceError, fail
from keyfence.fs import wipe, writeback
from keyfence.fs.cachedfile import PAGE_SIZE, CachedFile, Page, Progress
from keyfence.fs.crypto import FileCipher, MasterKey
from keyfence.fs.format import (
    BLOCK_OVERHEAD,
    FILE_HEADER_SIZE,
    RECORD_SIZE,
    FileHeader,
    FormatError,
    IntegrityError,
    backing_size,
    record_offset,
)
from keyfence.fs.limits import LARGEST_FILE, encrypted_max_size
from keyfence.fs.readahead import BackingReadahead
from keyfence.fs.syscalls import set_mtime_ns, start_writeback, wait_writeback
from keyfence.fs.writebehind import WriteBehind

__all__ = [
    "DEFAULT_CHUNK_PAGES",
    "DEFAULT_DIRTY_LIMIT",
    "DEFAULT_EXPIRE",
    "DEFAULT_PREFETCH",
    "PAGE_SIZE",
    "CachedFile",
    "Flusher",
    "PageCache",
    "Progress",
    "lenient_plaintext_size",
]

log = logging.getLogger("keyfence.fs.pagecache")

DEFAULT_DIRTY_LIMIT = 64 << 20
DEFAULT_EXPIRE = 5.0
DEFAULT_CHUNK_PAGES = 256
"""Pages encrypted and written per ``pwrite`` during write-back (1 MiB)."""
DEFAULT_PREFETCH = 4 << 20
"""Backing bytes announced (POSIX_FADV_WILLNEED) ahead of a sequential reader."""


_ZERO_PAGE = bytes(PAGE_SIZE)
_RECENT_READS = 4
"""Read replies kept after pyfuse3 has sent them, to be zeroed at a key
removal (fs/wipe.py); older ones are freed as they are: glibc hands their
memory to the next reads, which overwrite it."""


def lenient_plaintext_size(disk_size: int) -> int:
    """The plaintext size of a backing file, also for a damaged one.

    A size no sequence of records gives (a header or last record cut short)
    still maps to a size whose last block reads as EIO, never to garbage.
    """
    if disk_size <= 0:
        return 0
    if disk_size < FILE_HEADER_SIZE:
        return 1
    full, rest = divmod(disk_size - FILE_HEADER_SIZE, RECORD_SIZE)
    if rest == 0:
        return full * PAGE_SIZE
    return full * PAGE_SIZE + max(rest - BLOCK_OVERHEAD, 1)


TRIM_AFTER_BYTES = 256 << 20
"""Bytes written back after which an idle cache gives the heap back
(:meth:`PageCache.trim_if_idle`): glibc's own threshold was 256 MiB too."""

IDLE_FILES = 4096
"""Files closed clean kept open for the next open, by default in a mount
(:meth:`PageCache._maybe_close_locked`; fewer where descriptors are few)."""


def kernel_writes_back_within() -> float:
    """Seconds within which the kernel writes a dirty page of the backing
    store by itself: ``vm.dirty_expire_centisecs`` plus one period of its
    flusher, ``vm.dirty_writeback_centisecs`` (30 + 5 s by default)."""
    total = 0.0
    for name, default in (("dirty_expire_centisecs", 3000), ("dirty_writeback_centisecs", 500)):
        try:
            with open(f"/proc/sys/vm/{name}") as f:
                total += int(f.read()) / 100
        except (OSError, ValueError):
            total += default / 100
    return total


def idle_files_allowed() -> int:
    """:data:`IDLE_FILES`, or an eighth of the descriptor limit if less
    (the inode table keeps up to a quarter for directories)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return IDLE_FILES
    return min(IDLE_FILES, soft // 8)


WRITE_THROUGH_BYTES = 16 * PAGE_SIZE
"""The largest first write of an empty file stored at once, by default
(:meth:`PageCache._write_through`)."""


class PageCache:
    """Dirty plaintext pages of every open encrypted file (see module doc)."""

    def __init__(
        self,
        *,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
        expire: float = DEFAULT_EXPIRE,
        chunk_pages: int = DEFAULT_CHUNK_PAGES,
        prefetch: int = DEFAULT_PREFETCH,
        label_of: Callable[[int], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        write_through: int = WRITE_THROUGH_BYTES,
        idle_files: int = 0,
        max_size: int | None = None,
    ) -> None:
        if dirty_limit < PAGE_SIZE:
            raise ValueError("dirty limit below one page")
        self.max_size = encrypted_max_size(LARGEST_FILE) if max_size is None else max_size
        """The largest plaintext size a file can have: its backing file must
        fit the backing filesystem (fs/limits.py).  A write or truncate past
        it fails with EFBIG before anything changes, so no page or size that
        could never be stored enters the cache."""
        self.idle_files = idle_files
        """How many files closed clean stay open for the next open (0: none)."""
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Inodes of the idle files, least recently closed first."""
        self.write_through = write_through
        """The largest first write of an empty file stored at once (0: none)."""
        self.lock = threading.Lock()
        self.dirty_limit = dirty_limit
        self.expire = expire
        self.chunk_pages = max(1, chunk_pages)
        self.prefetch = prefetch
        self.label_of = label_of or (lambda ino: f"inode {ino}")
        self.trim_heap: Callable[[], object] | None = None
        """Gives the process's free heap back to the kernel (the worker's
        ``malloc_trim``, with glibc's own trimming turned off: fs/worker.py
        ``tune_malloc``); the flusher calls it when nothing is dirty after
        :data:`TRIM_AFTER_BYTES` were written back, never a request or a
        key removal.  None: never (in-process users of the cache)."""
        self._trimmed_at = 0
        self.backing_sync: Callable[[], None] | None = None
        """Makes the whole backing filesystem durable (``syncfs``): the
        fallback for a file closed between its write-back and its fsync."""
        self.clock = clock
        self._files: dict[int, CachedFile] = {}
        self._closing_keys: set[str] = set()
        """Keys whose removal is flushing: files opened meanwhile refuse writes too."""
        self._dirty_pages = 0
        self._stored_pages = 0
        """Pages kept after their records were stored, until the backing
        store has written them (``CachedFile.stored``, and those being
        waited for)."""
        self._stored_files = 0
        """Files with pages in ``CachedFile.stored``: each keeps its
        descriptor until then, so past :attr:`stored_files_limit` of them
        the flusher waits for them all, as past ``dirty_limit / 2`` pages,
        and past twice that a closed file goes without the wait."""
        self.stored_files_limit = max(64, idle_files)
        self.stored_wait = max(expire, kernel_writes_back_within())
        """Seconds after which the flusher waits for what a file stored:
        by then the kernel has written it by itself, so the wait only
        learns whether that succeeded, and a file deleted sooner (``tar``,
        then ``rm``) is never written out early for it.  Sooner only past
        the limits (:meth:`stored_over_limit`)."""
        self._recent_reads: deque[bytearray] = deque(maxlen=_RECENT_READS)
        """The last plaintext handed to pyfuse3 for read replies."""
        self._wakeup = threading.Condition(self.lock)
        self._store_thread: ThreadPoolExecutor | None = None
        """Writes encrypted chunks while the flushing thread encrypts the
        next one (pwrite releases the GIL; AES on 4 KiB blocks does not)."""
        self._store_thread_lock = threading.Lock()
        self.readahead = BackingReadahead()
        """Announces a sequential reader's next records off the serving thread."""
        self.write_behind = WriteBehind()
        """Starts the disk writes of a write-back that an fsync follows,
        and flushes the disk's cache behind it (fs/writebehind.py)."""
        self.stats = {"written_bytes": 0, "read_bytes": 0, "integrity_errors": 0, "idle_reopens": 0}

    # ------------------------------------------------------------ accounting

    @property
    def dirty_bytes(self) -> int:
        return self._dirty_pages * PAGE_SIZE

    @property
    def stored_bytes(self) -> int:
        """Plaintext kept until the backing store has written its records."""
        return self._stored_pages * PAGE_SIZE

    def over_limit(self) -> bool:
        return self._dirty_pages * PAGE_SIZE > self.dirty_limit

    def get(self, ino: int) -> CachedFile | None:
        return self._files.get(ino)

    def files(self, key: str | None = None) -> list[CachedFile]:
        with self.lock:
            return [f for f in self._files.values() if key is None or f.key == key]

    def dirty_bytes_of(self, key: str | None = None) -> int:
        with self.lock:
            return sum(f.dirty_bytes() for f in self._files.values() if key is None or f.key == key)

    def idle_inodes(self) -> list[int]:
        """Inodes of the files kept idle, least recently closed first."""
        with self.lock:
            return list(self._idle)

    def attributes(self, ino: int) -> tuple[int, int | None, int] | None:
        """(plaintext size, pending mtime in ns or None, last write's time in
        ns or 0: the least ctime to show) of a cached file."""
        f = self._files.get(ino)
        if f is None:
            return None
        with self.lock:
            return f.size, f.mtime_ns, f.changed_ns

    def unwritten_sectors(self, ino: int, block_size: int) -> int:
        """512-byte sectors the dirty pages of ``ino`` will take in its
        backing file beyond what the backing file has allocated: what
        ``stat`` adds to the backing file's ``st_blocks``, as ext4 counts
        its delayed-allocation blocks.  Without them a file written and
        kept open showed 0 blocks, and ``tar --sparse`` archived it as one
        hole (zeros).

        Counted in the backing filesystem's blocks (``block_size``): those
        the dirty pages' records (and a header still to write) touch that
        lie beyond the backing file's end or in one of its holes, so a
        sparse file stays sparse where nothing was written.  The holes
        are found with ``SEEK_HOLE``/``SEEK_DATA`` (one call for a file
        without holes; at most :data:`_HOLES_ASKED` holes, the rest
        counted as unallocated: more, never fewer).  A range preallocated
        by ``fallocate`` reads as a hole to ``SEEK_HOLE`` on ext4
        (unwritten extents), so a write into it counts its blocks twice
        until written back."""
        bs = max(512, block_size)
        with self.lock:
            f = self._files.get(ino)
            if f is None or not f.pages or f.fd < 0 or f.master is None:
                return 0
            ranges = _record_blocks(sorted(f.pages), f.size, not f.header_on_disk, bs)
            if not ranges:
                return 0
            allocated_end = -(-f.disk_size // bs)  # blocks beyond it are not there
            inside = [(lo, min(hi, allocated_end)) for lo, hi in ranges if lo < allocated_end]
            holes = _holes(f.fd, inside[0][0] * bs, inside[-1][1] * bs, bs) if inside else []
        count = sum(hi - max(lo, allocated_end) for lo, hi in ranges if hi > allocated_end)
        count += _overlap(inside, holes)
        return count * (bs // 512)

    # ------------------------------------------------------------- open/close

    def open(
        self,
        ino: int,
        key: str,
        master: MasterKey,
        open_fd: Callable[[], int],
        *,
        disk_size: int | None = None,
    ) -> CachedFile:
        """The cached file of ``ino`` with one more user, opened if needed.

        ``open_fd`` opens the backing file (read-write if possible); it is
        called only when the file is not cached yet.  A cached file whose
        key went away while it was open gets the new key and is re-read.
        ``disk_size``: the backing size, when the caller has just stat'ed
        the descriptor ``open_fd`` returns (saves an ``fstat`` per create).
        """
        with self.lock:
            f = self._files.get(ino)
            if f is not None:
                if ino in self._idle:  # closed clean before: nothing to open or read
                    del self._idle[ino]
                    self.stats["idle_reopens"] += 1
                if f.master is None:
                    f.master, f.key, f.closing = master, key, key in self._closing_keys
                    self._load_locked(f)
                f.users += 1
                return f
        fd = open_fd()
        with self.lock:
            f = self._files.get(ino)
            if f is not None:  # opened meanwhile by another thread
                os.close(fd)
                self._idle.pop(ino, None)
                f.users += 1
                return f
            f = CachedFile(ino, fd, key, master)
            f.closing = key in self._closing_keys
            self._load_locked(f, disk_size)
            f.users = 1
            self._files[ino] = f
            return f

    def rekey(self, f: CachedFile, key: str, master: MasterKey) -> None:
        """Give an open file whose key went away its key again (re-read)."""
        with self.lock:
            if f.master is None and f.fd >= 0:
                f.master, f.key, f.closing = master, key, key in self._closing_keys
                self._load_locked(f)

    def _load_locked(self, f: CachedFile, disk_size: int | None = None) -> None:
        f.disk_size = os.fstat(f.fd).st_size if disk_size is None else disk_size
        f.size = lenient_plaintext_size(f.disk_size)
        f.cipher, f.header_error, f.header_on_disk = None, None, False
        f.generation += 1
        self._forget_stored_locked(f)
        if f.disk_size >= FILE_HEADER_SIZE:
            f.header_on_disk = True
            try:
                header = FileHeader.parse(os.pread(f.fd, FILE_HEADER_SIZE, 0))
                assert f.master is not None
                f.cipher = f.master.file_cipher(header.file_id)
            except (FormatError, IntegrityError) as err:
                f.header_error = IntegrityError(f"bad file header: {err}").for_file(
                    self.label_of(f.ino)
                )
        elif f.disk_size > 0:
            f.header_error = IntegrityError("file header truncated").for_file(self.label_of(f.ino))

    def release(self, f: CachedFile) -> bool:
        """One user fewer; a file without users and dirty pages is closed.

        Returns whether the file left the cache.
        """
        with self.lock:
            f.users -= 1
            return self._maybe_close_locked(f)

    def _maybe_close_locked(self, f: CachedFile, *, keep_idle: bool = True) -> bool:
        """Close a file without users or dirty pages, or keep it idle for
        the next open (``keep_idle``, while its key is there and its header
        sound); whether it left the cache.  A file with pages stored that
        the backing store has not written yet (``CachedFile.stored``) may
        be idle, but is closed only once it has."""
        if f.users > 0 or f.pages or self._files.get(f.ino) is not f:
            return False
        if (
            f.master is not None
            and f.size > 0
            and (f.disk_size < backing_size(f.size) or not f.header_on_disk)
        ):
            return False  # an extension (or a header) still to write
        if (
            keep_idle
            and self.idle_files
            and f.master is not None
            and not f.closing
            and f.header_error is None
            and f.fd >= 0
        ):
            self._idle[f.ino] = None
            self._idle.move_to_end(f.ino)
            while len(self._idle) > self.idle_files:
                oldest = self._files.get(self._idle.popitem(last=False)[0])
                if oldest is not None and oldest is not f:
                    self._maybe_close_locked(oldest, keep_idle=False)
            return False
        self._idle.pop(f.ino, None)
        if f.stored:
            if self._stored_files <= 2 * self.stored_files_limit:
                return False  # closed by confirm_stored once the backing store has it
            # files made faster than the flusher's waits end (a slow disk):
            # descriptors come first, this one goes without the wait
            self._forget_stored_locked(f)
        del self._files[f.ino]
        with contextlib.suppress(OSError):
            os.close(f.fd)
        f.fd = -1
        f.cipher = None
        f.master = None
        return True

    def drop_idle(self, ino: int, *, only_read_only: bool = False) -> None:
        """Close ``ino`` if it is idle (closed clean), or closed and kept
        only for what it stored: before its last name
        goes, so the backing unlink frees it at once (an unlink with a
        descriptor still open puts the inode on ext4's orphan list and the
        close takes it off again, two more journal updates).

        ``only_read_only``: only if its backing descriptor is read-only
        (opened so where read-write was refused: not the worker's own,
        immutable): before an open for writing, which must then open it
        afresh instead of writing through that descriptor."""
        with self.lock:
            f = self._files.get(ino)
            if f is None or f.users > 0 or f.pages:
                return
            if only_read_only:
                if ino not in self._idle:
                    return
                try:
                    if fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                        return
                except OSError:
                    pass  # unusable: closed like a read-only one
            else:
                if ino not in self._idle and not f.stored:
                    return
                # kept (idle or not) until the backing store has written
                # what it stored: the last name is going, so is that need
                self._forget_stored_locked(f)
            self._maybe_close_locked(f, keep_idle=False)

    def forget_unlinked(self, f: CachedFile) -> None:
        """The file has no name left and no user: its pages need no write-back."""
        with self.lock:
            if f.users > 0:
                return
            self._dirty_pages -= len(f.pages)
            for page in f.pages.values():
                page.data[:] = _ZERO_PAGE
            f.pages.clear()
            f.size = min(f.size, lenient_plaintext_size(f.disk_size))
            f.generation += 1
            self._forget_stored_locked(f)
            self._maybe_close_locked(f, keep_idle=False)

    # ------------------------------------------------------------------ reads

    def _check_usable_locked(self, f: CachedFile, *, writing: bool) -> None:
        if f.master is None:
            raise fail(errno.ENOKEY, "the directory's key is gone")
        if writing and f.closing:
            raise fail(errno.ENOKEY, "the file's key is being removed")
        if f.header_error is not None and f.size > 0:
            raise f.header_error

    def read(self, f: CachedFile, off: int, size: int) -> bytes | bytearray | memoryview:
        """Plaintext bytes ``off .. off+size`` (short at end of file).

        Dirty pages win over the backing file.  A block that fails
        authentication raises :class:`IntegrityError` (EIO), logged with the
        file's path.  The result is a bytes-like object (not copied again).
        """
        try:
            data = self._read(f, off, size, retry=True)
        except IntegrityError as err:
            self.stats["integrity_errors"] += 1
            label = self.label_of(f.ino)
            log.error("%s: %s", label, err.strerror)
            raise err.for_file(label) from None
        buffer = data.obj if isinstance(data, memoryview) else data
        if type(buffer) is bytearray:
            self._recent_reads.append(buffer)  # the oldest goes (see __init__)
        return data

    def _read(
        self, f: CachedFile, off: int, size: int, *, retry: bool
    ) -> bytes | bytearray | memoryview:
        with self.lock:
            self._check_usable_locked(f, writing=False)
            fsize = f.size
            if off >= fsize or size <= 0:
                return b""
            end = min(off + size, fsize)
            first, last = off // PAGE_SIZE, (end - 1) // PAGE_SIZE
            cached: dict[int, bytes] = {}
            pages = f.pages
            if pages:
                found = list(map(pages.get, range(first, last + 1)))
                if any(found):  # (a Page is always true)
                    for idx, page in enumerate(found, first):
                        if page is not None:
                            cached[idx] = bytes(page.data)
            cipher, fd, generation, disk_size = f.cipher, f.fd, f.generation, f.disk_size
            announce = None
            if off == f.next_read and self.prefetch and cipher is not None and end < fsize:
                announce = self._readahead_range_locked(f, last + 1)
            f.next_read = end
        if announce is not None:
            self.readahead.announce(fd, *announce)
        data: bytes | bytearray
        try:
            if not cached:
                data = self._load_run(fd, cipher, first, last - first + 1, fsize, disk_size)
            else:
                buf = bytearray((last - first + 1) * PAGE_SIZE)
                idx = first
                while idx <= last:
                    if idx in cached:
                        pos = (idx - first) * PAGE_SIZE
                        buf[pos : pos + PAGE_SIZE] = cached[idx]
                        idx += 1
                        continue
                    run_end = idx
                    while run_end + 1 <= last and run_end + 1 not in cached:
                        run_end += 1
                    plain = self._load_run(fd, cipher, idx, run_end - idx + 1, fsize, disk_size)
                    pos = (idx - first) * PAGE_SIZE
                    buf[pos : pos + len(plain)] = plain
                    wipe.zero(plain)  # made for this copy only
                    idx = run_end + 1
                data = buf
                copies = list(cached.values())
                cached.clear()
                wipe.release(copies)
        except IntegrityError:
            # The file may have changed under us (truncated, new file id):
            # try once more with a fresh snapshot before calling it damaged.
            with self.lock:
                changed = f.generation != generation or f.disk_size != disk_size
            if retry and changed:
                return self._read(f, off, size, retry=False)
            raise
        start = off - first * PAGE_SIZE
        n = end - off
        self.stats["read_bytes"] += n
        if start == 0 and len(data) == n:
            return data
        return memoryview(data)[start : start + n]

    def _readahead_range_locked(self, f: CachedFile, block: int) -> tuple[int, int] | None:
        """(offset, length) of backing bytes to announce for a sequential
        reader whose next block is ``block``, or None while enough is on its
        way: the window runs ``prefetch`` bytes ahead and is topped up half a
        window at a time, each byte announced once."""
        nxt = record_offset(block)
        want = nxt + self.prefetch
        start = f.readahead_to if nxt <= f.readahead_to <= want else nxt
        if want - start < self.prefetch // 2:
            return None
        f.readahead_to = want
        return start, want - start

    @staticmethod
    def _load_run(
        fd: int, cipher: FileCipher | None, first: int, count: int, fsize: int, disk_size: int
    ) -> bytes | bytearray:
        """Plaintext of blocks ``first .. first+count`` from the backing file,
        each padded to a full page (zeros beyond the end of file).

        A record missing from the backing file is a hole not written yet,
        unless ``disk_size`` (the backing size the cache knows it wrote or
        found) says it is there: then the file was cut behind the mount's
        back, and that is EIO, never zeros."""
        if cipher is None:  # no header on disk: everything is a hole
            return bytes(count * PAGE_SIZE)
        if (first + count) * PAGE_SIZE <= fsize:  # all full blocks (sequential reads)
            lengths = [PAGE_SIZE] * count
            total = count * RECORD_SIZE
        else:
            lengths = [
                max(0, min(PAGE_SIZE, fsize - i * PAGE_SIZE)) for i in range(first, first + count)
            ]
            total = sum(n + BLOCK_OVERHEAD for n in lengths if n)
        start = record_offset(first)
        raw = os.pread(fd, total, start) if total else b""
        if total and len(raw) == total:
            return cipher.decrypt_blocks(first, raw)
        out = bytearray(count * PAGE_SIZE)
        pos = 0
        for k, n in enumerate(lengths):
            if n == 0:
                break
            rlen = n + BLOCK_OVERHEAD
            record = raw[pos : pos + rlen]
            pos += rlen
            if not record:
                if start + pos <= disk_size:
                    index = first + k
                    raise IntegrityError(
                        f"block {index} missing from the backing file", block=index
                    )
                continue  # beyond the backing file: a hole not written yet
            if len(record) < rlen:
                if not any(record):
                    continue
                index = first + k
                raise IntegrityError(
                    f"block {index} truncated ({len(record)} of {rlen} bytes)", block=index
                )
            plain = cipher.decrypt_block(first + k, record)
            out[k * PAGE_SIZE : k * PAGE_SIZE + n] = plain
            wipe.zero(plain)  # made for this copy only
        return out

    def _load_block_locked(self, f: CachedFile, idx: int) -> bytearray:
        """A full page holding block ``idx`` as the backing file has it."""
        if idx * PAGE_SIZE >= f.size:
            return bytearray(PAGE_SIZE)
        try:
            data = self._load_run(f.fd, f.cipher, idx, 1, f.size, f.disk_size)
        except IntegrityError as err:
            self.stats["integrity_errors"] += 1
            label = self.label_of(f.ino)
            log.error("%s: %s", label, err.strerror)
            raise err.for_file(label) from None
        page = data if isinstance(data, bytearray) else bytearray(data)
        if len(page) < PAGE_SIZE:
            page.extend(bytes(PAGE_SIZE - len(page)))
        return page

    # ----------------------------------------------------------------- writes

    def _dirty_page_locked(self, f: CachedFile, idx: int) -> Page:
        """Block ``idx`` as a dirty page (loaded if it was not cached)."""
        page = f.pages.get(idx)
        if page is None:
            page = Page(self._load_block_locked(f, idx))
            f.pages[idx] = page
            self._dirty_pages += 1
        page.version += 1
        return page

    def _mark_dirty_locked(self, f: CachedFile) -> None:
        if f.dirty_since is None:
            f.dirty_since = self.clock()
        if self._dirty_pages * PAGE_SIZE > self.dirty_limit // 2:
            self._wakeup.notify_all()

    def write(self, f: CachedFile, off: int, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into dirty pages at ``off``; returns its length.

        The first write of a new (or emptied) file, of at most
        :attr:`write_through` bytes at offset 0, is sealed and stored at
        once instead (:meth:`_write_through`)."""
        n = len(data)
        if n == 0:
            return 0
        view = memoryview(data).cast("B")
        if off + n > self.max_size:  # as ext4: what fits, EFBIG if nothing does
            if off >= self.max_size:
                raise fail(errno.EFBIG, "beyond the largest encrypted file")
            n = self.max_size - off
            view = view[:n]
        if off == 0 and n <= self.write_through and f.size == 0 and self._write_through(f, view):
            return n
        if n == PAGE_SIZE and not off % PAGE_SIZE:
            return self._write_page(f, off // PAGE_SIZE, view)
        with self.lock:
            self._check_usable_locked(f, writing=True)
            end = off + n
            first, last = off // PAGE_SIZE, (end - 1) // PAGE_SIZE
            old_size = f.size
            tail = old_size % PAGE_SIZE
            if end > old_size and tail and old_size // PAGE_SIZE < first:
                # the old last block grows to a full block: write it again
                self._dirty_page_locked(f, old_size // PAGE_SIZE)
            pages = f.pages
            new_pages = 0
            # whole pages in the middle: one copy, pages are views into it
            full_first = first if off % PAGE_SIZE == 0 else first + 1
            full_last = last if end % PAGE_SIZE == 0 else last - 1
            if full_last - full_first >= 7:
                start = full_first * PAGE_SIZE - off
                block = memoryview(
                    bytearray(view[start : start + (full_last - full_first + 1) * PAGE_SIZE])
                )
                span = range(full_first, full_last + 1)
                if pages.keys().isdisjoint(span):  # the usual case: all new, one update
                    views = [
                        block[pos : pos + PAGE_SIZE] for pos in range(0, len(block), PAGE_SIZE)
                    ]
                    pages.update(zip(span, map(Page, views), strict=True))
                    new_pages += len(views)
                else:
                    pos = 0
                    for idx in span:
                        page = pages.get(idx)
                        if page is None:
                            page = Page(block[pos : pos + PAGE_SIZE])
                            pages[idx] = page
                            new_pages += 1
                        else:
                            page.data[:] = block[pos : pos + PAGE_SIZE]
                        page.version += 1
                        pos += PAGE_SIZE
                edges = [i for i in (first, last) if i < full_first or i > full_last]
            else:
                edges = list(range(first, last + 1))
            for idx in dict.fromkeys(edges):
                base = idx * PAGE_SIZE
                lo = off - base if off > base else 0
                hi = end - base if end < base + PAGE_SIZE else PAGE_SIZE
                src = view[base + lo - off : base + hi - off]
                page = pages.get(idx)
                if page is None:
                    if lo == 0 and hi == PAGE_SIZE:
                        page = Page(bytearray(src))
                    else:
                        on_disk = min(PAGE_SIZE, old_size - base)
                        if on_disk > 0 and (lo > 0 or hi < on_disk):
                            page = Page(self._load_block_locked(f, idx))
                        else:
                            page = Page(bytearray(PAGE_SIZE))
                        page.data[lo:hi] = src
                    pages[idx] = page
                    new_pages += 1
                else:
                    page.data[lo:hi] = src
                page.version += 1
            self._dirty_pages += new_pages
            if end > old_size:
                f.size = end
            f.mtime_ns = f.changed_ns = time.time_ns()
            self._mark_dirty_locked(f)
        return n

    def _write_through(self, f: CachedFile, view: memoryview) -> bool:
        """Seal ``view`` as the whole of an empty file and store it, header
        and records in one ``pwritev``, as gocryptfs writes; False (nothing
        done) unless the file is empty with nothing dirty, on disk or
        pending (the caller caches the write then).

        A small file is mostly written once and closed (``tar``, ``git``,
        an editor saving): through the cache, its close paid for a page
        snapshot, a write-back pass and an ``futimens`` to put the write's
        mtime back, about as much again as the write.  Stored at the write,
        the file has the write's mtime, nothing is dirty, close(2) has
        nothing to do, and an error (ENOSPC) is the write's own.  A later
        write into the short last block reads it back first, as a write
        into any file on disk does.  Sealed outside the lock (the cipher
        and generation checked again before storing), stored under it: one
        ``pwrite`` of at most :attr:`write_through` bytes of records.
        """
        with self.lock:
            self._check_usable_locked(f, writing=True)
            if not self._blank_locked(f):
                return False
            master = f.master
            assert master is not None  # _check_usable_locked
            if f.cipher is None:
                f.cipher = master.new_file_cipher()
                f.header_on_disk = False
            cipher, generation = f.cipher, f.generation
        n = len(view)
        count = (n + PAGE_SIZE - 1) // PAGE_SIZE
        out = memoryview(bytearray(count * RECORD_SIZE))
        blocks = [view[pos : pos + PAGE_SIZE] for pos in range(0, n, PAGE_SIZE)]
        records = out[: cipher.encrypt_indexed_into(range(count), blocks, out, checked=True)]
        header = FileHeader(cipher.file_id).serialize()
        with self.lock:
            self._check_usable_locked(f, writing=True)
            if f.generation != generation or f.cipher is not cipher or not self._blank_locked(f):
                return False  # changed meanwhile: through the cache
            try:
                done = os.pwritev(f.fd, [header, records], 0)
                while done < len(header) + len(records):  # short: the rest
                    if done < len(header):
                        done += os.pwrite(f.fd, header[done:], done)
                    else:
                        rest = records[done - len(header) :]
                        done += os.pwrite(f.fd, rest, done)
            except BaseException:
                # nothing of it counts: the next write starts the file again
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fd, 0)
                raise
            f.header_on_disk = True
            f.disk_size = len(header) + len(records)
            f.size = n
            self.stats["written_bytes"] += n
            # a copy, kept until the backing store has written it
            for data in self.retain_locked(f, 0, _pages_of(view, count)):
                data[:] = _ZERO_PAGE  # not kept (memory is short)
        return True

    def _write_page(self, f: CachedFile, idx: int, view: memoryview) -> int:
        """:meth:`write` of one whole, aligned page (random 4 KiB writes):
        the same steps without the edge-page bookkeeping."""
        end = (idx + 1) * PAGE_SIZE
        with self.lock:
            self._check_usable_locked(f, writing=True)
            old_size = f.size
            if end > old_size and old_size % PAGE_SIZE and old_size // PAGE_SIZE < idx:
                # the old last block grows to a full block: write it again
                self._dirty_page_locked(f, old_size // PAGE_SIZE)
            page = f.pages.get(idx)
            if page is None:
                page = f.pages[idx] = Page(bytearray(view))
                self._dirty_pages += 1
            else:
                page.data[0:PAGE_SIZE] = view
            page.version += 1
            if end > old_size:
                f.size = end
            f.mtime_ns = f.changed_ns = time.time_ns()
            self._mark_dirty_locked(f)
        return PAGE_SIZE

    def truncate(self, f: CachedFile, size: int) -> None:
        """Set the plaintext size (shrinking drops pages; growing makes a hole)."""
        if size < 0:
            raise KeyfenceError(errno.EINVAL)
        if size > self.max_size:
            raise fail(errno.EFBIG, "beyond the largest encrypted file")
        with self.lock:
            if f.master is None:
                raise fail(errno.ENOKEY, "the directory's key is gone")
            if f.closing:
                raise fail(errno.ENOKEY, "the file's key is being removed")
            old = f.size
            f.generation += 1
            if size < old:  # what was stored beyond the cut is no longer wanted
                self._forget_stored_locked(f, size // PAGE_SIZE)
            if size == 0:
                self._dirty_pages -= len(f.pages)
                for page in f.pages.values():
                    page.data[:] = _ZERO_PAGE
                f.pages.clear()
                os.ftruncate(f.fd, 0)
                f.disk_size = 0
                f.cipher, f.header_on_disk, f.header_error = None, False, None
                f.size = 0
                f.dirty_since = None
                f.mtime_ns = None
                if old:
                    _touch(f.fd)
                return
            if f.header_error is not None:
                raise f.header_error
            if size < old:
                last = (size - 1) // PAGE_SIZE
                for idx in [i for i in f.pages if i > last]:
                    f.pages.pop(idx).data[:] = _ZERO_PAGE
                    self._dirty_pages -= 1
                record = None
                if size % PAGE_SIZE:
                    page = self._dirty_page_locked(f, last)
                    page.data[size % PAGE_SIZE :] = bytes(PAGE_SIZE - size % PAGE_SIZE)
                    if f.cipher is not None and record_offset(last) < f.disk_size:
                        # on disk: sealed now (one block, under the lock),
                        # not left to a write-back seconds later (below)
                        record = f.cipher.encrypt_block(last, page.data[: size % PAGE_SIZE])
                f.size = size
                new_disk = backing_size(size)
                # The cut block's record and the file's size must change
                # together, and no order of two calls keeps the block
                # readable in between: the size says how long the last
                # record is (format.md, "Sizes"), so the old record cut to
                # the new size fails authentication, and the new record
                # written over the old one's head with the old size reads
                # as a torn record.  So the cut is followed at once by the
                # new record, in this request under the lock: a kill -9
                # of the worker loses that block only between these two
                # calls (docs/fs.md, "Faults"), where it used to lose it
                # until the next write-back.  Cut first: a kill between
                # leaves the new size, and a failed write leaves the page
                # dirty for write-back, as before.
                if f.disk_size > new_disk:
                    os.ftruncate(f.fd, new_disk)
                    f.disk_size = new_disk
                if record is not None:
                    self._store_cut_record_locked(f, last, record)
            elif size > old:
                if old % PAGE_SIZE:
                    self._dirty_page_locked(f, old // PAGE_SIZE)
                f.size = size
            f.mtime_ns = None
            if size != old:
                _touch(f.fd)
            if f.pages or f.disk_size < backing_size(f.size):
                self._mark_dirty_locked(f)

    def _store_cut_record_locked(self, f: CachedFile, idx: int, record: bytes) -> None:
        """Write the record :meth:`truncate` sealed for the block it cut and
        forget that page; an error leaves the page dirty for write-back
        (which then reports it)."""
        offset = record_offset(idx)
        try:
            done = 0
            while done < len(record):
                done += os.pwrite(f.fd, record[done:], offset + done)
        except OSError as err:
            log.warning("%s: block %d kept for write-back: %s", self.label_of(f.ino), idx, err)
            return
        f.disk_size = max(f.disk_size, offset + len(record))
        for data in self.retain_locked(f, idx, [f.pages.pop(idx)]):
            data[:] = _ZERO_PAGE
        self._dirty_pages -= 1
        self.stats["written_bytes"] += len(record) - BLOCK_OVERHEAD
        if not f.pages and f.disk_size >= backing_size(f.size):
            f.dirty_since = None

    # ------------------------------------------------------------- write-back

    def flush(
        self, f: CachedFile, progress: Progress | None = None, *, start_io: bool = False
    ) -> int:
        """Write every dirty page of ``f`` back (encrypted); bytes written.

        Does not fsync (see :meth:`fsync`).  Errors (ENOSPC, EIO) leave the
        pages dirty and propagate.  ``start_io``: start the backing file's
        disk writes as it goes (an fsync follows, or memory is short).
        """
        with f.flushing:
            return writeback.flush_file(self, f, progress, start_io)

    @staticmethod
    def _blank_locked(f: CachedFile) -> bool:
        """Empty, with nothing dirty, on disk or pending, and open: what
        :meth:`_write_through` may store a whole file into."""
        return not (f.size or f.pages or f.disk_size or f.fd < 0 or f.mtime_ns is not None)

    @staticmethod
    def has_write_back(f: CachedFile) -> bool:
        """Whether ``f`` may have something to write back (a hint, read
        without the lock: :meth:`flush` decides under it)."""
        if f.pages:
            return True
        return f.master is not None and f.size > 0 and f.disk_size < backing_size(f.size)

    def try_flush(self, f: CachedFile, max_pages: int = 64) -> bool:
        """Write back a file with at most ``max_pages`` dirty pages now, if no
        other thread is writing it back; whether it did (small files are
        cheaper to write back inline than through a worker thread)."""
        if len(f.pages) > max_pages or not f.flushing.acquire(blocking=False):
            return False
        try:
            writeback.flush_file(self, f, None, False)
        finally:
            f.flushing.release()
        return True

    def set_mtime(self, f: CachedFile, mtime_ns: int) -> None:
        """An explicit mtime (utimens): kept after the pending write-back."""
        with self.lock:
            if f.pages or f.mtime_ns is not None:
                f.mtime_ns = mtime_ns

    def fsync(self, f: CachedFile, datasync: bool = False) -> None:
        """Write back and make it durable (POSIX fsync/fdatasync)."""
        self.flush(f, start_io=True)
        if not self._sync_fd(f, datasync):
            self._sync_backing()

    def _sync_fd(self, f: CachedFile, datasync: bool = False) -> bool:
        """fsync the backing file; False if its descriptor was closed already.

        Another thread may close ``f.fd`` (a release, the flusher) at any
        moment outside the lock: a duplicate taken under the lock keeps the
        file open for the fsync (never EBADF, never another file's fd).
        What was stored before the fsync began is let go if it succeeds and
        dirty again if it fails (:meth:`_settle`), with ``f.flushing``
        held: no write-back pass of the file runs meanwhile.
        """
        with f.flushing:
            with self.lock:
                if f.fd < 0:
                    return False
                fd = os.dup(f.fd)
                taken = self._take_stored_locked(f)
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            except OSError as err:
                self._settle(f, taken, err)
                raise
            finally:
                os.close(fd)
            self._settle(f, taken, None)
        with self.lock:
            f.unsynced = 0  # the next flush behind counts from here
        return True

    # ------------------------------------------ stored, until the disk has it

    def retain_locked(
        self, f: CachedFile, first: int, pages: list[Page]
    ) -> list[bytearray | memoryview]:
        """Keep ``pages`` (indexes ``first, first+1, ...``), whose records
        were just stored, in ``f.stored`` until the backing store has
        written them; the data of the older stored pages they replace, to
        be zeroed (they would write older bytes again).

        Why: the backing filesystem takes the records into its page cache
        and writes them later; when that write fails (EIO from the disk,
        ENOSPC from a thin pool) it marks them clean, reports the error to
        one fsync, and forgets them.  A key removal that failed on that
        fsync and was retried then found nothing to write and lost them
        (ext4 with fscrypt loses them so).  Kept, they are made dirty again
        instead (:meth:`_settle`).

        Past ``dirty_limit`` of kept pages (twice what wakes the flusher's
        waits: writers faster than the disk, many files open), new ones are
        not kept but returned to be zeroed, as before pages were kept:
        memory comes first."""
        if self._stored_pages * PAGE_SIZE >= self.dirty_limit:
            self._wakeup.notify_all()
            return [page.data for page in pages]
        stored = f.stored
        if not stored:
            f.stored_since = self.clock()
            self._stored_files += 1
        span = range(first, first + len(pages))
        replaced: list[bytearray | memoryview] = (
            []  # the usual case: nothing stored there
            if stored.keys().isdisjoint(span)
            else [stored[i].data for i in span if i in stored]
        )
        stored.update(zip(span, pages, strict=True))
        self._stored_pages += len(pages) - len(replaced)
        if self.stored_over_limit():
            self._wakeup.notify_all()
        return replaced

    def stored_over_limit(self) -> bool:
        """Whether the flusher should wait for everything stored now."""
        return (
            self._stored_pages * PAGE_SIZE > self.dirty_limit // 2
            or self._stored_files > self.stored_files_limit
        )

    def _forget_stored_locked(self, f: CachedFile, first: int = 0) -> None:
        """Let go of (and zero) the stored pages of ``f`` from index
        ``first`` on: cut off by a truncate, unlinked, or the file's key or
        contents gone."""
        if not f.stored:
            return
        gone = sorted(i for i in f.stored if i >= first)
        writeback.zero_pages([f.stored.pop(i).data for i in gone])
        self._stored_pages -= len(gone)
        if not f.stored:
            f.stored_since = None
            self._stored_files -= 1

    def _take_stored_locked(self, f: CachedFile) -> tuple[dict[int, Page], FileCipher | None]:
        """What was stored in ``f`` so far (and its cipher), for an fsync or
        a wait about to begin to settle; pages stored from now on are the
        next one's."""
        taken = f.stored
        if not taken:
            return {}, f.cipher  # not f.stored: what is stored from now on is not this one's
        f.stored = {}
        f.stored_since = None
        self._stored_files -= 1
        return taken, f.cipher

    def _settle(
        self,
        f: CachedFile,
        taken: tuple[dict[int, Page], FileCipher | None],
        err: OSError | None,
    ) -> None:
        """An fsync (or wait) of the backing file ended: with ``err`` None
        its pages ``taken`` are on disk, zeroed and let go; otherwise they
        are dirty again, to be written by the next write-back, and the
        error is counted for every open of the file
        (``CachedFile.sync_errors``)."""
        pages, cipher = taken
        if err is None:
            with self.lock:
                self._stored_pages -= len(pages)
            if pages:
                writeback.zero_pages([pages[i].data for i in sorted(pages)])
            return
        with self.lock:
            f.sync_errors += 1
            f.sync_errno = err.errno or errno.EIO
            self._stored_pages -= len(pages)
            usable = (
                f.master is not None
                and f.fd >= 0
                and f.cipher is cipher
                and cipher is not None
                and self._files.get(f.ino) is f
            )
            again = 0
            last = (f.size - 1) // PAGE_SIZE
            for idx in sorted(pages):
                page = pages[idx]
                if not usable or idx > last or idx in f.pages or idx in f.stored:
                    page.data[:] = _ZERO_PAGE  # gone, or newer bytes were written since
                    continue
                if idx == last and f.size % PAGE_SIZE:  # cut since: zeros past the end
                    page.data[f.size % PAGE_SIZE :] = bytes(PAGE_SIZE - f.size % PAGE_SIZE)
                page.version += 1
                f.pages[idx] = page
                again += 1
            self._dirty_pages += again
            if usable:
                f.header_on_disk = False  # it may have been lost with them
                self._mark_dirty_locked(f)
        if pages:
            log.error(
                "%s: the backing store failed to write %d stored pages (%s); %s",
                self.label_of(f.ino),
                len(pages),
                os.strerror(err.errno or errno.EIO),
                f"{again} kept to write again" if usable else "the file is gone",
            )

    def confirm_stored(self, *, everything: bool = False) -> int:
        """Have the backing store write what files had stored more than
        :attr:`stored_wait` seconds ago (``everything``: all of it, memory
        or descriptors are short)
        and wait for it, so that those pages can go; pages whose write
        failed are dirty again.  The flusher's; the number of files settled.

        The disk writes of all of them are started first, then waited for
        one by one (``sync_file_range``: no journal commit, no flush of the
        disk's cache; an fsync still does those).  The wait takes the
        report of a failed write from the backing file's description: the
        pages are then dirty again, and every open of the file is told at
        its next fsync (:meth:`_settle`)."""
        deadline = self.clock() - self.stored_wait
        with self.lock:
            if not self._stored_files:
                return 0  # the flusher asks every turn: no walk of the table
            due = [
                f
                for f in self._files.values()
                if f.stored
                and f.fd >= 0
                and (everything or (f.stored_since is not None and f.stored_since <= deadline))
            ]
        for f in due:  # one descriptor at a time: thousands may be due
            with self.lock:
                if f.fd < 0:
                    continue
                fd = os.dup(f.fd)
            with contextlib.suppress(OSError):  # the wait below reports it
                start_writeback(fd, 0, 0)
            os.close(fd)
        settled = 0
        for f in due:
            if not f.flushing.acquire(blocking=False):
                continue  # being written back or fsynced: that settles it
            try:
                with self.lock:
                    if f.fd < 0 or not f.stored:
                        continue
                    fd = os.dup(f.fd)
                    taken = self._take_stored_locked(f)
                try:
                    wait_writeback(fd)
                except OSError as err:
                    self._settle(f, taken, err)
                else:
                    self._settle(f, taken, None)
                finally:
                    os.close(fd)
                settled += 1
            finally:
                f.flushing.release()
            with self.lock:
                if f.ino not in self._idle:  # pushed out of the idle ones meanwhile
                    self._maybe_close_locked(f, keep_idle=False)
        return settled

    def _sync_backing(self) -> None:
        """A file was closed after its write-back but before its fsync: sync
        the backing filesystem instead (rare: a race with a close)."""
        if self.backing_sync is not None:
            self.backing_sync()

    def flush_files(
        self, files: Iterable[CachedFile], *, sync: bool, progress: Progress | None = None
    ) -> int:
        """Write back ``files`` and, with ``sync``, fsync each.  With
        ``sync`` it fails (EIO, or the backing store's errno) also when the
        backing store failed a write of one of them while this ran (the
        flusher's wait saw it, not this fsync): their pages are dirty again,
        and a key removal must not go on as if they were on disk."""
        files = list(files)
        errors = [f.sync_errors for f in files]
        written = 0
        missed = False
        for f in files:
            base = written

            def report(n: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + n)

            written += self.flush(f, report, start_io=sync)
            if sync and not self._sync_fd(f):
                missed = True
        if missed:
            self._sync_backing()
        if sync:
            for f, before in zip(files, errors, strict=True):
                if f.sync_errors != before:  # logged with the file's name by _settle
                    code = f.sync_errno or errno.EIO
                    raise OSError(code, os.strerror(code))
        return written

    def flush_key(self, key: str, progress: Progress | None = None) -> int:
        """Flush and fsync every file under ``key`` (the key is going away)."""
        return self.flush_files(self.files(key), sync=True, progress=progress)

    def flush_all(self, *, sync: bool = False) -> int:
        return self.flush_files(self.files(), sync=sync)

    def flush_expired(self) -> int:
        """Write back files whose oldest dirty page is older than ``expire``."""
        deadline = self.clock() - self.expire
        with self.lock:
            old = [
                f
                for f in self._files.values()
                if f.dirty_since is not None and f.dirty_since <= deadline
            ]
        written = 0
        for f in old:
            if f.flushing.locked():
                continue
            try:
                written += self.flush(f)
            except OSError as err:
                log.error("write-back of %s failed: %s", self.label_of(f.ino), err)
            self._close_idle(f)
        return written

    def flush_until(self, target: int) -> int:
        """Write back the oldest files until dirty memory is below ``target``."""
        written = 0
        while self._dirty_pages * PAGE_SIZE > target:
            with self.lock:
                candidates = sorted(
                    (f for f in self._files.values() if f.pages and f.master is not None),
                    key=lambda f: f.dirty_since or 0.0,
                )
            if not candidates:
                break
            progress = False
            for f in candidates:
                # memory is short: the disk may as well start on it now
                n = self.flush(f, start_io=True)
                written += n
                progress = progress or n > 0
                self._close_idle(f)
                if self._dirty_pages * PAGE_SIZE <= target:
                    break
            if not progress:
                break
        return written

    def _close_idle(self, f: CachedFile) -> None:
        with self.lock:
            self._maybe_close_locked(f)

    # -------------------------------------------------------------- key going

    def close_key(self, key: str) -> None:
        """Refuse new writes under ``key`` (its removal is flushing)."""
        with self.lock:
            self._closing_keys.add(key)
            for f in self._files.values():
                if f.key == key:
                    f.closing = True

    def reopen_key(self, key: str) -> None:
        """Undo :meth:`close_key` (the removal was aborted)."""
        with self.lock:
            self._closing_keys.discard(key)
            for f in self._files.values():
                if f.key == key:
                    f.closing = False

    def trim_if_idle(self) -> bool:
        """Call :attr:`trim_heap` if nothing is dirty and at least
        :data:`TRIM_AFTER_BYTES` were written back since it last ran (the
        pages of a big burst are free memory now); whether it was called.

        glibc would otherwise trim inside whichever ``free`` let the top of
        the heap pass its threshold: after 1 GiB written back, that was a
        key removal's eviction: 45-61 ms with the GIL held, ~6 % of the
        removal (docs/performance.md, part 7).  Called by the flusher
        thread; the trim itself holds no lock of ours."""
        if self.trim_heap is None:
            return False
        with self.lock:
            written = self.stats["written_bytes"]
            if (
                self._dirty_pages
                or self._stored_pages
                or written - self._trimmed_at < TRIM_AFTER_BYTES
            ):
                return False
            self._trimmed_at = written
        self.trim_heap()
        return True

    def evict_key(self, key: str) -> tuple[list[int], dict[int, int]]:
        """Forget plaintext and ciphers under ``key``.

        Returns (inodes still open, {inode: dirty bytes discarded}); after a
        successful :meth:`flush_key` nothing is discarded.  Dirty pages are
        zeroed before they are let go.
        """
        busy: list[int] = []
        dropped: dict[int, int] = {}
        ciphers: list[FileCipher | None] = []
        with self.lock:
            self._closing_keys.discard(key)
            for f in list(self._files.values()):
                if f.key != key:
                    continue
                lost = f.dirty_bytes()
                if lost:
                    dropped[f.ino] = lost
                writeback.zero_pages([f.pages[i].data for i in sorted(f.pages)])
                self._dirty_pages -= len(f.pages)
                f.pages.clear()
                self._forget_stored_locked(f)
                f.master = None
                ciphers.append(f.cipher)
                f.cipher = None
                f.generation += 1
                f.dirty_since = None
                f.mtime_ns = None
                f.closing = False
                if f.users > 0:
                    busy.append(f.ino)
                else:
                    self._maybe_close_locked(f, keep_idle=False)
            wipe.release(self._recent_reads, keep_shared=True)
        wipe.release(ciphers)  # the file keys; one a write-back still holds is skipped
        return busy, dropped

    def drop_key(self, key: str) -> tuple[list[int], dict[int, int]]:
        """Emergency: the key is gone; drop its plaintext at once."""
        return self.evict_key(key)


class Flusher:
    """The background write-back thread of a :class:`PageCache`.

    Wakes every ``min(1 s, expire / 2)`` or when dirty memory passes half
    the limit; writes back expired files, then the oldest files until dirty
    memory is below a quarter of the limit.
    """

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="keyfence-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cache.lock:
            self._stop = True
            self.cache._wakeup.notify_all()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        cache = self.cache
        interval = max(0.05, min(1.0, cache.expire / 2))
        while True:
            with cache.lock:
                if self._stop:
                    return
                if cache.dirty_bytes <= cache.dirty_limit // 2 and not cache.stored_over_limit():
                    cache._wakeup.wait(interval)
                if self._stop:
                    return
            try:
                cache.flush_expired()
                if cache.dirty_bytes > cache.dirty_limit // 2:
                    cache.flush_until(cache.dirty_limit // 4)
                cache.confirm_stored(everything=cache.stored_over_limit())
                cache.trim_if_idle()
            except Exception:  # keep the flusher alive; the error was logged
                log.exception("background write-back failed")
                time.sleep(interval)


_HOLES_ASKED = 256
"""Holes of a backing file :meth:`PageCache.unwritten_sectors` looks for at
most (two ``lseek`` each); past them everything counts as a hole."""


def _pages_of(view: memoryview, count: int) -> list[Page]:
    """A copy of ``view`` (at most ``count`` pages) as pages: one buffer of
    ``count`` pages, zero past the end, one view per page."""
    if count == 1:
        page = bytearray(PAGE_SIZE)
        page[: len(view)] = view
        return [Page(page)]
    block = memoryview(bytearray(count * PAGE_SIZE))
    block[: len(view)] = view
    return [Page(block[pos : pos + PAGE_SIZE]) for pos in range(0, len(block), PAGE_SIZE)]


def _record_blocks(order: list[int], size: int, header: bool, bs: int) -> list[tuple[int, int]]:
    """Backing blocks (``bs`` bytes) the records of the dirty pages ``order``
    (sorted) of a file of ``size`` plaintext bytes touch, and the header's
    if ``header``: sorted, disjoint ``[lo, hi)`` ranges."""
    out: list[tuple[int, int]] = [(0, -(-FILE_HEADER_SIZE // bs))] if header else []
    k, n = 0, len(order)
    while k < n:
        first = order[k]
        j = k
        while j + 1 < n and order[j + 1] == order[j] + 1:
            j += 1
        last = order[j]
        k = j + 1
        if first * PAGE_SIZE >= size:
            break  # beyond the end: cut by a truncate, not to be written
        last = min(last, (size - 1) // PAGE_SIZE)
        lo = record_offset(first) // bs
        hi = -(
            -(record_offset(last) + min(PAGE_SIZE, size - last * PAGE_SIZE) + BLOCK_OVERHEAD) // bs
        )
        if out and lo <= out[-1][1]:  # adjacent runs share a block
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _holes(fd: int, start: int, end: int, bs: int) -> list[tuple[int, int]]:
    """The holes of ``fd`` between byte ``start`` and ``end`` (inside the
    file), as ``[lo, hi)`` ranges of whole blocks of ``bs`` bytes; an error
    counts as no hole (allocated)."""
    holes: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        if len(holes) == _HOLES_ASKED:
            holes.append((-(-pos // bs), -(-end // bs)))  # the rest: holes
            break
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            break
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:  # ENXIO: a hole up to the end of the file
            data = end
        if -(-hole // bs) < min(data, end) // bs:
            holes.append((-(-hole // bs), min(data, end) // bs))
        pos = data
    return holes


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """How many units two sorted lists of disjoint ``[lo, hi)`` ranges share."""
    total = i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _touch(fd: int) -> None:
    """A size change is a change now (POSIX truncate: ctime and mtime), even
    where the backing file itself changes only at write-back.  Best effort:
    the size change stands without it."""
    with contextlib.suppress(OSError):
        set_mtime_ns(fd, time.time_ns())
