"""One client connection: its socket, buffers, watches and pending acks.

Concurrency contract.  The event loop thread (keyfence.server.loop) alone
reads the socket, parses frames, registers and closes it.  Any thread may
send: :meth:`Connection.send` encodes the frame and writes what the socket
takes at once without blocking (``MSG_DONTWAIT`` semantics: the socket is
non-blocking); the rest waits in the output queue, which the loop drains
when the socket is writable.  A client that lets more than
:data:`~keyfence.server.limits.OUTPUT_LIMIT_BYTES` pile up is disconnected:
nothing ever waits for a client to read.

Lock rule: ``lock`` guards the output queue, the watch and ack tables and
the counters; nothing under it calls the key service or the loop's
selector (the loop is told through :meth:`Loop.wake_for`).  Lock order:
service lock, then a connection's lock.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keyfence import protocol, wire
from keyfence.keys.caller import Caller
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.fence import RemovalProgress
from keyfence.keys.notify import KeyEvent, Notification, Phase, Watch
from keyfence.keys.secret import wipe_bytes
from keyfence.keys.waits import MustWait, interrupted_when, refusing_waits
from keyfence.server import limits
from keyfence.server.sessions import is_thread_of

if TYPE_CHECKING:
    from keyfence.server.internal import DaemonParts
    from keyfence.server.mounts import SupervisedMount

log = logging.getLogger("keyfence.daemon")

SERVER_NAME = "keyfence 0.1.0"
RECV_BYTES = 256 * 1024
_ZEROS = memoryview(bytes(RECV_BYTES))
FRAMES_PER_TURN = 16
MAX_STATUS_PENDING = 64
"""Pending watchers a status names (the first ones): a removal held by
thousands still fits one frame."""
CLOSE_MARKER = bytearray()
"""What :meth:`Connection.receive` puts after a framing error it answered:
the loop closes the connection there (an empty frame is not this object)."""
"""Messages the loop takes from one connection before serving the next: a
client pipelining thousands of cheap requests gets turns, not the loop."""


class _AckWaiter:
    __slots__ = ("done", "errno", "message", "note")

    def __init__(self, note: Notification) -> None:
        self.done = threading.Event()
        self.errno = 0
        self.message = ""
        self.note = note


class RemoteWatcher:
    """The callback behind a client's watch: forwards notifications, and for
    a synchronous BEFORE waits for the client's Ack (a closed connection
    counts as done).  Runs on the key service's fence threads."""

    def __init__(self, conn: Connection, watch_id: int) -> None:
        self.conn = conn
        self.watch_id = watch_id
        self.fence_group = conn  # one fence thread per connection, not per watch

    def __call__(self, note: Notification) -> None:
        conn = self.conn
        ack = note.phase is Phase.BEFORE
        waiter = _AckWaiter(note) if ack else None
        with conn.lock:
            if conn.closed:
                return
            seq = next(conn.seqs)
            if waiter is not None:
                conn.acks[seq] = waiter
        # who acted, only to root and to the actor itself: the kernel's
        # notification names nobody, and another watcher (a key's "other"
        # view suffices) would learn who touched the key, and when
        told = conn.uid in (0, note.uid)
        conn.send(
            protocol.Event(
                watch=self.watch_id,
                seq=seq,
                key=note.key,
                event=note.event.label,
                aux=note.aux,
                op=note.op,
                uid=note.uid if told else None,
                pid=note.pid if told else None,
                phase=note.phase.value,
                emergency=note.emergency,
                removal=note.removal,
                description=note.description,
                ack=ack,
            )
        )
        if waiter is None:
            return
        waiter.done.wait()  # set by the Ack, or by close()
        if waiter.errno:
            raise OSError(waiter.errno, waiter.message or errno.errorcode.get(waiter.errno, ""))


def _wipe_payloads(value: object) -> None:
    """Zero the ``bytes`` in an answer that carried a payload (read's
    bytes; worker_find_key's ``[serial, description, payload]``)."""
    if isinstance(value, list):
        for item in value:
            _wipe_payloads(item)
    else:
        wipe_bytes(value)


class Connection:
    def __init__(
        self,
        daemon: DaemonParts,
        sock: socket.socket,
        caller: Caller,
        sid: int,
        *,
        mount: SupervisedMount | None = None,
    ) -> None:
        self.daemon = daemon
        self.sock = sock
        self.fd = sock.fileno()
        self.caller = caller
        self.uid = caller.uid
        self.sid = sid
        self.mount = mount
        """Set for a mount worker's private channel: the only connection
        that may read a logon key's payload (worker_find_key)."""
        self.lock = threading.Lock()
        self.closed = False
        self.greeted = False
        self.deadline = time.monotonic() + limits.HANDSHAKE_SECONDS
        self.inflight = 0
        self.watches: dict[int, Watch] = {}
        self.acks: dict[int, _AckWaiter] = {}
        self.seqs = itertools.count(1)
        self.watch_ids = itertools.count(1)
        self.inbuf = wire.ReceiveBuffer()
        """What the client sent that is not a whole message yet."""
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.bad = 0
        sock.setblocking(False)

    # -- output (any thread)

    def send(self, message: protocol.Message, *, room: int = 0) -> None:
        """Send a message without waiting for the client to read it.

        ``room``: the bytes a message carrying a secret needs
        (:func:`protocol.room_for`), so that its frame is encoded in one
        buffer, never reallocated (keyfence.protocol.encode).
        """
        try:
            frame = protocol.encode(message, room=room)
        except ValueError as err:
            if not isinstance(message, protocol.Reply):
                # a status or an event is not the request's answer: an
                # E2BIG under the request's id would end it early
                log.warning("dropped a %s too large for a frame", type(message).__name__)
                return
            frame = protocol.encode(
                protocol.Error(id=message.id, errno=errno.E2BIG, message=str(err))
            )
        self.send_frame(frame)

    def send_frame(self, frame: bytearray) -> None:
        """Queue ``frame`` (ours from now on: zeroed once sent or dropped,
        as it may carry a key's payload)."""
        overflow = ""
        with self.lock:
            if self.closed:
                wire.zero(frame)
                return
            pending = memoryview(frame)
            if not self.out:
                try:
                    sent = self.sock.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = -1
                if sent == len(frame):
                    wire.zero(frame)
                    return
                if sent < 0:
                    overflow = "gone"  # the peer is gone: close below
                pending = pending[max(sent, 0) :]
            if not overflow:
                size = len(pending) + limits.QUEUED_FRAME_BYTES
                if self.out_bytes + size > limits.OUTPUT_LIMIT_BYTES:
                    overflow = "this connection"
                elif not self.daemon.limits.try_take("output", self.uid, size):
                    overflow = f"uid {self.uid}'s connections"
                else:
                    self.out.append(pending)
                    self.out_bytes += size
            if overflow:
                wire.zero(frame)
        if overflow:
            if overflow != "gone":
                log.warning(
                    "pid %d does not read its socket (%s past the bound): dropping it",
                    self.caller.pid,
                    overflow,
                )
            self.close()
        else:
            self.daemon.loop.wake_for(self)

    def flush(self) -> bool:
        """Loop thread: write what the socket takes; True when all is out."""
        drained = 0
        try:
            with self.lock:
                while self.out:
                    head = self.out[0]
                    try:
                        sent = self.sock.send(head)
                    except BlockingIOError:
                        return False
                    except OSError:
                        drained += self.out_bytes
                        self._drop_output()
                        return True  # the reader will see the end of the stream
                    self.out_bytes -= sent
                    drained += sent
                    if sent == len(head):
                        self.out.popleft()
                        self.out_bytes -= limits.QUEUED_FRAME_BYTES
                        drained += limits.QUEUED_FRAME_BYTES
                        wire.zero(head.obj)  # type: ignore[arg-type] # a frame of send_frame's
                    else:
                        self.out[0] = head[sent:]
                return True
        finally:
            if drained:
                self.daemon.limits.give_back("output", self.uid, drained)

    def discard_buffers(self) -> None:
        """Loop thread, closing: partial input is dropped (zeroed)."""
        if self.inbuf:
            self.daemon.limits.give_back("input", self.uid, len(self.inbuf))
            self.inbuf.clear()
        self.discard_output()

    def discard_output(self) -> None:
        """Loop thread, closing: what is still queued is dropped (zeroed)."""
        with self.lock:
            dropped = self.out_bytes
            self._drop_output()
        if dropped:
            self.daemon.limits.give_back("output", self.uid, dropped)

    def _drop_output(self) -> None:
        """Under the lock: the queued frames are zeroed and dropped."""
        for pending in self.out:
            wire.zero(pending.obj)  # type: ignore[arg-type] # a frame of send_frame's
        self.out.clear()
        self.out_bytes = 0

    @property
    def reading_paused(self) -> bool:
        """Too many replies not read yet: take no more requests for now."""
        return self.out_bytes > limits.OUTPUT_PAUSE_BYTES

    # -- input (loop thread)

    def receive(self, scratch: memoryview) -> list[bytearray] | None:
        """Read what the socket has (through the loop's ``scratch`` buffer:
        a fresh 256 KiB bytes per recv costs an mmap and munmap) and take
        this turn's messages; None at the end of the stream (or after a
        framing error, already reported).

        Neither buffer keeps a copy of what passed through it (a payload may
        be a key): ``scratch`` is zeroed after each receive, the consumed
        part of ``inbuf`` before it is dropped.
        """
        held = len(self.inbuf)
        bodies = self._receive(scratch)
        grown = len(self.inbuf) - held
        if grown > 0 and not self.daemon.limits.try_take("input", self.uid, grown):
            text = f"too much buffered input for uid {self.uid}"
            self.send(protocol.Error(id=0, errno=errno.ENOBUFS, message=text))
            self.daemon.limits.give_back("input", self.uid, held)
            self.inbuf.clear()
            return None
        if grown < 0:
            self.daemon.limits.give_back("input", self.uid, -grown)
        return bodies

    def _receive(self, scratch: memoryview) -> list[bytearray] | None:
        if self.has_backlog():
            bodies, used, error = wire.split_frames(self.inbuf.view(), FRAMES_PER_TURN)
            self.inbuf.take(used)
        else:
            try:
                size = self.sock.recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                return []
            except OSError:
                return None
            if not size:
                return None
            if self.inbuf:
                self.inbuf.append(scratch[:size])
                scratch[:size] = _ZEROS[:size]
                bodies, used, error = wire.split_frames(self.inbuf.view(), FRAMES_PER_TURN)
                self.inbuf.take(used)
            else:  # the usual case: whole messages straight from scratch
                bodies, used, error = wire.split_frames(scratch[:size], FRAMES_PER_TURN)
                if used < size:  # a partial message (or a bad header: next turn)
                    self.inbuf.append(scratch[used:size])
                scratch[:size] = _ZEROS[:size]
        if error is not None and not bodies:
            # the stream can no longer be trusted: answer, then close (the
            # messages before the bad header were served in earlier turns)
            self.send(protocol.Error(id=0, errno=errno.EMSGSIZE, message=str(error)))
            self.inbuf.clear()
            bodies.append(CLOSE_MARKER)  # the loop closes here
        return bodies

    def has_backlog(self) -> bool:
        """Whether a complete message is already buffered (the next turn
        needs no recv, and epoll will not say so)."""
        buffer = self.inbuf.view()
        if len(buffer) < wire.HEADER_SIZE:
            return False
        try:
            return len(buffer) >= wire.HEADER_SIZE + wire.body_size(buffer)
        except wire.WireError:
            return True  # a bad header: the next turn reports it

    def welcome(self, first: protocol.Message) -> bool:
        """Answer the first message; False if the connection must close."""
        if not isinstance(first, protocol.Hello):
            self.send(protocol.Error(id=0, errno=errno.EPROTO, message="expected hello"))
            return False
        if first.version != protocol.PROTOCOL_VERSION:
            text = f"protocol version {first.version} not supported (server speaks 1)"
            self.send(protocol.Error(id=0, errno=errno.EPROTONOSUPPORT, message=text))
            return False
        self.greeted = True
        caller = self.caller
        self.send(
            protocol.Welcome(
                version=protocol.PROTOCOL_VERSION,
                server=SERVER_NAME,
                pid=caller.pid,
                uid=caller.uid,
                gid=caller.gid,
                session=self.sid,
            )
        )
        return True

    def protocol_error(self, err: protocol.ProtocolError) -> bool:
        """Report a bad message; True if the connection must close."""
        self.bad += 1
        self.send(protocol.Error(id=0, errno=errno.EBADMSG, message=str(err)))
        return err.fatal or self.bad > limits.MAX_BAD_FRAMES

    def acknowledge(self, message: protocol.Ack) -> None:
        with self.lock:
            waiter = self.acks.pop(message.seq, None)
        if waiter is not None:
            # a refusal must carry a real errno; anything else is ECANCELED
            code = message.errno
            waiter.errno = code if 0 <= code < 4096 else errno.ECANCELED
            waiter.message = message.message  # made printable where it is shown (keys/fence.py)
            waiter.done.set()

    def progress(self, message: protocol.Progress) -> None:
        with self.lock:
            waiter = self.acks.get(message.seq)
        if waiter is not None:
            waiter.note.report_progress(message.remaining_bytes, message.note)

    # -- requests (loop thread or a lane thread)

    def run(
        self,
        op: Callable[[Connection, protocol.Request], Any],
        request: protocol.Request,
        *,
        counted: bool = True,
        may_wait: bool = True,
        payload_args: tuple[int, ...] = (),
        payload_reply: bool = False,
    ) -> bool:
        """Run one checked request and send its answer; ``counted``: it holds
        one of the connection's and the uid's in-flight places.

        ``may_wait`` False (the event loop): a call that would wait for the
        key service (a key under construction, keys/waits.py) is not done:
        nothing is sent, the request is left intact (its payload too) and
        False is returned, for the caller to run it on a lane thread.

        ``payload_args``, ``payload_reply`` (the operation's row): where a
        key's payload is, in the request or the answer.  The request's
        decoded copy is zeroed once the call is done, the answer's once it
        is encoded, and the answer is encoded in one buffer
        (:func:`protocol.encode`): no copy of a payload is freed unzeroed.
        """
        deferred = False
        try:
            waits = interrupted_when(self.is_closed) if may_wait else refusing_waits()
            with waits:
                value = op(self, request)
            reply: protocol.Message = protocol.Reply(id=request.id, value=value)
        except MustWait:
            deferred = True
        except KeyfenceError as err:
            reply = protocol.Error(id=request.id, errno=err.errno or errno.EIO, message=str(err))
        except OSError as err:
            code = err.errno or errno.EIO
            reply = protocol.Error(id=request.id, errno=code, message=err.strerror or str(err))
        except Exception:
            log.exception("request %s from pid %d failed", request.op, self.caller.pid)
            reply = protocol.Error(id=request.id, errno=errno.EIO, message="internal error")
        finally:
            if not deferred:
                for index in payload_args:
                    wipe_bytes(request.args[index])
            if counted:
                with self.lock:
                    self.inflight -= 1
                self.daemon.limits.give_back("inflight", self.uid)
        if deferred:
            return False
        if payload_reply and isinstance(reply, protocol.Reply):
            self.send(reply, room=protocol.room_for(reply.value))
            _wipe_payloads(reply.value)
        else:
            self.send(reply)
        return True

    def caller_for(self, request: protocol.Request) -> Caller:
        """The caller as the thread that sent ``request``: a thread other
        than the main one has its own ``@t``, as the kernel's credentials
        are per thread.  Only a thread of the connected process counts
        (ESRCH otherwise: the thread has gone, or was never its)."""
        tid = request.tid
        caller = self.caller
        if not tid or tid == caller.pid:
            return caller
        if not is_thread_of(caller.pid, tid):
            raise KeyfenceError(errno.ESRCH, f"thread {tid} is not one of the calling process's")
        return dataclasses.replace(caller, tid=tid)

    def watch(self, key_id: int, mask: KeyEvent, sync: bool, name: str | None) -> int:
        with self.lock:
            if len(self.watches) >= limits.MAX_WATCHES:
                raise KeyfenceError(
                    errno.EMFILE,
                    f"too many watches on this connection (limit {limits.MAX_WATCHES})",
                )
            watch_id = next(self.watch_ids)
        uid_limits = self.daemon.limits
        if not uid_limits.try_take("watches", self.uid):
            bound = uid_limits.bound("watches")
            raise KeyfenceError(
                errno.EMFILE, f"too many watches for uid {self.uid} (limit {bound})"
            )
        caller = self.caller
        if self.mount is not None:  # a mount watches with the rights it found the key with
            caller = self.daemon.mounts.watcher(self.mount, key_id) or caller
        try:
            watch = self.daemon.service.watch(
                caller,
                key_id,
                RemoteWatcher(self, watch_id),
                mask,
                sync=sync,
                name=name or f"pid {self.caller.pid}",
            )
        except BaseException:
            uid_limits.give_back("watches", self.uid)
            raise
        with self.lock:
            if not self.closed:
                self.watches[watch_id] = watch
                return watch_id
        watch.remove()
        uid_limits.give_back("watches", self.uid)
        raise KeyfenceError(errno.ENOTCONN, "the connection closed")

    def unwatch(self, watch_id: int) -> None:
        with self.lock:
            watch = self.watches.pop(watch_id, None)
        if watch is None:
            raise KeyfenceError(errno.ENOENT, f"no watch {watch_id}")
        watch.remove()
        self.daemon.limits.give_back("watches", self.uid)

    def progress_sender(self, request_id: int) -> Callable[[RemovalProgress], None]:
        """At most 20 Status messages a second; the latest one is never lost."""
        state: dict[str, Any] = {"last": 0.0, "held": None, "timer": None}
        lock = threading.Lock()

        def emit(progress: RemovalProgress) -> None:
            pending = [
                protocol.Pending(p.watcher, p.key, p.remaining_bytes, p.note)
                for p in progress.pending[:MAX_STATUS_PENDING]
            ]
            self.send(
                protocol.Status(
                    id=request_id,
                    op=progress.op,
                    removal=progress.removal,
                    keys=progress.keys,
                    elapsed=progress.elapsed,
                    pending=pending,
                )
            )

        def flush_held() -> None:
            with lock:
                held, state["held"], state["timer"] = state["held"], None, None
                state["last"] = time.monotonic()
            if held is not None:
                emit(held)

        def send(progress: RemovalProgress) -> None:
            with lock:
                wait = state["last"] + 0.05 - time.monotonic()
                if wait > 0:
                    state["held"] = progress
                    if state["timer"] is None:
                        timer = threading.Timer(wait, flush_held)
                        timer.daemon = True
                        timer.start()
                        state["timer"] = timer
                    return
                state["last"] = time.monotonic()
            emit(progress)

        return send

    # -- the end (any thread)

    def is_closed(self) -> bool:
        """The client has gone: a request of its still waiting in the key
        service ends with EINTR (keys/waits.py)."""
        return self.closed

    def close(self) -> None:
        """Drop the connection: its watches end (a pending fence call on one
        counts as done), and the loop closes the socket."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            watches = list(self.watches.values())
            self.watches.clear()
            waiters = list(self.acks.values())
            self.acks.clear()
        for watch in watches:
            watch.remove()
        if watches:
            self.daemon.limits.give_back("watches", self.uid, len(watches))
        for waiter in waiters:
            waiter.done.set()
        self.daemon.service.interrupt_waits()  # a request of ours may be waiting
        self.daemon.loop.wake_for(self)
