"""The daemon mounts FUSE for a worker, on the checked mount point's descriptor.

This is what fusermount3 does for sshfs or gocryptfs, done by the daemon
that has already checked the request as the caller (mount_request.py):

1. open ``/dev/fuse`` (root: a user need not be allowed to, and on this
   kind of machine the node is often 0600);
2. ``mount(2)`` it on ``/proc/self/fd/M`` -- M the O_PATH descriptor of
   the mount point opened as the caller -- so the kernel mounts on exactly
   that directory, whatever its name means by now (issue 11, finding 2);
   always ``MS_NOSUID | MS_NODEV``; ``user_id``/``group_id`` the caller's,
   so only the caller's processes may use it unless ``allow_other``
   (which a user gets only with ``user_allow_other`` in /etc/fuse.conf);
   ``default_permissions``: the kernel checks modes;
3. hand the /dev/fuse descriptor to the worker, which runs as the caller
   and serves ``/dev/fd/N`` (libfuse then mounts nothing itself).

As fusermount3, we refuse a mount point on a filesystem that is not a
plain data filesystem (procfs, sysfs ...: a user may "own" directories
there without being meant to put anything over them), and a user's mount
while the system has ``mount_max`` (/etc/fuse.conf, default 1000) FUSE
filesystems or more (fuse_conf.py): fusermount3's words, EPERM.

Unmounting uses the same descriptor: ``umount2(/proc/self/fd/M)`` unmounts
the mount on top of that directory (the kernel looks the last component up
as a mount point), never a name looked up again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading

from keyfence.errors import KeyfenceError
from keyfence.server.fuse_conf import FUSE_CONF, count_fuse_mounts, read_fuse_conf

__all__ = [
    "MNT_DETACH",
    "check_mount_max",
    "filesystem_type",
    "is_data_filesystem",
    "mount_fuse",
    "umount",
]

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

FUSE_TYPE = "fuse.keyfence"

# fusermount3's whitelist (util/fusermount.c), by statfs f_type
_DATA_FILESYSTEMS = frozenset(
    {
        0x61756673,  # aufs
        0x00000187,  # autofs
        0xCA451A4E,  # bcachefs
        0x9123683E,  # btrfs
        0x00C36400,  # ceph
        0xFF534D42,  # cifs
        0x0000F15F,  # ecryptfs
        0x2011BAB0,  # exfat
        0x0000EF53,  # ext2/3/4
        0xF2F52010,  # f2fs
        0x65735546,  # fuse
        0x01161970,  # gfs2
        0x47504653,  # gpfs
        0x0000482B,  # hfsplus
        0x000072B6,  # jffs2
        0x3153464A,  # jfs
        0x00006969,  # nfs
        0x7366746E,  # ntfs
        0x5346544E,  # ntfs3
        0x5346414F,  # openafs
        0x794C7630,  # overlayfs
        0x858458F6,  # ramfs
        0x52654973,  # reiserfs
        0xFE534D42,  # smb2
        0x73717368,  # squashfs
        0x01021994,  # tmpfs
        0x24051905,  # ubifs
        0x58465342,  # xfs
        0x2FC12FC1,  # zfs
    }
)

_libc: ctypes.CDLL | None = None
_counted_mounts = threading.Lock()
"""Held from counting the FUSE mounts to mounting one more (users' mounts):
two requests at once cannot both take the last place under mount_max."""


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


def _fd_path(fd: int) -> bytes:
    return f"/proc/self/fd/{fd}".encode()


def filesystem_type(fd: int) -> int:
    """statfs f_type of the filesystem holding descriptor ``fd``."""
    buf = ctypes.create_string_buffer(256)
    if _c().statfs(_fd_path(fd), buf) != 0:
        code = ctypes.get_errno()
        raise KeyfenceError(code, f"statfs: {os.strerror(code)}")
    return int(struct.unpack_from("l", buf.raw, 0)[0]) & 0xFFFFFFFF


def is_data_filesystem(fd: int) -> bool:
    """Whether ``fd`` is on a filesystem fusermount3 would mount over."""
    return filesystem_type(fd) in _DATA_FILESYSTEMS


def check_mount_max(uid: int, conf: str = FUSE_CONF) -> None:
    """fusermount3's limit for a user (not root): refused with its words
    while ``mount_max`` or more FUSE filesystems are mounted.  fusermount3
    only exits 1; EPERM is what mount(2) itself says to a user, and what
    this module answers for fusermount3's other refusals."""
    if uid == 0:
        return
    limit = read_fuse_conf(conf).mount_max
    if limit != -1 and count_fuse_mounts() >= limit:
        raise KeyfenceError(
            errno.EPERM,
            f"too many FUSE filesystems mounted; mount_max=N can be set in {FUSE_CONF}",
        )


def mount_fuse(
    mountpoint_fd: int, source: str, *, uid: int, gid: int, allow_other: bool, what: str
) -> int:
    """Mount FUSE on the directory ``mountpoint_fd``; the /dev/fuse descriptor."""
    if not is_data_filesystem(mountpoint_fd):
        raise KeyfenceError(
            errno.EPERM, f"mounting over the filesystem type of {what} is forbidden"
        )
    with _counted_mounts if uid != 0 else contextlib.nullcontext():
        check_mount_max(uid)
        return _mount(mountpoint_fd, source, uid=uid, gid=gid, allow_other=allow_other, what=what)


def _mount(
    mountpoint_fd: int, source: str, *, uid: int, gid: int, allow_other: bool, what: str
) -> int:
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fuse},rootmode=40000,user_id={uid},group_id={gid},default_permissions"
    if allow_other:
        options += ",allow_other"
    done = _c().mount(
        source.encode(errors="surrogateescape"),
        _fd_path(mountpoint_fd),
        FUSE_TYPE.encode(),
        ctypes.c_ulong(MS_NOSUID | MS_NODEV),
        options.encode(),
    )
    if done != 0:
        code = ctypes.get_errno()
        os.close(fuse)
        raise KeyfenceError(code, f"mount on {what}: {os.strerror(code)}")
    return fuse


def umount(mountpoint_fd: int, flags: int = 0) -> None:
    """Unmount whatever is mounted on the directory ``mountpoint_fd``."""
    if _c().umount2(_fd_path(mountpoint_fd), ctypes.c_int(flags)) != 0:
        code = ctypes.get_errno()
        raise KeyfenceError(code, f"umount: {os.strerror(code)}")
