"""The operations a client may call: one table, one row per operation.

A row says everything the daemon needs: the name on the wire, the types of
the positional arguments (checked before anything runs; bool is not an int
here, so the wire keeps them apart), whether the operation may wait (for a
removal's watchers, a mount worker...), whether it is a removal (takes
``timeout``/``emergency``/``progress``), whether only a mount worker's
private channel may call it, and the handler.

Where it runs follows from the row (keyfence.server.loop): an operation
that cannot wait runs on the event loop at once; one that may wait runs on
a thread of its caller's lane (keyfence.server.lanes); an emergency
removal never waits (the key service applies it at once) and so always
runs on the loop, where nothing a client does can queue ahead of it.  The
one wait a row cannot foresee, a lookup meeting a key under construction
(it waits for the request-key handler), is refused on the loop
(keyfence.keys.waits) and the request goes on to the lane.

Adding an operation is adding one row to :data:`OPERATIONS` (and, if it is
the key service's, a method there of the same name): see ``_service``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyfence import protocol
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.fence import inside_fence
from keyfence.keys.keyring_tree import keyring_members, keyring_tree
from keyfence.keys.notify import KeyEvent

if TYPE_CHECKING:
    from keyfence.server.connection import Connection

Types = tuple[type, ...]
Handler = Callable[["Connection", protocol.Request], Any]

INT: Types = (int,)
STR: Types = (str,)
OPT_STR: Types = (str, type(None))
OPT_BYTES: Types = (bytes, type(None))
BOOL: Types = (bool,)
LIST: Types = (list,)
ANY: Types = (object,)


def never(request: protocol.Request) -> bool:
    return False


def always(request: protocol.Request) -> bool:
    return True


def unless_no_destination(request: protocol.Request) -> bool:
    """search: a lookup without a destination keyring links nothing, so it
    displaces nothing and cannot wait."""
    return bool(request.args[-1] != 0)


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    args: tuple[Types, ...]
    handler: Handler
    may_wait: Callable[[protocol.Request], bool] = never
    removal: bool = False
    """Takes timeout, emergency and progress (keyfence.keys removal options)."""
    worker_only: bool = False
    """Only on a mount worker's private channel."""
    progress: bool = False
    """Not a removal, but reports progress as one does (umount)."""
    payload_args: tuple[int, ...] = ()
    """The arguments that carry a key's payload: their decoded copies are
    zeroed once the call is done (the key keeps its own, in the arena)."""
    payload_reply: bool = False
    """The answer carries a key's payload: it is encoded in one buffer and
    its copy zeroed once encoded (keyfence.server.connection)."""

    def check(self, request: protocol.Request) -> None:
        """EINVAL for arguments or options this operation does not take."""
        args = request.args
        if len(args) != len(self.args):
            raise KeyfenceError(
                errno.EINVAL, f"{self.name} takes {len(self.args)} arguments, not {len(args)}"
            )
        for index, (value, allowed) in enumerate(zip(args, self.args, strict=True)):
            if allowed is not ANY and type(value) not in allowed:
                names = "/".join(t.__name__ for t in allowed)
                raise KeyfenceError(
                    errno.EINVAL, f"{self.name}: argument {index + 1} must be {names}"
                )
            texts = value if type(value) is list else (value,)
            if any(type(t) is str and "\0" in t for t in texts):
                # the kernel takes C strings: a NUL cannot reach it, and here
                # it reached subprocess argv and os paths (ValueError)
                raise KeyfenceError(
                    errno.EINVAL, f"{self.name}: argument {index + 1} holds a NUL byte"
                )
        if not self.removal:
            if (
                request.timeout is not None
                or request.emergency
                or (request.progress and not self.progress)
            ):
                raise KeyfenceError(errno.EINVAL, f"{self.name} is not a removal")
        elif request.timeout is not None and not request.timeout >= 0:
            raise KeyfenceError(errno.EINVAL, "timeout must be a number of seconds >= 0")

    def waits(self, request: protocol.Request) -> bool:
        """Whether this call must run on a thread (checked arguments)."""
        if self.removal and request.emergency:
            return False  # nothing waits in an emergency: the loop runs it
        return self.may_wait(request)


# -- handlers


def _service(name: str, *, removal: bool = False) -> Handler:
    """The key service's method ``name``, called for the connection's caller."""

    def call(conn: Connection, request: protocol.Request) -> Any:
        method: Callable[..., Any] = getattr(conn.daemon.service, name)
        caller = conn.caller_for(request)
        with inside_fence(request.fence):
            if not removal:
                return method(caller, *request.args)
            progress = conn.progress_sender(request.id) if request.progress else None
            return method(
                caller,
                *request.args,
                timeout=request.timeout,
                emergency=request.emergency,
                progress=progress,
            )

    return call


def _watch(conn: Connection, request: protocol.Request) -> int:
    key_id, events, sync, name = request.args
    mask = KeyEvent(events & KeyEvent.ALL) or KeyEvent.ALL
    return conn.watch(key_id, mask, sync, name)


def _unwatch(conn: Connection, request: protocol.Request) -> None:
    conn.unwatch(request.args[0])


def _key_users(conn: Connection, request: protocol.Request) -> list[list[int]]:
    return [
        [u.uid, u.nkeys, u.qnkeys, u.qnbytes, u.maxkeys, u.maxbytes]
        for u in conn.daemon.service.key_users()
    ]


def _keyring_tree(conn: Connection, request: protocol.Request) -> list[object]:
    key_id, levels = request.args
    root, entries = keyring_tree(conn.daemon.service, conn.caller_for(request), key_id, levels)
    return [root, entries]


def _keyring_members(conn: Connection, request: protocol.Request) -> list[list[int | str]]:
    return keyring_members(conn.daemon.service, conn.caller_for(request), request.args[0])


def _ping(conn: Connection, request: protocol.Request) -> str:
    return "pong"


def _mount(conn: Connection, request: protocol.Request) -> None:
    backing, mountpoint, options = request.args
    if not all(type(o) is str for o in options):
        raise KeyfenceError(errno.EINVAL, "mount options must be strings")
    conn.daemon.mounts.mount(conn.caller, backing, mountpoint, options)


def _umount(conn: Connection, request: protocol.Request) -> None:
    progress = conn.progress_sender(request.id) if request.progress else None
    conn.daemon.mounts.umount(conn.caller, request.args[0], progress=progress)


def _mounts(conn: Connection, request: protocol.Request) -> Any:
    return conn.daemon.mounts.describe(conn.caller)


def _worker_find_key(conn: Connection, request: protocol.Request) -> Any:
    pid, descriptions = request.args
    if not all(type(d) is str for d in descriptions):
        raise KeyfenceError(errno.EINVAL, "descriptions must be strings")
    assert conn.mount is not None
    return conn.daemon.mounts.find_key(conn.mount, pid, descriptions)


def _worker_report(conn: Connection, request: protocol.Request) -> None:
    assert conn.mount is not None
    conn.daemon.mounts.report(conn.mount, request.args[0], request.args[1])


def _table(*ops: Op) -> dict[str, Op]:
    return {op.name: op for op in ops}


OPERATIONS: dict[str, Op] = _table(
    # keys (keyfence.keys.KeyService); an add, link or joined session may
    # displace a key, which goes through the removal path and may wait
    Op("add_key", (STR, OPT_STR, OPT_BYTES, INT), _service("add_key"), always, payload_args=(2,)),
    # request_key waits: for its request-key handler, and (even without
    # callout information) for a key another request is constructing
    Op("request_key", (STR, STR, OPT_STR, INT), _service("request_key"), always),
    Op("get_keyring_id", (INT, BOOL), _service("get_keyring_id")),
    Op("join_session_keyring", (OPT_STR,), _service("join_session_keyring"), always),
    Op(
        "session_to_parent",
        (),
        _service("session_to_parent", removal=True),
        always,
        removal=True,
    ),
    Op("update", (INT, OPT_BYTES), _service("update"), payload_args=(1,)),
    Op("revoke", (INT,), _service("revoke", removal=True), always, removal=True),
    Op("chown", (INT, INT, INT), _service("chown")),
    Op("setperm", (INT, INT), _service("setperm")),
    Op("describe", (INT,), _service("describe")),
    Op("clear", (INT,), _service("clear", removal=True), always, removal=True),
    Op("link", (INT, INT), _service("link"), always),
    Op("unlink", (INT, INT), _service("unlink", removal=True), always, removal=True),
    Op("search", (INT, STR, STR, INT), _service("search"), unless_no_destination),
    Op("read", (INT,), _service("read"), payload_reply=True),
    Op("list_keyring", (INT,), _service("list_keyring")),
    # keyctl show's describe + read of every key below a keyring, and
    # list's read + describe of each member, in one request each
    # (keys/keyring_tree.py)
    Op("keyring_tree", (INT, INT), _keyring_tree),
    Op("keyring_members", (INT,), _keyring_members),
    Op("set_timeout", (INT, INT), _service("set_timeout")),
    Op("invalidate", (INT,), _service("invalidate", removal=True), always, removal=True),
    # keyfence lock: a filesystem key, whoever's keyrings hold it (the owner or root)
    Op(
        "lock_filesystem_key",
        (INT,),
        _service("invalidate_filesystem_key", removal=True),
        always,
        removal=True,
    ),
    Op("move", (INT, INT, INT, INT), _service("move", removal=True), always, removal=True),
    Op("get_security", (INT,), _service("get_security")),
    # keyctl's %type:desc when request_key finds nothing: /proc/keys's lines
    Op("viewable_keys", (STR, STR), _service("viewable_keys")),
    # request-key: the handler instantiates the key under construction (and
    # may link it into a destination keyring, displacing another: may wait)
    Op(
        "instantiate",
        (INT, OPT_BYTES, INT),
        _service("instantiate"),
        always,
        payload_args=(1,),
    ),
    Op("reject", (INT, INT, INT, INT), _service("reject"), always),
    Op("assume_authority", (INT,), _service("assume_authority")),
    Op("key_users", (), _key_users),
    # the connection's own watches
    Op("watch", (INT, INT, BOOL, OPT_STR), _watch),
    Op("unwatch", (INT,), _unwatch),
    Op("ping", (), _ping),
    # mounts (keyfence.server.mounts); mount waits for the worker to start
    Op("mount", (STR, STR, LIST), _mount, always),
    Op("umount", (STR,), _umount, always, progress=True),
    Op("mounts", (), _mounts),
    # a lookup for a FUSE request: may meet a key under construction and wait
    Op(
        "worker_find_key",
        (INT, LIST),
        _worker_find_key,
        always,
        worker_only=True,
        payload_reply=True,
    ),
    Op("worker_report", (STR, ANY), _worker_report, worker_only=True),
)
