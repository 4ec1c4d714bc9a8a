"""The daemon's event loop: one thread, epoll, non-blocking sockets.

Why this shape.  The key service is synchronous and a removal may wait a
long time for its watchers, so the daemon cannot be one loop alone; but a
thread per connection (and a shared pool for waiting requests) let one uid
park every thread: nine connections queueing slow removals of their own
key and never reading their replies stalled root's emergency wipe.  Here:

1. One thread (this loop) owns every socket: it accepts, reads, parses,
   answers every request that cannot wait (most of them: reads, searches,
   describes, watches, acks, and every emergency removal, which the key
   service applies without waiting), and writes what clients have not
   read yet.  Nothing it runs blocks: sends are non-blocking with a
   bounded per-connection queue (keyfence.server.connection).
2. A request that may wait goes to its uid's lane (keyfence.server.lanes):
   a bounded number of threads per uid, the rest queued as state.  A uid
   can only delay its own requests.
3. What one uid may hold is bounded (keyfence.server.limits): connections,
   requests in flight, watches, unread bytes; a connection that has not
   said hello within HANDSHAKE_SECONDS is closed.

Threads other than the loop talk to it through :meth:`Loop.wake_for` (a
connection has output waiting or closed) and :meth:`Loop.adopt` (a mount
worker's channel), both of which write an eventfd.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from keyfence import protocol, wire
from keyfence.keys.secret import wipe_bytes
from keyfence.server import limits
from keyfence.server.connection import CLOSE_MARKER, RECV_BYTES, Connection
from keyfence.server.lanes import handler_lane
from keyfence.server.optable import OPERATIONS

if TYPE_CHECKING:
    from keyfence.server.internal import DaemonParts

log = logging.getLogger("keyfence.daemon")

ACCEPT_PAUSE_SECONDS = 0.1
"""Out of file descriptors: stop accepting for this long (not a busy loop)."""

FRAMES_PER_UID_TURN = 32
"""Messages the loop takes from one uid's connections together in one
turn (each connection's own share is connection.FRAMES_PER_TURN): a uid
pipelining from many connections gets a turn's share, not one per
connection, so another's request waits for at most a few dozen of theirs.
A connection past it is read at a later turn (it stays readable)."""

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class Loop:
    def __init__(self, daemon: DaemonParts, listener: socket.socket) -> None:
        self.daemon = daemon
        self.listener = listener
        listener.setblocking(False)
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._listen_fd: int | None = listener.fileno()
        self._epoll.register(self._listen_fd, _IN)
        self._accept_paused_until = 0.0
        self._scratch = memoryview(bytearray(RECV_BYTES))
        self._conns: dict[int, Connection] = {}
        self._interest: dict[int, int] = {}
        self._handshakes: deque[Connection] = deque()
        self._backlog: set[Connection] = set()
        """Connections with buffered messages left after their turn."""
        self._lock = threading.Lock()
        self._dirty: set[Connection] = set()
        self._adopted: list[Connection] = []
        self._ident = 0
        self._stopping = False
        self._finished = False

    # -- from any thread

    def wake_for(self, conn: Connection) -> None:
        """Look at ``conn`` again: output waits, or it closed."""
        with self._lock:
            self._dirty.add(conn)
        if threading.get_ident() != self._ident:
            self._wake()

    def adopt(self, conn: Connection) -> None:
        with self._lock:
            self._adopted.append(conn)
        self._wake()

    def stop(self) -> None:
        """Begin the shutdown (a signal handler may call this)."""
        self._stopping = True
        self._wake()

    def finish(self) -> None:
        """End the loop (after the shutdown's unmounts)."""
        self._finished = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def connections(self) -> int:
        return len(self._conns)

    # -- the loop

    def run(self) -> None:
        self._ident = threading.get_ident()
        stop_seen = False
        while not self._finished:
            if self._stopping and not stop_seen:
                stop_seen = True
                self._stop_listening()
                self.daemon.begin_shutdown()
            touched = []
            taken: dict[int, int] = {}  # this turn's messages, by uid
            backlog, self._backlog = self._backlog, set()
            for waiting in backlog:
                if waiting.closed:
                    continue
                if not waiting.reading_paused and taken.get(waiting.uid, 0) < FRAMES_PER_UID_TURN:
                    self._serve(waiting, select.EPOLLIN, taken)
                    touched.append(waiting)
                else:
                    self._backlog.add(waiting)  # its turn comes when it reads, or next
            for fd, mask in self._epoll.poll(self._timeout()):
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                elif fd == self._listen_fd:
                    self._accept_all()
                else:
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue
                    if mask & ~_OUT and taken.get(conn.uid, 0) >= FRAMES_PER_UID_TURN:
                        # its uid had this turn's share: read at a later turn
                        # (epoll says so again; buffered messages, the backlog)
                        if conn.has_backlog():
                            self._backlog.add(conn)
                        mask &= _OUT
                        if not mask:
                            continue
                    self._serve(conn, mask, taken)
                    touched.append(conn)
            self._settle(touched)
            self._expire_handshakes()
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                if self._listen_fd is not None:
                    self._epoll.register(self._listen_fd, _IN)
        for conn in list(self._conns.values()):
            conn.close()
        self._settle([])
        self._epoll.close()
        os.close(self._wake_fd)

    def _serve(self, conn: Connection, mask: int, taken: dict[int, int]) -> None:
        """One turn of ``conn`` (``taken``: the messages taken this turn, by
        uid); a bug here costs that connection, not the loop."""
        try:
            if mask & _OUT:
                conn.flush()
            if mask & ~_OUT:
                taken[conn.uid] = taken.get(conn.uid, 0) + self._readable(conn)
        except Exception:
            log.exception("serving pid %d failed: connection closed", conn.caller.pid)
            conn.close()

    def _timeout(self) -> float | None:
        if any(not c.reading_paused for c in self._backlog):
            return 0.0
        deadlines = []
        if self._handshakes:
            deadlines.append(self._handshakes[0].deadline)
        if self._accept_paused_until:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _settle(self, touched: list[Connection]) -> None:
        """Bring each touched connection's registration up to date."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            adopted, self._adopted = self._adopted, []
        dirty.update(touched)
        for conn in adopted:
            self.register(conn, handshake=False)
        for conn in dirty:
            fd = conn.fd
            if self._conns.get(fd) is not conn:
                continue  # dropped already (its descriptor may be another's now)
            if conn.closed:
                self._drop(conn)
                continue
            want = (0 if conn.reading_paused else _IN) | (_OUT if conn.out else 0)
            if want != self._interest[fd]:
                self._epoll.modify(fd, want)
                self._interest[fd] = want

    def register(self, conn: Connection, *, handshake: bool = True) -> None:
        """Loop thread: serve ``conn`` from now on."""
        self._conns[conn.fd] = conn
        self._interest[conn.fd] = _IN
        self._epoll.register(conn.fd, _IN)
        if handshake:
            self._handshakes.append(conn)

    def _drop(self, conn: Connection) -> None:
        conn.flush()  # best effort: an error said just before closing
        conn.discard_buffers()
        del self._conns[conn.fd]
        del self._interest[conn.fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(conn.fd)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()
        self.daemon.forget(conn)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        while self._handshakes and (
            self._handshakes[0].greeted
            or self._handshakes[0].closed
            or self._handshakes[0].deadline <= now
        ):
            conn = self._handshakes.popleft()
            if not conn.greeted and not conn.closed:
                log.info("pid %d did not say hello in time: closed", conn.caller.pid)
                conn.close()
                self._drop(conn)

    # -- accepting

    def _accept_all(self) -> None:
        while self._listen_fd is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept (%s): pausing", os.strerror(err.errno))
                    self._epoll.unregister(self._listen_fd)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                return
            try:
                conn = self.daemon.accept(sock)
            except Exception:
                log.exception("could not accept a connection")
                sock.close()
                continue
            if conn is not None:
                self.register(conn)

    def _stop_listening(self) -> None:
        if self._listen_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                if not self._accept_paused_until:
                    self._epoll.unregister(self._listen_fd)
            self._listen_fd = None
            with contextlib.suppress(OSError):
                self.listener.close()

    # -- reading and dispatching

    def _readable(self, conn: Connection) -> int:
        """Take this turn's messages of ``conn``; how many."""
        bodies = conn.receive(self._scratch)
        if bodies is None:
            conn.close()
            return 0
        for body in bodies:
            if conn.closed:
                return len(bodies)
            if body is CLOSE_MARKER:  # a framing error was reported
                conn.close()
                return len(bodies)
            self._message(conn, body)
        if conn.has_backlog() and not conn.closed:
            self._backlog.add(conn)
        return len(bodies)

    def _message(self, conn: Connection, body: bytearray) -> None:
        try:
            message = protocol.decode(body)
        except protocol.ProtocolError as err:
            if not conn.greeted:
                conn.send(protocol.Error(id=0, errno=errno.EPROTO, message=str(err)))
                conn.close()
            elif conn.protocol_error(err):
                conn.close()
            return
        finally:
            wire.zero(body)  # decoded (or refused): the message has its own copies
        if not conn.greeted:
            if not conn.welcome(message):
                conn.close()
            return
        if isinstance(message, protocol.Request):
            self._dispatch(conn, message)
        elif isinstance(message, protocol.Ack):
            conn.acknowledge(message)
        elif isinstance(message, protocol.Progress):
            conn.progress(message)
        else:
            conn.bad += 1
            kind = type(message).__name__
            conn.send(protocol.Error(id=0, errno=errno.EPROTO, message=f"unexpected {kind}"))
            if conn.bad > limits.MAX_BAD_FRAMES:
                conn.close()

    def _dispatch(self, conn: Connection, request: protocol.Request) -> None:
        def refuse(code: int, text: str) -> None:
            # a refused request is dropped: its bytes (a payload, maybe in
            # the wrong place or for an unknown operation) are zeroed first
            for arg in request.args:
                wipe_bytes(arg)
            conn.send(protocol.Error(id=request.id, errno=code, message=text))

        op = OPERATIONS.get(request.op)
        if op is None:
            return refuse(errno.EOPNOTSUPP, f"unknown operation {request.op!r}")
        if op.worker_only and conn.mount is None:
            return refuse(errno.EPERM, f"{op.name} is for mount workers only")
        try:
            op.check(request)
        except OSError as err:
            return refuse(err.errno or errno.EINVAL, str(err))
        if not op.waits(request) and conn.run(
            op.handler,
            request,
            counted=False,
            may_wait=False,
            payload_args=op.payload_args,
            payload_reply=op.payload_reply,
        ):
            return None  # done before the next message is read: no in-flight place needed
        # it may wait (its row says so, or it met a key under construction,
        # whose wait here would stop every client: the handler too)
        with conn.lock:
            busy = conn.inflight >= limits.MAX_INFLIGHT
            if not busy:
                conn.inflight += 1
        if busy:
            text = f"too many requests in flight on this connection (limit {limits.MAX_INFLIGHT})"
            return refuse(errno.EBUSY, text)
        uid_limits = self.daemon.limits
        if not uid_limits.try_take("inflight", conn.uid):
            with conn.lock:
                conn.inflight -= 1
            bound = uid_limits.bound("inflight")
            return refuse(
                errno.EBUSY, f"too many requests in flight for uid {conn.uid} (limit {bound})"
            )
        lane = conn.uid
        if self.daemon.service.acts_for_construction(conn.caller):
            # not behind its uid's requests, which may be waiting for the
            # key this handler makes (server/lanes.py)
            lane = handler_lane(conn.uid)
        self.daemon.lanes.submit(
            lane,
            functools.partial(
                conn.run,
                op.handler,
                request,
                payload_args=op.payload_args,
                payload_reply=op.payload_reply,
            ),
        )
        return None
