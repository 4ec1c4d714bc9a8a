"""Negative entries: the names the kernel was told are missing, and for how long.

A ``lookup`` of a missing name may answer with inode 0 and an entry timeout:
the kernel then keeps a negative dentry and answers the next ``stat`` or
``open`` of that name itself until the timeout (SQLite asks whether its hot
journal exists before every transaction; Python's imports, git and make probe
missing names all day).  Creating the name through the mount replaces the
negative dentry (the kernel does that for ``create``, ``mknod``, ``mkdir``,
``symlink``, ``link`` and ``rename``); the backing store is private to the
mount, so nothing else creates names behind the kernel's back.

What the kernel cannot know is a key going away: in a locked directory the
backing (encrypted) names appear, and a name that was missing while the key
was there may exist now.  So every negative entry handed out with a timeout
is remembered here, per directory, and a key removal invalidates those of its
directories together with their positive entries (ops ``_evict`` and
``_invalidate``).  A locked directory's negatives get no timeout at all (its
plaintext names come back when the key does).

Bounded: past ``limit`` names in all, a lookup gets no timeout (correct,
only slower) until directories are forgotten or evicted.  A name made
through the mount leaves the table (:meth:`NegativeEntries.discard`).

Concurrency: used on the FUSE loop's thread only (lookups, forget, and the
eviction, which runs there too); no lock.
"""

from __future__ import annotations

from keyfence.fs import wipe

DEFAULT_LIMIT = 65536


class NegativeEntries:
    """Names of each directory inode answered as missing with a timeout."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._names: dict[int, set[bytes]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def remember(self, dir_ino: int, name: bytes) -> bool:
        """Record ``name`` as handed out missing in ``dir_ino``; False (give it
        no timeout) when the table is full."""
        names = self._names.get(dir_ino)
        if names is not None and name in names:
            return True
        if self._count >= self.limit:
            return False
        if names is None:
            names = self._names[dir_ino] = set()
        names.add(name)
        self._count += 1
        return True

    def discard(self, dir_ino: int, name: bytes) -> None:
        """``name`` was made through the mount: the kernel swapped its
        negative dentry for the new entry, so there is nothing left to
        invalidate (and without this every file made after a miss, as
        ``open(O_CREAT)`` makes them, would hold a place until the table is
        full and no miss is cached any more)."""
        names = self._names.get(dir_ino)
        if names is not None and name in names:
            names.remove(name)
            self._count -= 1
            if not names:
                del self._names[dir_ino]

    def take(self, dir_ino: int) -> list[bytes]:
        """The names of ``dir_ino`` (to invalidate in the kernel), forgotten here."""
        names = self._names.pop(dir_ino, None)
        if not names:
            return []
        self._count -= len(names)
        return sorted(names)

    def forget_dir(self, dir_ino: int) -> None:
        """The kernel forgot the directory: its dentries, negative ones too,
        are gone (the names, plaintext in an encrypted directory, zeroed)."""
        wipe.release(self.take(dir_ino))
