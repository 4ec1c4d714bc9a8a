"""The largest file the mount can store (docs/fs.md, "Sizes and holes").

A plaintext size is stored as a longer ciphertext (header and per-record
overhead, fs/format.py), so an encrypted file's largest size is the largest
plaintext whose backing file the backing filesystem still takes.  The page
cache refuses (EFBIG) a write or truncate beyond it before anything
changes: a size or page it accepted but could never store would fail every
write-back, every fsync and every key removal after it.

The backing filesystem's limit (ext4's ``s_maxbytes``: 16 TiB - 4 KiB with
4 KiB blocks; more on xfs, btrfs, tmpfs) is asked of the filesystem itself
once per mount: ``ftruncate`` of an unnamed file (``O_TMPFILE``) in the
backing directory, halving the interval (a sparse size costs no blocks).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets

from keyfence.fs.format import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    FILE_HEADER_SIZE,
    RECORD_SIZE,
    TEMP_NAME_PREFIX,
)

__all__ = ["FALLBACK_BACKING_MAX", "LARGEST_FILE", "backing_max_size", "encrypted_max_size"]

log = logging.getLogger("keyfence.fs.limits")

LARGEST_FILE = 2**63 - 1
"""The kernel's own limit (MAX_LFS_FILESIZE on 64-bit), also FUSE's."""

FALLBACK_BACKING_MAX = (2**32 - 1) * 4096
"""Taken when the backing filesystem cannot be asked: ext4's limit with
4 KiB blocks (too small a limit refuses sizes, too large a one would
accept data that can never be stored)."""


def encrypted_max_size(backing_max: int) -> int:
    """The largest plaintext size whose backing file is at most
    ``backing_max`` bytes (fs/format.py ``backing_size``)."""
    if backing_max <= FILE_HEADER_SIZE:
        return 0
    full, rest = divmod(backing_max - FILE_HEADER_SIZE, RECORD_SIZE)
    return full * BLOCK_SIZE + max(0, rest - BLOCK_OVERHEAD)


def backing_max_size(dir_fd: int) -> int:
    """The largest file size the filesystem of ``dir_fd`` takes, asked of
    it (see the module doc; a filesystem without ``O_TMPFILE``, such as
    vfat or NFS, through a ``kf.tmp.*`` file removed at once);
    :data:`FALLBACK_BACKING_MAX` if it cannot be asked (a read-only or
    unwritable directory: nothing is stored there anyway)."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600, dir_fd=dir_fd)
    except OSError:
        fd = _named_probe_file(dir_fd)
    if fd < 0:
        return FALLBACK_BACKING_MAX
    try:
        return _largest_truncate(fd)
    finally:
        os.close(fd)


def _named_probe_file(dir_fd: int) -> int:
    """A new empty file in ``dir_fd`` whose name is already gone, or -1."""
    name = f"{TEMP_NAME_PREFIX}{secrets.token_hex(8)}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as err:
        log.warning(
            "cannot ask the backing filesystem its largest file size (%s); taking %d",
            err.strerror,
            FALLBACK_BACKING_MAX,
        )
        return -1
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
    return fd


def _largest_truncate(fd: int) -> int:
    """The largest size ``ftruncate(fd)`` takes (the file is left empty)."""
    good, bad = 0, LARGEST_FILE + 1
    try:
        while bad - good > 1:
            size = (good + bad) // 2
            try:
                os.ftruncate(fd, size)
            except OSError as err:
                if err.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                bad = size
            else:
                good = size
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    return good
