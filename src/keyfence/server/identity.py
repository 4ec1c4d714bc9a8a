"""Who is on the other end of a socket, pinned to the process.

Caller identity comes only from the kernel, never from what the client
says: SO_PEERCRED gives the pid, uid and gid the peer had when it
connected; SO_PEERPIDFD a pidfd for that very process.  /proc then gives
the start time, the parent and the groups -- but /proc is read by pid, and
a pid is reused as soon as its process is reaped.  So every /proc read is
checked against the pidfd afterwards: if the process the pidfd names is
still alive once /proc was read, that pid was not reused in between, and
what /proc said was about the caller.  A caller that is already gone is
refused (ESRCH); one whose /proc credentials no longer match SO_PEERCRED
is refused (EPERM).  The Caller is then named by (pid, start time), which
no later owner of the pid can share (docs/security.md, "Daemon: caller
identity and session keyrings across users").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import signal
import socket
import struct
from dataclasses import dataclass

from keyfence.keys import KeyService
from keyfence.keys.caller import Caller, ParentProcess
from keyfence.keys.errors import KeyfenceError, fail
from keyfence.server.sessions import SessionTracker, read_stat

_CRED = struct.Struct("3i")
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
"""Linux >= 6.5."""


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    session: int
    """The POSIX session id (shown in the Welcome; not the keyring's)."""
    start_time: int
    """Clock ticks since boot (field 22 of /proc/PID/stat)."""


@dataclass(frozen=True, slots=True)
class ProcCreds:
    """Credentials of a process from /proc/PID/status."""

    tgid: int
    uids: tuple[int, int, int]
    """Real, effective, saved."""
    gids: tuple[int, int, int]
    groups: frozenset[int]


def read_proc(pid: int) -> ProcInfo | None:
    """Session and start time of a live process; None if it is gone."""
    stat = read_stat(pid)
    if stat is None:
        return None
    return ProcInfo(pid=pid, session=stat.session, start_time=stat.start_time)


def read_creds(pid: int) -> ProcCreds | None:
    """Tgid, uids, gids and groups from ``/proc/PID/status``; None if gone.

    Only the four lines needed are looked at (every connection reads two of
    these files: parsing the whole text cost the handshake ~60 us each)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
        tgid = int(_status_field(text, b"Tgid"))
        uids = [int(u) for u in _status_field(text, b"Uid").split()[:3]]
        gids = [int(g) for g in _status_field(text, b"Gid").split()[:3]]
        groups = frozenset(int(g) for g in _status_field(text, b"Groups").split())
    except (OSError, KeyError, ValueError):
        return None
    return ProcCreds(tgid, (uids[0], uids[1], uids[2]), (gids[0], gids[1], gids[2]), groups)


def read_image(pid: int) -> bytes | None:
    """A digest of the program the process runs now: of its auxiliary
    vector (``/proc/PID/auxv``), which every exec makes anew (the stack,
    vDSO and program addresses in it are randomized for each).  None if it
    cannot be read (a process that is not dumpable, to a daemon that is
    not root).  The digest, not the vector: no addresses kept or logged."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return hashlib.blake2b(data, digest_size=16).digest() if data else None


def _status_field(text: bytes, name: bytes) -> bytes:
    """The value of line ``name:`` of a /proc status text (KeyError: none).
    Names come at line starts, and the first line is ``Name:`` with the
    command name, which may hold anything but a newline: never matched."""
    start = text.find(b"\n" + name + b":")
    if start < 0:
        raise KeyError(name)
    start += len(name) + 2
    end = text.find(b"\n", start)
    return text[start:] if end < 0 else text[start:end]


def read_groups(pid: int) -> frozenset[int]:
    creds = read_creds(pid)
    return creds.groups if creds is not None else frozenset()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd for the process that connected.

    SO_PEERPIDFD names the connecting process itself.  Without it (Linux <
    6.5) pidfd_open(pid) is the fallback, which a pid reused between
    connect() and this call would fool; docs/security.md says so.
    """
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as err:
        # 6.5 to 6.8 refuse (EINVAL/ESRCH) a peer already reaped; only a
        # kernel without the option (ENOPROTOOPT) gets the fallback
        if err.errno != errno.ENOPROTOOPT:
            raise fail(errno.ESRCH, "the connecting process is gone") from None
    try:
        return os.pidfd_open(pid)
    except OSError:
        raise fail(errno.ESRCH, "the connecting process is gone") from None


def alive(pidfd: int) -> bool:
    """Whether the process a pidfd names has not exited."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another uid's process: it exists
    return True


def _parent(pid: int, ppid: int) -> ParentProcess | None:
    """The parent as session_to_parent sees it (no pinning needed: the
    binding it names is (pid, start time), and a wrong guess only names a
    process that has no binding or fails the uid checks)."""
    stat = read_stat(ppid)
    creds = read_creds(ppid)
    if stat is None or creds is None:
        return None
    return ParentProcess(
        pid=ppid, session=stat.process, uids=creds.uids, gids=creds.gids, threads=stat.threads
    )


def _pinned_caller(
    pidfd: int,
    pid: int,
    uid: int | None,
    gid: int | None,
    sessions: SessionTracker,
    service: KeyService,
    admin_uid: int | None,
) -> tuple[Caller, ProcInfo]:
    """Read /proc for ``pid``, then check the pidfd: the reads were of the
    process the pidfd names only if it is still alive afterwards."""
    stat = read_stat(pid)
    creds = read_creds(pid)
    image = read_image(pid)
    if stat is None or creds is None or not alive(pidfd):
        raise fail(errno.ESRCH, "the connecting process is gone")
    if uid is not None and (creds.uids[1] != uid or creds.gids[1] != gid):
        raise fail(errno.EPERM, "the connecting process changed credentials")
    uid = creds.uids[1] if uid is None else uid
    gid = creds.gids[1] if gid is None else gid
    sessions.start(service)
    sessions.resolve(service, stat)
    caller = Caller(
        uid=uid,
        gid=gid,
        groups=creds.groups,
        pid=pid,
        start_time=stat.start_time,
        session=stat.process,
        admin=admin_uid is not None and uid == admin_uid,
        real_uid=creds.uids[0] if creds.uids[0] != uid else None,
        parent=_parent(pid, stat.ppid),
        image=image,
    )
    # an exec since its @p or @t were made took them (the daemon's
    # lifetime check then ends them, fenced)
    service.exec_seen(caller)
    return caller, ProcInfo(pid=pid, session=stat.session, start_time=stat.start_time)


def caller_of(
    sock: socket.socket,
    sessions: SessionTracker,
    service: KeyService,
    *,
    admin_uid: int | None = 0,
) -> tuple[Caller, ProcInfo]:
    """The Caller for a freshly accepted connection, pinned to its process.

    ``admin_uid``: the uid that has CAP_SYS_ADMIN over keys (0 in a system
    daemon; None in a private per-user daemon, where nobody has).
    Errors: ESRCH (the peer is gone), EPERM (its credentials changed).
    """
    pid, uid, gid = peer_credentials(sock)
    pidfd = peer_pidfd(sock, pid)
    try:
        return _pinned_caller(pidfd, pid, uid, gid, sessions, service, admin_uid)
    finally:
        os.close(pidfd)


def caller_of_pid(
    pid: int,
    sessions: SessionTracker,
    service: KeyService,
    *,
    admin_uid: int | None = 0,
) -> Caller | None:
    """The Caller for a process known only by pid (a FUSE request's): its
    effective uid and gid from /proc, pinned by pidfd while /proc is read,
    its session keyring resolved as for a connection.  A thread id is its
    process's caller with that thread's own ``@t``.  None if the process
    is gone."""
    creds = read_creds(pid)
    if creds is None:
        return None
    try:
        pidfd = os.pidfd_open(creds.tgid)
    except OSError:
        return None
    try:
        caller, _ = _pinned_caller(pidfd, creds.tgid, None, None, sessions, service, admin_uid)
    except KeyfenceError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(pidfd)
    if pid != creds.tgid:  # the requesting thread's own @t, as the kernel's lookup
        caller = dataclasses.replace(caller, tid=pid)
    return caller
