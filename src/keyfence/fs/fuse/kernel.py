"""What the handlers ask of the FUSE loop serving them, whichever it is.

:mod:`keyfence.fs.ops` calls these instead of pyfuse3's functions of the
same names: with keyfence's own loop (:mod:`.session`) active in this
process they go to it, otherwise to pyfuse3.  One mount per worker
process, so one loop: a module global, as pyfuse3's own state is.
"""

from __future__ import annotations

from typing import Any

import pyfuse3

from keyfence.fs.fuse.dispatch import DirBuffer
from keyfence.fs.fuse.session import Session

__all__ = [
    "active",
    "invalidate_entry",
    "invalidate_entry_async",
    "invalidate_inode",
    "readdir_reply",
    "set_active",
]

_session: Session | None = None


def set_active(session: Session | None) -> None:
    global _session
    _session = session


def active() -> Session | None:
    return _session


def readdir_reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
    """Add a directory entry to a READDIR answer; False when it is full."""
    if isinstance(token, DirBuffer):
        return token.add(bytes(name), attrs, next_id)
    return bool(pyfuse3.readdir_reply(token, name, attrs, next_id))


def invalidate_inode(ino: int) -> None:
    """Drop the kernel's cached attributes and pages of ``ino`` (may wait
    for requests: never from a handler)."""
    if _session is not None:
        _session.invalidate_inode(ino)
    else:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(ino))


def invalidate_entry(parent: int, name: bytes) -> None:
    """Drop the kernel's dentry (may wait for requests: never from a handler)."""
    if _session is not None:
        _session.invalidate_entry(parent, bytes(name))
    else:
        pyfuse3.invalidate_entry(pyfuse3.InodeT(parent), pyfuse3.FileNameT(name))


def invalidate_entry_async(parent: int, name: bytes, *, ignore_enoent: bool = False) -> None:
    """:func:`invalidate_entry` on another thread: safe from a handler."""
    if _session is not None:
        _session.invalidate_entry_async(parent, bytes(name), ignore_enoent)
    else:
        pyfuse3.invalidate_entry_async(
            pyfuse3.InodeT(parent), pyfuse3.FileNameT(name), ignore_enoent=ignore_enoent
        )
