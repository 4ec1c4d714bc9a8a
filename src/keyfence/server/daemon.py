"""The daemon: one KeyService shared by every process of the machine.

The parts, one concept per module:

- keyfence.server.loop: the event loop (epoll, non-blocking sockets) that
  owns every connection and runs every request that cannot wait;
- keyfence.server.optable: the operations, one row each;
- keyfence.server.connection: one connection's buffers, watches and acks;
- keyfence.server.lanes: threads for requests that may wait, per uid;
- keyfence.server.limits: what one connection and one uid may hold;
- here: the socket's claim, process and session lifetimes, and shutdown.

Nothing a client sends can stop the daemon or make another user wait: a bad
frame gets an Error (and, when the stream can no longer be trusted, a
closed connection); limits per connection and per uid bound what one
client can hold (docs/security.md, "Daemon: connections, limits and
latency under attack").

Lock order: service lock, then a connection's own lock; a connection never
calls into the service with its lock held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable

from keyfence import fdtable, protocol, socket_trust
from keyfence.keys import KeyService
from keyfence.keys.caller import Caller
from keyfence.keys.errors import KeyfenceError
from keyfence.server import identity, request_key_runner, systemd
from keyfence.server.connection import SERVER_NAME, Connection
from keyfence.server.lanes import Lanes
from keyfence.server.limits import MAX_INFLIGHT, UidLimits
from keyfence.server.loop import Loop
from keyfence.server.mounts import MountSupervisor, SupervisedMount
from keyfence.server.optable import OPERATIONS
from keyfence.server.sessions import SessionTracker, is_thread_of

__all__ = [
    "MAX_INFLIGHT",
    "OPERATIONS",
    "SERVER_NAME",
    "Connection",
    "Daemon",
    "DaemonRunning",
    "run_daemon",
]

log = logging.getLogger("keyfence.daemon")

MONITOR_INTERVAL = 0.25
DAEMON_DESCRIPTORS = 4096
"""The descriptor table's room made at start (keyfence/fdtable.py)."""
UNMOUNT_SECONDS = 60.0
"""How long shutdown waits for the mount workers to write back and exit."""


class DaemonRunning(RuntimeError):
    """Another daemon already serves this socket."""


class Daemon:
    """Serve ``service`` on the Unix socket at ``path``.

    ``private_uid``: serve only this uid (a per-user daemon); nobody is an
    admin over keys there.  None: a system daemon serving every user, root
    being the admin.
    """

    def __init__(
        self,
        path: str,
        *,
        service: KeyService | None = None,
        private_uid: int | None = None,
    ) -> None:
        self.path = path
        self.service = service or KeyService()
        request_key_runner.install(self.service, path)
        self.private_uid = private_uid
        self.sessions = SessionTracker()
        self.limits = UidLimits()
        self.lanes = Lanes()
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._lock_file: int | None = None
        self._ending: set[object] = set()
        self._loop: Loop | None = None
        self._activated = False
        """Serving a socket systemd made (socket activation): it stays at exit."""
        self.mounts = MountSupervisor(self)

    @property
    def loop(self) -> Loop:
        assert self._loop is not None, "the daemon is not serving"
        return self._loop

    # -- socket setup

    def bind(self, listener: socket.socket | None = None) -> None:
        """Claim the socket; DaemonRunning if another daemon serves it.

        ``listener``: a listening socket already bound at ``path`` (systemd's
        socket activation): served as it is, and left in place at exit, as
        the service manager owns it."""
        directory = os.path.dirname(self.path) or "."
        socket_trust.prepare_bind_dir(directory, private=self.private_uid is not None)
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonRunning(
                f"a keyfence daemon (pid {owner}) already serves {self.path}; "
                f"stop it first (kill {owner}) or set KEYFENCE_SOCKET to another path"
            ) from None
        self._lock_file = fd
        self.record_pid()
        self._activated = listener is not None
        if listener is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # stale: its daemon no longer holds the lock
            listener = self._listen(directory)
        self._listener = listener
        self._loop = Loop(self, listener)

    def _listen(self, directory: str) -> socket.socket:
        """A socket listening at ``path``, which appears only once it listens:
        bound under a temporary name in the same (checked) directory, given
        its mode, made to listen, then renamed into place.  A client that
        finds the path can connect (bound at ``path`` itself, a connect
        between bind and listen got ECONNREFUSED, and a client that starts
        daemons on demand would have tried to start a second one).  A path
        too long for the temporary name is bound directly, as before."""
        mode = 0o600 if self.private_uid is not None else 0o666
        temporary = os.path.join(directory, f".sock-{os.getpid()}.new")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # a crashed daemon's, under our lock
            try:
                listener.bind(temporary)
            except OSError as err:
                if err.errno is not None:
                    raise
                temporary = self.path  # too long: bind at the path itself
                listener.bind(temporary)
            os.chmod(temporary, mode)
            listener.listen(128)
            if temporary != self.path:
                os.rename(temporary, self.path)
        except OSError as err:
            listener.close()
            if temporary != self.path:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            if err.errno is None:  # "AF_UNIX path too long": bind(2)'s own word
                code = errno.ENAMETOOLONG
                raise OSError(code, os.strerror(code), self.path) from None
            raise
        return listener

    def record_pid(self) -> None:
        """Write our pid into the lock file (again after a fork)."""
        if self._lock_file is not None:
            os.ftruncate(self._lock_file, 0)
            os.pwrite(self._lock_file, f"{os.getpid()}\n".encode(), 0)

    # -- serving

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then unmount, clean up and return."""
        if self._listener is None:
            self.bind()
        # every connection is a descriptor: all the hard limit allows, and
        # room for the first thousands now, not a doubling inside a request
        fdtable.reserve(DAEMON_DESCRIPTORS)
        monitor = threading.Thread(target=self._monitor, name="keyfence-lifetimes", daemon=True)
        monitor.start()
        log.info("serving %s", self.path)
        try:
            self.loop.run()
        finally:
            self._stop.set()
            self._release()

    def accept(self, sock: socket.socket) -> Connection | None:
        """Loop thread: the Connection for a new socket, or None if refused."""
        try:
            caller, info = identity.caller_of(
                sock, self.sessions, self.service, admin_uid=0 if self.private_uid is None else None
            )
        except KeyfenceError as err:  # gone already, or not who SO_PEERCRED says
            _refuse(sock, err.errno or errno.EIO, str(err))
            return None
        if self.private_uid is not None and caller.uid != self.private_uid:
            _refuse(sock, errno.EACCES, f"this is uid {self.private_uid}'s private keyfence daemon")
            return None
        if not self.limits.try_take("connections", caller.uid):
            bound = self.limits.bound("connections")
            _refuse(
                sock, errno.EMFILE, f"too many connections for uid {caller.uid} (limit {bound})"
            )
            return None
        conn = Connection(self, sock, caller, info.session)
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def adopt(self, sock: socket.socket, caller: Caller, mount: SupervisedMount) -> None:
        """Serve a mount worker's private channel (made by us at spawn)."""
        conn = Connection(self, sock, caller, 0, mount=mount)
        conn.greeted = False
        self.limits.try_take("connections", caller.uid)
        with self._conns_lock:
            self._conns.add(conn)
        self.loop.adopt(conn)

    def forget(self, conn: Connection) -> None:
        """Loop thread: ``conn`` is closed."""
        with self._conns_lock:
            self._conns.discard(conn)
        self.limits.give_back("connections", conn.uid)

    def connections(self) -> int:
        with self._conns_lock:
            return len(self._conns)

    # -- process and session lifetimes

    def _monitor(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            try:
                self.check_lifetimes()
            except Exception:
                log.exception("lifetime check failed")

    def check_lifetimes(self) -> None:
        """End the keyrings and session bindings of processes that are gone
        (a session keyring ends with the last process holding it), and the
        process and thread keyrings of programs that exec'd."""
        for pid, start in self.sessions.gone(self.service):
            self._end(("process", pid, start), functools.partial(self._exit, pid, start))
        for token in self.service.retired():  # @p and @t an exec took
            self._end(("exec", token), functools.partial(self.service.release_retired, token))
        for pid, start, tid in self.service.anchored_threads():  # @t ends with its thread
            if not is_thread_of(pid, tid):
                exited = functools.partial(self.service.thread_exited, pid, tid, start)
                self._end(("thread", pid, start, tid), exited)

    def _exit(self, pid: int, start: int) -> None:
        self.service.process_exited(pid, start)

    def _end(self, tag: object, action: Callable[[], None]) -> None:
        """Run a fenced removal off the monitor thread, once at a time per tag."""
        with self._conns_lock:
            if tag in self._ending:
                return
            self._ending.add(tag)

        def run() -> None:
            try:
                action()
            except OSError as err:
                log.warning("%s: keyrings kept, will retry: %s", tag, err)
            finally:
                with self._conns_lock:
                    self._ending.discard(tag)

        threading.Thread(target=run, name=f"keyfence-end-{tag}", daemon=True).start()

    # -- shutdown

    def stop(self) -> None:
        """Begin a clean shutdown (safe from a signal handler); a second
        call while mounts are being written back ends the wait."""
        if self._stop.is_set():
            self.loop.finish()
            return
        self._stop.set()
        self.loop.stop()

    def shutdown(self) -> None:
        """Stop from another thread (as :meth:`stop`)."""
        self.stop()

    def begin_shutdown(self) -> None:
        """Loop thread, once the listener is closed: drop the clients, then
        write back and unmount every mount while the loop keeps serving the
        workers' channels; the loop ends when they are gone."""
        systemd.notify("STOPPING=1")
        self._remove_socket()
        with self._conns_lock:
            clients = [c for c in self._conns if c.mount is None]
        for conn in clients:
            conn.close()
        threading.Thread(target=self._unmount_all, name="keyfence-shutdown", daemon=True).start()

    def _unmount_all(self) -> None:
        try:
            pids = [m["pid"] for m in self.mounts.describe()]
            self.mounts.shutdown()  # each worker writes back, then exits
            deadline = time.monotonic() + UNMOUNT_SECONDS
            while time.monotonic() < deadline:
                live = [p for p in pids if _alive(p)]
                if not live:
                    break
                time.sleep(0.05)
            else:
                log.error("mount workers %s still running after %.0f s", live, UNMOUNT_SECONDS)
        except Exception:
            log.exception("unmounting at shutdown failed")
        finally:
            self.loop.finish()

    def _remove_socket(self) -> None:
        if not self._activated:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _release(self) -> None:
        self._remove_socket()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        self.service.close()


def _alive(pid: int) -> bool:
    """Whether our child ``pid`` still runs (a zombie counts as gone: the
    mount supervisor reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def _refuse(sock: socket.socket, code: int, message: str) -> None:
    """Tell a refused client why, without waiting for it, and close."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.send(protocol.encode(protocol.Error(0, code, message)))
    sock.close()


def _detach() -> int:
    """Fork; the parent waits for the child's word and leaves with it (0
    once the child serves, 1 if it exits first, having said why on the
    same terminal).  The child, in a session of its own in "/" (as
    gpg-agent: the starter's directory is not held busy), gets the pipe to
    send that word on.  It forks before anything starts a thread: the key
    service's collector and notifier did not survive a fork after them (a
    detached daemon delivered no notification, and an emergency removal
    never reached a mount)."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        word = b""
        while chunk := os.read(read_end, 16):
            word += chunk
        os._exit(0 if word == b"ok" else 1)
    os.close(read_end)
    os.setsid()
    os.chdir("/")
    return write_end


def _let_go_of_the_terminal(path: str) -> None:
    """A detached daemon keeps no terminal or pipe of its caller open (a
    ``$(keyfence daemon --detach)`` or a test reading its output would wait
    for the daemon's exit): standard input from /dev/null, and output that
    does not already go to a file (the client's autostart log) to
    ``SOCKET.log`` beside the socket, as an autostarted daemon's."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if all(_is_regular_file(fd) for fd in (1, 2)):
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        log = os.open(path + ".log", flags, 0o600)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if not _is_regular_file(fd):
            os.dup2(log, fd)
    os.close(log)


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def run_daemon(
    path: str,
    *,
    private: bool | None = None,
    detach: bool = False,
    service: KeyService | None = None,
) -> int:
    """``keyfence daemon``: serve in the foreground until SIGTERM or SIGINT.

    ``detach``: claim the socket, then fork; the parent exits as soon as
    the socket accepts connections (how clients start a daemon on demand).
    ``service``: the key service to serve (Python callers only; the demo's
    unfenced one).
    """
    from keyfence.keys.secret import disable_core_dumps

    path = os.path.abspath(path)  # a detached daemon leaves for "/"
    disable_core_dumps()
    fdtable.occupy_standard()  # before the listener and connections take a number
    if private is None:
        private = os.geteuid() != 0
    ready = _detach() if detach else None
    daemon = Daemon(path, service=service, private_uid=os.geteuid() if private else None)
    try:
        daemon.bind(systemd.listen_socket())
    except DaemonRunning as err:
        print(f"keyfence daemon: {err}", flush=True)
        return 1
    if ready is not None:
        _let_go_of_the_terminal(path)
        os.write(ready, b"ok")  # the parent leaves: the socket accepts
        os.close(ready)
    # the socket accepts from here on (connections wait in its backlog)
    systemd.take_notify_socket()
    systemd.notify("READY=1")

    def stop(signum: int, frame: object) -> None:
        daemon.stop()  # sets flags and writes an eventfd: safe in a handler

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.serve_forever()
    return 0
