"""Directories whose GETATTR (and missing names) the FUSE loop answers in C.

Why: with ``default_permissions`` (docs/security.md) the kernel asks for a
directory's attributes again after every create, unlink, mkdir or rename
in it, before the next path walk's permission check (docs/performance.md,
part 9): one GETATTR per file for ``tar -x``, ``git add``, ``rm -rf``.
Answered by the handler that is ~24 µs of the serving thread; from this
table, an ``fstat`` in C, ~7.

What an entry is: ``nodeid -> (fd, st_ino, attr_valid, attr_valid_nsec,
names)``.
``fd`` is this table's own duplicate (close-on-exec) of the directory's
backing descriptor, ``st_ino`` the backing inode it must still be, and the
timeout the one the handler answered with.  The loop answers a GETATTR of
``nodeid`` from the entry when ``fstat(fd)`` shows a directory, that inode,
not removed (``st_nlink > 0``): the attributes of the ``fstat`` as
``KeyfenceOperations._attrs`` gives a directory's (size as on disk,
``blksize`` 4096), with the stored timeout.  Otherwise the handler answers,
as it always did.

Missing names (docs/performance.md, part 17): ``names`` is the directory's
:class:`~keyfence.fs._names.NameSealer` (``DirectoryCipher.names_sealer``)
for an encrypted directory whose key is bound, else None.  With it, the
loop (fs/fuse/_answers.c) answers a LOOKUP itself when the encoded name is
missing from ``fd``: it calls :attr:`on_miss` (``KeyfenceOperations.
lookup_missed``: remember the negative entry, for a key removal to
invalidate) and answers inode 0 with the stored timeout (ENOENT, no
timeout, when ``on_miss`` says the negative-entry table is full), as the
handler's ``_missing`` does.  A name found, a long name, or any error: the
handler.  Lookups in a directory that is not encrypted always go to the
handler (its reserved names are decided there).

Who keeps it true (fs/ops.py):

* the operations :meth:`offer` a directory only after answering its
  GETATTR or a LOOKUP in it themselves with a timeout (unencrypted, or its
  key present), and give the generation they read before they looked
  (:attr:`generation`); a sealer is added to an entry that had none;
* a FORGET :meth:`withdraw` s the inode, a rename the directory moved,
  and a new encryption policy the directory it was set on;
* a key unbound (fs/binding.py) :meth:`clear` s the table and moves the
  generation on, so an offer made from what was true before is refused:
  what locks changes the timeout (0 for a directory whose key is gone)
  and takes the sealers out before the key's names are wiped
  (fs/key_going.py: both on the loop's own thread);
* the mount's end clears it.

What is not refreshed: ``Inode.group`` (the set-group-ID bit and group a
new entry inherits), which the handler's ``fstat`` also updated.  It only
changes through the mount's own SETATTR, which resets it; the backing
directory is the mount's own (docs/fs.md).

Threads: :meth:`offer`, :meth:`withdraw` and :meth:`clear` may run on any
thread (a key is unbound on the key source's); they change the table under
a lock and close a descriptor only after its entry is out of the table.
The loop reads the table and ``fstat`` s the descriptor without letting go
of the GIL, so it never uses a descriptor closed (or reused) meanwhile.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["DirectoryAttributes"]

MAX_ENTRIES = 1024
"""Descriptors the table holds at most (the oldest entry goes first)."""


class DirectoryAttributes:
    """The table the loop answers directories' GETATTR from (see above)."""

    def __init__(self, *, enabled: bool = True, max_entries: int = MAX_ENTRIES) -> None:
        self.enabled = enabled
        """False: nothing is offered (no C loop reads the table: fs/worker.py)."""
        self.table: dict[int, tuple[int, int, int, int, Any]] = {}
        """What fs/fuse/_loop.c reads: nodeid -> (fd, st_ino, seconds, nanoseconds, names)."""
        self.on_miss: Callable[[int, bytes, str], bool] | None = None
        """``(nodeid, name, disk name) -> bool`` the loop calls for a missing
        name it answers: True, answer with the timeout; False, ENOENT."""
        self.generation = 0
        """Moves on at every :meth:`clear`: read it before looking, give it to :meth:`offer`."""
        self._max = max_entries
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, nodeid: int) -> bool:
        return nodeid in self.table

    def offer(
        self,
        nodeid: int,
        backing_fd: int,
        st_ino: int,
        timeout: float,
        *,
        generation: int,
        names: Any = None,
    ) -> None:
        """Answer ``nodeid``'s GETATTR from ``backing_fd`` (duplicated here)
        with ``timeout`` seconds, and with ``names`` (a NameSealer) its
        missing names, unless the table was cleared since ``generation``.
        An entry already there only gains ``names``."""
        if not self.enabled or timeout <= 0:
            return
        entry = self.table.get(nodeid)
        if entry is not None and (names is None or entry[4] is not None):
            return
        if entry is not None:
            with self._lock:
                if generation == self.generation and self.table.get(nodeid) is entry:
                    self.table[nodeid] = (*entry[:4], names)
            return
        seconds = int(timeout)
        entry_ns = int((timeout - seconds) * 1_000_000_000)  # as dispatch.attr_out_bytes
        fd = os.dup(backing_fd)  # close-on-exec, as os.dup makes it
        oldest = -1
        with self._lock:
            if generation != self.generation or nodeid in self.table:
                fd, oldest = -1, fd  # not taken: closed below
            else:
                if len(self.table) >= self._max:
                    oldest = self.table.pop(next(iter(self.table)))[0]
                self.table[nodeid] = (fd, st_ino, seconds, entry_ns, names)
        if oldest >= 0:
            os.close(oldest)

    def withdraw(self, nodeid: int) -> None:
        """The handler answers ``nodeid``'s GETATTR and lookups again."""
        with self._lock:
            entry = self.table.pop(nodeid, None)
        if entry is not None:
            os.close(entry[0])

    def clear(self) -> None:
        """The handlers answer every GETATTR and LOOKUP again; earlier offers
        are refused."""
        with self._lock:
            self.generation += 1
            entries = list(self.table.values())
            self.table.clear()
        for fd, *_ in entries:
            os.close(fd)
