"""The client library: the service's operations, from any process.

``Client.connect()`` finds the daemon (``keyfence.paths``) and starts one
if none answers (unless ``KEYFENCE_NO_AUTOSTART=1``).  Methods mirror
:class:`keyfence.keys.KeyService` without the caller -- the daemon knows
who we are from the socket -- and raise :class:`keyfence.errors.KeyfenceError`
with the kernel's errno.  ``watch()`` works across processes: a synchronous
watcher here takes part in removals exactly like one inside the daemon.

Start-up matters (kfctl runs it once per command): the client speaks the
wire through :mod:`keyfence.wire` rather than msgspec, reads its own
replies until a watch needs a reader thread, and imports threading and
subprocess only when it needs them.
"""

from __future__ import annotations

import _socket  # not socket: its enum and selectors cost start-up time
import _thread  # not threading (start-up time): the calling thread's id
import errno
import posix  # not os: its import costs kfctl 1.7 ms

from keyfence import paths, socket_trust, wire
from keyfence.constants import *  # noqa: F403 - KEY_SPEC_*, KEY_POS_*, ...: keyutils' names
from keyfence.errors import KeyfenceError

_in_fence: Any = None
"""A ``threading.local``: the removal whose ``"before"`` callback this
thread runs (made with the first reader thread: threading costs start-up
time).  Requests made from it carry ``fence`` (docs/protocol.md)."""

TYPE_CHECKING = False  # typing costs a client 4 ms to import; mypy knows the name
if TYPE_CHECKING:
    import queue
    import threading
    from collections.abc import Callable, Sequence
    from typing import Any

PROTOCOL_VERSION = wire.PROTOCOL_VERSION
HELLO_SECONDS = 30.0
"""The longest wait for a daemon's welcome: one that accepts and never
answers (stopped, wedged) is an error, not a client waiting for ever."""
ALL_EVENTS = wire.ALL_EVENTS


class PendingWatcher:
    """A key user still flushing, as a removal's progress reports it."""

    __slots__ = ("key", "note", "remaining_bytes", "watcher")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.watcher: str = raw.get("watcher", "")
        self.key: int = raw.get("key", 0)
        self.remaining_bytes: int | None = raw.get("remaining_bytes")
        self.note: str = raw.get("note", "")


class RemovalStatus:
    """A removal's progress, as the daemon's :class:`keyfence.protocol.Status` message gives it."""

    __slots__ = ("elapsed", "keys", "op", "pending", "removal")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.op: str = raw.get("op", "")
        self.removal: int = raw.get("removal", 0)
        self.keys: int = raw.get("keys", 0)
        self.elapsed: float = raw.get("elapsed", 0.0)
        self.pending = [PendingWatcher(p) for p in raw.get("pending") or ()]

    @property
    def remaining_bytes(self) -> int:
        """Bytes the pending watchers still have to flush, as they said."""
        return sum(p.remaining_bytes or 0 for p in self.pending)


class RemoteNotification:
    """An event of one of this client's watches (see keyfence.keys.notify)."""

    __slots__ = (
        "_client",
        "_seq",
        "aux",
        "description",
        "emergency",
        "event",
        "key",
        "op",
        "phase",
        "pid",
        "removal",
        "uid",
        "watch",
    )

    def __init__(self, raw: dict[str, Any], client: Client) -> None:
        self.watch: int = raw["watch"]
        self.key: int = raw["key"]
        self.event: str = raw["event"]
        """keyctl's word: inst, upd, link, unlk, clr, rev, inv, attr, exp, gc."""
        self.aux: int | None = raw.get("aux")
        self.op: str = raw.get("op", "")
        self.uid: int | None = raw.get("uid")
        self.pid: int | None = raw.get("pid")
        self.phase: str = raw.get("phase", "after")
        """"before": the key is about to go away; flush now (raise to refuse)."""
        self.emergency: bool = raw.get("emergency", False)
        self.removal: int = raw.get("removal", 0)
        self.description: str = raw.get("description", "")
        self._client = client
        self._seq: int = raw["seq"]

    def report_progress(self, remaining_bytes: int | None = None, note: str = "") -> None:
        """While handling a ``"before"`` event: tell the waiting removal how
        much is left to flush (shown by kfctl and keyfence lock)."""
        if self.phase == "before":
            message = {"remaining_bytes": remaining_bytes, "note": note}
            self._client._send({"type": "progress", "seq": self._seq, **message})

    def __repr__(self) -> str:
        return f"<RemoteNotification {self.key} {self.event} {self.phase} op={self.op}>"


WatchCallback = "Callable[[RemoteNotification], None]"


class ClientWatch:
    """A watch made by :meth:`Client.watch`."""

    def __init__(self, client: Client, watch_id: int, callback: Any) -> None:
        self.client = client
        self.id = watch_id
        self.callback = callback

    def remove(self) -> None:
        """keyctl watch_rm: stop watching (a synchronous watch stops fencing).

        Errors: ENOENT when the watch is already gone."""
        self.client._call("unwatch", self.id)
        self.client._watches.pop(self.id, None)


class _Pending:
    __slots__ = ("done", "error", "progress", "value")

    def __init__(self, progress: Callable[[RemovalStatus], None] | None) -> None:
        self.done = False
        self.value: Any = None
        self.error: dict[str, Any] | None = None
        self.progress = progress


class ServerInfo:
    """What the daemon said on connecting: who it sees us as."""

    __slots__ = ("gid", "pid", "server", "session", "uid", "version")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.version: int = raw.get("version", 0)
        self.server: str = raw.get("server", "")
        self.pid: int = raw.get("pid", 0)
        self.uid: int = raw.get("uid", 0)
        self.gid: int = raw.get("gid", 0)
        self.session: int = raw.get("session", 0)


class Client:
    """A connection to the key service, as one process.

    Methods are the keyctl(2) operations, named after them, with the same
    arguments (keyring ids or ``KEY_SPEC_*`` constants from
    :mod:`keyfence.constants`, re-exported here) and the kernel's errors,
    raised as :class:`keyfence.errors.KeyfenceError` (an ``OSError`` whose
    ``errno`` is the kernel's).  Operations that remove keys take
    ``timeout=``, ``emergency=`` and ``progress=`` (see :meth:`revoke`).
    Use one from several threads once a watch exists; a context manager.
    """

    def __init__(self, sock: _socket.socket, welcome: dict[str, Any]) -> None:
        self._sock = sock
        self._frames = wire.FrameReader(sock)
        self.welcome = ServerInfo(welcome)
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[int, ClientWatch] = {}
        self._closed = False
        self._reader: threading.Thread | None = None
        self._cond: threading.Condition | None = None
        """Set when the reader thread runs: guards _pending from then on."""
        self._send_lock: threading.Lock | None = None
        self._events: queue.Queue[tuple[ClientWatch, RemoteNotification] | None] | None = None

    @property
    def closed(self) -> bool:
        """The connection to the daemon is gone."""
        return self._closed

    # -- connecting

    @classmethod
    def connect(
        cls,
        path: str | None = None,
        *,
        autostart: bool | None = None,
        name: str = "",
        timeout: float = 5.0,
        opener: Callable[[str], _socket.socket] | None = None,
    ) -> Client:
        """Connect (starting a daemon if none answers and autostart is allowed).

        ``path``: a socket of the caller's choosing; else as
        :func:`keyfence.paths.locate` says.  ``autostart``: None starts a
        daemon only at the default per-user (or, for root, system) socket,
        unless ``KEYFENCE_NO_AUTOSTART=1``; an explicit path or
        ``$KEYFENCE_SOCKET`` that does not answer is an error unless
        ``autostart=True``.  Before a byte is sent the server must be root
        or ourselves (docs/security.md, "which socket a client trusts").

        Errors: ENOENT/ECONNREFUSED with an explanation when no daemon
        answers; EACCES (ELOOP, ENOTDIR) when the socket or its directory
        is not one we can trust; EPROTONOSUPPORT on a version mismatch.

        ``opener``: connects a socket to a path (default: here); kfctl's warm
        worker has its caller connect, so that the daemon sees the caller
        (keyfence.cli.kfctl_warm).  Every check above applies to its socket.
        """
        place = paths.locate(path)
        connect = opener or _open
        if autostart is None:
            # the system daemon is root's to start
            ours = place.kind == paths.USER or (place.kind == paths.SYSTEM and not place.root_only)
            autostart = ours and paths.autostart_allowed()
        try:
            if place.private_dir is not None:
                socket_trust.check_private_dir(place.private_dir)
            sock = connect(place.path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if not autostart:
                hint = "start one: keyfence daemon"
                if place.kind == paths.SYSTEM:
                    hint = "the system daemon: root starts it, systemctl start keyfence"
                elif place.kind == paths.EXPLICIT:
                    hint = f"check {place.source}, or start one there: keyfence daemon"
                raise KeyfenceError(
                    err.errno or errno.ECONNREFUSED,
                    f"no keyfence daemon answers at {place.path} ({hint})",
                ) from None
            sock = _start_daemon(place, timeout, connect)
        except KeyfenceError:
            raise
        except OSError as err:
            raise KeyfenceError(
                err.errno or errno.EIO,
                f"cannot reach a keyfence daemon at {place.path} ({place.source})",
            ) from None
        socket_trust.check_server(sock, place.path, root_only=place.root_only)
        try:
            sock.settimeout(HELLO_SECONDS)
            try:  # noqa: SIM105 - contextlib costs start-up time
                sock.sendall(
                    wire.frame({"type": "hello", "version": PROTOCOL_VERSION, "client": name})
                )
            except OSError:
                pass  # a daemon that refuses us closes at once: read why
            first = wire.read(sock)
            sock.settimeout(None)
        except TimeoutError:
            sock.close()
            raise KeyfenceError(
                errno.ETIMEDOUT,
                f"the keyfence daemon at {place.path} did not answer in {HELLO_SECONDS:.0f} s"
                f" (stopped or stuck? its pid is in {place.path}.lock)",
            ) from None
        except (OSError, wire.WireError) as err:
            sock.close()
            raise KeyfenceError(errno.EPROTO, f"bad answer from the daemon: {err}") from None
        if first is not None and first["type"] == "error":
            sock.close()
            raise KeyfenceError(int(first["errno"]), str(first["message"]))  # type: ignore[call-overload]
        if first is None or first["type"] != "welcome":
            sock.close()
            raise KeyfenceError(errno.EPROTO, "the daemon did not answer hello")
        return cls(sock, first)

    @classmethod
    def over_socket(cls, sock: _socket.socket, *, name: str = "") -> Client:
        """Speak to the daemon over an already connected socket (a mount
        worker's private channel, made by the daemon at spawn)."""
        try:
            sock.sendall(wire.frame({"type": "hello", "version": PROTOCOL_VERSION, "client": name}))
            first = wire.read(sock)
        except (OSError, wire.WireError) as err:
            raise KeyfenceError(errno.EPROTO, f"bad answer from the daemon: {err}") from None
        if first is None or first["type"] != "welcome":
            raise KeyfenceError(errno.EPROTO, "the daemon did not answer hello")
        return cls(sock, first)

    # -- plumbing

    def _send(self, message: dict[str, Any]) -> None:
        data = wire.frame(message)
        if self._send_lock is None:
            self._sock.sendall(data)
        else:
            with self._send_lock:
                self._sock.sendall(data)

    def _call(
        self,
        op: str,
        *args: Any,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalStatus], None] | None = None,
    ) -> Any:
        if self._closed:
            raise KeyfenceError(errno.ENOTCONN, "the connection to the daemon is closed")
        self._next_id += 1
        request_id = self._next_id
        pending = _Pending(progress)
        request = {
            "type": "req",
            "id": request_id,
            "op": op,
            "args": list(args),
            "timeout": timeout,
            "emergency": emergency,
            "progress": progress is not None,
        }
        inside = getattr(_in_fence, "removal", 0)
        if inside:
            request["fence"] = inside
        tid = _thread.get_native_id()
        if tid != posix.getpid():  # not the main thread: its own @t
            request["tid"] = tid
        if self._cond is None:
            self._pending[request_id] = pending
            self._send_or_fail(request, request_id)
            self._receive_until(pending)
        else:
            with self._cond:
                self._pending[request_id] = pending
            self._send_or_fail(request, request_id)
            with self._cond:
                self._cond.wait_for(lambda: pending.done)
        if pending.error is not None:
            raise KeyfenceError(int(pending.error["errno"]), _detail(pending.error))
        return pending.value

    def _send_or_fail(self, request: dict[str, Any], request_id: int) -> None:
        try:
            self._send(request)
        except OSError as err:
            self._pending.pop(request_id, None)
            raise KeyfenceError(errno.ENOTCONN, f"lost the daemon: {err}") from None

    def _receive_until(self, pending: _Pending) -> None:
        """No reader thread: read the socket ourselves until our reply."""
        while not pending.done:
            try:
                message = self._frames.read()
            except (OSError, wire.WireError):
                message = None
            if message is None:
                self._fail_all()
                return
            self._route(message)

    def _read_loop(self) -> None:
        try:
            while True:
                message = self._frames.read()
                if message is None:
                    break
                self._route(message)
        except (OSError, wire.WireError):
            pass
        finally:
            self._fail_all()

    def _route(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("reply", "error"):
            pending = self._pending.get(message.get("id", 0))
            if pending is None:
                return
            if kind == "error":
                pending.error = message
            else:
                pending.value = message.get("value")
            self._complete(message["id"], pending)
        elif kind == "status":
            pending = self._pending.get(message.get("id", 0))
            if pending is not None and pending.progress is not None:
                pending.progress(RemovalStatus(message))
        elif kind == "event":
            self._event(message)

    def _complete(self, request_id: int, pending: _Pending) -> None:
        if self._cond is None:
            self._pending.pop(request_id, None)
            pending.done = True
            return
        with self._cond:
            self._pending.pop(request_id, None)
            pending.done = True
            self._cond.notify_all()

    def _event(self, message: dict[str, Any]) -> None:
        import threading

        watch = self._watches.get(message["watch"])
        note = RemoteNotification(message, self)
        if message.get("ack"):
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
            # a call the callback makes (on any connection) says it comes
            # from inside this fence: a removal of the keys the fence holds
            # is then EDEADLK at once, not a wait for this very callback
            _in_fence.removal = note.removal
            try:
                watch.callback(note)
            except OSError as err:
                code, message = err.errno or errno.ECANCELED, err.strerror or str(err)
            except Exception as err:
                code, message = errno.ECANCELED, f"{type(err).__name__}: {err}"
            finally:
                _in_fence.removal = 0
        try:  # noqa: SIM105 - contextlib costs start-up time
            self._send({"type": "ack", "seq": note._seq, "errno": code, "message": message})
        except OSError:
            pass

    def _after_queue(self) -> queue.Queue[tuple[ClientWatch, RemoteNotification] | None]:
        import queue
        import threading

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
            try:  # noqa: SIM105 - a watcher's bug must not stop delivery to others
                watch.callback(note)
            except Exception:
                pass

    def _start_reader(self) -> None:
        """From now on a thread reads the socket (watches need one)."""
        import threading

        global _in_fence
        if _in_fence is None:
            _in_fence = threading.local()

        if self._reader is not None:
            return
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="keyfence-client", daemon=True)
        self._reader.start()

    def _fail_all(self) -> None:
        self._closed = True
        error = {"type": "error", "id": 0, "errno": errno.ENOTCONN}
        error["message"] = "the daemon closed the connection"
        pending = list(self._pending.items())
        for request_id, item in pending:
            item.error = error
            self._complete(request_id, item)
        if self._events is not None:
            self._events.put(None)

    def close(self) -> None:
        """Close the connection.  The daemon forgets this client's watches; a
        synchronous watch here stops fencing (its key can go without asking).
        """
        try:  # noqa: SIM105 - contextlib costs start-up time
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._closed = True
        if self._reader is not None:
            self._reader.join(timeout=2)

    def __enter__(self) -> Client:
        """``with Client.connect() as client:`` closes it at the end."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the operations (keyfence.keys.KeyService, without the caller)

    def add_key(
        self, type: str, description: str | None, payload: bytes | None, keyring: int
    ) -> int:
        """add_key(2): create a key of ``type`` (``"user"``, ``"logon"``,
        ``"keyring"``, ...) with ``description`` and ``payload`` and link it into
        ``keyring`` (an id or a ``KEY_SPEC_*`` constant), or update the key of the
        same type and description already there.  Returns the key's id.

        Errors (as the kernel's): EINVAL (bad type, description or payload),
        ENOKEY/EKEYREVOKED/EKEYEXPIRED (the keyring), EACCES (no write permission
        on the keyring), EDQUOT (the owner's key quota), ENOTDIR (not a keyring).
        """
        return int(self._call("add_key", type, description, payload, keyring))

    def request_key(
        self, type: str, description: str, callout: str | None = None, dest_keyring: int = 0
    ) -> int:
        """request_key(2): search the caller's keyrings for a key of ``type``
        and ``description``; with ``callout`` and none found, construct it through
        request-key.conf (keyfence-request-key.conf(5)) and wait.  The key found
        is linked into ``dest_keyring`` (0: the default).  Returns its id.

        Errors: ENOKEY (none, and no callout or no handler), EKEYREJECTED or the
        error it was negated with, EKEYREVOKED, EKEYEXPIRED, EACCES, EDQUOT.
        """
        return int(self._call("request_key", type, description, callout, dest_keyring))

    def get_keyring_id(self, key_id: int, create: bool = False) -> int:
        """KEYCTL_GET_KEYRING_ID: the id behind ``key_id`` (a ``KEY_SPEC_*``
        constant); with ``create``, make the special keyring if it does not exist.

        Errors: ENOKEY (no such keyring and not ``create``), EINVAL.
        """
        return int(self._call("get_keyring_id", key_id, create))

    def join_session_keyring(self, name: str | None = None) -> int:
        """KEYCTL_JOIN_SESSION_KEYRING: give this process a new anonymous
        session keyring (``name`` None) or join, creating it if needed, the
        session keyring called ``name``.  Returns its id.

        Errors: EACCES (a keyring of that name this caller may not join),
        EDQUOT.
        """
        return int(self._call("join_session_keyring", name))

    def session_to_parent(self, **removal: Any) -> None:
        """KEYCTL_SESSION_TO_PARENT: give this process's session keyring to
        its parent (keyctl new_session's second step)."""
        self._call("session_to_parent", **removal)

    def update(self, key_id: int, payload: bytes | None) -> None:
        """KEYCTL_UPDATE: replace the payload of ``key_id``.

        Errors: EOPNOTSUPP (a type that cannot be updated, such as a keyring),
        EACCES (no write permission), EKEYREVOKED, EKEYEXPIRED, EINVAL, EDQUOT.
        """
        self._call("update", key_id, payload)

    def revoke(self, key_id: int, **removal: Any) -> None:
        """KEYCTL_REVOKE: revoke ``key_id`` -- after every synchronous watcher
        (such as a mount flushing data written with the key) has finished.
        ``removal``: ``timeout=SECONDS`` (give up with ETIMEDOUT, nothing
        removed, if the key's synchronous watchers have not finished),
        ``emergency=True`` (remove now; the watchers are told afterwards),
        ``progress=callable`` (called with a :class:`RemovalStatus` while it
        waits).

        Errors: EACCES (no write or setattr permission), ENOKEY; a synchronous
        watcher's own error aborts the removal (keys intact); ETIMEDOUT; EDEADLK
        when a watcher's callback removes the keys its fence holds.
        """
        self._call("revoke", key_id, **removal)

    def chown(self, key_id: int, uid: int, gid: int) -> None:
        """KEYCTL_CHOWN: change the owner (``uid``) and group (``gid``) of
        ``key_id``; -1 leaves either as it is.

        Errors: EACCES (only root changes the owner; setattr permission),
        EDQUOT (the new owner's quota), ENOKEY.
        """
        self._call("chown", key_id, uid, gid)

    def setperm(self, key_id: int, perm: int) -> None:
        """KEYCTL_SETPERM: set the permission mask of ``key_id`` (``KEY_POS_*``
        | ``KEY_USR_*`` | ``KEY_GRP_*`` | ``KEY_OTH_*``).

        Errors: EACCES (not the owner, or no setattr permission), EINVAL (bits
        outside the mask), ENOKEY.
        """
        self._call("setperm", key_id, perm)

    def describe(self, key_id: int) -> str:
        """KEYCTL_DESCRIBE: ``type;uid;gid;perm;description`` of ``key_id``
        (perm in hex), as keyctl describe's raw form.

        Errors: EACCES (no view permission), ENOKEY, EKEYREVOKED.
        """
        return str(self._call("describe", key_id))

    def clear(self, keyring: int, **removal: Any) -> None:
        """KEYCTL_CLEAR: unlink every key from ``keyring``, fenced: each key
        that goes away waits for its synchronous watchers first.
        ``removal``: ``timeout=SECONDS`` (give up with ETIMEDOUT, nothing
        removed, if the key's synchronous watchers have not finished),
        ``emergency=True`` (remove now; the watchers are told afterwards),
        ``progress=callable`` (called with a :class:`RemovalStatus` while it
        waits).

        Errors: ENOTDIR (not a keyring), EACCES (no write permission), ENOKEY;
        a synchronous watcher's own error aborts the removal (keys intact);
        ETIMEDOUT; EDEADLK when a watcher's callback removes the keys its fence
        holds.
        """
        self._call("clear", keyring, **removal)

    def link(self, key_id: int, keyring: int) -> None:
        """KEYCTL_LINK: link ``key_id`` into ``keyring``.

        Errors: ENOTDIR, EACCES (no link permission on the key or no write
        permission on the keyring), EDEADLK (a loop), ENFILE (keyring full),
        EDQUOT, ENOKEY, EKEYREVOKED.
        """
        self._call("link", key_id, keyring)

    def unlink(self, key_id: int, keyring: int, **removal: Any) -> None:
        """KEYCTL_UNLINK: remove the link to ``key_id`` from ``keyring``; a key
        whose last link goes waits for its synchronous watchers first.
        ``removal``: ``timeout=SECONDS`` (give up with ETIMEDOUT, nothing
        removed, if the key's synchronous watchers have not finished),
        ``emergency=True`` (remove now; the watchers are told afterwards),
        ``progress=callable`` (called with a :class:`RemovalStatus` while it
        waits).

        Errors: ENOENT (not linked there), ENOTDIR, EACCES, ENOKEY; a
        synchronous watcher's own error aborts the removal (keys intact);
        ETIMEDOUT; EDEADLK when a watcher's callback removes the keys its fence
        holds.
        """
        self._call("unlink", key_id, keyring, **removal)

    def search(self, keyring: int, type: str, description: str, dest_keyring: int = 0) -> int:
        """KEYCTL_SEARCH: find a key of ``type`` and ``description`` in
        ``keyring`` and the keyrings below it; link it into ``dest_keyring``
        if not 0.  Returns its id.

        Errors: ENOKEY (not found), EACCES (no search permission), EKEYREVOKED,
        EKEYEXPIRED, ENOTDIR.
        """
        return int(self._call("search", keyring, type, description, dest_keyring))

    def read(self, key_id: int) -> bytes:
        """KEYCTL_READ: the payload of ``key_id`` (for a keyring, its key ids as
        32-bit integers in host order, as the kernel gives them).

        Errors: EACCES (no read permission, nor possessed with search
        permission), EOPNOTSUPP (a type that cannot be read, such as logon),
        EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """
        return bytes(self._call("read", key_id))

    def list_keyring(self, keyring: int) -> list[int]:
        """The ids of the keys linked into ``keyring`` (KEYCTL_READ on a keyring,
        as keyctl rlist prints them).

        Errors: ENOTDIR (not a keyring), EACCES, ENOKEY, EKEYREVOKED.
        """
        return [int(s) for s in self._call("list_keyring", keyring)]

    def keyring_tree(
        self, keyring: int, levels: int = 9
    ) -> tuple[int, dict[int, tuple[str | int, bytes | int | None]]]:
        """What ``keyctl show`` asks key by key, in one request: the serial of
        ``keyring`` (resolved as :meth:`get_keyring_id` does) and, for every key
        reached within ``levels`` levels (1 to 9), its :meth:`describe` string
        or the errno describe fails with, and for a keyring its :meth:`read`
        (packed serials) or that errno.

        Errors: the root's (ENOKEY, EACCES, EKEYREVOKED, ...); EINVAL (levels);
        E2BIG (more keys than one answer holds: describe key by key);
        EOPNOTSUPP (a daemon without the operation).
        """
        root, entries = self._call("keyring_tree", keyring, levels)
        table: dict[int, tuple[str | int, bytes | int | None]] = {}
        for serial, described, members in entries:
            table[int(serial)] = (described, members)
        return int(root), table

    def keyring_members(self, keyring: int) -> list[tuple[int, str | int]]:
        """What ``keyctl list`` asks, in one request: the keys linked into
        ``keyring`` (read as :meth:`list_keyring` reads it), each with its
        :meth:`describe` string or the errno describe fails with.

        Errors: those of :meth:`list_keyring` (ENOTDIR, EACCES, ENOKEY, ...);
        E2BIG (more members than one answer holds); EOPNOTSUPP (a daemon
        without the operation).
        """
        return [
            (int(serial), described) for serial, described in self._call("keyring_members", keyring)
        ]

    def set_timeout(self, key_id: int, timeout: int) -> None:
        """KEYCTL_SET_TIMEOUT: expire ``key_id`` in ``timeout`` seconds (0:
        never).  An expiring key is fenced like a removal: its synchronous
        watchers are called before it goes.

        Errors: EACCES (no setattr permission), EKEYREVOKED, ENOKEY.
        """
        self._call("set_timeout", key_id, timeout)

    def invalidate(self, key_id: int, **removal: Any) -> None:
        """KEYCTL_INVALIDATE: invalidate ``key_id`` at once, unlinking it
        everywhere -- after its synchronous watchers have finished.
        ``removal``: ``timeout=SECONDS`` (give up with ETIMEDOUT, nothing
        removed, if the key's synchronous watchers have not finished),
        ``emergency=True`` (remove now; the watchers are told afterwards),
        ``progress=callable`` (called with a :class:`RemovalStatus` while it
        waits).

        Errors: EACCES (no search permission), ENOKEY; a synchronous watcher's
        own error aborts the removal (keys intact); ETIMEDOUT; EDEADLK when a
        watcher's callback removes the keys its fence holds.
        """
        self._call("invalidate", key_id, **removal)

    def lock_filesystem_key(self, key_id: int, **removal: Any) -> None:
        """Remove a key a mount uses whatever this caller's keyrings hold
        (its owner or root; fscrypt's lock --all-users)."""
        self._call("lock_filesystem_key", key_id, **removal)

    def move(
        self, key_id: int, from_keyring: int, to_keyring: int, flags: int = 0, **removal: Any
    ) -> None:
        """KEYCTL_MOVE: move the link to ``key_id`` from ``from_keyring`` to
        ``to_keyring`` (``flags``: ``KEYCTL_MOVE_EXCL`` fails with EEXIST rather
        than displace a key of the same type and description).  A key displaced
        in the destination waits for its watchers first.
        ``removal``: ``timeout=SECONDS`` (give up with ETIMEDOUT, nothing
        removed, if the key's synchronous watchers have not finished),
        ``emergency=True`` (remove now; the watchers are told afterwards),
        ``progress=callable`` (called with a :class:`RemovalStatus` while it
        waits).

        Errors: ENOENT (not in ``from_keyring``), EEXIST, ENOTDIR, EACCES, EDQUOT;
        a synchronous watcher's own error aborts the removal (keys intact);
        ETIMEDOUT; EDEADLK when a watcher's callback removes the keys its fence
        holds.
        """
        self._call("move", key_id, from_keyring, to_keyring, flags, **removal)

    def get_security(self, key_id: int) -> str:
        """KEYCTL_GET_SECURITY: the LSM label of ``key_id`` (always empty: no
        LSM labels keyfence's keys; the call still checks view permission).

        Errors: ENOKEY (also for a key the caller may not view, as the
        kernel answers), EKEYREVOKED.
        """
        return str(self._call("get_security", key_id))

    def viewable_keys(self, key_type: str, description: str) -> list[int]:
        """The serials, lowest first, of the keys of ``key_type`` and
        ``description`` the caller may view, wherever they are linked: the
        lines of /proc/keys libkeyutils' find_key_by_type_and_desc() looks
        at when request_key() finds nothing (keyctl's ``%type:desc``).
        Never an error but the connection's.
        """
        return [int(serial) for serial in self._call("viewable_keys", key_type, description)]

    def instantiate(self, key_id: int, payload: bytes | None, keyring: int) -> None:
        """KEYCTL_INSTANTIATE: only with the authority over ``key_id``."""
        self._call("instantiate", key_id, payload, keyring)

    def reject(self, key_id: int, timeout: int, error: int, keyring: int) -> None:
        """KEYCTL_REJECT (KEYCTL_NEGATE is ``error`` ENOKEY)."""
        self._call("reject", key_id, timeout, error, keyring)

    def assume_authority(self, key_id: int) -> int:
        """KEYCTL_ASSUME_AUTHORITY: this process (and its children) act for
        the request-key construction of ``key_id`` (0: give it up)."""
        return int(self._call("assume_authority", key_id))

    def key_users(self) -> list[tuple[int, ...]]:
        """(uid, nkeys, qnkeys, qnbytes, maxkeys, maxbytes), as /proc/key-users."""
        return [tuple(row) for row in self._call("key_users")]

    def ping(self) -> str:
        """A round trip to the daemon (it answers ``"pong"``).

        Errors: ENOTCONN when the connection is gone.
        """
        return str(self._call("ping"))

    # -- mounts (the daemon spawns and supervises the workers: docs/fs.md)

    def mount(self, backing: str, mountpoint: str, options: Sequence[str] = ()) -> None:
        """Mount the encrypted overlay of ``backing`` at ``mountpoint``.

        Both are absolute paths the daemon opens and checks as the caller;
        ``options`` are mount(8)-style words from a fixed table
        (docs/cli.md, ``keyfence mount``; server/mount_options.py).
        Returns when the worker serves the mount.  Errors carry the errno
        of the check that failed (EACCES, ENOTDIR, EBUSY, EINVAL, ...).
        """
        self._call("mount", backing, mountpoint, list(options))

    def umount(
        self, mountpoint: str, *, progress: Callable[[RemovalStatus], None] | None = None
    ) -> None:
        """Unmount the keyfence mount at ``mountpoint`` once the worker has
        written back everything (EINVAL: none there; EPERM: another user's;
        ETIMEDOUT: the worker wrote nothing for a minute).  ``progress`` is
        called while it writes, as for a removal: one pending entry, the
        mount worker, with the bytes it still has to write."""
        self._call("umount", mountpoint, progress=progress)

    def mounts(self) -> list[dict[str, Any]]:
        """The daemon's mounts the caller may see (its own; root: all), one
        dict each, as ``keyfence status --json`` prints them: the schema is
        in docs/cli.md ("keyfence status").  A dead mount is listed once."""
        return list(self._call("mounts"))

    # -- the mount worker's private channel (refused on any other socket)

    def listen(self) -> None:
        """Read the daemon's messages on a thread of their own from now on,
        so that watch events arrive while no call is being made."""
        self._start_reader()

    def wait_disconnected(self) -> None:
        """Block until the connection to the daemon ends (after :meth:`listen`)."""
        reader = self._reader
        if reader is not None:
            reader.join()

    def worker_find_key(
        self, pid: int, descriptions: Sequence[str]
    ) -> tuple[int, str, bytes] | None:
        """The first key of ``descriptions`` that process ``pid`` can search
        for in its keyrings, as (serial, description, payload), or None.

        Only a mount worker's channel may ask: the payload of a logon key
        leaves the daemon only this way.  The caller owns the payload and
        must wipe it."""
        found = self._call("worker_find_key", pid, list(descriptions))
        if found is None:
            return None
        serial, description, payload = found
        return int(serial), str(description), bytes(payload)

    def worker_report(self, event: str, detail: dict[str, Any]) -> None:
        """Tell the daemon about the mount: ``ready``, ``error`` (with a
        ``reason``), ``dropped`` (files discarded by an emergency removal)."""
        self._call("worker_report", event, detail)

    def watch(
        self,
        key_id: int,
        callback: Callable[[RemoteNotification], None],
        events: int = ALL_EVENTS,
        *,
        sync: bool = False,
        name: str | None = None,
    ) -> ClientWatch:
        """keyctl watch_add, across processes: call ``callback`` with a
        :class:`RemoteNotification` for each event of ``key_id`` (and, for a
        keyring, of its links) in ``events`` (``KEY_EVENT_*`` bits, all by
        default).  Returns a :class:`ClientWatch`; ``.remove()`` ends it.

        With ``sync`` the watch is a fence: before ``key_id`` goes away
        (revoke, invalidate, unlink of its last link, clear, expiry, a
        logout), the removal calls ``callback`` with ``phase == "before"``
        and waits until it returns; the callback flushes what it wrote with
        the key, reporting with ``note.report_progress()``, or raises (an
        OSError's errno, else ECANCELED) to refuse the removal, unless it is
        an emergency.  ``name`` is shown in removal progress.  Other
        callbacks run one at a time on a delivery thread, after the fact.

        Errors: EACCES (no view permission on the key; a synchronous watch
        on a key that is not the caller's, unless root), ENOKEY, EMFILE (the
        daemon's limit on this uid's watches).
        """
        self._start_reader()
        watch_id = int(self._call("watch", key_id, events, sync, name))
        watch = ClientWatch(self, watch_id, callback)
        self._watches[watch_id] = watch
        return watch


def _detail(error: dict[str, Any]) -> str | None:
    """The daemon's message minus the errno text KeyfenceError adds again."""
    code = int(error["errno"])
    text = posix.strerror(code)
    message = str(error.get("message", ""))
    if message.startswith(f"[Errno {code}] "):
        message = message.split("] ", 1)[1]
    if message == text or not message:
        return None
    if message.startswith(text + ": "):
        return message[len(text) + 2 :]
    return message


def _open(path: str) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    if sock.fileno() < 3:  # a caller started with 0-2 closed: keep off them
        from keyfence.fdtable import above_standard

        sock = _socket.socket(fileno=above_standard(sock.detach()))
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        if err.errno is None:  # Python's "AF_UNIX path too long" carries no errno
            raise OSError(errno.ENAMETOOLONG, posix.strerror(errno.ENAMETOOLONG), path) from None
        raise
    return sock


def _start_daemon(
    place: paths.SocketPlace, timeout: float, connect: Callable[[str], _socket.socket] = _open
) -> _socket.socket:
    """Start a detached daemon for ``place`` and connect to it.

    Its directory is created with mode 0700 and checked (ours, 0700, not a
    symlink) before the log file is written into it: never a directory
    someone else made.  Root's at the system socket is the system daemon:
    its directory is made as that daemon makes it (0755, root's), so that
    every user reaches it."""
    import os
    import subprocess
    import sys
    import time

    path = place.path
    directory = place.private_dir or os.path.dirname(path) or "."
    try:
        if place.kind == paths.SYSTEM:
            socket_trust.prepare_bind_dir(directory, private=False)
        else:
            socket_trust.make_private_dir(directory)
        log_path = path + ".log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        log = os.open(log_path, flags, 0o600)
    except KeyfenceError:
        raise
    except OSError as err:
        raise KeyfenceError(
            err.errno or errno.EIO, f"cannot start a keyfence daemon at {path}"
        ) from None
    try:
        # the daemon binds, forks and its parent exits: nothing to reap here
        # -P and "/": never the caller's directory on sys.path (a keyfence/
        # package planted in /tmp would run as the caller), nor held busy
        argv = [sys.executable, "-P", "-m", "keyfence.cli.main", "daemon", "--detach"]
        subprocess.run(
            [*argv, "--socket", os.path.abspath(path)],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pass  # it may still come up: wait for the socket below
    finally:
        os.close(log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                text = f"started a keyfence daemon but it did not answer; see {log_path}"
                raise KeyfenceError(errno.ETIMEDOUT, text) from None
            time.sleep(0.01)
