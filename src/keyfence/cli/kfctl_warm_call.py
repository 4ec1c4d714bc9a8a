"""One call on kfctl's warm path, from the worker's side (the server:
keyfence.cli.kfctl_warm, which has the protocol; the client:
kfctl_client.c).

* :func:`same_rights`: the check each side makes of the other (the same
  uid and gid by ``SO_PEERCRED``, the same credentials, capabilities,
  confinement, namespaces and root by ``/proc``), the caller's taken by
  pidfd so that a pid reused since the call was sent is no pass;
* :func:`run_spare`: a spare worker waiting for a call, taking it;
* the worker: the caller's descriptors, directory, umask and environment
  in place, then kfctl's ``main()`` with a client whose connection the
  caller makes (:class:`Channel`), or the call handed back (``F``) before
  anything is done.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys

from keyfence import paths
from keyfence.cli import kfctl, kfctl_commands, kfctl_tool  # noqa: F401 - warm: imported once
from keyfence.client import Client
from keyfence.errors import KeyfenceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
"""A pidfd of the process that connected (Linux 6.5); 77 where Python has no name."""
CALL_MAX = 192 * 1024
"""The largest call a client sends (kfctl_client.c's CALL_MAX)."""
STATUS_LINES = (
    b"Uid:",
    b"Gid:",
    b"Groups:",
    b"CapInh:",
    b"CapPrm:",
    b"CapEff:",
    b"CapBnd:",
    b"CapAmb:",
    b"NoNewPrivs:",
    b"Seccomp:",
    b"Seccomp_filters:",
)
NAMESPACES = ("user", "mnt", "pid", "ipc", "uts", "net", "cgroup")
COLD_COMMANDS = frozenset({"session", "watch", "watch_session"})
"""They fork or exec in the caller's process: the client runs them itself."""


def same_rights(pid: int) -> bool:
    """Process ``pid`` has exactly our credentials and confinement (the
    client checks the same of the server: kfctl_client.c ``same_rights``)."""
    try:
        return _rights(str(pid)) == own_rights()
    except OSError:
        return False


def _rights(pid: str) -> tuple[dict[bytes, bytes], list[tuple[int, int]]]:
    fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        status = os.read(fd, 16384)
    finally:
        os.close(fd)
    places = []
    for name in _PLACES:
        st = os.stat(f"/proc/{pid}/{name}")
        places.append((st.st_dev, st.st_ino))
    return _status_lines(status), places


_PLACES = (*(f"ns/{ns}" for ns in NAMESPACES), "root")
_OWN: list[tuple[dict[bytes, bytes], list[tuple[int, int]]]] = []


def own_rights() -> tuple[dict[bytes, bytes], list[tuple[int, int]]]:
    """Ours, read once: a server's credentials do not change."""
    if not _OWN:
        _OWN.append(_rights("self"))
    return _OWN[0]


def _status_lines(status: bytes) -> dict[bytes, bytes]:
    found = {}
    for line in status.split(b"\n"):
        for name in STATUS_LINES:
            if line.startswith(name):
                found[name] = line
    return found


# -- taking a call


def run_spare(listener: socket.socket, channel: socket.socket) -> None:
    """The spare worker: wait for a call (or the server's end), take it."""
    code = 0
    try:
        # nothing of the server's but these two: its end of our channel (or
        # we would never see the server go), other callers' connections (or
        # they would wait on us), the other workers' pidfds
        _close_all_but(listener.fileno(), channel.fileno())
        # what a worker needs, done while we wait: the caller's environment
        # replaces ours, and signals do to it what they do to a kfctl
        os.environ.clear()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        waiting = select.poll()
        waiting.register(listener, select.POLLIN)
        waiting.register(channel, select.POLLIN)
        while True:
            ready = {fd for fd, _ in waiting.poll()}
            if channel.fileno() in ready:
                kfctl.exit_now(0)  # the server has gone
            if listener.fileno() in ready:
                try:
                    conn, _ = listener.accept()
                    break
                except BlockingIOError:
                    continue
        send(channel, b"T", [conn.fileno()])
        conn.settimeout(2.0)  # a caller of our own uid that says nothing
        call = _receive_call(conn)
        if call is None:
            send(conn, b"Fmalformed call")
            kfctl.exit_now(0)
        conn.setblocking(True)
        _run_worker(conn, *call)
    except BaseException:
        code = 1
    kfctl.exit_now(code)


def _close_all_but(*keep: int) -> None:
    """Close every descriptor from 3 up but ``keep``."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def receive_socket(sock: socket.socket, kind: bytes) -> tuple[bytes, socket.socket | None]:
    """A message and the one socket it carries when it is a ``kind`` message
    (``T``: a call taken; ``D``: the daemon connection); any other
    descriptors are closed."""
    data, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(struct.calcsize("i")))
    fds = _received_fds(ancillary)
    if data[:1] == kind and len(fds) == 1:
        return data, socket.socket(fileno=fds[0])
    _close_all(fds)
    return data, None


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    return fds


def send(conn: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    try:
        if fds:
            conn.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
        else:
            conn.send(data)
    except OSError:
        pass  # the caller has gone


def _receive_call(conn: socket.socket) -> tuple[list[str], dict[str, str], int, list[int]] | None:
    """The client's call, once its sender is shown to be as privileged as
    we are; None for anything else (its descriptors closed)."""
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", cred)
    data, ancillary, flags, _ = conn.recvmsg(CALL_MAX, socket.CMSG_SPACE(4 * struct.calcsize("i")))
    fds = _received_fds(ancillary)
    truncated = flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    if truncated or uid != os.geteuid() or gid != os.getegid() or not _is_as_we_are(conn, pid):
        _close_all(fds)
        return None
    if len(fds) != 4 or data[:4] != b"KFW1" or len(data) < 16:
        _close_all(fds)
        return None
    argc, envc, umask = struct.unpack("=III", data[4:16])
    strings = data[16:].split(b"\0")
    if strings[-1] != b"" or len(strings) - 1 != argc + envc or argc < 1:
        _close_all(fds)
        return None
    decode = os.fsdecode
    argv = [decode(s) for s in strings[:argc]]
    env = {}
    for entry in strings[argc:-1]:
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[decode(name)] = decode(value)
    return argv, env, umask & 0o777, fds


def _is_as_we_are(conn: socket.socket, pid: int) -> bool:
    """:func:`same_rights` of the process that connected, not of another
    that has its pid since: /proc is read by pid, so the caller must still
    be alive afterwards, which its pidfd says (``SO_PEERPIDFD``, Linux 6.5;
    before that a pidfd opened first, which narrows the race to the moment
    between the connection and the call's arrival)."""
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as err:
        if err.errno != errno.ENOPROTOOPT:
            return False  # ESRCH: the caller has gone, its pid may be another's
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
    try:
        if not same_rights(pid):
            return False
        signal.pidfd_send_signal(pidfd, 0)  # ESRCH once it has exited
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    return None


# -- a worker (the forked child): kfctl's main() as the caller


class FallBack(Exception):
    """Nothing has been done: the caller runs this call in Python."""


class Channel:
    """The worker's end of the client's connection."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def open_daemon(self, path: str) -> socket.socket:
        """keyfence.client's opener: the client connects, we get the socket."""
        self.sock.send(b"C" + os.fsencode(path))
        data, sock = receive_socket(self.sock, b"D")
        if sock is not None:
            return sock
        code = (
            struct.unpack("=i", data[1:5])[0]
            if data[:1] == b"E" and len(data) == 5
            else errno.EPROTO
        )
        raise OSError(code, os.strerror(code), path)


def _run_worker(
    conn: socket.socket, argv: list[str], env: dict[str, str], umask: int, fds: list[int]
) -> None:
    code = 1
    channel: Channel | None = None
    try:
        try:
            # the connection well clear of 0-2 first, then the caller's
            raw = fcntl.fcntl(conn.detach(), fcntl.F_DUPFD_CLOEXEC, 10)
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            os.fchdir(fds[3])
            channel_fd = os.dup2(raw, 3, inheritable=False)
            # the listener, the server's channel, the received copies
            os.closerange(4, 1 << 20)
        except OSError as err:
            os.write(2, f"kfctl: the warm worker cannot take the call: {err}\n".encode())
            kfctl.exit_now(1)
        os.umask(umask)
        os.environ.update(env)  # the spare has cleared ours
        sys.argv = argv
        channel = Channel(channel_fd)
        channel.send(b"P" + struct.pack("=i", os.getpid()))
        code = _run_kfctl(channel, argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105
            stream.flush()
        except (OSError, ValueError):
            pass
    if channel is not None:
        # the caller leaves now, not after our exit and the server's reaping
        send(channel.sock, b"X" + struct.pack("=i", (code & 0xFF) << 8))
    kfctl.exit_now(code)


def _run_kfctl(channel: Channel, argv: list[str]) -> int:
    command = next((word for word in argv[1:] if not word.startswith("-")), None)
    if command in COLD_COMMANDS:
        channel.send(b"F" + command.encode())
        return 0
    if not utf8_locale():
        # Python started in the caller's locale decodes argv by it; we by UTF-8
        channel.send(b"Fnot a UTF-8 locale")
        return 0
    prog = kfctl_tool.program_name(argv[0])
    tool = kfctl_tool.Kfctl(prog, connect=lambda: _connect(channel, tool))
    try:
        return kfctl.main(argv[1:], tool=tool)
    except FallBack:  # raised only while nothing has been written
        channel.send(b"Fno daemon answers: starting one")
        return 0


def utf8_locale() -> bool:
    """The caller's locale decodes as ours does: UTF-8, or C/POSIX (which
    Python coerces to UTF-8)."""
    value = os.environ.get("LC_ALL") or os.environ.get("LC_CTYPE") or os.environ.get("LANG")
    if value in (None, "", "C", "POSIX"):
        return True
    value = value.lower()
    return "utf-8" in value or "utf8" in value


def _connect(channel: Channel, tool: kfctl_tool.Kfctl) -> Client:
    """Client.connect() through the caller's own connection.  A daemon it
    would start is started by the caller's Python kfctl instead, unless
    this call has already written something (a terminal's first line)."""
    try:
        return Client.connect(name="kfctl", autostart=False, opener=channel.open_daemon)
    except KeyfenceError as err:
        if err.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
        place = paths.locate()
        if place.kind == paths.EXPLICIT or not paths.autostart_allowed():
            raise
        if not tool.wrote:
            tool.discard()  # kfctl.main flushes on the way out
            raise FallBack from None
    return Client.connect(name="kfctl", autostart=True, opener=channel.open_daemon)
