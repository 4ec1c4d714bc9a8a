"""POSIX ACLs through the mount: the mode a new entry gets, as ext4 gives it.

The kernel enforces ACLs on the mount itself (``FUSE_POSIX_ACL``, asked
for at INIT by both loops): it reads ``system.posix_acl_access`` through
GETXATTR, which passes to the backing entry, and checks every access
against it as ext4 would (docs/fs.md, "POSIX ACLs").  Two things stay the
server's:

1. **The mode of a new entry.**  With ``FUSE_DONT_MASK`` the kernel sends
   the mode unmasked, with the caller's umask beside it.  As ext4's
   ``posix_acl_create``: under a directory with a default ACL the umask is
   ignored and the mode is the default ACL's "masq" of the asked mode
   (:func:`creation_mode`); anywhere else the umask applies.  The worker
   then makes the backing entry with that mode, and the backing filesystem
   copies the default ACL onto it (the worker's own umask is 0).  A mode
   set again afterwards (the worker's ``chmod`` after ``chown``, an
   encrypted directory made with a narrower mode first) is this same
   mode, so ``posix_acl_chmod`` leaves the entry's ACL as ext4 made it.
2. **The set-group-ID bit on an ACL change** by a caller outside the
   file's group (``FUSE_SETXATTR_ACL_KILL_SGID``): ext4 drops it when such a
   caller sets the access ACL, and a root worker is no such caller
   (fs/xattrs.py drops it).

Everything else (``chmod`` updating the ACL's mask, ``setfacl`` updating
the mode, inheritance into subdirectories) the backing filesystem does
when the worker changes the backing entry.

The xattr format (include/uapi/linux/posix_acl_xattr.h): a 4-byte version
(2), then entries of tag (u16), perm (u16) and id (u32), little-endian.
"""

from __future__ import annotations

import errno
import struct

from keyfence.fs import syscalls as sc

__all__ = ["ACCESS_XATTR", "DEFAULT_XATTR", "creation_mode", "masq"]

ACCESS_XATTR = b"system.posix_acl_access"
DEFAULT_XATTR = b"system.posix_acl_default"

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
# tags
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NOT_THERE = (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP)


def _entries(value: bytes) -> list[tuple[int, int]]:
    """(tag, perm) of each entry; ValueError if it is not an ACL."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("not a POSIX ACL")
    if _HEADER.unpack_from(value)[0] != _VERSION:
        raise ValueError("not a version 2 POSIX ACL")
    out = []
    for pos in range(_HEADER.size, len(value), _ENTRY.size):
        tag, perm, _id = _ENTRY.unpack_from(value, pos)
        if tag not in (_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER):
            raise ValueError("unknown ACL tag")
        out.append((tag, perm & 7))
    return out


def masq(default_acl: bytes, mode: int) -> int:
    """The mode ext4 gives an entry made with ``mode`` under a directory
    with ``default_acl``: the kernel's ``posix_acl_create_masq`` (the
    owner and other classes are ANDed with theirs, the group class with the
    mask entry's, or the owning group's if there is no mask)."""
    perm = mode & 0o777
    group_class = None
    mask = None
    for tag, bits in _entries(default_acl):
        if tag == _USER_OBJ:
            perm &= (bits << 6) | ~0o700
        elif tag == _OTHER:
            perm &= bits | ~0o007
        elif tag == _MASK:
            mask = bits
        elif tag == _GROUP_OBJ:
            group_class = bits
    if mask is not None:
        group_class = mask
    if group_class is None:
        raise ValueError("an ACL without its owning group")
    perm &= (group_class << 3) | ~0o070
    return (mode & ~0o777) | perm


def creation_mode(dir_fd: int, mode: int, umask: int) -> int:
    """The mode to make an entry with under the backing directory ``dir_fd``
    (an ``O_PATH`` descriptor): the default ACL's masq of ``mode`` if the
    directory has one, else ``mode`` less ``umask`` (see the module)."""
    try:
        default_acl = sc.getxattr_opath(dir_fd, DEFAULT_XATTR)
    except OSError as err:
        if err.errno not in _NOT_THERE:
            raise
        return mode & ~(umask & 0o777)
    try:
        return masq(default_acl, mode)
    except ValueError:
        return mode & ~(umask & 0o777)  # unreadable: as if it had none
