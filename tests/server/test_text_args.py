"""Text that is not UTF-8, in every text argument, against a real daemon.

The kernel takes a key's description, a keyring's name, a type name and
callout info as C strings: any bytes but NUL (keyfence.keys.text).  The wire
carries such text as msgpack's ext :data:`keyfence.wire.TEXT_EXT`, so a
hostile client may put it in any argument: the daemon must answer each such
request with its result or an errno, never an internal error, and log no
traceback.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from keyfence import protocol, wire
from keyfence.client import Client
from keyfence.server.optable import OPERATIONS, STR
from keyfence.testing.daemon import DaemonProcess

NOT_UTF8 = "caf\udce9"
"""``b"caf\\xe9"`` as Python holds it from argv or a file name."""

SESSION = -3

PLAUSIBLE: dict[str, list[Any]] = {
    "add_key": ["user", "plain", b"x", SESSION],
    "request_key": ["user", "plain", "info", 0],
    "join_session_keyring": ["plain"],
    "search": [SESSION, "user", "plain", 0],
    "viewable_keys": ["user", "plain"],
    "watch": [SESSION, 0, False, "plain"],
    "mount": ["/nonexistent/backing", "/nonexistent/mnt", ["ro"]],
    "umount": ["/nonexistent/mnt"],
}
"""Each operation that takes text, with arguments it could take."""


def _text_places(args: list[Any]) -> Iterator[tuple[int, ...]]:
    for i, value in enumerate(args):
        if isinstance(value, str):
            yield (i,)
        elif isinstance(value, list):
            yield from ((i, j) for j, item in enumerate(value) if isinstance(item, str))


CASES = [
    pytest.param(op, place, id=f"{op}-{'.'.join(map(str, place))}")
    for op, args in PLAUSIBLE.items()
    for place in _text_places(args)
]


def test_every_operation_taking_text_is_here() -> None:
    """A new operation with a text argument must join PLAUSIBLE."""
    takes_text = {name for name, op in OPERATIONS.items() if any(STR[0] in t for t in op.args)}
    takes_text -= {name for name, op in OPERATIONS.items() if op.worker_only}
    assert takes_text == set(PLAUSIBLE)


def _call(daemon: DaemonProcess, op: str, args: list[Any]) -> protocol.Message:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(daemon.socket)
        sock.settimeout(30)
        sock.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, "test")))
        assert isinstance(protocol.read_message(sock), protocol.Welcome)
        sock.sendall(protocol.encode(protocol.Request(id=1, op=op, args=args)))
        while True:
            message = protocol.read_message(sock)
            if isinstance(message, protocol.Reply | protocol.Error):
                return message


@pytest.mark.parametrize(("op", "place"), CASES)
def test_text_that_is_not_utf8_gets_an_answer(
    daemon: DaemonProcess, op: str, place: tuple[int, ...]
) -> None:
    args = [list(a) if isinstance(a, list) else a for a in PLAUSIBLE[op]]
    holder = args if len(place) == 1 else args[place[0]]
    holder[place[-1]] = NOT_UTF8
    answer = _call(daemon, op, args)
    if isinstance(answer, protocol.Error):
        assert answer.errno != errno.EIO, answer
    assert "Traceback" not in daemon.log_text()


@pytest.mark.parametrize(("op", "place"), CASES)
def test_a_nul_in_any_text_is_einval(
    daemon: DaemonProcess, op: str, place: tuple[int, ...]
) -> None:
    """A C string ends at its NUL, so none reaches the kernel; here it
    reached subprocess argv: request_key with one in its callout info (or
    description) raised ValueError in the daemon, answered EIO, and left
    the key under construction for ever, its quota held (a helper's attack
    run, 2026-12-07; failed before, as did add_key, which stored it)."""
    args = [list(a) if isinstance(a, list) else a for a in PLAUSIBLE[op]]
    holder = args if len(place) == 1 else args[place[0]]
    holder[place[-1]] = "a\0b"
    answer = _call(daemon, op, args)
    assert isinstance(answer, protocol.Error) and answer.errno == errno.EINVAL, answer
    assert "Traceback" not in daemon.log_text()


def test_a_description_that_is_not_utf8_round_trips(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        ring = c.add_key("keyring", "ring\udcff", None, SESSION)
        key = c.add_key("user", NOT_UTF8, b"payload", ring)
        assert c.describe(key).endswith(f";{NOT_UTF8}")
        assert c.describe(ring).endswith(";ring\udcff")
        assert c.search(SESSION, "user", NOT_UTF8, 0) == key
        with pytest.raises(Exception, match="Required key not available"):
            c.search(SESSION, "user", "caf\udce8", 0)  # another byte: another key
        # 4095 bytes is the most the kernel takes, counted as bytes
        assert c.add_key("user", "\udcff" * 4095, b"x", ring)
        with pytest.raises(Exception, match="Invalid argument"):
            c.add_key("user", "\udcff" * 4096, b"x", ring)
    assert "Traceback" not in daemon.log_text()


def test_the_lean_codec_and_msgspec_agree_on_text_that_is_not_utf8() -> None:
    for size in (0, 1, 3, 4, 15, 16, 17, 255, 256, 70000):
        text = "x" * size + "\udce9"
        message = {"type": "reply", "id": 1, "value": [text, b"\xe9", {"k": text}]}
        decoded = protocol.decode(wire.pack(message))
        assert isinstance(decoded, protocol.Reply)
        assert decoded.value == [text, b"\xe9", {"k": text}]
        frame = protocol.encode(protocol.Reply(1, [text, b"\xe9", {"k": text}]))
        assert wire.unpack(bytes(frame[wire.HEADER_SIZE :])) == message


def test_other_ext_types_are_refused() -> None:
    body = wire.pack({"type": "reply", "id": 1, "value": None})[:-1] + b"\xd4\x05\x00"
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(body)
    with pytest.raises(wire.WireError):
        wire.unpack(body)
