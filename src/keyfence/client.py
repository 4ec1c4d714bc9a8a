"""The client library: the service's operations, from any process.

``Client.connect()`` finds the daemon (``keyfence.paths``) and starts one
if none answers (unless ``KEYFENCE_NO_AUTOSTART=1``).  Methods mirror
:class:`keyfence.keys.KeyService` without the caller -- the daemon knows
who we are from the socket -- and raise :class:`keyfence.errors.KeyfenceError`
with the kernel's errno.  ``watch()`` works across processes: a synchronous
watcher here takes part in removals exactly like one inside the daemon.

Import-light on purpose (no keyfence.keys, no cryptography): kfctl starts
in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keyfence import paths, protocol
from keyfence.errors import KeyfenceError

RemovalCallback = Callable[[protocol.RemovalStatus], None]


@dataclass(frozen=True)
class RemoteNotification:
    """An event of one of this client's watches (see keyfence.keys.notify)."""

    watch: int
    key: int
    event: str
    """keyctl's word: inst, upd, link, unlk, clr, rev, inv, attr, exp, gc."""
    aux: int | None
    op: str
    uid: int | None
    pid: int | None
    phase: str
    """"before": the key is about to go away; flush now (raise to refuse)."""
    emergency: bool
    removal: int
    description: str
    _client: Client | None = field(default=None, repr=False, compare=False)
    _seq: int = field(default=0, repr=False, compare=False)

    def report_progress(self, remaining_bytes: int | None = None, note: str = "") -> None:
        if self._client is not None and self.phase == "before":
            self._client._send(protocol.Progress(self._seq, remaining_bytes, note))


WatchCallback = Callable[[RemoteNotification], None]


class ClientWatch:
    def __init__(self, client: Client, watch_id: int, callback: WatchCallback) -> None:
        self.client = client
        self.id = watch_id
        self.callback = callback

    def remove(self) -> None:
        self.client._call("unwatch", self.id)
        self.client._watches.pop(self.id, None)


class _Pending:
    __slots__ = ("done", "error", "progress", "value")

    def __init__(self, progress: RemovalCallback | None) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: protocol.Error | None = None
        self.progress = progress


class Client:
    def __init__(self, sock: socket.socket, welcome: protocol.Welcome) -> None:
        self._sock = sock
        self.welcome = welcome
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[int, ClientWatch] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False
        self._events: queue.Queue[tuple[ClientWatch, RemoteNotification] | None] | None = None
        self._reader: threading.Thread | None = None
        self._inline = threading.Lock()
        """Without watches, a call reads its own reply: no thread hop."""

    def _start_reader(self) -> None:
        """From now on a thread reads the socket (watches need it)."""
        with self._inline:
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read_loop, name="keyfence-client", daemon=True
                )
                self._reader.start()

    def _receive_until(self, pending: _Pending) -> None:
        with self._inline:
            while self._reader is None and not pending.done.is_set():
                try:
                    message = protocol.read_message(self._sock)
                except (OSError, protocol.ProtocolError):
                    message = None
                if message is None:
                    self._fail_all()
                    break
                self._route(message)
        pending.done.wait()

    # -- connecting

    @classmethod
    def connect(
        cls,
        path: str | None = None,
        *,
        autostart: bool | None = None,
        name: str = "",
        timeout: float = 5.0,
    ) -> Client:
        """Connect (starting a daemon if none answers and autostart is allowed).

        Errors: ENOENT/ECONNREFUSED with an explanation when no daemon
        answers; EPROTONOSUPPORT on a version mismatch.
        """
        path = path or paths.default_socket()
        if autostart is None:
            autostart = paths.autostart_allowed()
        try:
            sock = _open(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if not autostart:
                raise KeyfenceError(
                    err.errno or errno.ECONNREFUSED,
                    f"no keyfence daemon answers at {path} (start one: keyfence daemon)",
                ) from None
            sock = _start_daemon(path, timeout)
        try:
            sock.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, name)))
            first = protocol.read_message(sock)
        except (OSError, protocol.ProtocolError) as err:
            sock.close()
            raise KeyfenceError(errno.EPROTO, f"bad answer from the daemon: {err}") from None
        if isinstance(first, protocol.Error):
            sock.close()
            raise KeyfenceError(first.errno, first.message)
        if not isinstance(first, protocol.Welcome):
            sock.close()
            raise KeyfenceError(errno.EPROTO, "the daemon did not answer hello")
        return cls(sock, first)

    # -- plumbing

    def _send(self, message: protocol.Message) -> None:
        frame = protocol.encode(message)
        with self._send_lock:
            self._sock.sendall(frame)

    def _call(
        self,
        op: str,
        *args: Any,
        timeout: float | None = None,
        emergency: bool = False,
        progress: RemovalCallback | None = None,
    ) -> Any:
        request_id = next(self._ids)
        pending = _Pending(progress)
        with self._lock:
            if self._closed:
                raise KeyfenceError(errno.ENOTCONN, "the connection to the daemon is closed")
            self._pending[request_id] = pending
        request = protocol.Request(
            id=request_id,
            op=op,
            args=list(args),
            timeout=timeout,
            emergency=emergency,
            progress=progress is not None,
        )
        try:
            self._send(request)
        except OSError as err:
            with self._lock:
                self._pending.pop(request_id, None)
            raise KeyfenceError(errno.ENOTCONN, f"lost the daemon: {err}") from None
        if self._reader is None:
            self._receive_until(pending)
        else:
            pending.done.wait()
        if pending.error is not None:
            raise KeyfenceError(pending.error.errno, _detail(pending.error))
        return pending.value

    def _read_loop(self) -> None:
        try:
            while True:
                message = protocol.read_message(self._sock)
                if message is None:
                    break
                self._route(message)
        except (OSError, protocol.ProtocolError):
            pass
        finally:
            self._fail_all()

    def _route(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Reply | protocol.Error):
            with self._lock:
                pending = self._pending.pop(message.id, None)
            if pending is None:
                return
            if isinstance(message, protocol.Error):
                pending.error = message
            else:
                pending.value = message.value
            pending.done.set()
        elif isinstance(message, protocol.RemovalStatus):
            with self._lock:
                pending = self._pending.get(message.id)
            if pending is not None and pending.progress is not None:
                pending.progress(message)
        elif isinstance(message, protocol.Event):
            self._event(message)

    def _event(self, event: protocol.Event) -> None:
        watch = self._watches.get(event.watch)
        note = RemoteNotification(
            watch=event.watch,
            key=event.key,
            event=event.event,
            aux=event.aux,
            op=event.op,
            uid=event.uid,
            pid=event.pid,
            phase=event.phase,
            emergency=event.emergency,
            removal=event.removal,
            description=event.description,
            _client=self,
            _seq=event.seq,
        )
        if event.ack:
            # its own thread: the callback may call back into the daemon,
            # whose replies this reader must stay free to deliver
            threading.Thread(
                target=self._fence, args=(watch, note), name="keyfence-fence", daemon=True
            ).start()
        elif watch is not None:
            self._after_queue().put((watch, note))

    def _fence(self, watch: ClientWatch | None, note: RemoteNotification) -> None:
        code, message = 0, ""
        if watch is not None:
            try:
                watch.callback(note)
            except OSError as err:
                code, message = err.errno or errno.ECANCELED, err.strerror or str(err)
            except Exception as err:
                code, message = errno.ECANCELED, f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError):
            self._send(protocol.Ack(note._seq, code, message))

    def _after_queue(self) -> queue.Queue[tuple[ClientWatch, RemoteNotification] | None]:
        if self._events is None:
            self._events = queue.Queue()
            threading.Thread(target=self._deliver, name="keyfence-events", daemon=True).start()
        return self._events

    def _deliver(self) -> None:
        assert self._events is not None
        while True:
            item = self._events.get()
            if item is None:
                return
            watch, note = item
            with contextlib.suppress(Exception):
                watch.callback(note)

    def _fail_all(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        for item in pending:
            item.error = protocol.Error(0, errno.ENOTCONN, "the daemon closed the connection")
            item.done.set()
        if self._events is not None:
            self._events.put(None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=2)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the operations (keyfence.keys.KeyService, without the caller)

    def add_key(
        self, type: str, description: str | None, payload: bytes | None, keyring: int
    ) -> int:
        return int(self._call("add_key", type, description, payload, keyring))

    def request_key(
        self, type: str, description: str, callout: str | None = None, dest_keyring: int = 0
    ) -> int:
        return int(self._call("request_key", type, description, callout, dest_keyring))

    def get_keyring_id(self, key_id: int, create: bool = False) -> int:
        return int(self._call("get_keyring_id", key_id, create))

    def join_session_keyring(self, name: str | None = None) -> int:
        return int(self._call("join_session_keyring", name))

    def update(self, key_id: int, payload: bytes | None) -> None:
        self._call("update", key_id, payload)

    def revoke(self, key_id: int, **removal: Any) -> None:
        self._call("revoke", key_id, **removal)

    def chown(self, key_id: int, uid: int, gid: int) -> None:
        self._call("chown", key_id, uid, gid)

    def setperm(self, key_id: int, perm: int) -> None:
        self._call("setperm", key_id, perm)

    def describe(self, key_id: int) -> str:
        return str(self._call("describe", key_id))

    def clear(self, keyring: int, **removal: Any) -> None:
        self._call("clear", keyring, **removal)

    def link(self, key_id: int, keyring: int) -> None:
        self._call("link", key_id, keyring)

    def unlink(self, key_id: int, keyring: int, **removal: Any) -> None:
        self._call("unlink", key_id, keyring, **removal)

    def search(self, keyring: int, type: str, description: str, dest_keyring: int = 0) -> int:
        return int(self._call("search", keyring, type, description, dest_keyring))

    def read(self, key_id: int) -> bytes:
        return bytes(self._call("read", key_id))

    def list_keyring(self, keyring: int) -> list[int]:
        return [int(s) for s in self._call("list_keyring", keyring)]

    def set_timeout(self, key_id: int, timeout: int) -> None:
        self._call("set_timeout", key_id, timeout)

    def invalidate(self, key_id: int, **removal: Any) -> None:
        self._call("invalidate", key_id, **removal)

    def move(
        self, key_id: int, from_keyring: int, to_keyring: int, flags: int = 0, **removal: Any
    ) -> None:
        self._call("move", key_id, from_keyring, to_keyring, flags, **removal)

    def get_security(self, key_id: int) -> str:
        return str(self._call("get_security", key_id))

    def key_users(self) -> list[tuple[int, int, int, int, int, int]]:
        """(uid, nkeys, qnkeys, qnbytes, maxkeys, maxbytes), as /proc/key-users."""
        return [tuple(row) for row in self._call("key_users")]

    def ping(self) -> str:
        return str(self._call("ping"))

    def watch(
        self,
        key_id: int,
        callback: WatchCallback,
        events: int = protocol.ALL_EVENTS,
        *,
        sync: bool = False,
        name: str | None = None,
    ) -> ClientWatch:
        """Watch a key; with ``sync``, removals wait for ``callback`` (BEFORE phase)."""
        self._start_reader()
        watch_id = int(self._call("watch", key_id, events, sync, name))
        watch = ClientWatch(self, watch_id, callback)
        self._watches[watch_id] = watch
        return watch


def _detail(error: protocol.Error) -> str | None:
    """The daemon's message minus the errno text KeyfenceError adds again."""
    text = os.strerror(error.errno)
    message = error.message
    if message.startswith(f"[Errno {error.errno}] "):
        message = message.split("] ", 1)[1]
    if message == text:
        return None
    if message.startswith(text + ": "):
        return message[len(text) + 2 :]
    return message


def _open(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _start_daemon(path: str, timeout: float) -> socket.socket:
    """Start a detached daemon for ``path`` and connect to it."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    log_path = path + ".log"
    with open(log_path, "ab") as log:
        # the daemon binds, forks and its parent exits: nothing to reap here
        subprocess.run(
            [sys.executable, "-m", "keyfence.cli.main", "daemon", "--detach", "--socket", path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            timeout=timeout,
            check=False,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _open(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise KeyfenceError(
                    errno.ETIMEDOUT,
                    f"started a keyfence daemon but it did not answer; see {log_path}",
                ) from None
            time.sleep(0.01)
