"""Who is on the other end of a socket: peer credentials and /proc.

Caller identity comes only from the kernel -- SO_PEERCRED for pid, uid and
gid at connect time, /proc for the POSIX session, the process start time
and supplementary groups -- never from what the client says.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass

from keyfence.keys.process_keys import Caller

_CRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    session: int
    start_time: int
    """Clock ticks since boot (field 22 of /proc/PID/stat)."""


def read_proc(pid: int) -> ProcInfo | None:
    """Session and start time of a live process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rfind(b")") + 2 :].split()
    return ProcInfo(pid=pid, session=int(rest[3]), start_time=int(rest[19]))


def read_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


class SessionRegistry:
    """Stable identities for POSIX sessions.

    A session id can be reused once the session is gone, so a session is
    named by (sid, start time of its leader) the first time it is seen and
    keeps that name while any process is in it, even after its leader
    exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[int, tuple[int, int]] = {}

    def identify(self, sid: int) -> tuple[int, int]:
        with self._lock:
            name = self._names.get(sid)
            if name is None:
                leader = read_proc(sid)
                start = leader.start_time if leader is not None and leader.session == sid else 0
                name = self._names[sid] = (sid, start)
            return name

    def forget(self, name: tuple[int, int]) -> None:
        with self._lock:
            if self._names.get(name[0]) == name:
                del self._names[name[0]]


def live_sessions() -> set[int]:
    """Session ids that have at least one process."""
    sids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                sids.add(info.session)
    return sids


def caller_of(
    sock: socket.socket, sessions: SessionRegistry, *, admin_uid: int | None = 0
) -> tuple[Caller, ProcInfo | None]:
    """The Caller for a freshly accepted connection.

    ``admin_uid``: the uid that has CAP_SYS_ADMIN over keys (0 in a system
    daemon; None in a private per-user daemon, where nobody has).
    """
    pid, uid, gid = peer_credentials(sock)
    info = read_proc(pid)
    session = sessions.identify(info.session) if info is not None else None
    caller = Caller(
        uid=uid,
        gid=gid,
        groups=read_groups(pid),
        pid=pid,
        start_time=info.start_time if info is not None else 0,
        session=session,
        admin=admin_uid is not None and uid == admin_uid,
    )
    return caller, info
