"""Readahead of backing files, on a thread of its own.

A sequential reader's next records are announced to the backing filesystem
(``posix_fadvise(WILLNEED)``) so that its disk reads overlap our decryption
of what was read before.  The announcement is not free: the kernel allocates
the page-cache pages and submits the reads in the announcing thread.  In a
cold 1 MiB-request read it was a quarter of the serving thread's time
(docs/performance.md, part 11), so it runs here, on another core, and the
serving thread only copies pages that are already on their way.

Concurrency: :meth:`BackingReadahead.announce` never blocks and may be called
from any thread.  Announcements run in order on one daemon thread, started
at the first one.  A descriptor closed (or even reused for another file)
before its announcement runs gets a hint about the wrong file at worst:
WILLNEED reads nothing back to anyone, and its errors are ignored.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

__all__ = ["BackingReadahead"]


class BackingReadahead:
    """Runs ``posix_fadvise(fd, offset, length, WILLNEED)`` off the caller's thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self.announced = 0
        """Announcements run so far (for tests and statistics)."""

    def announce(self, fd: int, offset: int, length: int) -> None:
        """Ask for ``length`` bytes of ``fd`` from ``offset`` to be read soon."""
        if self._thread is None:
            with self._start_lock:
                if self._stopped:
                    return
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="keyfence-readahead", daemon=True
                    )
                    self._thread.start()
        self._queue.put((fd, offset, length))

    def stop(self) -> None:
        """End the thread once what was announced has run (idempotent)."""
        with self._start_lock:
            self._stopped = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(10)

    def _run(self) -> None:
        advise, willneed = os.posix_fadvise, os.POSIX_FADV_WILLNEED
        while True:
            item = self._queue.get()
            if item is None:
                return
            with contextlib.suppress(OSError):
                advise(item[0], item[1], item[2], willneed)  # releases the GIL
            self.announced += 1
