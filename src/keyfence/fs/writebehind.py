"""Disk writes behind a long write-back: started, and the disk's cache
flushed, on a thread of its own.

A write-back that an fsync follows (a file's fsync, memory running short, a
key being removed: ``start_io`` in fs/writeback.py) hands the disk what it
stored every few MiB, so the fsync finds the work under way.  Two things
made that slower than it needs to be, both measured in process on 1 GiB
(docs/performance.md, part 12):

* An fsync ends with a flush of the disk's volatile cache, and the flush
  costs in proportion to what was written since the last one: on these VMs
  (the host's page cache under the virtual disk) 0.2-0.45 s for 512 MiB
  already written and waited for (``bench/flush_cost.py``).  So every
  :attr:`WriteBehind.every` bytes handed over per file, an ``fdatasync``
  of it runs here too, while the write-back seals the rest; the final
  fsync flushes only what came after the last one.
* ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` blocks while another thread
  writes the same file's pages out (such an ``fdatasync``), and on the
  sealing threads that was 0.2-0.3 s of a 1 GiB write-back asleep.  Here
  a start waits behind the flush instead; the sealing threads never wait
  for the disk.

Error reporting: the ``fdatasync`` runs on a descriptor of its own, the
file opened again through ``/proc/self/fd`` (a new open file description).
Linux reports a write-back error to every open file description once
(``errseq_t``), so an error this thread sees, and ignores, is still
reported by the next fsync on the cache's own descriptor.  A ``dup`` would
share the description and could take that report away from the user's
fsync.  Without ``/proc`` (or when the file cannot be opened for reading)
no flush runs here and the final fsync does all of it, as before.  Errors
of a start are ignored likewise (the fsync reports them).

Concurrency: :meth:`WriteBehind.start` never waits for the disk and may be
called from any thread; the work runs in order on one daemon thread,
started at the first call.  At most one flush is queued or running at a
time; a flush asked for meanwhile is declined (the next is asked for
``every`` bytes later), the start with it is not.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

from keyfence.fs.syscalls import reopen_read_only, start_writeback

__all__ = ["FLUSH_BEHIND_BYTES", "WriteBehind"]

FLUSH_BEHIND_BYTES = 64 << 20
"""Disk writes started per file between two flushes behind (32 and 64 MiB
measured alike; docs/performance.md, part 12)."""

_Work = tuple[int, int, int, int]
"""The descriptor handed over, offset, length, and the file's own
read-only description to flush (-1: none)."""


class WriteBehind:
    """Starts disk writes and flushes of backing files off the write-back's threads."""

    def __init__(
        self,
        *,
        every: int = FLUSH_BEHIND_BYTES,
        datasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        """``datasync``: injected by tests, to see which descriptor is
        flushed and on which thread (the real call everywhere else)."""
        self.every = every
        """Bytes of disk writes started per file between two flushes (0: none)."""
        self._datasync = datasync
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._flushing = False
        self._stopped = False
        self.started = 0
        """Ranges handed to the disk so far (for tests and statistics)."""
        self.flushed = 0
        """Flushes run so far."""

    def start(self, fd: int, offset: int, length: int, *, flush: bool = False) -> bool:
        """Have the disk write ``length`` bytes of ``fd`` from ``offset``
        soon and, with ``flush``, then flush the file to it unless a flush
        is under way; whether a flush was taken.  ``fd`` is handed over (a
        duplicate the caller made while it knew the file open): it is
        closed here, once done.
        """
        with self._lock:
            if self._stopped:
                os.close(fd)
                return False
            flush = flush and self.every > 0 and not self._flushing
            if flush:
                self._flushing = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="keyfence-writebehind", daemon=True
                )
                self._thread.start()
        own = -1
        if flush:
            with contextlib.suppress(OSError):  # no /proc, a file not ours to read:
                own = reopen_read_only(fd)  # the fsync does it all
        with self._lock:  # queued under the lock: never after stop()'s end mark
            if not self._stopped:
                self._queue.put((fd, offset, length, own))
                if flush and own < 0:
                    self._flushing = False
                return own >= 0
            if flush:
                self._flushing = False
        os.close(fd)
        if own >= 0:
            os.close(own)
        return False

    def stop(self) -> None:
        """End the thread once the work handed over is done (idempotent)."""
        with self._lock:
            if not self._stopped and self._thread is not None:
                self._queue.put(None)
            self._stopped = True
            thread = self._thread
        if thread is not None:
            thread.join(30)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            fd, offset, length, own = work
            with contextlib.suppress(OSError):  # reported by the real fsync
                start_writeback(fd, offset, length)
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._lock:
                self.started += 1
            if own < 0:
                continue
            with contextlib.suppress(OSError):
                self._datasync(own)  # releases the GIL
            with contextlib.suppress(OSError):
                os.close(own)
            with self._lock:
                self.flushed += 1
                self._flushing = False
