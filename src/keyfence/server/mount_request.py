"""Checking a mount request: the directories are opened as the caller would.

The client sends absolute, resolved paths (``os.path.realpath``).  The
daemon, which runs as root, never trusts a name twice:

1. Each directory is opened one component at a time from ``/`` with
   ``O_PATH | O_NOFOLLOW | O_DIRECTORY``, on a thread that carries the
   caller's fsuid, fsgid and groups, so the kernel applies the caller's
   search permissions and a symlink anywhere on the way is refused (ELOOP):
   the client already resolved them, so one appearing now is a race.
2. Ownership is checked on the descriptors (fstat), not on names.
3. From then on only the descriptors are used: the worker gets them
   (``pass_fds``), mounts on ``/proc/self/fd/N`` when it is root (the
   kernel's mount(2) follows that magic link to exactly the directory we
   checked), and serves the backing store through its descriptor.  A user's
   worker mounts through fusermount3, which checks the mount point again as
   that user and mounts on the directory it ``chdir``-ed into.
4. Refused at once (no worker is started): a mount point equal to, inside
   or above the backing directory (the worker would serve its own mount and
   deadlock), a backing directory inside a keyfence mount, a mount point
   that has files unless ``nonempty``, and a missing directory (ENOENT).

Per-thread credentials: Linux keeps credentials per thread; glibc's
``setfsuid``/``setfsgid`` change only the calling thread, and the raw
``setgroups`` system call (not glibc's, which changes every thread) does
too.  The daemon's other threads keep root's credentials throughout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from keyfence.errors import KeyfenceError
from keyfence.keys.caller import Caller
from keyfence.server import fuse_mount

__all__ = ["CheckedRequest", "as_caller", "check_request", "keyfence_devices"]

_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159}
_OPEN_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_DEPTH = 4096

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


def _setgroups_thread(groups: list[int]) -> None:
    nr = _SYS_SETGROUPS.get(os.uname().machine)
    if nr is None:
        raise KeyfenceError(errno.ENOSYS, f"per-thread setgroups unknown on {os.uname().machine}")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _c().syscall(ctypes.c_long(nr), ctypes.c_size_t(len(groups)), array) != 0:
        code = ctypes.get_errno()
        raise KeyfenceError(code, f"setgroups: {os.strerror(code)}")


def _setfs(which: str, value: int) -> None:
    fn = getattr(_c(), which)
    fn(ctypes.c_uint(value))
    if fn(ctypes.c_uint(0xFFFFFFFF)) != value:  # -1 changes nothing, returns the current
        raise KeyfenceError(errno.EPERM, f"{which}({value}) did not take")


@contextlib.contextmanager
def as_caller(caller: Caller) -> Iterator[None]:
    """Run the block with the caller's file-system credentials on this
    thread only (nothing to do when the daemon is not root, or for root)."""
    if os.geteuid() != 0 or caller.uid == 0:
        yield
        return
    groups = sorted(caller.groups | {caller.gid})
    saved = os.getgroups()
    _setgroups_thread(groups)
    try:
        _setfs("setfsgid", caller.gid)
        try:
            _setfs("setfsuid", caller.uid)
            try:
                yield
            finally:
                _setfs("setfsuid", 0)
        finally:
            _setfs("setfsgid", os.getegid())
    finally:
        _setgroups_thread(saved)


def _error(err: OSError, path: str, what: str) -> KeyfenceError:
    code = err.errno or errno.EIO
    return KeyfenceError(code, f"{what} {path}: {os.strerror(code)}")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_directory(path: str, what: str) -> int:
    """An O_PATH descriptor of the directory ``path``, walked component by
    component without following any symlink (with the current thread's
    credentials)."""
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        raise KeyfenceError(
            errno.EINVAL, f"{what} {path!r}: not an absolute resolved path (the client resolves)"
        )
    fd = os.open("/", _OPEN_DIR)
    walked = ""
    try:
        for name in [p for p in path.split("/") if p]:
            walked += "/" + name
            try:
                nxt = os.open(name, _OPEN_DIR, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(name, fd):
                    raise KeyfenceError(
                        errno.ELOOP,
                        f"{what} {path}: {walked} became a symbolic link "
                        "(the request is resolved once, by the client)",
                    ) from None
                raise _error(err, path, what) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _ancestors(fd: int, path: str, what: str) -> Iterator[tuple[os.stat_result, int]]:
    """(stat, depth) of the directory ``path`` (open as ``fd``) and each
    parent up to ``/``; a parent the caller may not look up is an error
    naming ``path`` (a directory of mode 000: EACCES)."""
    root = _identity(os.stat("/"))
    current = os.dup(fd)
    try:
        for depth in range(_MAX_DEPTH):
            st = os.fstat(current)
            yield st, depth
            if _identity(st) == root:
                return
            try:
                parent = os.open("..", _OPEN_DIR, dir_fd=current)
            except OSError as err:
                raise _error(err, path, what) from None
            os.close(current)
            current = parent
    finally:
        os.close(current)


def keyfence_devices(mountinfo: str = "/proc/self/mountinfo") -> set[int]:
    """st_dev of every keyfence FUSE mount on the system."""
    devices: set[int] = set()
    with contextlib.suppress(OSError), open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if " - " not in line or len(fields) < 3:
                continue
            after = line.split(" - ", 1)[1].split()
            if after and after[0] in ("fuse.keyfence", "fuseblk.keyfence"):
                major, _, minor = fields[2].partition(":")
                devices.add(os.makedev(int(major), int(minor)))
    return devices


def keyfence_mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Where keyfence mounts are, by name (a first, cheap check: the
    descriptor checks below are the ones that count)."""
    points: list[str] = []
    with contextlib.suppress(OSError), open(mountinfo, errors="surrogateescape") as f:
        for line in f:
            head, sep, tail = line.partition(" - ")
            fields = head.split()
            if sep and len(fields) > 4 and tail.split()[:1] == ["fuse.keyfence"]:
                points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return points


def _inside_a_mount(backing: str) -> KeyfenceError:
    return KeyfenceError(
        errno.EINVAL,
        f"the backing directory {backing} is inside a keyfence mount "
        "(ciphertext of ciphertext, and a worker waiting on another)",
    )


@dataclass
class CheckedRequest:
    """Descriptors of a checked mount request; close() when done with them."""

    backing: str
    mountpoint: str
    backing_fd: int
    mountpoint_fd: int
    mountpoint_id: tuple[int, int]

    def close(self) -> None:
        for fd in (self.backing_fd, self.mountpoint_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _is_empty(fd: int, path: str) -> bool:
    try:
        dirfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise _error(err, path, "mount point") from None
    try:
        with os.scandir(dirfd) as entries:
            return next(entries, None) is None
    finally:
        os.close(dirfd)


def check_request(
    caller: Caller, backing: str, mountpoint: str, *, nonempty: bool
) -> CheckedRequest:
    """Open and check both directories as ``caller``; raise KeyfenceError
    with the kernel's errno and the reason, or return the descriptors."""
    for point in keyfence_mount_points():
        if backing == point or backing.startswith(point.rstrip("/") + "/"):
            raise _inside_a_mount(backing)
    with as_caller(caller):
        backing_fd = open_directory(backing, "backing directory")
        try:
            mountpoint_fd = open_directory(mountpoint, "mount point")
        except BaseException:
            os.close(backing_fd)
            raise
        request = CheckedRequest(backing, mountpoint, backing_fd, mountpoint_fd, (0, 0))
        try:
            _check(caller, request, nonempty=nonempty)
        except BaseException:
            request.close()
            raise
    return request


def _writable(fd: int) -> bool:
    """faccessat(W_OK, AT_EACCESS) of the directory ``fd``, with this
    thread's file-system ids (the daemon's capabilities are dropped with
    its fsuid)."""
    return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)


def _check(caller: Caller, request: CheckedRequest, *, nonempty: bool) -> None:
    backing_st = os.fstat(request.backing_fd)
    mount_st = os.fstat(request.mountpoint_fd)
    request.mountpoint_id = _identity(mount_st)
    for st, path, what in (
        (backing_st, request.backing, "backing directory"),
        (mount_st, request.mountpoint, "mount point"),
    ):
        if caller.uid != 0 and st.st_uid != caller.uid:
            raise KeyfenceError(errno.EPERM, f"you do not own the {what} {path}")
    if _identity(backing_st) == _identity(mount_st):
        raise KeyfenceError(
            errno.EINVAL,
            f"the mount point {request.mountpoint} is the backing directory "
            "(the mount would hide its own ciphertext)",
        )
    backing_id, mount_id = _identity(backing_st), _identity(mount_st)
    ours = keyfence_devices()
    for st, depth in _ancestors(request.mountpoint_fd, request.mountpoint, "mount point"):
        if depth and _identity(st) == backing_id:
            raise KeyfenceError(
                errno.EINVAL,
                f"the mount point {request.mountpoint} is inside the backing directory "
                f"{request.backing} (the mount would serve its own files)",
            )
    for st, depth in _ancestors(request.backing_fd, request.backing, "backing directory"):
        if depth and _identity(st) == mount_id:
            raise KeyfenceError(
                errno.EINVAL,
                f"the backing directory {request.backing} is inside the mount point "
                f"{request.mountpoint} (the mount would hide its own ciphertext)",
            )
        if st.st_dev in ours:
            raise _inside_a_mount(request.backing)
    if not fuse_mount.is_data_filesystem(request.mountpoint_fd):
        raise KeyfenceError(
            errno.EPERM,
            f"mounting over the filesystem type of {request.mountpoint} is forbidden "
            "(as fusermount3: only plain data filesystems, not procfs, sysfs ...)",
        )
    if caller.uid != 0 and not _writable(request.mountpoint_fd):
        # fusermount3's access(".", W_OK) as the user: a directory made
        # read-only (mode 0555, chattr +i, a read-only filesystem) by
        # root or by the user stays so; this thread has the caller's fsuid
        raise KeyfenceError(
            errno.EACCES, f"user has no write access to mountpoint {request.mountpoint}"
        )
    if not nonempty and not _is_empty(request.mountpoint_fd, request.mountpoint):
        raise KeyfenceError(
            errno.ENOTEMPTY,
            f"Invalid mountpoint: directory {request.mountpoint} not empty "
            "(mounting would hide its files; use -o nonempty to mount anyway)",
        )
