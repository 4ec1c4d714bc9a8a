"""Session keyrings follow process ancestry, as the kernel's credentials do.

The kernel hangs ``@s`` off each task's credentials: a child gets its
parent's session keyring at fork, setsid(2) does not change it, and only
joining another (``kfctl session``/``new_session``, the login hook) or a
child's session_to_parent replaces it.  The daemon has no credentials to
hang it on, so it keeps a *binding* per process, named (pid, start time),
in the model (KeyService.inherit_session / session_binding), and learns
the tree three ways:

1. **At fork**, from the kernel's process events connector (root only:
   CAP_NET_ADMIN).  A fork by a bound process binds the child at once --
   exactly the kernel's rule, even for a double-forked daemon (tmux) whose
   parent exits a moment later.  The parent at fork is remembered, so the
   walk in 2 follows it even after the child was reparented.
2. **On first contact**: a caller with no binding walks its parents (the
   one remembered at fork, else /proc's ppid) up to the nearest bound
   process, and every process on the way inherits its keyring.  A child
   that started before that ancestor got its keyring did not inherit it
   (start times are compared) and stops the walk.
3. **Each lifetime check** (no events connector: a per-user daemon): live
   children of bound processes inherit their parent's keyring, so a child
   that outlives its parent by at least one check keeps the keyring.

A binding ends when its process is gone (the daemon's lifetime check); the
keyring ends, through the fenced removal path, with the last binding or
link that holds it.  Where this cannot be exact is written down in
docs/keys.md, "Session keyrings".
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass

from keyfence.keys import KeyService

log = logging.getLogger("keyfence.sessions")

MAX_DEPTH = 4096
"""Parents walked at most (pid_max bounds a real chain; this bounds a
hostile one)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")

ProcessId = tuple[int, int]
"""(pid, start time in clock ticks since boot): a process, never its pid's
next owner."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/PID/stat says of a process (or thread)."""

    pid: int
    ppid: int
    session: int
    threads: int
    start_time: int
    """Clock ticks since boot (field 22)."""

    @property
    def process(self) -> ProcessId:
        return (self.pid, self.start_time)


def read_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat of a live process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            ppid=int(rest[1]),
            session=int(rest[3]),
            threads=int(rest[17]),
            start_time=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def started_by(start_time: int) -> float:
    """The latest boot_clock() time a process with this start time may have
    started at (start times have clock-tick resolution)."""
    return (start_time + 1) / CLK_TCK


class SessionTracker:
    """The daemon's view of the process tree, for session bindings.

    Thread-safe; takes the service lock (through KeyService methods) only
    with its own lock released.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forks: dict[int, tuple[int, ProcessId]] = {}
        """child pid -> (its start time, its parent at fork), from fork events."""
        self._service: KeyService | None = None
        self._events: socket.socket | None = None

    # -- learning the tree

    def start(self, service: KeyService) -> None:
        """Listen to fork events for ``service`` (idempotent; without
        CAP_NET_ADMIN this is a no-op and rules 2 and 3 do the work)."""
        with self._lock:
            if self._service is not None:
                return
            self._service = service
        sock = open_process_events()
        if sock is None:
            return
        self._events = sock
        threading.Thread(target=self._event_loop, name="keyfence-forks", daemon=True).start()

    @property
    def follows_forks(self) -> bool:
        return self._events is not None

    def stop(self) -> None:
        sock, self._events = self._events, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _event_loop(self) -> None:
        sock = self._events
        while sock is not None:
            try:
                data = sock.recv(65536)
            except OSError as err:
                if self._events is None:
                    return
                # ENOBUFS: events were lost; rules 2 and 3 cover the gap
                log.debug("process events: %s", err)
                continue
            for event in parse_process_events(data):
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("process event %r", event)

    def _on_event(self, event: tuple[int, int, int]) -> None:
        kind, child, parent = event
        if kind == _EXIT:
            with self._lock:
                self._forks.pop(child, None)
            return
        me = read_stat(child)
        up = read_stat(parent)
        if me is None or up is None or up.start_time > me.start_time:
            return
        with self._lock:
            self._forks[child] = (me.start_time, up.process)
        service = self._service
        if service is not None:
            service.inherit_session(me.process, up.process, started_by(me.start_time))

    def parent_of(self, process: ProcessId) -> ProcessId | None:
        """The process's parent at fork if a fork event told us, else its
        parent now (it may have been reparented: docs/keys.md)."""
        pid, start = process
        with self._lock:
            forked = self._forks.get(pid)
        if forked is not None and forked[0] == start:
            return forked[1]
        me = read_stat(pid)
        if me is None or me.start_time != start or me.ppid <= 0:
            return None
        up = read_stat(me.ppid)
        if up is None or up.start_time > start:
            return None  # the parent's pid already belongs to a younger process
        return up.process

    # -- resolving

    def resolve(self, service: KeyService, process: ProcessId) -> None:
        """Give ``process`` the session binding fork would have given it
        (rule 2); nothing if no ancestor has one."""
        if service.session_binding(process):
            return
        chain = [process]
        above: ProcessId | None = None
        current = process
        for _ in range(MAX_DEPTH):
            parent = self.parent_of(current)
            if parent is None or parent[0] <= 0:
                return
            if service.session_binding(parent):
                above = parent
                break
            chain.append(parent)
            current = parent
        if above is None:
            return
        for proc in reversed(chain):
            if not service.inherit_session(proc, above, started_by(proc[1])):
                return
            above = proc

    def propagate(self, service: KeyService) -> None:
        """Rule 3: live children of bound processes inherit their keyring.
        Needed only without fork events."""
        if self.follows_forks or not service.anchored_processes():
            return
        procs: list[ProcStat] = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = read_stat(int(entry.name))
                if stat is not None:
                    procs.append(stat)
        starts = {p.pid: p.start_time for p in procs}
        # parents before children: a chain of new processes binds in one pass
        for stat in sorted(procs, key=lambda p: p.start_time):
            pstart = starts.get(stat.ppid)
            if pstart is None or pstart > stat.start_time:
                continue
            parent = (stat.ppid, pstart)
            if service.session_binding(parent) and not service.session_binding(stat.process):
                service.inherit_session(stat.process, parent, started_by(stat.start_time))

    def gone(self, service: KeyService) -> list[ProcessId]:
        """Processes holding keyrings or bindings that no longer exist."""
        self.propagate(service)
        dead = []
        for pid, start in service.anchored_processes():
            stat = read_stat(pid)
            if stat is None or stat.start_time != start:
                dead.append((pid, start))
        return dead


# -- the kernel's process events connector (linux/cn_proc.h)

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_NLMSG_HDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")
_FORK = 0x00000001
_EXIT = 0x80000000


def open_process_events() -> socket.socket | None:
    """A socket receiving fork and exit events; None without the privilege
    (CAP_NET_ADMIN) or the facility."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
    except OSError:
        return None
    try:
        sock.bind((0, _CN_IDX_PROC))
        op = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), 3, 0, 0, 0) + cn)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError:
        sock.close()
        return None
    return sock


def parse_process_events(data: bytes) -> list[tuple[int, int, int]]:
    """(kind, pid, parent pid) for each process fork and exit in a datagram
    (thread creation and exit are skipped)."""
    events = []
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length = _NLMSG_HDR.unpack_from(data, offset)[0]
        if length < _NLMSG_HDR.size:
            break
        body = offset + _NLMSG_HDR.size + _CN_MSG.size
        if body + _EVENT_HDR.size <= offset + length:
            what = _EVENT_HDR.unpack_from(data, body)[0]
            fields = body + _EVENT_HDR.size
            if what == _FORK and fields + 16 <= offset + length:
                _ppid, ptgid, cpid, ctgid = struct.unpack_from("=4i", data, fields)
                if cpid == ctgid:
                    events.append((_FORK, ctgid, ptgid))
            elif what == _EXIT and fields + 8 <= offset + length:
                pid, tgid = struct.unpack_from("=2i", data, fields)
                if pid == tgid:
                    events.append((_EXIT, tgid, 0))
        offset += (length + 3) & ~3
    return events
