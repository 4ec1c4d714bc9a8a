"""kfctl's warm server: one per user, kfctl's modules already imported, a
forked worker per call.

A Python interpreter takes 8-17 ms to start on the hosts we measure, before
kfctl does anything (docs/performance.md, parts 21 and 30); keyctl takes 1
ms.  The installed ``kfctl`` is therefore a small C program
(``kfctl_client.c``, compiled by keyfence.cli.launcher) that hands its call
to this server, which forks a worker that runs kfctl's ``main()`` with the
caller's argv, environment, umask, working directory and descriptors 0-2.

Who may call whom (docs/security.md, "kfctl's warm server"):

1. The socket is in the caller's private keyfence directory (mode 0700,
   ours: :func:`keyfence.socket_trust.make_private_dir`), or where
   ``$KEYFENCE_KFCTL_SOCKET`` says; it is mode 0600.
2. Each side checks the other with ``SO_PEERCRED`` and ``/proc``: the same
   uid and gid, and the same credentials, groups, capabilities,
   no_new_privs, seccomp mode, namespaces and root
   (:func:`same_rights`).  A worker is thus no more privileged than its
   caller, and a caller no more than the worker it gets; a socket planted
   by anyone else is refused by the client, which then runs kfctl in
   Python (the launcher) as before.
3. The worker never connects to the daemon itself: it sends the socket
   path and the *client* connects and passes the connection over, so the
   daemon sees the caller's process (its ``@s``, ``@p``, ``@t`` and any
   request-key authority) exactly as if kfctl had run in it.  The server
   holds no daemon connection, no key and no payload; a worker's payloads
   die with it.

Commands that fork or exec in the caller's process (``session``,
``watch``, ``watch_session``), and a call that would start a daemon, are
declined before anything is done ("F"): the client runs them in Python.

How a call runs: the server keeps one *spare* worker forked ahead and
blocked in ``accept()``; the spare takes the next call, sends the server the
connection (so that the server can report a signal's death and kill the
worker if its caller dies) and serves it, and the server forks the next
spare meanwhile.  No call waits for a fork, and no worker serves two calls
(nothing of one caller's environment, descriptors or payloads meets the
next's).

The protocol, over ``SOCK_SEQPACKET`` (one message each; integers native):

* client -> worker: ``KFW1`` u32 argc, u32 envc, u32 umask, then argv and
  environ as NUL-terminated strings; descriptors 0, 1, 2 and the working
  directory (O_PATH) attached.
* worker -> client: ``P`` i32 pid (first: signals go there); ``C`` path
  (connect there); ``F`` [reason] (declined, nothing done); ``X`` i32 wait
  status, its last word.
* client -> worker: ``D`` with the connected socket, or ``E`` i32 errno.
* server -> client: ``X`` i32 wait status once the worker has been reaped
  (the one that counts when a signal killed it).

The server leaves after ``idle`` seconds without a call, on SIGTERM, and
when its modules' sources change (the call that notices runs the old code;
the next finds no server and starts one).
``python -m keyfence.cli.kfctl_warm [--socket PATH] [--idle S]``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import socket
import struct
import sys

from keyfence import paths, socket_trust
from keyfence.cli import kfctl, kfctl_commands, kfctl_tool  # noqa: F401 - warm: imported once
from keyfence.client import Client
from keyfence.errors import KeyfenceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

CALL_MAX = 192 * 1024
"""The largest call a client sends (kfctl_client.c's CALL_MAX)."""
IDLE_SECONDS = 600.0
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
        return _rights(str(pid)) == _own_rights()
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


def _own_rights() -> tuple[dict[bytes, bytes], list[tuple[int, int]]]:
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


def warm_socket() -> str:
    """Where the warm server listens (kfctl_client.c computes the same)."""
    return paths.warm_socket()


# -- the server


class Server:
    """One user's warm server: the listening socket, one spare worker
    blocked in ``accept()`` (forked ahead, so that no call waits for a
    fork), and the workers serving calls."""

    def __init__(self, path: str, *, idle: float = IDLE_SECONDS, private_dir: bool = True) -> None:
        self.path = path
        self.idle = idle
        self._private_dir = private_dir  # the default place: check (or make) its directory
        self._sources = _sources()
        self._listener: socket.socket | None = None
        self._lock_fd = -1
        self._poller = select.poll()
        # pidfd -> (pid, the caller's connection once it has one)
        self._workers: dict[int, tuple[int, socket.socket | None]] = {}
        self._spare: tuple[int, socket.socket] | None = None  # (pidfd, its channel)
        self._stale = False

    # the socket and its lock

    def bind(self) -> bool:
        """Take the lock and the socket; False if another server holds them."""
        if self._private_dir:
            socket_trust.make_private_dir(os.path.dirname(self.path))
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._lock_fd = os.open(self.path + ".lock", flags, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead server's: the lock was free
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(64)
        self._listener = listener
        return True

    def _unbind(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._unbind()
        if self._spare is not None:
            pidfd, channel = self._spare
            channel.close()  # it leaves when it sees this
            pid = self._workers[pidfd][0]
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            self._spare = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # the loop

    def serve(self) -> None:
        _own_rights()  # read once, here: every worker inherits it
        gc.freeze()  # the warm objects: a worker's collections do not touch their pages
        self._fork_spare()
        while True:
            busy = len(self._workers) > (self._spare is not None)
            if self._stale and not busy:
                return
            try:
                events = self._poller.poll(None if busy else int(self.idle * 1000))
            except InterruptedError:
                continue
            if not events and not busy:
                return  # idle
            ready = {fd for fd, _ in events}
            # a call taken, exits, callers gone: a descriptor closed by one
            # event is not reused before the next poll
            if self._spare is not None and self._spare[1].fileno() in ready:
                ready.discard(self._spare[1].fileno())
                self._taken()
            for pidfd in ready & self._workers.keys():
                ready.discard(pidfd)
                self._reap(pidfd)
            for fd in ready:
                self._client_gone(fd)

    def _fork_spare(self) -> None:
        if self._stale or self._listener is None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return  # calls wait in the backlog until a worker exits
        if pid == 0:
            _run_spare(self._listener, theirs)  # never returns
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self._workers[pidfd] = (pid, None)
        self._spare = (pidfd, ours)
        self._poller.register(pidfd, select.POLLIN)
        self._poller.register(ours, select.POLLIN)

    def _taken(self) -> None:
        """The spare has accepted a call and sent us the connection (to
        tell its caller a signal's death, and to kill it if its caller dies)."""
        assert self._spare is not None
        pidfd, channel = self._spare
        self._spare = None
        self._poller.unregister(channel)
        try:
            conn = _receive_socket(channel, b"T")[1]
        except OSError:
            conn = None
        channel.close()
        if conn is not None:
            self._workers[pidfd] = (self._workers[pidfd][0], conn)
            self._poller.register(conn, _HANGUP)
        if _sources() != self._sources:
            self._stale = True  # this call ran the old code; the next starts a server
            self._unbind()
        self._fork_spare()

    def _reap(self, pidfd: int) -> None:
        pid, conn = self._workers.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if self._spare is not None and self._spare[0] == pidfd:
            # a spare that died without a call: something is wrong here
            self._poller.unregister(self._spare[1])
            self._spare[1].close()
            self._spare = None
            self._stale = True
            self._unbind()
        if conn is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(conn)
            # the worker sent its own status unless a signal killed it
            _send(conn, b"X" + struct.pack("=i", status))
            conn.close()

    def _client_gone(self, fd: int) -> None:
        # the caller died (SIGKILL) before its worker finished: so does the worker
        for pid, conn in self._workers.values():
            if conn is not None and conn.fileno() == fd:
                self._poller.unregister(fd)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP


def _run_spare(listener: socket.socket, channel: socket.socket) -> None:
    """The spare worker: wait for a call (or the server's end), take it."""
    code = 0
    try:
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
        _send(channel, b"T", [conn.fileno()])
        conn.settimeout(2.0)  # a caller of our own uid that says nothing
        call = _receive_call(conn)
        if call is None:
            _send(conn, b"Fmalformed call")
            kfctl.exit_now(0)
        conn.setblocking(True)
        _run_worker(conn, *call)
    except BaseException:
        code = 1
    kfctl.exit_now(code)


def _receive_socket(sock: socket.socket, kind: bytes) -> tuple[bytes, socket.socket | None]:
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


def _sources() -> dict[str, tuple[int, int]]:
    """The (mtime, size) of every keyfence module this server has loaded."""
    found = {}
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if origin and module.__name__.startswith("keyfence"):
            try:
                st = os.stat(origin)
            except OSError:
                continue
            found[origin] = (st.st_mtime_ns, st.st_size)
    return found


def _send(conn: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
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
    if truncated or uid != os.geteuid() or gid != os.getegid() or not same_rights(pid):
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
        data, sock = _receive_socket(self.sock, b"D")
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
        _send(channel.sock, b"X" + struct.pack("=i", (code & 0xFF) << 8))
    kfctl.exit_now(code)


def _run_kfctl(channel: Channel, argv: list[str]) -> int:
    command = next((word for word in argv[1:] if not word.startswith("-")), None)
    if command in COLD_COMMANDS:
        channel.send(b"F" + command.encode())
        return 0
    if not _utf8_locale():
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


def _utf8_locale() -> bool:
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kfctl_warm", description="kfctl's warm server")
    parser.add_argument("--socket", default=None, help="default: keyfence.paths.warm_socket()")
    parser.add_argument(
        "--private-dir",
        action="store_true",
        help="make or check the socket's directory as the per-user one (0700, ours)",
    )
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="seconds without a call")
    args = parser.parse_args(argv)
    if sys.getfilesystemencoding() != "utf-8":
        print("kfctl_warm: needs a UTF-8 locale (or C)", file=sys.stderr)
        return 1
    for fd in (0, 1, 2):  # callers' descriptors never land on these
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    try:
        path = args.socket or warm_socket()
        chosen = args.socket or paths.environment("KEYFENCE_KFCTL_SOCKET")
        server = Server(path, idle=args.idle, private_dir=args.private_dir or not chosen)
        if not server.bind():
            return 0  # another one serves
    except (OSError, KeyfenceError) as err:
        print(f"kfctl_warm: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
