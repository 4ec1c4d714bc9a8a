"""Session keyrings follow process ancestry, as the kernel's credentials do.

The kernel hangs ``@s`` off each task's credentials: a child gets its
parent's session keyring at fork, setsid(2) does not change it, and only
joining another (``kfctl session``/``new_session``, the login hook) or a
child's session_to_parent replaces it.  The daemon has no credentials to
hang it on, so it keeps a *binding* per process, named (pid, start time),
in the model (KeyService.inherit_session / session_binding), and learns
the tree three ways:

1. **At fork**, from the kernel's process events connector (any user
   since Linux 6.6, CAP_NET_ADMIN before; the initial pid namespace only).
   A fork by a bound process binds the child at once --
   exactly the kernel's rule, even for a double-forked daemon (tmux) whose
   parent exits a moment later.  The parent at fork is remembered, so the
   walk in 2 follows it even after the child was reparented.
2. **On first contact**: a caller with no binding walks its parents (the
   one remembered at fork, else /proc's ppid) up to the nearest bound
   process, and every process on the way inherits its keyring.  A child
   that started before that ancestor got its keyring did not inherit it
   (start times are compared) and stops the walk.
3. **Each lifetime check**, when there are no fork events: live children
   of bound processes inherit their parent's keyring, so a child that
   existed for at least one check before its parent exited keeps it.

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
import time
from dataclasses import dataclass

from keyfence.keys import KeyService

log = logging.getLogger("keyfence.sessions")

MAX_DEPTH = 4096
"""Parents walked at most (pid_max bounds a real chain; this bounds a
hostile one)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
SWEEP_CHECKS = 16
"""With fork and exit events, every holder is still looked at every 16th
lifetime check (4 s), for exit events lost to an overflowing socket."""

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
    state: str = "R"

    @property
    def exited(self) -> bool:
        """A zombie: it has exited (and, as in the kernel's exit_creds(),
        let go of its keyrings) but its parent has not reaped it yet.  A
        leader whose main thread left by pthread_exit(3) shows Z too while
        its other threads run: their credentials hold the keyrings."""
        return self.state == "X" or (self.state == "Z" and self.threads <= 1)

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
            state=rest[0].decode(errors="replace"),
        )
    except (IndexError, ValueError):
        return None


def is_thread_of(pid: int, tid: int) -> bool:
    """Whether ``tid`` is a live thread of process ``pid`` (its main one
    included)."""
    return tid > 0 and os.path.exists(f"/proc/{pid}/task/{tid}")


class _Gone(ProcStat):
    """A parent known from a fork record that has exited since."""

    def __init__(self, process: ProcessId) -> None:
        super().__init__(pid=process[0], ppid=0, session=0, threads=0, start_time=process[1])


FORK_SKEW = 0.5
"""Seconds a fork event's time may be later than the child's start time
(start times have clock-tick resolution; events queue)."""
FORK_LATE = 2 / CLK_TCK
"""Seconds a process may seem to have started after a fork event's time
and still be that fork's child or parent (start times are taken before
the event; this covers rounding).  One started later took a pid that came
round while the event waited: a user cycles 32,768 pids in about a second
on one core (11,000 forks in 0.5 s measured), not in 20 ms."""


def _boottime_of(monotonic_ns: int) -> float:
    """A CLOCK_MONOTONIC time (a fork event's) on the CLOCK_BOOTTIME scale
    of /proc's start times."""
    offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    return monotonic_ns / 1e9 + offset


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
        self._fork_times: dict[int, tuple[int, float]] = {}
        """child pid -> (its start time, when it was forked: boot_clock()),
        precise where start times are rounded to a clock tick."""
        self._service: KeyService | None = None
        self._events: socket.socket | None = None
        self._checks = 0
        self._exited: set[int] = set()
        """Pids exit events named since the last check."""
        self._lost = False
        """Events were lost since the last check."""

    # -- learning the tree

    def start(self, service: KeyService) -> None:
        """Listen to fork events for ``service`` (idempotent; where the
        kernel refuses them, rules 2 and 3 do the work)."""
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
                # ENOBUFS: events were lost; the next check runs rule 3
                # and looks at every holder
                log.debug("process events: %s", err)
                self._lost = True
                continue
            for event in parse_process_events(data):
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("process event %r", event)

    def _on_event(self, event: tuple[int, int, int, int]) -> None:
        kind, child, parent, when_ns = event
        if kind == _EXIT:
            with self._lock:
                self._forks.pop(child, None)
                self._fork_times.pop(child, None)
                self._exited.add(child)
            return
        when = _boottime_of(when_ns)
        me = read_stat(child)
        if me is not None and not -FORK_SKEW <= me.start_time / CLK_TCK - when <= FORK_LATE:
            me = None  # the child is gone and its pid already reused
        up = read_stat(parent)
        if up is not None and (
            up.start_time / CLK_TCK - when > FORK_LATE
            or (me is not None and up.start_time > me.start_time)
        ):
            up = None  # the parent's pid was reused already
        gone_parent: ProcessId | None = None
        if up is not None:
            source = up.process
        else:
            # a short-lived parent (daemon(3)'s middle process, `setsid -f`)
            # is gone already: it passed on its own binding if it had one
            # (a login shell that joined a keyring, then exec'd `setsid -f`
            # as its last command), else what it inherited at its own fork
            with self._lock:
                forked = self._forks.get(parent)
            if forked is None or (me is not None and forked[0] > me.start_time):
                return  # unknown, or the record of the pid's next owner
            source = forked[1]
            if forked[0] >= 0:
                gone_parent = (parent, forked[0])
        with self._lock:
            self._forks[child] = (me.start_time if me is not None else -1, source)
            if me is not None:
                self._fork_times[child] = (me.start_time, when)
        service = self._service
        if me is not None and service is not None:
            started = self._started(me.process)
            if gone_parent is None or not service.inherit_session(me.process, gone_parent, started):
                service.inherit_session(me.process, source, started)

    def _started(self, process: ProcessId) -> float:
        """The latest time the process may have been forked at: its fork
        event's time where known (its start time is rounded up to a clock
        tick, past a join by its parent just after the fork)."""
        started = started_by(process[1])
        with self._lock:
            forked = self._fork_times.get(process[0])
        if forked is not None and forked[0] == process[1]:
            started = min(started, forked[1])
        return started

    def parent_of(self, process: ProcessId, ppid: int | None = None) -> ProcStat | None:
        """The process's parent at fork if a fork event told us, else its
        parent now (it may have been reparented: docs/keys.md).  ``ppid``:
        its parent pid if the caller just read it."""
        pid, start = process
        with self._lock:
            forked = self._forks.get(pid)
        if forked is not None and forked[0] == start:
            up = read_stat(forked[1][0])
            if up is not None and up.start_time == forked[1][1]:
                return up
            return _Gone(forked[1])
        if ppid is None:
            me = read_stat(pid)
            if me is None or me.start_time != start:
                return None
            ppid = me.ppid
        if ppid <= 0:
            return None
        up = read_stat(ppid)
        if up is None or up.start_time > start:
            return None  # the parent's pid already belongs to a younger process
        return up

    def _prune(self) -> None:
        """Forget fork records of processes gone (their exit events may
        have been lost to an overflowing socket): every 64th check."""
        self._checks += 1
        if self._checks % 64:
            return
        with self._lock:
            records = list(self._forks.items())
        stale = []
        for pid, record in records:
            stat = read_stat(pid)
            if stat is None or stat.start_time != record[0]:
                stale.append((pid, record))
        with self._lock:
            for pid, record in stale:
                if self._forks.get(pid) == record:  # not re-recorded meanwhile
                    del self._forks[pid]
                forked = self._fork_times.get(pid)
                if forked is not None and forked[0] == record[0]:
                    del self._fork_times[pid]

    # -- resolving

    def resolve(self, service: KeyService, stat: ProcStat) -> None:
        """Give the process the session binding fork would have given it
        (rule 2); nothing if no ancestor has one."""
        process = stat.process
        if service.session_binding(process):
            return
        chain = [process]
        above: ProcessId | None = None
        current: ProcStat | None = stat
        for _ in range(MAX_DEPTH):
            assert current is not None
            parent = self.parent_of(current.process, current.ppid)
            if parent is None or parent.pid <= 0:
                return
            if service.session_binding(parent.process):
                above = parent.process
                break
            if isinstance(parent, _Gone):
                return  # a dead middle process with no binding: nothing above is known
            chain.append(parent.process)
            current = parent
        if above is None:
            return
        for proc in reversed(chain):
            if not service.inherit_session(proc, above, self._started(proc)):
                return
            above = proc

    def propagate(self, service: KeyService, *, force: bool = False) -> None:
        """Rule 3: live children of bound processes inherit their keyring.
        Needed only without fork events (``force``: some were lost)."""
        if (self.follows_forks and not force) or not service.anchored_processes():
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
        """Processes holding keyrings or bindings that no longer exist and
        whose going needs the removal path.

        With fork events, only processes an exit event named are looked at,
        and everything every SWEEP_CHECKS checks (an event may be lost);
        without, every holder at every check.  A binding whose keyring
        other processes still hold is dropped here at once: nothing goes
        away, so there is nothing to fence.
        """
        lost, self._lost = self._lost, False
        self.propagate(service, force=lost)
        self._prune()
        with self._lock:
            exited, self._exited = self._exited, set()
        sweep = not self.follows_forks or lost or self._checks % SWEEP_CHECKS == 0
        dead = []
        for pid, start in service.anchored_processes():
            if not sweep and pid not in exited:
                continue
            stat = read_stat(pid)
            alive = stat is not None and stat.start_time == start and not stat.exited
            if not alive and not service.drop_shared_session(pid, start):
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


def in_initial_pid_namespace() -> bool:
    """Fork events carry the initial pid namespace's pids: a daemon in
    another one (a container) must not read them as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) == 2
    except OSError:
        pass
    return False


def open_process_events() -> socket.socket | None:
    """A socket receiving fork and exit events; None without the privilege
    (CAP_NET_ADMIN) or the facility, or outside the initial pid namespace."""
    if not in_initial_pid_namespace():
        return None
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


def parse_process_events(data: bytes) -> list[tuple[int, int, int, int]]:
    """(kind, pid, parent pid, CLOCK_MONOTONIC ns) for each process fork and
    exit in a datagram (thread creation and exit are skipped)."""
    events = []
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length = _NLMSG_HDR.unpack_from(data, offset)[0]
        if length < _NLMSG_HDR.size:
            break
        body = offset + _NLMSG_HDR.size + _CN_MSG.size
        if body + _EVENT_HDR.size <= offset + length:
            what, _cpu, when = _EVENT_HDR.unpack_from(data, body)
            fields = body + _EVENT_HDR.size
            if what == _FORK and fields + 16 <= offset + length:
                _ppid, ptgid, cpid, ctgid = struct.unpack_from("=4i", data, fields)
                if cpid == ctgid:
                    events.append((_FORK, ctgid, ptgid, when))
            elif what == _EXIT and fields + 8 <= offset + length:
                pid, tgid = struct.unpack_from("=2i", data, fields)
                if pid == tgid:
                    events.append((_EXIT, tgid, 0, when))
        offset += (length + 3) & ~3
    return events
