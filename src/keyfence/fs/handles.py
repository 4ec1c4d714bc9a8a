"""The open files and directories of a mount (what a FUSE ``fh`` names)."""

from __future__ import annotations

from keyfence.fs.cachedfile import CachedFile

__all__ = ["DirHandle", "FileHandle"]


class FileHandle:
    __slots__ = ("cached", "fd", "flags", "ino", "pid", "sync_seen")

    def __init__(
        self, ino: int, flags: int, fd: int = -1, cached: CachedFile | None = None, pid: int = 0
    ):
        self.ino = ino
        self.flags = flags
        self.fd = fd
        self.cached = cached
        self.pid = pid
        """Who opened it (encrypted files): where a copy of its key is
        looked for when the bound one goes (KeyBindings.move_to_copy)."""
        self.sync_seen = cached.sync_errors if cached is not None else 0
        """The file's failed fsyncs this handle has reported (its fsync
        reports one it has not: ``CachedFile.sync_errors``)."""


class DirHandle:
    __slots__ = ("entries", "ino", "locked", "pid")

    def __init__(self, ino: int, pid: int) -> None:
        self.ino = ino
        self.pid = pid
        """The process that opened it: its keyrings count for readdir."""
        self.entries: list[tuple[bytes, str]] | None = None
        self.locked = False
