"""Device flushes behind a long write-back, on a thread of its own.

An fsync ends with a flush of the disk's volatile write cache, and that
flush costs in proportion to what was written since the last one: on these
VMs (the host's page cache under the virtual disk) 0.25-0.45 s for 512 MiB
that were already written and waited for (``bench/flush_cost.py``).  A
write-back that an fsync follows (a file's fsync, memory running short, a
key being removed: ``start_io`` in fs/writeback.py) starts the disk writes
as it goes; every :attr:`SyncBehind.every` bytes so started it also offers
the backing file here, and an ``fdatasync`` of it runs while the write-back
seals the rest.  The final fsync then flushes only what came after the last
one, as the disk's own write-back would have, had it been told.

Error reporting: the ``fdatasync`` runs on a descriptor of its own, the
file opened again through ``/proc/self/fd`` (a new open file description).
Linux reports a write-back error to every open file description once
(``errseq_t``), so an error this thread sees, and ignores, is still
reported by the next fsync on the cache's own descriptor.  A ``dup`` would
share the description and take that report away from the user's fsync.
Without ``/proc`` (or when the file cannot be opened for reading) nothing
runs here, and the final fsync does all the work, as before.

Concurrency: :meth:`SyncBehind.offer` never waits for a flush and may be
called from any thread; at most one ``fdatasync`` is queued or running at a
time, and an offer meanwhile is declined (the next comes ``every`` bytes
later).  The thread starts at the first accepted offer.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

from keyfence.fs.syscalls import reopen_read_only

__all__ = ["SYNC_BEHIND_BYTES", "SyncBehind"]

SYNC_BEHIND_BYTES = 64 << 20
"""Disk writes started between two flushes behind a write-back (32 and 64
MiB measured alike; docs/performance.md, part 12)."""


class SyncBehind:
    """Runs ``fdatasync`` of backing files off the write-back's threads."""

    def __init__(
        self,
        *,
        every: int = SYNC_BEHIND_BYTES,
        datasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        """``datasync``: injected by tests, to see which descriptor is
        synced and on which thread (the real call everywhere else)."""
        self.every = every
        """Bytes of disk writes started between two offers (0: never offer)."""
        self._datasync = datasync
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._stopped = False
        self.synced = 0
        """Flushes run so far (for tests and statistics)."""

    def offer(self, fd: int) -> bool:
        """Flush ``fd``'s file to the disk soon, unless a flush is under
        way; whether it was taken.  ``fd`` stays the caller's."""
        with self._lock:
            if self._busy or self._stopped or self.every <= 0:
                return False
            self._busy = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="keyfence-syncbehind", daemon=True
                )
                self._thread.start()
        try:
            own = reopen_read_only(fd)
        except OSError:  # no /proc, a file not readable by us: the fsync does it all
            with self._lock:
                self._busy = False
            return False
        self._queue.put(own)
        return True

    def stop(self) -> None:
        """End the thread once a flush under way is done (idempotent)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(30)

    def _run(self) -> None:
        while True:
            fd = self._queue.get()
            if fd is None:
                return
            try:
                with contextlib.suppress(OSError):  # reported by the real fsync
                    self._datasync(fd)  # releases the GIL
            finally:
                os.close(fd)
                with self._lock:
                    self.synced += 1
                    self._busy = False
