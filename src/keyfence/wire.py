"""The wire's one framing and one set of constants, and a lean msgpack codec.

Everything both ends of a connection must agree on lives here, once:
:data:`PROTOCOL_VERSION`, :data:`MAX_FRAME`, the frame header, the event
bits, and the fields of each message (:data:`FIELDS`, which the msgspec
structs of :mod:`keyfence.protocol` are checked against when it is
imported).  The daemon decodes message bodies with msgspec, which validates
them; importing msgspec costs a command-line client about 10 ms, a quarter
of its budget.  Clients therefore encode and decode here, in plain Python,
the subset of msgpack the protocol uses (nil, bool, int, float, str, bin,
array, map, and ext :data:`TEXT_EXT`) -- messages are dicts whose ``"type"`` is the struct's tag,
exactly as msgspec lays tagged structs out.  tests/test_wire.py checks both
directions against msgspec.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs a client 4 ms to import; mypy knows the name
if TYPE_CHECKING:
    import _socket

PROTOCOL_VERSION = 1

MAX_FRAME = 2 * 1024 * 1024
"""Big enough for the largest add_key payload (1 MiB - 1) with room to spare."""

HEADER_SIZE = 4
"""A frame: a 4-byte big-endian body length, then the msgpack body."""

FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("version", "client"),
    "welcome": ("version", "server", "pid", "uid", "gid", "session"),
    "req": ("id", "op", "args", "timeout", "emergency", "progress", "fence", "tid"),
    "reply": ("id", "value"),
    "error": ("id", "errno", "message"),
    "status": ("id", "op", "removal", "keys", "elapsed", "pending"),
    "event": (
        "watch",
        "seq",
        "key",
        "event",
        "aux",
        "op",
        "uid",
        "pid",
        "phase",
        "emergency",
        "removal",
        "description",
        "ack",
    ),
    "ack": ("seq", "errno", "message"),
    "progress": ("seq", "remaining_bytes", "note"),
    "pending": ("watcher", "key", "remaining_bytes", "note"),
}
"""Each message's fields by tag (``pending``: the untagged entries of a
status).  keyfence.protocol's structs must have exactly these, in order."""

EVENT_BITS: dict[str, int] = {
    "inst": 0x001,
    "upd": 0x002,
    "link": 0x004,
    "unlk": 0x008,
    "clr": 0x010,
    "rev": 0x020,
    "inv": 0x040,
    "attr": 0x080,
    "exp": 0x100,
    "gc": 0x200,
}
"""Watch masks on the wire: keyctl's event words and the model's KeyEvent bits."""
ALL_EVENTS = 0x3FF

TEXT_EXT = 0
"""The msgpack ext type of text that is not UTF-8: a key's description, a
keyring's or a type's name may be any bytes but NUL, as the kernel's are
(keyfence.keys.text).  Its data are the bytes; decoded, a str with each
byte that is not UTF-8 as a lone surrogate (``surrogateescape``)."""

# Numbers go through int.to_bytes/from_bytes: struct (an extension module)
# costs a command-line client 0.7 ms to import; only floats (a removal's
# timeout, a status frame's elapsed time) import it, when they occur.


class WireError(ValueError):
    """Bytes that are not msgpack of the protocol's subset."""


def pack(obj: object) -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj: object, out: bytearray) -> None:
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif type(obj) is int:
        _pack_int(obj, out)
    elif type(obj) is float:
        import struct

        out.append(0xCB)
        out += struct.pack(">d", obj)
    elif type(obj) is str:
        try:
            data = obj.encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8, held as surrogates
            _pack_ext(TEXT_EXT, obj.encode("utf-8", "surrogateescape"), out)
            return
        if len(data) < 32:
            out.append(0xA0 | len(data))
        else:
            _pack_length(len(data), 0xD9, out)
        out += data
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        _pack_length(len(data), 0xC4, out)
        out += data
    elif isinstance(obj, list | tuple):
        n = len(obj)
        if n < 16:
            out.append(0x90 | n)
        elif n < 0x10000:
            out += b"\xdc" + n.to_bytes(2, "big")
        else:
            out += b"\xdd" + n.to_bytes(4, "big")
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        n = len(obj)
        if n < 16:
            out.append(0x80 | n)
        elif n < 0x10000:
            out += b"\xde" + n.to_bytes(2, "big")
        else:
            out += b"\xdf" + n.to_bytes(4, "big")
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _pack_ext(code: int, data: bytes, out: bytearray) -> None:
    _pack_length(len(data), 0xC7, out)
    out.append(code)
    out += data


def _pack_length(n: int, tag8: int, out: bytearray) -> None:
    """str 8/16/32 (0xd9-0xdb), bin (0xc4-0xc6) and ext (0xc7-0xc9): the
    three tags follow each other, for a 1-, 2- and 4-byte length."""
    if n < 0x100:
        out.append(tag8)
        out += n.to_bytes(1, "big")
    elif n < 0x10000:
        out.append(tag8 + 1)
        out += n.to_bytes(2, "big")
    else:
        out.append(tag8 + 2)
        out += n.to_bytes(4, "big")


def _pack_int(n: int, out: bytearray) -> None:
    if 0 <= n < 0x80:
        out.append(n)
    elif -32 <= n < 0:
        out.append(n & 0xFF)
    elif n >= 0:
        if n < 0x100:
            out += b"\xcc" + n.to_bytes(1, "big")
        elif n < 0x10000:
            out += b"\xcd" + n.to_bytes(2, "big")
        elif n < 0x100000000:
            out += b"\xce" + n.to_bytes(4, "big")
        elif n < 1 << 64:
            out += b"\xcf" + n.to_bytes(8, "big")
        else:
            raise OverflowError("integer too large for msgpack")
    elif n >= -0x80:
        out += b"\xd0" + n.to_bytes(1, "big", signed=True)
    elif n >= -0x8000:
        out += b"\xd1" + n.to_bytes(2, "big", signed=True)
    elif n >= -0x80000000:
        out += b"\xd2" + n.to_bytes(4, "big", signed=True)
    elif n >= -(1 << 63):
        out += b"\xd3" + n.to_bytes(8, "big", signed=True)
    else:
        raise OverflowError("integer too large for msgpack")


_Data = bytes | memoryview
"""What the decoder reads: a body, or a view of a buffer zeroed afterwards."""


def unpack(data: _Data) -> object:
    obj, end = _unpack(data, 0, 0)
    if end != len(data):
        raise WireError("trailing bytes after the message")
    return obj


_MAX_DEPTH = 32


def _unpack(data: _Data, pos: int, depth: int) -> tuple[object, int]:
    if depth > _MAX_DEPTH:
        raise WireError("message nested too deeply")
    try:
        tag = data[pos]
    except IndexError:
        raise WireError("truncated message") from None
    pos += 1
    if tag < 0x80:
        return tag, pos
    if tag >= 0xE0:
        return tag - 0x100, pos
    if 0xA0 <= tag < 0xC0:
        return _str(data, pos, tag & 0x1F)
    if 0x90 <= tag < 0xA0:
        return _array(data, pos, tag & 0x0F, depth)
    if 0x80 <= tag < 0x90:
        return _map(data, pos, tag & 0x0F, depth)
    if tag == 0xC0:
        return None, pos
    if tag == 0xC2:
        return False, pos
    if tag == 0xC3:
        return True, pos
    size = _INTS.get(tag)
    if size is not None:
        return _number(data, pos, size, signed=tag >= 0xD0), pos + size
    if tag in (0xCA, 0xCB):
        import struct

        size, fmt = (4, ">f") if tag == 0xCA else (8, ">d")
        _check(data, pos + size)
        return struct.unpack_from(fmt, data, pos)[0], pos + size
    if 0xD4 <= tag <= 0xD8:  # fixext 1, 2, 4, 8, 16
        return _ext(data, pos, 1 << (tag - 0xD4))
    size = _LENGTHS.get(tag)
    if size is None:
        raise WireError(f"msgpack type 0x{tag:02x} is not used by the protocol")
    n = _number(data, pos, size, signed=False)
    pos += size
    if tag in (0xD9, 0xDA, 0xDB):
        return _str(data, pos, n)
    if tag in (0xC4, 0xC5, 0xC6):
        if pos + n > len(data):
            raise WireError("truncated bin")
        return bytes(data[pos : pos + n]), pos + n  # from a view: its one copy
    if tag in (0xC7, 0xC8, 0xC9):
        return _ext(data, pos, n)
    if tag in (0xDC, 0xDD):
        return _array(data, pos, n, depth)
    return _map(data, pos, n, depth)


_INTS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
"""Integer tags: the size of the big-endian value (0xD0-0xD3 signed)."""
_LENGTHS = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
_LENGTHS.update({0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4})
"""str, bin, ext, array and map tags: the size of their length."""


def _check(data: _Data, end: int) -> None:
    if end > len(data):
        raise WireError("truncated message")


def _number(data: _Data, pos: int, size: int, *, signed: bool) -> int:
    _check(data, pos + size)
    return int.from_bytes(data[pos : pos + size], "big", signed=signed)


def _str(data: _Data, pos: int, n: int) -> tuple[str, int]:
    if pos + n > len(data):
        raise WireError("truncated str")
    try:
        return str(data[pos : pos + n], "utf-8"), pos + n
    except UnicodeDecodeError:
        raise WireError("str is not UTF-8") from None


def _ext(data: _Data, pos: int, n: int) -> tuple[str, int]:
    """An ext of ``n`` bytes after its type byte at ``pos``: only text that
    is not UTF-8 is used (:data:`TEXT_EXT`)."""
    _check(data, pos + 1 + n)
    if data[pos] != TEXT_EXT:
        raise WireError(f"msgpack ext type {data[pos]} is not used by the protocol")
    return text_of(data[pos + 1 : pos + 1 + n]), pos + 1 + n


def text_of(data: bytes | memoryview) -> str:
    """A :data:`TEXT_EXT`'s str: its UTF-8, bytes that are not held as surrogates."""
    return str(data, "utf-8", "surrogateescape")


def _array(data: _Data, pos: int, n: int, depth: int) -> tuple[list[object], int]:
    items = []
    for _ in range(n):
        item, pos = _unpack(data, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(data: _Data, pos: int, n: int, depth: int) -> tuple[dict[object, object], int]:
    result: dict[object, object] = {}
    for _ in range(n):
        key, pos = _unpack(data, pos, depth + 1)
        value, pos = _unpack(data, pos, depth + 1)
        if not isinstance(key, str | int):
            raise WireError("map keys must be str or int")
        result[key] = value
    return result, pos


# -- framing


def framed(body: bytes) -> bytes:
    """``body`` with its header; ValueError if it is too large for a frame."""
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return len(body).to_bytes(4, "big") + body


def frame(message: dict[str, object]) -> bytes:
    return framed(pack(message))


def body_size(header: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """The body length a header announces; WireError past MAX_FRAME."""
    if len(header) < offset + HEADER_SIZE:
        raise WireError("truncated frame header")
    size = int.from_bytes(header[offset : offset + HEADER_SIZE], "big")
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return int(size)


def split_frames(
    data: bytes | bytearray | memoryview, limit: int | None = None
) -> tuple[list[bytearray], int, WireError | None]:
    """The bodies of the complete frames at the front of ``data`` (at most
    ``limit``), how many bytes those frames take, and the error, if any,
    of a header past MAX_FRAME after them (the stream can no longer be
    trusted from there on).  For readers that receive whatever the socket
    has (the daemon's event loop); the caller drops what was consumed.

    Each body is a ``bytearray`` of its own, for the caller to :func:`zero`
    once decoded: a body may carry a key's payload.
    """
    bodies: list[bytearray] = []
    view = memoryview(data)  # slices of a view copy nothing
    offset = 0
    end = len(view)
    error = None
    while end - offset >= HEADER_SIZE and (limit is None or len(bodies) < limit):
        try:
            size = body_size(view, offset)
        except WireError as err:
            error = err
            break
        start = offset + HEADER_SIZE
        if end - start < size:
            break
        bodies.append(bytearray(view[start : start + size]))
        offset = start + size
    return bodies, offset, error


_ZEROS = memoryview(bytes(64 * 1024))


def zero(buffer: bytearray | memoryview) -> None:
    """Overwrite ``buffer`` with zeros, in place (views of it may live on)."""
    size = len(buffer)
    buffer[:] = _ZEROS[:size] if size <= len(_ZEROS) else bytes(size)


class ReceiveBuffer:
    """Bytes received but not taken yet, kept so that none is left behind.

    A ``bytearray`` grown with ``+=`` is reallocated, and glibc frees the
    old block with whatever it held (a key on its way to a mount, an
    ``add_key`` payload); ``del b[:n]`` may move what is left the same way.
    This buffer is one ``bytearray`` that is never resized: a window of it
    holds the bytes.  Taking bytes zeroes them; when more room is needed, a
    new ``bytearray`` gets the live bytes and the old one is zeroed before
    it is dropped.  Once empty, a large one is let go (it is all zeros).
    """

    __slots__ = ("_data", "_end", "_start")

    KEEP = 64 * 1024
    """Capacity kept while empty; a larger buffer is let go then."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def view(self) -> memoryview:
        """The bytes held (valid until the next :meth:`append` or :meth:`take`)."""
        return memoryview(self._data)[self._start : self._end]

    def append(self, chunk: bytes | bytearray | memoryview) -> None:
        size = len(chunk)
        if self._end + size > len(self._data):
            self._make_room(size)
        memoryview(self._data)[self._end : self._end + size] = chunk
        self._end += size

    def _make_room(self, size: int) -> None:
        live = self._end - self._start
        old = memoryview(self._data)
        if live + size <= len(old):  # move the live bytes to the front
            old[:live] = old[self._start : self._end]  # contiguous: a memmove
            zero(old[live : self._end])
        else:
            grown = bytearray(max(live + size, 2 * len(old), 4096))
            grown[:live] = old[self._start : self._end]
            zero(old)
            self._data = grown
        self._start, self._end = 0, live

    def take(self, size: int) -> None:
        """Drop ``size`` bytes off the front, zeroed."""
        size = min(size, self._end - self._start)
        zero(memoryview(self._data)[self._start : self._start + size])
        self._start += size
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._data) > self.KEEP:
                self._data = bytearray()  # all zeros by now

    def clear(self) -> None:
        self.take(self._end - self._start)


def recv_exact(sock: _socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_body(sock: _socket.socket) -> bytes | None:
    """The next frame's body, read blocking; None at a clean end of stream.

    WireError for a header past MAX_FRAME or a stream ending inside a frame.
    """
    header = recv_exact(sock, HEADER_SIZE)
    if header is None:
        return None
    body = recv_exact(sock, body_size(header))
    if body is None:
        raise WireError("connection closed inside a frame")
    return body


def read(sock: _socket.socket) -> dict[str, object] | None:
    """The next message as a dict; None at the end of the stream.

    Reads exactly one frame (nothing beyond it): for a handshake, before a
    :class:`FrameReader` takes the socket over.
    """
    body = read_body(sock)
    return None if body is None else message_of(body)


def message_of(body: bytes | memoryview) -> dict[str, object]:
    message = unpack(body)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("a message must be a map with a 'type'")
    return message


class FrameReader:
    """Messages from a blocking socket, with as few recv calls as it can:
    one recv usually brings a whole reply (header and body), where reading
    the header and then the body costs two system calls per message.

    It receives into one buffer of its own and zeroes what it has read:
    a reply may carry a key's payload (a mount worker's lookups), and no
    copy of it may stay behind in the reader.
    """

    __slots__ = ("_buffer", "_scratch", "_sock")

    CHUNK = 64 * 1024

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buffer = ReceiveBuffer()
        self._scratch = memoryview(bytearray(self.CHUNK))

    def read(self) -> dict[str, object] | None:
        """The next message; None at a clean end of stream; WireError."""
        buffer = self._buffer
        scratch = self._scratch
        while True:
            have = len(buffer)
            if have >= HEADER_SIZE:
                want = HEADER_SIZE + body_size(buffer.view())
                if have >= want:
                    try:  # decoded from the buffer itself, zeroed once taken
                        return message_of(buffer.view()[HEADER_SIZE:want])
                    finally:
                        buffer.take(want)
            size = self._sock.recv_into(scratch)
            if not size:
                if buffer:
                    raise WireError("connection closed inside a frame")
                return None
            try:
                # the usual case, one whole message: straight from scratch
                if not buffer and size >= HEADER_SIZE and size == HEADER_SIZE + body_size(scratch):
                    return message_of(scratch[HEADER_SIZE:size])
                buffer.append(scratch[:size])
            finally:
                zero(scratch[:size])
