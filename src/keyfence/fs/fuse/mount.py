"""Mounting ``/dev/fuse`` by name, for a worker that was not handed a
mounted descriptor (a per-user daemon, the tests' launcher).

Root mounts with mount(2) itself (the options libfuse would pass); any
other user through ``fusermount3``, which mounts and hands the descriptor
back over a socketpair (``_FUSE_COMMFD``).  A root daemon's worker gets
its descriptor already mounted (server/fuse_mount.py) and needs neither.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
from collections.abc import Iterable

__all__ = ["mount_by_name"]

MS_NOSUID = 2
MS_NODEV = 4
_KERNEL_OPTIONS = ("default_permissions", "allow_other")


def _unescape(value: str) -> str:
    """An option value as worker.fuse_options escaped it, for mount(2)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out)


def mount_by_name(mountpoint: str, options: Iterable[str]) -> int:
    """Mount FUSE on ``mountpoint``; the /dev/fuse descriptor (close-on-exec).

    ``options``: the worker's FUSE options (``fsname=``, ``subtype=``,
    ``default_permissions``, ``allow_other``, ``nosuid``, ``nodev``).
    """
    opts = set(options)
    if os.geteuid() != 0:
        return _fusermount(mountpoint, opts)
    fsname = next((o.split("=", 1)[1] for o in opts if o.startswith("fsname=")), "keyfence")
    fsname = _unescape(fsname)
    subtype = next((o.split("=", 1)[1] for o in opts if o.startswith("subtype=")), "")
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    data += "".join(f",{o}" for o in _KERNEL_OPTIONS if o in opts)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    kind = f"fuse.{subtype}" if subtype else "fuse"
    done = libc.mount(
        fsname.encode(errors="surrogateescape"),
        os.fsencode(mountpoint),
        kind.encode(),
        ctypes.c_ulong(MS_NOSUID | MS_NODEV),
        data.encode(),
    )
    if done != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, f"mount on {mountpoint}: {os.strerror(code)}")
    return fd


def _fusermount(mountpoint: str, opts: set[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        text = ",".join(sorted(opts))  # fsname= comes escaped (worker.fuse_options)
        done = subprocess.run(
            ["fusermount3", "-o", text, "--", mountpoint],
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise OSError(errno.EIO, f"fusermount3: {done.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, "fusermount3 sent no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]
