"""Set-id bits and file capabilities that a write takes away.

Linux drops a regular file's privileges when its contents change, so that
a setuid program somebody else may write into does not go on running with
its owner's rights and the new contents (``file_remove_privs``, fs/inode.c;
``setattr_should_drop_suidgid``, fs/attr.c):

1. ``security.capability`` goes on every write, truncate and chown, whoever
   the writer is.
2. ``S_ISUID`` goes, and ``S_ISGID`` when group-exec is set (without it,
   ``S_ISGID`` is mandatory locking's mark and stays), unless the writer
   has ``CAP_FSETID`` (write, truncate, ``open(O_TRUNC)``); on chown always.

On FUSE the kernel does this itself unless the server takes it on with
``FUSE_HANDLE_KILLPRIV_V2``, and then it asks ``getxattr
security.capability`` before every write (a second request per write).
With the flag the superblock is ``SB_NOSEC``: the kernel still looks once
per inode, then marks it ``S_NOSEC`` and sends writes alone.  In return the
server clears set-id bits itself where the kernel says the writer has no
``CAP_FSETID``: ``FUSE_WRITE_KILL_SUIDGID`` in a write's ``write_flags``,
``FATTR_KILL_SUIDGID`` in a truncating or chown setattr,
``FUSE_OPEN_KILL_SUIDGID`` in an ``O_TRUNC`` open (fuse.h, 7.33).

A keyfence file's mode and xattrs are its backing file's, so a drop is an
``fchmod``/``fremovexattr`` of the backing descriptor.  :class:`Privileges`
remembers the inodes known to carry nothing to drop, so that a write costs
no syscall after the first; anything that may give an inode privileges
back calls :meth:`mode_changed` (chmod, chown) or :meth:`xattrs_changed`
(setxattr, removexattr, forget).
The backing store is private to the mount: nothing else sets them.

Concurrency: the FUSE handlers' thread only (no lock).
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["CAPABILITY_XATTR", "Privileges", "chown_drops", "in_group", "suidgid_to_drop"]

CAPABILITY_XATTR = "security.capability"

_NO_XATTR = (errno.ENODATA, errno.ENOTSUP)


def suidgid_to_drop(mode: int) -> int:
    """The set-id bits of ``mode`` that a write by a writer without
    ``CAP_FSETID`` drops (0 for anything but a regular file)."""
    if not stat.S_ISREG(mode):
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_IXGRP:
        kill |= mode & stat.S_ISGID
    return kill


def chown_drops(mode: int, in_group_or_capable: bool) -> int:
    """The set-id bits of ``mode`` that a chown drops (``chown_common`` and
    ``setattr_should_drop_sgid``, fs/open.c, fs/attr.c): S_ISUID always;
    S_ISGID when group-exec is set, or when the caller is neither in the
    file's group nor privileged; nothing of a directory."""
    if stat.S_ISDIR(mode):
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group_or_capable):
        kill |= stat.S_ISGID
    return kill


def in_group(pid: int, primary: int, gid: int) -> bool:
    """Whether the process ``pid`` (primary group ``primary``, as its FUSE
    request says) is in group ``gid``: its supplementary groups are read
    from ``/proc/PID/status`` (the process waits in its request, so the pid
    is still its own); False if it cannot be read."""
    if primary == gid:
        return True
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return gid in {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return False


def remove_capability(fd: int) -> None:
    """Remove ``security.capability`` from the file open at ``fd`` if it has one.

    Looked up first: removing needs ``CAP_SETFCAP``, which a user's worker
    lacks (and without it nobody can have set one)."""
    try:
        os.getxattr(fd, CAPABILITY_XATTR)
    except OSError as err:
        if err.errno in _NO_XATTR:
            return
        raise
    try:
        os.removexattr(fd, CAPABILITY_XATTR)
    except OSError as err:
        if err.errno not in _NO_XATTR:  # gone meanwhile: fine
            raise


class Privileges:
    """What a write drops, per inode (see the module doc), and what
    ``getxattr security.capability`` may answer without a syscall.

    Two sets, one fact each; ``_bare`` is always within ``_no_capability``."""

    def __init__(self) -> None:
        self._no_capability: set[int] = set()
        """Inodes known to have no ``security.capability``."""
        self._bare: set[int] = set()
        """Inodes known to have no capability and no set-id bit a write drops."""

    def made(self, ino: int, mode: int) -> None:
        """``ino`` was just created by the worker with ``mode``: it has no
        capability, and no set-id bit to drop unless its mode has one."""
        self._no_capability.add(ino)
        if not suidgid_to_drop(mode):
            self._bare.add(ino)

    @property
    def without_capability(self) -> set[int]:
        """The set itself, never replaced: fs/fuse/_loop.c answers
        ``getxattr security.capability`` of these inodes with ENODATA,
        without the handler (read on the handlers' thread, as everything
        here)."""
        return self._no_capability

    def has_no_capability(self, ino: int) -> bool:
        """Known: ``ino`` has no ``security.capability`` (getxattr answers
        ENODATA without asking the backing file)."""
        return ino in self._no_capability

    def found_no_capability(self, ino: int) -> None:
        """The backing file said ENODATA for ``security.capability``."""
        self._no_capability.add(ino)

    def mode_changed(self, ino: int) -> None:
        """chmod or chown: set-id bits may be back (a chown only ever takes
        a capability away)."""
        self._bare.discard(ino)

    def xattrs_changed(self, ino: int) -> None:
        """setxattr, removexattr, or the inode forgotten: anything may be back."""
        self._bare.discard(ino)
        self._no_capability.discard(ino)

    def drop(self, ino: int, fd: int, *, kill_suidgid: bool) -> None:
        """Before a write or truncate of ``ino`` through its backing
        descriptor ``fd``: remove its capability, and its set-id bits when
        ``kill_suidgid`` (the writer has no ``CAP_FSETID``).

        Errors (``EPERM`` from a capability the worker may not remove) fail
        the write, as ``file_remove_privs`` fails it."""
        if ino in self._bare:
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self._bare.add(ino)
            return
        if ino not in self._no_capability:
            remove_capability(fd)
            self._no_capability.add(ino)
        kill = suidgid_to_drop(st.st_mode)
        if kill:
            if not kill_suidgid:
                return  # this writer keeps them; the next one is asked again
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~kill)
        self._bare.add(ino)
