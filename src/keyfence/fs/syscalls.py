"""Every raw call the mount worker makes on the backing store, in one place.

The model is gocryptfs' ``syscallcompat``: the FUSE operations never hand
a path to the kernel.  They name an entry as (directory descriptor, one
name) and call the ``*at`` functions here, which never follow a symlink
and never leave the directory:

* opens go through ``openat2(2)`` with ``RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (Linux 5.6+), else
  ``openat(2)`` with ``O_NOFOLLOW`` on a name checked to be one component;
* every other call takes ``AT_SYMLINK_NOFOLLOW`` (or cannot follow:
  ``unlinkat``, ``mkdirat``, ``renameat2``, ``linkat`` without
  ``AT_SYMLINK_FOLLOW``, ``readlinkat``), or a descriptor (``ftruncate``,
  ``fsync``, ``syncfs``, ``futimens``, ``f*xattr``).

A name is one component: not empty, no ``/``, never ``..`` (``.`` names
the directory itself).  A user who can write inside the backing tree can
swap an entry for a symlink at any moment; with these rules the worker
then acts on the symlink itself (``lchown``, ``lutimes``) or fails with
``ELOOP``, never on what it points to.

Extended attributes: ``fgetxattr`` and friends refuse ``O_PATH``
descriptors (EBADF, still on 6.x) and there is no ``*xattrat`` before
Linux 6.13.  Regular files and directories are opened (``O_NOFOLLOW |
O_NONBLOCK``) and the ``f*xattr`` calls used on that descriptor.  A
symlink, a device or a fifo must not be opened for I/O, so those (and a
file the worker may not read) are reached through an ``O_PATH |
O_NOFOLLOW`` descriptor and ``/proc/self/fd/N``: that magic link jumps to
exactly the inode the descriptor holds (no name is looked up again; for
a symlink descriptor, the symlink itself), which is the one place the
worker follows a magic link on purpose.

One ``ctypes.CDLL`` for the whole of ``fs/`` lives here (``keys/secret``
keeps its own: it is not the filesystem's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable
from types import ModuleType

from keyfence.fs.sealer import load_native

__all__ = [
    "HAVE_OPENAT2",
    "chmod_at",
    "chown_at",
    "chown_fd",
    "exists_at",
    "fallocate",
    "fgetxattr",
    "fsync_dir",
    "getxattr_at",
    "getxattr_opath",
    "link_at",
    "listdir_fd",
    "listxattr_at",
    "mkdir_at",
    "mknod_at",
    "open_at",
    "open_dir",
    "open_regular",
    "read_small",
    "readlink_at",
    "removexattr_at",
    "rename_at",
    "rmdir_at",
    "set_mtime_ns",
    "setxattr_at",
    "start_writeback",
    "stat_at",
    "symlink_at",
    "syncfs",
    "syncfs_dir",
    "syncfs_path",
    "trim_heap",
    "unlink_at",
    "utime_at",
    "utime_fd",
    "wait_writeback",
    "write_new",
]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
"""The C library, loaded once for fs/ (mallopt, syncfs, renameat2, ...)."""

_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)
_SYS_FCHMODAT2 = 452  # Linux 6.6
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_NO_XDEV = 0x01
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
_ALWAYS = os.O_CLOEXEC | os.O_NOFOLLOW


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int
_fchmodat = libc.fchmodat
_fchmodat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_int)
_fchmodat.restype = ctypes.c_int
_fchownat = libc.fchownat
_fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
_fchownat.restype = ctypes.c_int
_syncfs = libc.syncfs
_syncfs.argtypes = (ctypes.c_int,)
_syncfs.restype = ctypes.c_int
_futimens = libc.futimens
_futimens.argtypes = (ctypes.c_int, ctypes.POINTER(_Timespec))
_futimens.restype = ctypes.c_int
_sync_file_range = libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_fallocate = libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01

_fgetxattr = libc.fgetxattr
_fgetxattr.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_fgetxattr.restype = ctypes.c_ssize_t
_getxattr = libc.getxattr
_getxattr.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_getxattr.restype = ctypes.c_ssize_t
_flistxattr = libc.flistxattr
_flistxattr.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_flistxattr.restype = ctypes.c_ssize_t
_listxattr = libc.listxattr
_listxattr.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_listxattr.restype = ctypes.c_ssize_t
_fsetxattr = libc.fsetxattr
_fsetxattr.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_int,
)
_fsetxattr.restype = ctypes.c_int
_setxattr = libc.setxattr
_setxattr.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_int,
)
_setxattr.restype = ctypes.c_int
_fremovexattr = libc.fremovexattr
_fremovexattr.argtypes = (ctypes.c_int, ctypes.c_char_p)
_fremovexattr.restype = ctypes.c_int
_removexattr = libc.removexattr
_removexattr.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
_removexattr.restype = ctypes.c_int


def _fail() -> OSError:
    code = ctypes.get_errno() or errno.EIO
    return OSError(code, os.strerror(code))


def _name(name: str) -> bytes:
    """One path component, as bytes (EINVAL for anything else)."""
    if not name or "/" in name or name == ".." or "\0" in name:
        raise OSError(errno.EINVAL, "not a single name")
    return os.fsencode(name)


def _probe_openat2() -> bool:
    how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE)
    fd = int(_syscall(_SYS_OPENAT2, -100, b"/", ctypes.byref(how), ctypes.sizeof(how)))
    if fd >= 0:
        os.close(fd)
        return True
    # "/" is absolute: RESOLVE_BENEATH refuses it with EXDEV, which proves
    # the call exists; ENOSYS (or a seccomp EPERM) means it does not
    return ctypes.get_errno() == errno.EXDEV


HAVE_OPENAT2 = _probe_openat2()


_STATX: ModuleType | None = load_native("_statx")
"""fs/_statx.c (stat_at in one syscall), or None: the careful path only."""


# ----------------------------------------------------------------- opening


def open_at(dir_fd: int, name: str, flags: int, mode: int = 0) -> int:
    """Open ``name`` inside ``dir_fd``, never through a symlink, never
    into another filesystem.

    A symlink at ``name`` gives ELOOP, except with ``O_PATH`` (then the
    descriptor holds the symlink itself).  A mount point gives EXDEV
    (``RESOLVE_NO_XDEV``; without openat2, the opened descriptor's device is
    compared with ``dir_fd``'s): the worker's inode table and its ``syncfs``
    hold for one filesystem (docs/security.md).  ``O_CLOEXEC | O_NOFOLLOW``
    are always added.
    """
    raw = _name(name)
    flags |= _ALWAYS
    if HAVE_OPENAT2:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
        fd = int(_syscall(_SYS_OPENAT2, dir_fd, raw, ctypes.byref(how), ctypes.sizeof(how)))
        if fd < 0:
            raise _fail()
        return fd
    fd = os.open(raw, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    if os.fstat(fd).st_dev != os.fstat(dir_fd).st_dev:
        os.close(fd)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    return fd


def open_dir(dir_fd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """A directory inside ``dir_fd`` (``"."``: ``dir_fd`` itself, e.g. to
    turn an ``O_PATH`` descriptor into one that can be listed or fsynced)."""
    return open_at(dir_fd, name, flags | os.O_DIRECTORY)


def open_regular(dir_fd: int, name: str, flags: int, mode: int = 0) -> tuple[int, os.stat_result]:
    """A regular file inside ``dir_fd`` and its stat.

    Opened non-blocking (a fifo swapped in must not hang the worker) and
    without ``O_TRUNC`` (nothing is cut before the check); anything but a
    regular file is closed again with EIO.  The caller truncates.
    ``O_NONBLOCK`` stays set: Linux reads and writes a regular file the
    same with or without it (only ``RWF_NOWAIT`` asks otherwise), and
    clearing it cost an ``ioctl`` per open.
    """
    fd = open_at(dir_fd, name, (flags & ~os.O_TRUNC) | os.O_NONBLOCK | os.O_NOCTTY, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EIO, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def create_regular(dir_fd: int, name: str, flags: int, mode: int) -> tuple[int, os.stat_result]:
    """A new regular file ``name`` inside ``dir_fd`` and its stat
    (``O_CREAT | O_EXCL``: FileExistsError if there is an entry of that
    name).  Blocking, unlike :func:`open_regular`: a file made just now is
    a regular file, no fifo can have been swapped in."""
    flags = (flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
    fd = open_at(dir_fd, name, flags, mode)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def read_small(
    dir_fd: int,
    name: str,
    limit: int,
    inspect: Callable[[int, os.stat_result], None] | None = None,
) -> bytes | None:
    """Up to ``limit`` bytes of a small regular file (a policy record, a
    long-name sidecar), None if there is no such entry.  ``inspect`` is
    given the open descriptor and its stat before the read (it may refuse
    by raising)."""
    try:
        fd, st = open_regular(dir_fd, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if inspect is not None:
            inspect(fd, st)
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_new(
    dir_fd: int, name: str, data: bytes, *, replace: bool, sync: bool, mode: int = 0o644
) -> None:
    """Write a small file inside ``dir_fd`` (a policy record, a sidecar, a
    protectors record with ``mode`` 0600): ``O_EXCL`` unless ``replace``;
    fdatasync'd if ``sync``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd, _st = open_regular(dir_fd, name, flags, mode)
    try:
        if replace:
            os.ftruncate(fd, 0)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------- the entries


def stat_at(dir_fd: int, name: str) -> os.stat_result:
    """The lstat of ``name`` inside ``dir_fd``; EXDEV for a mount point.

    Never ``fstatat``: a stat of a mount point is answered by the
    filesystem mounted there, and a user's FUSE server in the backing tree
    would be asked (and could refuse, or never answer: the worker's
    request thread would hang).  One ``statx`` with ``AT_STATX_DONT_SYNC``
    that refuses a mount root (fs/_statx.c, ~0.8 µs) where the C extension
    is built and the kernel reports mount roots (5.8+); where it cannot
    say for certain, :func:`_stat_at_careful`.  ``"."``: ``dir_fd`` itself,
    by ``fstat`` (see :func:`_proc`).
    """
    if name == ".":
        return os.fstat(dir_fd)
    if _STATX is not None:
        st: os.stat_result | None = _STATX.stat_at(dir_fd, _name(name))
        if st is not None:
            return st
    return _stat_at_careful(dir_fd, name)


def _stat_at_careful(dir_fd: int, name: str) -> os.stat_result:
    """stat_at without the extension: the entry is opened ``O_PATH`` by
    :func:`open_at` (``RESOLVE_NO_XDEV`` stops at the mount point without
    asking it; a symlink gives a descriptor of the symlink itself) and
    ``fstat``'ed: three syscalls, ~1.2 µs more than ``fstatat``.  Without
    openat2 (Linux before 5.6), ``fstatat`` and a device check."""
    if not HAVE_OPENAT2:
        st = os.stat(_name(name), dir_fd=dir_fd, follow_symlinks=False)
        if st.st_dev != os.fstat(dir_fd).st_dev:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return st
    fd = open_at(dir_fd, name, os.O_PATH)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def exists_at(dir_fd: int, name: str) -> bool:
    try:
        stat_at(dir_fd, name)
    except FileNotFoundError:
        return False
    return True


def chmod_at(dir_fd: int, name: str, mode: int) -> None:
    """fchmodat2(AT_SYMLINK_NOFOLLOW) (Linux 6.6), else glibc's fchmodat,
    which does the same through an ``O_PATH`` descriptor.  ``"."``: the
    directory ``dir_fd`` itself (see :func:`_proc`)."""
    if name == ".":
        os.chmod(_proc(dir_fd), mode)
        return
    raw = _name(name)
    if int(_syscall(_SYS_FCHMODAT2, dir_fd, raw, mode, AT_SYMLINK_NOFOLLOW)) == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        raise _fail()
    if _fchmodat(dir_fd, raw, mode, AT_SYMLINK_NOFOLLOW) != 0:
        raise _fail()


def chown_at(dir_fd: int, name: str, uid: int, gid: int) -> None:
    """fchownat(AT_SYMLINK_NOFOLLOW); ``"."``: ``dir_fd`` itself."""
    if name == ".":
        chown_fd(dir_fd, uid, gid)
        return
    os.chown(_name(name), uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): the inode an ``O_PATH`` descriptor
    holds (a symlink itself, a device node without opening it)."""
    if _fchownat(fd, b"", uid, gid, AT_EMPTY_PATH) != 0:
        raise _fail()


def utime_at(dir_fd: int, name: str, atime_ns: int, mtime_ns: int) -> None:
    """utimensat(AT_SYMLINK_NOFOLLOW); ``"."``: ``dir_fd`` itself."""
    if name == ".":
        os.utime(_proc(dir_fd), ns=(atime_ns, mtime_ns))
        return
    os.utime(_name(name), ns=(atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def readlink_at(dir_fd: int, name: str) -> str:
    return os.readlink(_name(name), dir_fd=dir_fd).decode("utf-8", "surrogateescape")


def symlink_at(target: str, dir_fd: int, name: str) -> None:
    os.symlink(target, _name(name), dir_fd=dir_fd)


def mknod_at(dir_fd: int, name: str, mode: int, rdev: int) -> None:
    os.mknod(_name(name), mode, rdev, dir_fd=dir_fd)


def mkdir_at(dir_fd: int, name: str, mode: int) -> None:
    os.mkdir(_name(name), mode, dir_fd=dir_fd)


def link_at(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """linkat without AT_SYMLINK_FOLLOW: a symlink is linked, not its target."""
    a, b = _name(src), _name(dst)
    os.link(a, b, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)


def unlink_at(dir_fd: int, name: str) -> None:
    os.unlink(_name(name), dir_fd=dir_fd)


def rmdir_at(dir_fd: int, name: str) -> None:
    os.rmdir(_name(name), dir_fd=dir_fd)


def rename_at(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int = 0) -> None:
    """renameat2(2) (flags: RENAME_NOREPLACE, RENAME_EXCHANGE)."""
    a, b = _name(old), _name(new)
    if not flags:
        os.rename(a, b, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
    elif _renameat2(old_dir_fd, a, new_dir_fd, b, flags) != 0:
        raise _fail()


_listdir_of_descriptor = os.listdir
"""``os.listdir`` on an ``int`` only (fdopendir on a dup): never a path."""


def listdir_fd(dir_fd: int) -> list[str]:
    """The names in a directory held by ``dir_fd`` (an ``O_PATH`` one too)."""
    fd = open_dir(dir_fd, ".")
    try:
        return _listdir_of_descriptor(fd)
    finally:
        os.close(fd)


def fsync_dir(dir_fd: int) -> None:
    fd = open_dir(dir_fd, ".")
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ xattrs


def _xattr_target(dir_fd: int, name: str, kind: int | None) -> tuple[int, bool]:
    """A descriptor for the xattr calls on ``name``: (fd, is it O_PATH).

    ``kind``: what the caller believes ``name`` is (``S_IFREG``...); for a
    regular file or a directory one open does (checked by ``fstat``).
    ``"."``: a duplicate of ``dir_fd`` itself (see :func:`_proc`)."""
    if name == ".":
        return os.dup(dir_fd), True
    if kind in (stat.S_IFREG, stat.S_IFDIR):
        try:
            fd = open_at(dir_fd, name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM):
                raise
        else:
            if stat.S_IFMT(os.fstat(fd).st_mode) == kind:
                return fd, False
            os.close(fd)  # swapped for something else: see below
    fd = open_at(dir_fd, name, os.O_PATH)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            return fd, True
        try:
            io_fd = open_at(dir_fd, name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except PermissionError:
            return fd, True  # an unprivileged worker may not read it
        if os.path.sameopenfile(fd, io_fd):
            os.close(fd)
            return io_fd, False
        os.close(io_fd)  # swapped between the two opens: use the first
        return fd, True
    except BaseException:
        os.close(fd)
        raise


def _proc(fd: int) -> bytes:
    """The path of what ``fd`` holds.  The calls on ``(dir_fd, ".")`` go
    through it: ``"."`` looked up inside a directory
    needs search permission on it, which a user's worker lacks on its own
    ``chmod 000`` directory, while the /proc link reaches the directory
    without a lookup in it, as ext4 lets its owner chmod, touch or read the
    attributes of such a directory."""
    return b"/proc/self/fd/%d" % fd


def fgetxattr(fd: int, attr: bytes) -> bytes:
    """An xattr of an open (not O_PATH) descriptor."""
    return _get(fd, False, attr)


def getxattr_opath(fd: int, attr: bytes) -> bytes:
    """An xattr of the entry an ``O_PATH`` descriptor holds (through /proc:
    f*xattr refuse O_PATH descriptors); os.getxattr sizes its own buffer,
    half the cost of :func:`_get`'s for a missing name."""
    return os.getxattr(_proc(fd), attr)


def getxattr_at(dir_fd: int, name: str, attr: bytes, kind: int | None = None) -> bytes:
    fd, opath = _xattr_target(dir_fd, name, kind)
    try:
        return _get(fd, opath, attr)
    finally:
        os.close(fd)


def _get(fd: int, opath: bool, attr: bytes) -> bytes:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        if opath:
            n = int(_getxattr(_proc(fd), attr, buf, size))
        else:
            n = int(_fgetxattr(fd, attr, buf, size))
        if n >= 0:
            return buf.raw[:n]
        if ctypes.get_errno() != errno.ERANGE or size >= 1 << 20:
            raise _fail()
        size *= 16


def listxattr_at(dir_fd: int, name: str, kind: int | None = None) -> list[bytes]:
    fd, opath = _xattr_target(dir_fd, name, kind)
    try:
        size = 1024
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(_listxattr(_proc(fd), buf, size) if opath else _flistxattr(fd, buf, size))
            if n >= 0:
                return [a for a in buf.raw[:n].split(b"\0") if a]
            if ctypes.get_errno() != errno.ERANGE or size >= 1 << 20:
                raise _fail()
            size *= 16
    finally:
        os.close(fd)


def setxattr_at(dir_fd: int, name: str, attr: bytes, value: bytes, kind: int | None = None) -> None:
    fd, opath = _xattr_target(dir_fd, name, kind)
    try:
        if opath:
            ret = _setxattr(_proc(fd), attr, value, len(value), 0)
        else:
            ret = _fsetxattr(fd, attr, value, len(value), 0)
        if ret != 0:
            raise _fail()
    finally:
        os.close(fd)


def removexattr_at(dir_fd: int, name: str, attr: bytes, kind: int | None = None) -> None:
    fd, opath = _xattr_target(dir_fd, name, kind)
    try:
        ret = _removexattr(_proc(fd), attr) if opath else _fremovexattr(fd, attr)
        if ret != 0:
            raise _fail()
    finally:
        os.close(fd)


# ------------------------------------------------------------ descriptors


def syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem of ``fd`` (without holding the GIL)."""
    if _syncfs(fd) != 0:
        raise _fail()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (``os`` has only ``posix_fallocate``, whose fallback
    writes zeros where the filesystem cannot allocate)."""
    if _fallocate(fd, mode, offset, length) != 0:
        raise _fail()


def syncfs_path(path: str) -> None:
    """syncfs(2) on the filesystem of a directory named by an absolute path
    the worker was given (its own mount point)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def set_mtime_ns(fd: int, mtime_ns: int) -> None:
    """futimens(2) with the atime left alone (``UTIME_OMIT``): one syscall,
    where ``os.utime`` needs an ``fstat`` first for the atime."""
    times = (_Timespec * 2)(
        _Timespec(0, (1 << 30) - 2),  # UTIME_OMIT
        _Timespec(mtime_ns // 1_000_000_000, mtime_ns % 1_000_000_000),
    )
    if _futimens(fd, times) != 0:
        raise _fail()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start the disk writing a
    range without waiting (best effort: errors surface at fsync)."""
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def wait_writeback(fd: int) -> None:
    """sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER) of the whole file:
    have its dirty pages written and wait for them; the write-back error
    the file's open file description has not been told yet, if any
    (``errseq_t``, as fsync reports it), without a journal commit or a
    flush of the disk's cache."""
    flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
    if _sync_file_range(fd, 0, 0, flags) != 0:
        raise _fail()


def reopen_read_only(fd: int) -> int:
    """A new open file description of ``fd``'s regular file, read-only
    (fs/writebehind.py: its own write-back error report).  Through
    ``/proc/self/fd/N``, which names exactly the inode ``fd`` holds; the
    result is checked to be that inode."""
    new = os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(new).st_mode) or not os.path.sameopenfile(fd, new):
            raise OSError(errno.ESTALE, "not the same regular file")
    except BaseException:
        os.close(new)
        raise
    return new


def trim_heap(pad: int = 16 << 20) -> bool:
    """malloc_trim(3): give the C heap's free memory back to the kernel,
    keeping ``pad`` bytes at its top; whether any was.  ctypes lets the GIL
    go for the call (glibc still holds its arena lock meanwhile)."""
    return bool(libc.malloc_trim(ctypes.c_size_t(pad)))


def syncfs_dir(dir_fd: int) -> None:
    """syncfs(2) of the filesystem holding a directory descriptor (an
    ``O_PATH`` one too: syncfs needs a real open)."""
    fd = open_dir(dir_fd, ".")
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def utime_fd(fd: int, atime_ns: int, mtime_ns: int) -> None:
    """futimens(2) with both times."""
    times = (_Timespec * 2)(
        _Timespec(atime_ns // 1_000_000_000, atime_ns % 1_000_000_000),
        _Timespec(mtime_ns // 1_000_000_000, mtime_ns % 1_000_000_000),
    )
    if _futimens(fd, times) != 0:
        raise _fail()


def wipe_request_buffer(buf: bytes) -> None:
    """Zero the plaintext of a FUSE write request once it is in the page
    cache: pyfuse3 makes that ``bytes`` object for the one call and frees it
    afterwards, and freed heap memory keeps its contents.  Only a ``bytes``
    of two bytes or more (CPython shares the empty and one-byte objects);
    nothing may use ``buf`` afterwards."""
    if type(buf) is bytes and len(buf) > 1:
        ctypes.memset(ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p), 0, len(buf))
