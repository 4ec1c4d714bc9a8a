"""The daemon: one KeyService shared by every process of the machine.

Threads, not an event loop: the service is synchronous and a removal may
wait a long time for its watchers, so each request runs on a pool thread
while each connection has a reader (requests, acks) and a writer (replies,
events) of its own.  Nothing a client sends can stop the daemon: a bad
frame gets an Error (and, when the stream can no longer be trusted, a
closed connection); limits per connection bound what one client can hold.

Lock order: service lock, then a connection's own lock; a connection never
calls into the service with its lock held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keyfence import protocol
from keyfence.keys import KeyService
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.fence import RemovalProgress
from keyfence.keys.notify import KeyEvent, Notification, Phase, Watch
from keyfence.keys.process_keys import Caller
from keyfence.server import identity
from keyfence.server.mounts import Mount, MountSupervisor

log = logging.getLogger("keyfence.daemon")

MAX_INFLIGHT = 32
"""Requests one connection may have running at once (EBUSY beyond)."""
MAX_WATCHES = 4096
"""Watches one connection may hold (ENOSPC... EMFILE beyond)."""
MAX_QUEUED_FRAMES = 65536
"""Frames queued for a client that does not read; past this it is dropped."""
MAX_BAD_FRAMES = 16
"""Malformed messages tolerated on one connection before it is closed."""
MONITOR_INTERVAL = 0.25

SERVER_NAME = "keyfence 0.1.0"


class DaemonRunning(RuntimeError):
    """Another daemon already serves this socket."""


# -- the operations a client may call: name -> (argument types, removal?)

_INT = (int,)
_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_BYTES = (bytes, type(None))
_BOOL = (bool,)
_LIST = (list,)
_ANY = (object,)

OPS: dict[str, tuple[tuple[tuple[type, ...], ...], bool]] = {
    "add_key": ((_STR, _OPT_STR, _OPT_BYTES, _INT), False),
    "request_key": ((_STR, _STR, _OPT_STR, _INT), False),
    "get_keyring_id": ((_INT, _BOOL), False),
    "join_session_keyring": ((_OPT_STR,), False),
    "session_to_parent": ((), True),
    "update": ((_INT, _OPT_BYTES), False),
    "revoke": ((_INT,), True),
    "chown": ((_INT, _INT, _INT), False),
    "setperm": ((_INT, _INT), False),
    "describe": ((_INT,), False),
    "clear": ((_INT,), True),
    "link": ((_INT, _INT), False),
    "unlink": ((_INT, _INT), True),
    "search": ((_INT, _STR, _STR, _INT), False),
    "read": ((_INT,), False),
    "list_keyring": ((_INT,), False),
    "set_timeout": ((_INT, _INT), False),
    "invalidate": ((_INT,), True),
    "move": ((_INT, _INT, _INT, _INT), True),
    "get_security": ((_INT,), False),
}


INLINE_OPS = frozenset(
    {
        "describe",
        "read",
        "list_keyring",
        "get_keyring_id",
        "get_security",
        "update",
        "setperm",
        "chown",
        "set_timeout",
        "key_users",
        "ping",
        "watch",
        "unwatch",
        "mounts",
        "worker_report",
    }
)
"""Operations that never wait for a removal's watchers: run on the reader."""


_MOUNT_OPS = frozenset({"mount", "umount", "mounts", "worker_find_key", "worker_report"})


def _check_args(op: str, args: list[Any], types: tuple[tuple[type, ...], ...]) -> None:
    if len(args) != len(types):
        raise KeyfenceError(errno.EINVAL, f"{op} takes {len(types)} arguments, not {len(args)}")
    for index, (value, allowed) in enumerate(zip(args, types, strict=True)):
        # bool is an int in Python; keep them apart on the wire
        if allowed is not _ANY and type(value) not in allowed:
            names = "/".join(t.__name__ for t in allowed)
            raise KeyfenceError(errno.EINVAL, f"{op}: argument {index + 1} must be {names}")


class _AckWaiter:
    __slots__ = ("done", "errno", "message", "note")

    def __init__(self, note: Notification) -> None:
        self.done = threading.Event()
        self.errno = 0
        self.message = ""
        self.note = note


class RemoteWatcher:
    """The callback behind a client's watch: forwards notifications, and for
    a synchronous BEFORE waits for the client's Ack (a dropped connection
    counts as done)."""

    def __init__(self, conn: Connection, watch_id: int) -> None:
        self.conn = conn
        self.watch_id = watch_id
        self.fence_group = conn  # one fence thread per connection, not per watch

    def __call__(self, note: Notification) -> None:
        conn = self.conn
        seq = next(conn.seqs)
        event = protocol.Event(
            watch=self.watch_id,
            seq=seq,
            key=note.key,
            event=note.event.label,
            aux=note.aux,
            op=note.op,
            uid=note.uid,
            pid=note.pid,
            phase=note.phase.value,
            emergency=note.emergency,
            removal=note.removal,
            description=note.description,
            ack=note.phase is Phase.BEFORE,
        )
        if note.phase is not Phase.BEFORE:
            conn.send(event)
            return
        waiter = _AckWaiter(note)
        with conn.lock:
            if conn.closed.is_set():
                return
            conn.acks[seq] = waiter
        conn.send(event)
        while not waiter.done.wait(0.1):
            if conn.closed.is_set():
                return  # the watcher is gone: counts as done
        if waiter.errno:
            raise OSError(waiter.errno, waiter.message or os.strerror(waiter.errno))


class Connection:
    def __init__(self, daemon: Daemon, sock: socket.socket, caller: Caller, sid: int) -> None:
        self.daemon = daemon
        self.sock = sock
        self.caller = caller
        self.sid = sid
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.inflight = 0
        self.watches: dict[int, Watch] = {}
        self.acks: dict[int, _AckWaiter] = {}
        self.seqs = itertools.count(1)
        self.watch_ids = itertools.count(1)
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._send_lock = threading.Lock()
        self.mount: Mount | None = None
        """Set for a mount worker's private channel: the only connection
        that may read a logon key's payload (worker_find_key)."""
        self._bad = 0

    def start(self) -> None:
        name = f"keyfence-conn-{self.caller.pid}"
        threading.Thread(target=self._read_loop, name=name, daemon=True).start()
        threading.Thread(target=self._write_loop, name=name + "-w", daemon=True).start()

    # -- output

    def send(self, message: protocol.Message) -> None:
        """Queue a frame for the writer thread (events: never blocks the
        dispatcher on a client that does not read)."""
        if self.closed.is_set():
            return
        if self._out.qsize() > MAX_QUEUED_FRAMES:
            log.warning("pid %d does not read its socket: dropping it", self.caller.pid)
            self.close()
            return
        self._out.put(protocol.encode(message))

    def reply(self, message: protocol.Message) -> None:
        """Send a reply now, from the thread that ran the request."""
        if self.closed.is_set():
            return
        try:
            frame = protocol.encode(message)
        except ValueError as err:  # a reply too large for a frame
            frame = protocol.encode(
                protocol.Error(id=getattr(message, "id", 0), errno=errno.E2BIG, message=str(err))
            )
        try:
            with self._send_lock:
                self.sock.sendall(frame)
        except OSError:
            self.close()

    def _write_loop(self) -> None:
        while True:
            frame = self._out.get()
            if frame is None:
                return
            try:
                with self._send_lock:
                    self.sock.sendall(frame)
            except OSError:
                self.close()
                return

    # -- input

    def _read_loop(self) -> None:
        try:
            if self._handshake():
                while not self.closed.is_set():
                    try:
                        message = protocol.read_message(self.sock)
                    except protocol.ProtocolError as err:
                        if self._protocol_error(err):
                            break
                        continue
                    if message is None:
                        break
                    self._dispatch(message)
        except OSError:
            pass
        finally:
            self.close()

    def _handshake(self) -> bool:
        try:
            first = protocol.read_message(self.sock)
        except protocol.ProtocolError as err:
            self.reply(protocol.Error(id=0, errno=errno.EPROTO, message=str(err)))
            return False
        if not isinstance(first, protocol.Hello):
            self.reply(protocol.Error(id=0, errno=errno.EPROTO, message="expected hello"))
            return False
        if first.version != protocol.PROTOCOL_VERSION:
            message = f"protocol version {first.version} not supported (server speaks 1)"
            self.reply(protocol.Error(id=0, errno=errno.EPROTONOSUPPORT, message=message))
            return False
        caller = self.caller
        self.reply(
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

    def _protocol_error(self, err: protocol.ProtocolError) -> bool:
        """Report a bad frame; True if the connection must close."""
        self._bad += 1
        code = errno.EMSGSIZE if "exceeds" in str(err) else errno.EBADMSG
        self.reply(protocol.Error(id=0, errno=code, message=str(err)))
        return err.fatal or self._bad > MAX_BAD_FRAMES

    def _dispatch(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Request):
            with self.lock:
                busy = self.inflight >= MAX_INFLIGHT
                if not busy:
                    self.inflight += 1
            if busy:
                text = f"too many requests in flight on this connection (limit {MAX_INFLIGHT})"
                self.reply(protocol.Error(id=message.id, errno=errno.EBUSY, message=text))
                return
            if message.op in INLINE_OPS or (
                # a lookup without a destination keyring links nothing
                message.op in ("search", "request_key") and message.args[-1:] == [0]
            ):
                self._run(message)  # never waits on a fence: skip the thread hop
            else:
                self.daemon.pool.submit(self._run, message)
        elif isinstance(message, protocol.Ack):
            with self.lock:
                waiter = self.acks.pop(message.seq, None)
            if waiter is not None:
                # a refusal must carry a real errno; anything else is ECANCELED
                code = message.errno
                waiter.errno = code if 0 <= code < 4096 else errno.ECANCELED
                waiter.message = message.message
                waiter.done.set()
        elif isinstance(message, protocol.Progress):
            with self.lock:
                waiter = self.acks.get(message.seq)
            if waiter is not None:
                waiter.note.report_progress(message.remaining_bytes, message.note)
        else:
            self._bad += 1
            kind = type(message).__name__
            self.reply(protocol.Error(id=0, errno=errno.EPROTO, message=f"unexpected {kind}"))
            if self._bad > MAX_BAD_FRAMES:
                self.close()

    def _run(self, request: protocol.Request) -> None:
        try:
            value = self._execute(request)
            reply: protocol.Message = protocol.Reply(id=request.id, value=value)
        except KeyfenceError as err:
            reply = protocol.Error(id=request.id, errno=err.errno or errno.EIO, message=str(err))
        except OSError as err:
            code = err.errno or errno.EIO
            reply = protocol.Error(id=request.id, errno=code, message=err.strerror or str(err))
        except Exception:
            log.exception("request %s from pid %d failed", request.op, self.caller.pid)
            reply = protocol.Error(id=request.id, errno=errno.EIO, message="internal error")
        finally:
            with self.lock:
                self.inflight -= 1
        self.reply(reply)

    def _execute(self, request: protocol.Request) -> Any:
        svc = self.daemon.service
        op, args = request.op, request.args
        if op == "watch":
            return self._watch(args)
        if op == "unwatch":
            _check_args(op, args, (_INT,))
            with self.lock:
                watch = self.watches.pop(args[0], None)
            if watch is None:
                raise KeyfenceError(errno.ENOENT, f"no watch {args[0]}")
            watch.remove()
            return None
        if op == "key_users":
            _check_args(op, args, ())
            return [
                [u.uid, u.nkeys, u.qnkeys, u.qnbytes, u.maxkeys, u.maxbytes]
                for u in svc.key_users()
            ]
        if op == "ping":
            return "pong"
        if op in _MOUNT_OPS:
            return self._mount_op(op, args)
        if op == "lock_filesystem_key":
            return self._lock_filesystem_key(request, args)
        spec = OPS.get(op)
        if spec is None:
            raise KeyfenceError(errno.EOPNOTSUPP, f"unknown operation {op!r}")
        types, removal = spec
        _check_args(op, args, types)
        method: Callable[..., Any] = getattr(svc, op)
        if not removal:
            if request.timeout is not None or request.emergency or request.progress:
                raise KeyfenceError(errno.EINVAL, f"{op} is not a removal")
            return method(self.caller, *args)
        if request.timeout is not None and not request.timeout >= 0:
            raise KeyfenceError(errno.EINVAL, "timeout must be a number of seconds >= 0")
        progress = self._progress_sender(request.id) if request.progress else None
        return method(
            self.caller,
            *args,
            timeout=request.timeout,
            emergency=request.emergency,
            progress=progress,
        )

    def _lock_filesystem_key(self, request: protocol.Request, args: list[Any]) -> None:
        """``keyfence lock``: remove a key a mount uses, whoever possesses it
        (fscrypt's lock --all-users; the owner or root, see keyctl)."""
        _check_args("lock_filesystem_key", args, (_INT,))
        if request.timeout is not None and not request.timeout >= 0:
            raise KeyfenceError(errno.EINVAL, "timeout must be a number of seconds >= 0")
        progress = self._progress_sender(request.id) if request.progress else None
        self.daemon.service.invalidate_filesystem_key(
            self.caller,
            args[0],
            timeout=request.timeout,
            emergency=request.emergency,
            progress=progress,
        )

    def _mount_op(self, op: str, args: list[Any]) -> Any:
        mounts = self.daemon.mounts
        if op == "mount":
            _check_args(op, args, (_STR, _STR, _LIST))
            if not all(type(o) is str for o in args[2]):
                raise KeyfenceError(errno.EINVAL, "mount options must be strings")
            mounts.mount(self.caller, args[0], args[1], args[2])
            return None
        if op == "umount":
            _check_args(op, args, (_STR,))
            mounts.umount(self.caller, args[0])
            return None
        if op == "mounts":
            _check_args(op, args, ())
            return mounts.describe(self.caller)
        if self.mount is None:
            raise KeyfenceError(errno.EPERM, f"{op} is for mount workers only")
        if op == "worker_find_key":
            _check_args(op, args, (_INT, _LIST))
            if not all(type(d) is str for d in args[1]):
                raise KeyfenceError(errno.EINVAL, "descriptions must be strings")
            return mounts.find_key(self.mount, args[0], args[1])
        _check_args(op, args, (_STR, _ANY))
        mounts.report(self.mount, args[0], args[1])
        return None

    def _progress_sender(self, request_id: int) -> Callable[[RemovalProgress], None]:
        """At most 20 RemovalStatus a second; the latest one is never lost."""
        state: dict[str, Any] = {"last": 0.0, "held": None, "timer": None}
        lock = threading.Lock()

        def emit(progress: RemovalProgress) -> None:
            pending = [
                protocol.Pending(p.watcher, p.key, p.remaining_bytes, p.note)
                for p in progress.pending
            ]
            self.send(
                protocol.RemovalStatus(
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

    def _watch(self, args: list[Any]) -> int:
        _check_args("watch", args, (_INT, _INT, _BOOL, _OPT_STR))
        key_id, events, sync, name = args
        with self.lock:
            if len(self.watches) >= MAX_WATCHES:
                raise KeyfenceError(
                    errno.EMFILE, f"too many watches on this connection (limit {MAX_WATCHES})"
                )
            watch_id = next(self.watch_ids)
        mask = KeyEvent(events & KeyEvent.ALL) or KeyEvent.ALL
        label = name or f"pid {self.caller.pid}"
        caller = self.caller
        if self.mount is not None:  # a mount watches with the rights it found the key with
            caller = self.daemon.mounts.watcher(self.mount, key_id) or caller
        watch = self.daemon.service.watch(
            caller, key_id, RemoteWatcher(self, watch_id), mask, sync=sync, name=label
        )
        with self.lock:
            self.watches[watch_id] = watch
        return watch_id

    def close(self) -> None:
        with self.lock:
            if self.closed.is_set():
                return
            self.closed.set()
            watches = list(self.watches.values())
            self.watches.clear()
            waiters = list(self.acks.values())
            self.acks.clear()
        for watch in watches:
            watch.remove()  # a pending fence call on it now counts as done
        for waiter in waiters:
            waiter.done.set()
        self._out.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.daemon.forget(self)


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
        self.private_uid = private_uid
        self.sessions = identity.SessionRegistry()
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="keyfence-req")
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._lock_file: int | None = None
        self._ending: set[object] = set()
        self.mounts = MountSupervisor(self)

    # -- socket setup

    def bind(self) -> None:
        """Claim the socket; DaemonRunning if another daemon serves it."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700 if self.private_uid is not None else 0o755, exist_ok=True)
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonRunning(
                f"a keyfence daemon (pid {owner}) already serves {self.path}; "
                "stop it first or set KEYFENCE_SOCKET to another path"
            ) from None
        self._lock_file = fd
        self.record_pid()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # stale: its daemon no longer holds the lock
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600 if self.private_uid is not None else 0o666)
        listener.listen(128)
        self._listener = listener

    def record_pid(self) -> None:
        """Write our pid into the lock file (again after a fork)."""
        if self._lock_file is not None:
            os.ftruncate(self._lock_file, 0)
            os.pwrite(self._lock_file, f"{os.getpid()}\n".encode(), 0)

    # -- serving

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        threading.Thread(target=self._monitor, name="keyfence-lifetimes", daemon=True).start()
        log.info("serving %s", self.path)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    break
                continue
            try:
                self._accept(sock)
            except Exception:
                log.exception("could not accept a connection")
                sock.close()

    def _accept(self, sock: socket.socket) -> None:
        try:
            caller, info = identity.caller_of(
                sock, self.sessions, self.service, admin_uid=0 if self.private_uid is None else None
            )
        except KeyfenceError as err:
            with contextlib.suppress(OSError):
                sock.sendall(protocol.encode(protocol.Error(0, err.errno or errno.EIO, str(err))))
            sock.close()
            return
        if self.private_uid is not None and caller.uid != self.private_uid:
            message = f"this is uid {self.private_uid}'s private keyfence daemon"
            with contextlib.suppress(OSError):
                sock.sendall(protocol.encode(protocol.Error(0, errno.EACCES, message)))
            sock.close()
            return
        conn = Connection(self, sock, caller, info.session)
        with self._conns_lock:
            self._conns.add(conn)
        conn.start()

    def adopt(self, sock: socket.socket, caller: Caller, mount: Mount) -> None:
        """Serve a mount worker's private channel (made by us at spawn)."""
        conn = Connection(self, sock, caller, 0)
        conn.mount = mount
        with self._conns_lock:
            self._conns.add(conn)
        conn.start()

    def forget(self, conn: Connection) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

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
        (a session keyring ends with the last process holding it)."""
        for pid, start in self.sessions.gone(self.service):
            self._end(("process", pid, start), functools.partial(self._exit, pid, start))

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

    def shutdown(self) -> None:
        self._stop.set()
        self.mounts.shutdown()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.service.close()


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

    disable_core_dumps()
    if private is None:
        private = os.geteuid() != 0
    daemon = Daemon(path, service=service, private_uid=os.geteuid() if private else None)
    try:
        daemon.bind()
    except DaemonRunning as err:
        print(f"keyfence daemon: {err}", flush=True)
        return 1
    if detach:
        if os.fork():
            os._exit(0)
        os.setsid()
        daemon.record_pid()

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=daemon.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.serve_forever()
    return 0
