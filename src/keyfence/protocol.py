"""The wire protocol every keyfence process speaks (docs/protocol.md).

A connection carries frames: a 4-byte big-endian length, then one msgpack
message of at most :data:`MAX_FRAME` bytes.  Messages are tagged msgspec
structs, validated on decode: a frame that does not decode to one of them
is a protocol error (the peer gets an :class:`Error` and, for framing
errors, the connection is closed).

Order: the client sends :class:`Hello` first and gets :class:`Welcome`;
then any number of :class:`Request` (each answered by one :class:`Reply`
or :class:`Error` with the same id, possibly preceded by
:class:`Status` updates), while the server pushes :class:`Event`
for the client's watches.  An event of a synchronous watch in the
``before`` phase carries ``ack=True``: the removal waits until the client
sends :class:`Ack` for its ``seq`` (or drops the connection, which counts
as done); meanwhile the client may send :class:`Progress`.

Framing, the protocol version, the frame limit, the event bits and each
message's field names are defined once, in :mod:`keyfence.wire` (which the
lean client imports instead of this module); the structs here must match
:data:`keyfence.wire.FIELDS`, checked when this module is imported.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import msgspec

from keyfence import wire
from keyfence.wire import ALL_EVENTS, EVENT_BITS, MAX_FRAME, PROTOCOL_VERSION

__all__ = ["ALL_EVENTS", "EVENT_BITS", "MAX_FRAME", "PROTOCOL_VERSION"]


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    version: int
    client: str = ""


class Welcome(msgspec.Struct, tag="welcome", forbid_unknown_fields=True):
    version: int
    server: str
    pid: int
    uid: int
    gid: int
    session: int
    """The POSIX session id the server sees for this client."""


class Request(msgspec.Struct, tag="req", forbid_unknown_fields=True):
    id: int
    op: str
    args: list[Any] = []
    """Positional arguments; each operation checks their types (the
    daemon's dispatch table), since msgspec unions cannot mix str and bytes."""
    timeout: float | None = None
    """For removals: abort after this many seconds, keys intact."""
    emergency: bool = False
    progress: bool = False
    """For removals: send Status while watchers flush."""
    fence: int = 0
    """Sent from inside a synchronous watcher's callback for removal
    ``fence``: a removal of the keys that fence holds is EDEADLK at once
    (it would wait for the very callback that asks).  Claiming one only
    makes the caller's own request fail sooner."""
    tid: int = 0
    """The calling thread, when it is not the process's main thread: its
    ``@t`` (and the FUSE lookups') is that thread's own, as the kernel's
    credentials are per thread.  The daemon takes it only for a thread of
    the connected process (``/proc/PID/task/TID``)."""


class Reply(msgspec.Struct, tag="reply", forbid_unknown_fields=True):
    id: int
    value: Any = None


class Error(msgspec.Struct, tag="error", forbid_unknown_fields=True):
    id: int
    """The request's id, or 0 for an error about the connection itself."""
    errno: int
    message: str


class Pending(msgspec.Struct, forbid_unknown_fields=True):
    watcher: str
    key: int
    remaining_bytes: int | None = None
    note: str = ""


class Status(msgspec.Struct, tag="status", forbid_unknown_fields=True):
    id: int
    op: str
    removal: int
    keys: int
    elapsed: float
    pending: list[Pending] = []

    @property
    def remaining_bytes(self) -> int:
        return sum(p.remaining_bytes or 0 for p in self.pending)


class Event(msgspec.Struct, tag="event", forbid_unknown_fields=True):
    watch: int
    seq: int
    key: int
    event: str
    """keyctl's word for it: inst, upd, link, unlk, clr, rev, inv, attr, exp, gc; or
    loss: notifications to this watch were dropped, its uid's queue full."""
    aux: int | None = None
    op: str = ""
    uid: int | None = None
    pid: int | None = None
    phase: str = "after"
    emergency: bool = False
    removal: int = 0
    description: Any = ""
    """The key's description: str (a :data:`~keyfence.wire.TEXT_EXT` on the
    wire where it is not UTF-8)."""
    ack: bool = False


class Ack(msgspec.Struct, tag="ack", forbid_unknown_fields=True):
    seq: int
    errno: int = 0
    """Non-zero: the watcher failed; the removal is aborted with this errno."""
    message: str = ""


class Progress(msgspec.Struct, tag="progress", forbid_unknown_fields=True):
    seq: int
    remaining_bytes: int | None = None
    note: str = ""


Message = Hello | Welcome | Request | Reply | Error | Status | Event | Ack | Progress


def _ext_hook(code: int, data: memoryview) -> str:
    if code != wire.TEXT_EXT:
        raise msgspec.ValidationError(f"msgpack ext type {code} is not used by the protocol")
    return wire.text_of(data)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message, ext_hook=_ext_hook)


def _check_fields() -> None:
    """The structs say what keyfence.wire.FIELDS says (the lean client's view)."""
    structs: list[type[msgspec.Struct]] = [
        Hello,
        Welcome,
        Request,
        Reply,
        Error,
        Status,
        Event,
        Ack,
        Progress,
    ]
    for struct in structs:
        tag = struct.__struct_config__.tag
        if wire.FIELDS.get(str(tag)) != struct.__struct_fields__:
            raise AssertionError(f"protocol.{struct.__name__} does not match wire.FIELDS")
    if wire.FIELDS["pending"] != Pending.__struct_fields__:
        raise AssertionError("protocol.Pending does not match wire.FIELDS")


_check_fields()


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal
        """True when the stream can no longer be trusted (framing)."""


_ROOM = 256
"""What a frame's buffer starts with when the sender names no size."""


def encode(message: Message, *, room: int = 0) -> bytearray:
    """One frame, in a ``bytearray`` the sender may zero once it is sent;
    ValueError if the message is too large for a frame.

    msgspec encodes straight into the frame's buffer, after the header.  A
    message that outgrows the buffer makes msgspec reallocate it, and the
    old block is freed with what it held: a message carrying a key's
    payload names its size as ``room`` (:func:`room_for`), so it is
    encoded in one buffer and nothing of it is left behind.
    """
    frame = bytearray(wire.HEADER_SIZE + max(room, _ROOM))
    try:
        _encoder.encode_into(message, frame, wire.HEADER_SIZE)
    except UnicodeEncodeError:  # text that is not UTF-8 somewhere in it (rare)
        wire.zero(frame)
        frame = bytearray(wire.HEADER_SIZE + max(room, _ROOM))
        _encoder.encode_into(_with_text_exts(message), frame, wire.HEADER_SIZE)
    size = len(frame) - wire.HEADER_SIZE
    if size > wire.MAX_FRAME:
        wire.zero(frame)
        raise ValueError(f"message of {size} bytes exceeds the {wire.MAX_FRAME}-byte frame limit")
    frame[: wire.HEADER_SIZE] = size.to_bytes(wire.HEADER_SIZE, "big")
    return frame


_EXACT_TEXT = frozenset({"args", "value", "description"})
"""Fields (typed Any) whose text that is not UTF-8 goes as it is, a
:data:`~keyfence.wire.TEXT_EXT`: a request's arguments, an answer, an
event's key description.  In every other field (str: messages, notes,
names) such bytes are shown as ``\\xe9``."""


def _with_text_exts(message: Message) -> object:
    """``message`` as builtins with its text that is not UTF-8 made
    encodable (see :data:`_EXACT_TEXT`); bytes stay the same objects."""
    fields = msgspec.to_builtins(message, builtin_types=(bytes, bytearray, memoryview))
    return {
        k: _texts(v, exact=k in _EXACT_TEXT) for k, v in cast(dict[str, object], fields).items()
    }


def _texts(value: object, *, exact: bool) -> object:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogateescape")
            if exact:
                return msgspec.msgpack.Ext(wire.TEXT_EXT, raw)
            return raw.decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, list):
        return [_texts(item, exact=exact) for item in value]
    if isinstance(value, dict):
        return {_texts(k, exact=exact): _texts(v, exact=exact) for k, v in value.items()}
    return value


def room_for(value: object) -> int:
    """An upper bound of the bytes ``value`` takes in msgpack, plus what a
    message around it adds (for :func:`encode`'s ``room``)."""
    return 64 + _room(value, 0)


def _room(value: object, depth: int) -> int:
    if isinstance(value, bytes | bytearray | memoryview):
        return 5 + len(value)
    if isinstance(value, str):
        return 5 + 4 * len(value)  # UTF-8: at most 4 bytes a character
    if depth > 64:  # deeper than any decoder takes: let the encoder refuse it
        return 0
    if isinstance(value, list | tuple):
        return 5 + sum(_room(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return 5 + sum(_room(k, depth + 1) + _room(v, depth + 1) for k, v in value.items())
    return 9  # nil, bool, int, float


def decode(body: bytes | bytearray | memoryview) -> Message:
    try:
        message: Message = _decoder.decode(body)
    except msgspec.ValidationError as err:
        raise ProtocolError(f"invalid message: {err}", fatal=False) from None
    except msgspec.DecodeError as err:
        raise ProtocolError(f"undecodable message: {err}", fatal=False) from None
    except RecursionError:  # msgspec's nesting limit: not a DecodeError
        raise ProtocolError("undecodable message: nested too deeply", fatal=False) from None
    return message


def read_frame(sock: socket.socket) -> bytes | None:
    """One frame's body, read blocking; None at a clean end of stream."""
    try:
        return wire.read_body(sock)
    except wire.WireError as err:
        raise ProtocolError(str(err), fatal=True) from None


def read_message(sock: socket.socket) -> Message | None:
    body = read_frame(sock)
    return None if body is None else decode(body)
