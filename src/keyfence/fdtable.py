"""This process's descriptor table: its limit raised, and its room made once.

Linux grows a process's descriptor table by doubling it when a descriptor
beyond its size is handed out.  In a process with more than one thread the
old table may still be read by another thread, so the thread that grows it
waits for an RCU grace period first (``expand_fdtable``'s
``synchronize_rcu``): 7-22 ms on these VMs, at descriptors 64, 128, 256,
512, 1024 and on.  The mount worker keeps idle files and directories open,
so each doubling used to land inside some request: in ``tar -xf`` of the
standard library, four opens of 5-9 ms each (docs/performance.md, part 18).
:func:`reserve` grows the table once, at start, while the process has one
thread (nothing to wait for) or at least before it serves anything.  The
table never shrinks; 8,192 slots are 64 KiB of pointers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource

__all__ = ["above_standard", "occupy_standard", "raise_limit", "reserve", "table_size"]


def raise_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one where allowed (every
    connection, file and directory held is a descriptor); the soft limit
    now, ``1 << 20`` for none."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def reserve(count: int) -> int:
    """Make the table hold descriptors ``0 .. count - 1`` now (no more than
    the soft limit allows): one descriptor duplicated to the highest of them
    (``F_DUPFD``: the lowest free one from there, so no descriptor in use is
    ever replaced) and closed again.  Returns the table's size afterwards
    (0 if unknown)."""
    top = min(count, raise_limit()) - 1
    if top >= 64 and table_size() <= top:  # 64: the table every process starts with
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # EMFILE: the limit moved meanwhile
                os.close(fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, top))
        finally:
            os.close(null)
    return table_size()


def table_size() -> int:
    """How many descriptors this process's table holds now (``FDSize`` of
    /proc/self/status; 0 where there is no /proc)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"FDSize:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def occupy_standard() -> None:
    """Open /dev/null on each of descriptors 0, 1 and 2 that is closed.

    A process started with one closed hands that number to the next file
    or socket it opens, and what it prints or logs then goes there: into a
    client's connection, for a daemon started with ``2>&-``."""
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free: ``fd``
            if null != fd:
                os.dup2(null, fd, inheritable=True)
                os.close(null)


def above_standard(fd: int) -> int:
    """``fd`` itself, or, if it took a standard descriptor's number (0-2
    were closed), a close-on-exec duplicate above them, the original
    closed: a connection must never be what the program prints to."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)
