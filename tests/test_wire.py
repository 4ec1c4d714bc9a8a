"""The client's lean msgpack codec agrees with msgspec both ways."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyfence import protocol, wire

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=70_000)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=20), inner, max_size=20)
    ),
    max_leaves=40,
)


@given(values)
def test_pack_decodes_with_msgspec(value: object) -> None:
    assert msgspec.msgpack.decode(wire.pack(value)) == value


@given(values)
def test_unpack_reads_msgspec(value: object) -> None:
    assert wire.unpack(msgspec.msgpack.encode(value)) == value


def test_protocol_messages_round_trip() -> None:
    request = {"type": "req", "id": 3, "op": "add_key", "args": ["user", "d", b"x", -3]}
    decoded = protocol.decode(wire.pack(request))
    assert decoded == protocol.Request(id=3, op="add_key", args=["user", "d", b"x", -3])
    welcome = protocol.Welcome(version=1, server="s", pid=1, uid=2, gid=3, session=4)
    assert wire.unpack(protocol.encode(welcome)[4:]) == msgspec.to_builtins(welcome) | {
        "type": "welcome"
    }


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xd9\x05ab", b"\xc4\x10x", b"\x92\x01", b"\x81\xc0\x01", b"\x01\x02"],
)
def test_bad_bytes_are_wire_errors(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.unpack(data)


def test_nesting_is_bounded() -> None:
    with pytest.raises(wire.WireError):
        wire.unpack(b"\x91" * 100 + b"\xc0")


def test_one_set_of_constants_and_fields() -> None:
    """The client's views of the messages, the daemon's structs and wire.py
    agree (protocol.py also checks its structs against wire.FIELDS when it
    is imported)."""
    from keyfence import client

    assert protocol.PROTOCOL_VERSION == client.PROTOCOL_VERSION == wire.PROTOCOL_VERSION
    assert protocol.MAX_FRAME == wire.MAX_FRAME and protocol.EVENT_BITS is wire.EVENT_BITS
    assert set(client.ServerInfo.__slots__) == set(wire.FIELDS["welcome"])
    assert set(client.PendingWatcher.__slots__) == set(wire.FIELDS["pending"])
    assert set(client.RemovalStatus.__slots__) == set(wire.FIELDS["status"]) - {"id"}
    note = set(client.RemoteNotification.__slots__)
    assert note - {"_client", "_seq"} == set(wire.FIELDS["event"]) - {"seq", "ack"}


def test_frame_reader_and_split_frames_agree_with_encode() -> None:
    import socket

    messages = [
        protocol.Reply(id=i, value=b"x" * size) for i, size in enumerate([0, 10, 70_000, 3])
    ]
    data = b"".join(protocol.encode(m) for m in messages)
    buffer = wire.ReceiveBuffer()
    buffer.append(data[:-5])
    bodies, used, error = wire.split_frames(buffer.view())
    assert error is None and [protocol.decode(b) for b in bodies] == messages[:3]
    buffer.take(used)
    buffer.append(data[-5:])
    bodies, used, error = wire.split_frames(buffer.view(), limit=1)
    assert [protocol.decode(b) for b in bodies] == messages[3:] and used == len(buffer)
    assert wire.split_frames(b"\x00\x00\x00\x01x\xff\xff\xff\xff")[1:][1] is not None
    a, b = socket.socketpair()
    with a, b:
        reader = wire.FrameReader(b)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        got = [reader.read() for _ in messages]
        assert [g["id"] for g in got if g is not None] == [0, 1, 2, 3]
        assert reader.read() is None


@pytest.mark.parametrize("split", [False, True], ids=["one-recv", "buffered"])
def test_frame_reader_leaves_no_copy_of_a_payload(split: bool) -> None:
    """A reply carrying a key (a mount worker's lookup): once the caller has
    wiped the payload it got, no other copy is left in this process, not
    even in memory the reader freed (a bytes copy of the body was)."""
    import gc
    import os
    import socket

    from keyfence.keys.secret import wipe_bytes
    from keyfence.testing.memory import addresses_in_memory

    needle = bytearray(os.urandom(64))
    frame = bytearray(b"\x00\x00\x00\x58\x83\xa4type\xa5reply\xa2id\x07\xa5value\xc4\x40")
    frame += needle
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    a, b = socket.socketpair()
    with a, b:
        reader = wire.FrameReader(b)
        if split:  # the header first, alone: the body comes through the buffer
            a.sendall(frame[:10])
            b.settimeout(0.2)  # the reader takes the first part, then times out
            with pytest.raises(TimeoutError):
                reader.read()
            b.settimeout(None)
            a.sendall(frame[10:])
        else:
            a.sendall(frame)
        frame[:] = bytes(len(frame))
        message = reader.read()
        assert message is not None
        payload = message["value"]
        assert isinstance(payload, bytes) and payload == needle
        wipe_bytes(payload)
        del message, payload
    gc.collect()
    probe = bytes(needle)  # found once: this copy, at its own address
    needle[:] = bytes(len(needle))
    found = addresses_in_memory(os.getpid(), probe)
    assert len(found) == 1, [hex(a) for a in found]


def _copies_left(needle: bytearray) -> int:
    """Copies of ``needle`` in this process besides one probe (``needle``
    itself is zeroed first)."""
    import gc
    import os

    from keyfence.testing.memory import addresses_in_memory

    gc.collect()
    probe = bytes(needle)
    needle[:] = bytes(len(needle))
    return len(addresses_in_memory(os.getpid(), probe)) - 1


def test_receive_buffer_leaves_no_copy_when_it_grows() -> None:
    """Bytes that arrive a few at a time: the buffer grows (a new one, the
    old zeroed), moves what it holds to the front, and zeroes what is
    taken; none of it leaves a copy of a payload behind."""
    import os

    needle = bytearray(os.urandom(64))
    stream = bytearray(30_064)  # built in place: a concatenation would leave copies
    stream[:10_000] = os.urandom(10_000)
    stream[10_000:10_064] = needle
    stream[10_064:] = os.urandom(20_000)
    buffer = wire.ReceiveBuffer()
    view = memoryview(stream)
    for at in range(0, len(stream), 700):
        buffer.append(view[at : at + 700])
        if len(buffer) > 5_000:
            buffer.take(3_000)  # taken from the front while more comes
    assert bytes(buffer.view()) == bytes(stream[-len(buffer) :])
    buffer.clear()
    assert len(buffer) == 0
    view.release()
    stream[:] = bytes(len(stream))
    assert _copies_left(needle) == 0


def test_a_payload_reply_is_encoded_without_a_copy_left() -> None:
    """The daemon's answer to ``read``: encoded with room for its payload,
    the frame zeroed once sent and the payload's bytes wiped, nothing of
    the payload is left (a frame that outgrows its buffer is reallocated,
    and the smaller one freed with what it held)."""
    import os

    from keyfence.keys.secret import wipe_bytes

    needle = bytearray(os.urandom(64))
    made = bytearray(6064)  # built in place: a concatenation would leave copies
    made[:3000] = os.urandom(3000)
    made[3000:3064] = needle
    made[3064:] = os.urandom(3000)
    payload = bytes(made)
    wire.zero(made)
    reply = protocol.Reply(id=9, value=[12345, "desc", payload])
    frame = protocol.encode(reply, room=protocol.room_for(reply.value))
    decoded = wire.unpack(memoryview(frame)[wire.HEADER_SIZE :])
    assert decoded == {"type": "reply", "id": 9, "value": [12345, "desc", payload]}
    assert isinstance(decoded, dict)
    wipe_bytes(decoded["value"][2])
    wire.zero(frame)
    wipe_bytes(payload)
    del reply, payload, decoded
    assert _copies_left(needle) == 0


def test_protocol_encode_refuses_a_frame_too_large() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        protocol.encode(protocol.Reply(id=1, value=bytes(wire.MAX_FRAME)))


@given(values)
def test_room_for_bounds_what_msgspec_writes(value: object) -> None:
    """An answer encoded with ``room_for`` its value never outgrows its
    buffer (a reallocation would leave the smaller one behind, unzeroed)."""
    reply = protocol.Reply(id=2**31 - 1, value=value)
    frame = protocol.encode(reply, room=protocol.room_for(value))
    assert len(frame) - wire.HEADER_SIZE <= protocol.room_for(value)
