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
from typing import Any

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
    """keyctl's word for it: inst, upd, link, unlk, clr, rev, inv, attr, exp, gc."""
    aux: int | None = None
    op: str = ""
    uid: int | None = None
    pid: int | None = None
    phase: str = "after"
    emergency: bool = False
    removal: int = 0
    description: str = ""
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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


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


def encode(message: Message) -> bytes:
    """One frame; ValueError if the message is too large for one."""
    return wire.framed(_encoder.encode(message))


def decode(body: bytes) -> Message:
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
