"""The page cache's records: a dirty page, a cached file.

The internal contract of fs/pagecache.py (the cache: reads, writes, its
lock protocol) and fs/writeback.py (sealing and storing the pages), which
both use them; neither imports the other's internals through here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from keyfence.fs.crypto import FileCipher, MasterKey
from keyfence.fs.format import BLOCK_SIZE

__all__ = ["PAGE_SIZE", "CachedFile", "Page", "Progress"]

PAGE_SIZE = BLOCK_SIZE

Progress = Callable[[int], None]
"""Called during write-back with the bytes written so far."""


class Page:
    """One dirty 4 KiB page: its own bytearray, or a view into the buffer
    of the large write that made it (one copy for a whole 1 MiB write)."""

    __slots__ = ("data", "version")

    def __init__(self, data: bytearray | memoryview) -> None:
        self.data = data
        self.version = 0


class CachedFile:
    """One encrypted backing file in the page cache (one per inode).

    Every field is guarded by the lock of its cache
    (:attr:`keyfence.fs.pagecache.PageCache.lock`).
    """

    __slots__ = (
        "changed_ns",
        "cipher",
        "closing",
        "dirty_since",
        "disk_size",
        "fd",
        "flushing",
        "generation",
        "header_error",
        "header_on_disk",
        "ino",
        "key",
        "master",
        "mtime_ns",
        "next_read",
        "pages",
        "readahead_to",
        "size",
        "stored",
        "stored_since",
        "sync_errno",
        "sync_errors",
        "unsynced",
        "users",
    )

    def __init__(self, ino: int, fd: int, key: str, master: MasterKey) -> None:
        self.ino = ino
        self.fd = fd
        self.key = key
        """Description of the key the file is under (``keyfence:...``)."""
        self.master: MasterKey | None = master
        self.cipher: FileCipher | None = None
        self.header_on_disk = False
        self.header_error: OSError | None = None
        self.size = 0
        self.disk_size = 0
        self.pages: dict[int, Page] = {}
        self.stored: dict[int, Page] = {}
        """Pages whose records were stored in the backing file since its
        last fsync (or wait for its write-back) began, the latest of each
        index: kept, plaintext and all, until the backing store says it
        wrote them, to be written again if it failed (a removal retried
        after EIO must find them dirty; docs/fs.md, "Faults")."""
        self.stored_since: float | None = None
        """When the first of :attr:`stored` was stored (the cache's clock)."""
        self.generation = 0
        self.dirty_since: float | None = None
        self.mtime_ns: int | None = None
        """The last write's time, to set as mtime after write-back (None:
        the backing file's mtime holds)."""
        self.changed_ns = 0
        """The last write's time: the ctime to show until a write-back
        changes the backing file's (ext4 sets both at the write)."""
        self.users = 0
        self.closing = False
        self.flushing = threading.Lock()
        self.next_read = -1
        """Where a sequential reader would read next (for prefetching)."""
        self.readahead_to = 0
        """The end of the backing bytes announced to a sequential reader."""
        self.unsynced = 0
        """Bytes handed to the disk since the file was last flushed
        behind the write-back (fs/writebehind.py)."""
        self.sync_errors = 0
        """fsyncs of the backing file that failed (EIO: its write-back
        failed in the backing store), and the last one's errno: every open
        of the file is told once (:class:`keyfence.fs.handles.FileHandle`),
        as the kernel tells every open file description (``errseq_t``);
        the backing file's one description would tell only the first
        fsync, whoever made it (another process, a key removal)."""
        self.sync_errno = 0

    def __repr__(self) -> str:
        return f"CachedFile(ino={self.ino}, size={self.size}, dirty_pages={len(self.pages)})"

    def dirty_bytes(self) -> int:
        """Plaintext bytes in dirty pages (what an emergency would lose)."""
        pages, size = self.pages, self.size
        if not pages:
            return 0
        last = (size - 1) // PAGE_SIZE if size > 0 else -1
        if max(pages) > last:  # pages beyond the end (never left by truncate): count each
            return sum(max(0, min(PAGE_SIZE, size - i * PAGE_SIZE)) for i in pages)
        # every page is full but the one holding the end of file (a key
        # removal asks this of 1 GiB of pages: a Python loop cost 60 ms)
        total = len(pages) * PAGE_SIZE
        if last in pages:
            total -= (last + 1) * PAGE_SIZE - size
        return total
