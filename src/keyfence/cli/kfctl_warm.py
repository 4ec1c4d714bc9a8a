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
   (:func:`keyfence.cli.kfctl_warm_call.same_rights`, by pidfd).  A
   worker is thus no more privileged than its caller, and a caller no
   more than the worker it gets; a socket planted by anyone else is
   refused by the client, which then runs kfctl in Python (the launcher)
   as before.
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
the next finds no server and starts one).  This module is the server; a
call's side (the checks, the spare, the worker) is
keyfence.cli.kfctl_warm_call.
``python -m keyfence.cli.kfctl_warm [--socket PATH] [--idle S]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import struct
import sys

from keyfence import paths, socket_trust
from keyfence.cli import kfctl_warm_call as call
from keyfence.errors import KeyfenceError

IDLE_SECONDS = 600.0


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
        call.own_rights()  # read once, here: every worker inherits it
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
        if self._stale or self._listener is None or self._spare is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return  # calls wait in the backlog until a worker exits
        if pid == 0:
            call.run_spare(self._listener, theirs)  # never returns
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self._workers[pidfd] = (pid, None)
        self._spare = (pidfd, ours)
        self._poller.register(pidfd, select.POLLIN)
        self._poller.register(ours, select.POLLIN)

    def _taken(self) -> None:
        """The spare has accepted a call and sent us the connection (to
        tell its caller a signal's death, and to kill it if its caller
        dies); or it has died without one, and we stop."""
        assert self._spare is not None
        pidfd, channel = self._spare
        self._spare = None
        self._poller.unregister(channel)
        try:
            conn = call.receive_socket(channel, b"T")[1]
        except OSError:
            conn = None
        channel.close()
        if conn is None:
            # no spare ever dies on its own: rather than fork one after
            # another, leave (the next call runs in Python and starts a server)
            self._stop()
            return
        self._workers[pidfd] = (self._workers[pidfd][0], conn)
        self._poller.register(conn, _HANGUP)
        if _sources() != self._sources:
            self._stop()  # this call ran the old code; the next starts a server
            return
        self._fork_spare()

    def _stop(self) -> None:
        """Take no more calls; leave once the running ones have finished."""
        self._stale = True
        self._unbind()

    def _reap(self, pidfd: int) -> None:
        pid, conn = self._workers.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if conn is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(conn)
            # the worker sent its own status unless a signal killed it
            call.send(conn, b"X" + struct.pack("=i", status))
            conn.close()
        if self._spare is None:
            self._fork_spare()  # one that failed to fork before

    def _client_gone(self, fd: int) -> None:
        # the caller died (SIGKILL) before its worker finished: so does the worker
        for pid, conn in self._workers.values():
            if conn is not None and conn.fileno() == fd:
                self._poller.unregister(fd)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP


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
        path = os.path.abspath(args.socket or warm_socket())
        chosen = args.socket or paths.environment("KEYFENCE_KFCTL_SOCKET")
        server = Server(path, idle=args.idle, private_dir=args.private_dir or not chosen)
        if not server.bind():
            return 0  # another one serves
    except (OSError, KeyfenceError) as err:
        print(f"kfctl_warm: {err}", file=sys.stderr)
        return 1
    os.chdir("/")  # the first caller's directory is not held busy (each call's is sent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
