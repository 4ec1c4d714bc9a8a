"""The FUSE wire protocol: opcodes, flags and structures of the kernel's
include/uapi/linux/fuse.h (7.x, as the kernel speaks it; we answer at most
:data:`OUR_MINOR`).

Every structure is a :class:`struct.Struct` in native byte order (the
kernel's), named after its C name.  Nothing here does I/O.
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
OUR_MINOR = 38
"""The newest protocol minor whose structures this module knows; INIT
answers ``min(kernel's, ours)``.  The structures below are those of 7.38
and the kernel accepts shorter ones only for older minors, so an older
kernel than :data:`OLDEST_MINOR` is refused."""
OLDEST_MINOR = 31

ROOT_ID = 1

# enum fuse_opcode
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
"""Requests the kernel expects no answer to."""

# enum fuse_notify_code: the ``error`` field of an unsolicited message
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# fuse_init_in/out flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
"""Creation modes come unmasked, the umask beside them (fs/acl.py applies it)."""
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
"""The kernel enforces POSIX ACLs, read through GETXATTR (fs/acl.py)."""
MAX_PAGES = 1 << 22
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
"""fuse_init_in/out carry ``flags2``, the flags' upper 32 bits."""
OVER_IO_URING_2 = 1 << (41 - 32)
"""FUSE_OVER_IO_URING (1 << 41), as a bit of ``flags2``: requests through
io_uring (Linux 6.14+, the fuse module's ``enable_uring``)."""
SETXATTR_EXT = 1 << 29
"""SETXATTR carries :data:`SETXATTR_EXT_IN` (its ACL_KILL_SGID flag)."""

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
"""HANDLE_KILLPRIV_V2: a truncate by a caller without CAP_FSETID, or a chown."""

# fuse_write_in.write_flags, fuse_open_in.open_flags (HANDLE_KILLPRIV_V2)
WRITE_KILL_SUIDGID = 1 << 2
OPEN_KILL_SUIDGID = 1 << 0

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_NOFLUSH = 1 << 5
"""7.35: close(2) sends no FLUSH for this file (ignored with the writeback cache)."""

FSYNC_FDATASYNC = 1 << 0
XATTR_CREATE = 1
XATTR_REPLACE = 2

PAGE = 4096
MAX_PAGES_PER_REQUEST = 256
MAX_WRITE = MAX_PAGES_PER_REQUEST * PAGE
BUFFER_SIZE = MAX_WRITE + 2 * PAGE
"""A read buffer the kernel accepts: a whole WRITE request (header, write
header, ``max_write`` bytes) must fit."""

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_IN_EXT = struct.Struct("=IIIII")  # ... flags2 (7.36+, with INIT_EXT)
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
"""major minor max_readahead flags max_background congestion_threshold
max_write time_gran max_pages map_alignment flags2, unused: 64 bytes."""
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")
"""fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec
ctimensec mode nlink uid gid rdev blksize flags (88 bytes).  The seconds
are declared u64 but are the kernel's signed time64 (a time before 1970
is negative), as in SETATTR_IN."""
ENTRY_OUT = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid nsecs, + ATTR
ATTR_OUT = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy, + ATTR
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
"""valid padding fh size lock_owner atime mtime ctime atimensec mtimensec
ctimensec mode unused4 uid gid unused5 (times signed: see ATTR)."""
FORGET_IN = struct.Struct("=Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
FORGET_ONE = struct.Struct("=QQ")  # nodeid nlookup
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")  # size padding
KSTATFS = struct.Struct("=QQQQQIIII24x")
"""blocks bfree bavail files ffree bsize namelen frsize padding spare[6]."""
FH_IN = struct.Struct("=Q")
"""The ``fh`` that begins release_in, flush_in, fsync_in, read_in, write_in."""
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
SETXATTR_IN = struct.Struct("=II")  # size flags
SETXATTR_EXT_IN = struct.Struct("=IIII")  # size flags setxattr_flags padding (SETXATTR_EXT)
SETXATTR_ACL_KILL_SGID = 1 << 0
"""The caller is outside the file's group: setting its access ACL drops set-group-ID."""
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
INTERRUPT_IN = struct.Struct("=Q")  # unique
DIRENT = struct.Struct("=QQII")  # ino off namelen type, + name, padded to 8
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags

ERRNO_MAX = 511
"""The kernel refuses an error reply outside -511..-1 (and the caller would
wait for ever): anything else is sent as EIO."""


def dirent_size(name_len: int) -> int:
    """Bytes of one fuse_direntplus with a name of ``name_len`` bytes."""
    return (ENTRY_OUT.size + ATTR.size + DIRENT.size + name_len + 7) & ~7
