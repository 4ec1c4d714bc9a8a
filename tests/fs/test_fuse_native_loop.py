"""The FUSE loop's common case in C (src/keyfence/fs/fuse/_loop.c), on its own.

A SOCK_SEQPACKET socket pair stands in for /dev/fuse: one datagram per
read, as the kernel hands out requests, and the answers come back on the
same descriptor.  Each test writes requests as the kernel would, calls
``_loop.serve`` and checks the status, the answer on the wire, the
counters and the buffer.  tests/fs/test_fuse_loop.py runs the same code
under real mounts, with the session around it.
"""

from __future__ import annotations

import errno
import socket
import struct
import types
from collections.abc import Iterator
from typing import Any

import pytest
from pyfuse3 import FUSEError

# built by setup.py (build_ext): not built is a failure here, not a skip
from keyfence.fs.fuse import _loop
from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse.dispatch import Caller

GETATTR, LOOKUP, FORGET = p.GETATTR, p.LOOKUP, p.FORGET


class Pair:
    def __init__(self) -> None:
        self.kernel, self.server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.setblocking(False)
        self.buf = bytearray(p.BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.by_opcode = [0] * 64
        self.handlers: dict[int, Any] = {}

    def request(self, opcode: int, unique: int, body: bytes = b"", *, length: int | None = None):
        size = p.IN_HEADER.size + len(body) if length is None else length
        head = p.IN_HEADER.pack(size, opcode, unique, 7, 1000, 1001, 4242, 0, 0)
        self.kernel.send(head + body)

    def serve(self, *, budget: int = 32, spin_ns: int = 0) -> tuple[Any, ...]:
        return _loop.serve(
            self.server.fileno(), self.buf, self.view, self.handlers, Caller, FUSEError,
            self.by_opcode, spin_ns, budget,
        )  # fmt: skip

    def answer(self) -> tuple[int, int, bytes]:
        data = self.kernel.recv(1 << 21)
        length, error, unique = p.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return error, unique, data[p.OUT_HEADER.size :]

    def no_answer(self) -> bool:
        self.kernel.setblocking(False)
        try:
            self.kernel.recv(1 << 21)
        except BlockingIOError:
            return True
        finally:
            self.kernel.setblocking(True)
        return False


@pytest.fixture
def pair() -> Iterator[Pair]:
    pr = Pair()
    try:
        yield pr
    finally:
        pr.kernel.close()
        pr.server.close()


def test_an_answer_goes_back_with_the_requests_unique_and_the_buffer_is_zeroed(pair: Pair) -> None:
    seen: list[tuple[int, int, int, int, bytes]] = []

    async def getattr_(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        seen.append((nodeid, caller.uid, caller.gid, caller.pid, bytes(body)))
        return b"attributes"

    pair.handlers[GETATTR] = getattr_
    pair.request(GETATTR, 11, b"plaintext-like body")
    status, served, *_ = pair.serve()
    assert status == _loop.IDLE
    assert served == 1
    assert seen == [(7, 1000, 1001, 4242, b"plaintext-like body")]
    assert pair.answer() == (0, 11, b"attributes")
    assert pair.by_opcode[GETATTR] == 1
    assert not any(pair.buf), "the request stayed in the buffer"


def test_answers_of_several_parts_none_and_no_reply(pair: Pair) -> None:
    async def parts(nodeid: int, caller: Caller, body: memoryview) -> list[Any]:
        return [b"ab", bytearray(b"cd"), memoryview(b"ef")]

    async def nothing(nodeid: int, caller: Caller, body: memoryview) -> None:
        return None

    pair.handlers[GETATTR] = parts
    pair.handlers[LOOKUP] = nothing
    pair.handlers[FORGET] = nothing
    pair.request(GETATTR, 1)
    pair.request(LOOKUP, 2, b"name\0")
    pair.request(FORGET, 3, struct.pack("=Q", 1))
    status, served, *_ = pair.serve()
    assert (status, served) == (_loop.IDLE, 3)
    assert pair.answer() == (0, 1, b"abcdef")
    assert pair.answer() == (0, 2, b"")
    assert pair.no_answer(), "FORGET is never answered"


@pytest.mark.parametrize(
    ("code", "sent"), [(errno.ENOENT, errno.ENOENT), (0, errno.EIO), (4096, errno.EIO)]
)
def test_a_fuse_error_is_answered_with_its_errno(pair: Pair, code: int, sent: int) -> None:
    async def fails(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        raise FUSEError(code)

    pair.handlers[LOOKUP] = fails
    pair.request(LOOKUP, 5, b"x\0")
    status, served, *_ = pair.serve()
    assert (status, served) == (_loop.IDLE, 1)
    assert pair.answer() == (-sent, 5, b"")
    assert not any(pair.buf)


def test_any_other_exception_goes_back_to_the_session_unanswered(pair: Pair) -> None:
    async def bug(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        raise RuntimeError("a handler's bug")

    pair.handlers[GETATTR] = bug
    pair.request(GETATTR, 9, b"body")
    status, served, _, _, _, n, exc, unique, opcode, _ = pair.serve()
    assert status == _loop.FAILED
    assert (served, n, unique, opcode) == (1, p.IN_HEADER.size + 4, 9, GETATTR)
    assert isinstance(exc, RuntimeError)
    assert exc.__traceback__ is not None, "the session logs where it came from"
    assert pair.no_answer()
    assert bytes(pair.buf[p.IN_HEADER.size : n]) == b"body", "the session zeroes it"


def test_a_suspended_handler_is_handed_over_with_its_trap(pair: Pair) -> None:
    trap = object()

    @types.coroutine
    def wait() -> Any:
        return (yield trap)

    async def slow(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        got = await wait()
        return b"after " + got

    pair.handlers[GETATTR] = slow
    pair.request(GETATTR, 21)
    status, served, _, _, _, n, coro, yielded, unique, opcode = pair.serve()
    assert status == _loop.SUSPENDED
    assert (served, n, unique, opcode) == (1, p.IN_HEADER.size, 21, GETATTR)
    assert yielded is trap
    with pytest.raises(StopIteration) as done:
        coro.send(b"wake")
    assert done.value.value == b"after wake"
    assert pair.no_answer(), "the session answers a suspended handler"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda pr: pr.request(p.INIT, 1, bytes(64)), id="INIT"),
        pytest.param(lambda pr: pr.request(p.INTERRUPT, 2, bytes(8)), id="INTERRUPT"),
        pytest.param(lambda pr: pr.request(99, 3), id="no-handler"),
        pytest.param(lambda pr: pr.request(GETATTR, 4, b"abc", length=100), id="length"),
        pytest.param(lambda pr: pr.kernel.send(b"short"), id="short"),
    ],
)
def test_what_the_session_serves_itself(pair: Pair, make: Any) -> None:
    async def never(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        raise AssertionError("not for the common case")

    pair.handlers[GETATTR] = never
    make(pair)
    status, served, *_ = pair.serve()
    assert (status, served) == (_loop.SPECIAL, 0)
    assert pair.no_answer()
    assert sum(pair.by_opcode) == 0


def test_the_budget_lets_trio_run(pair: Pair) -> None:
    async def ok(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        return b"."

    pair.handlers[GETATTR] = ok
    for unique in range(1, 6):
        pair.request(GETATTR, unique)
    assert pair.serve(budget=3)[:2] == (_loop.BUDGET, 3)
    assert pair.serve(budget=3)[:2] == (_loop.IDLE, 2)
    assert [pair.answer()[1] for _ in range(5)] == [1, 2, 3, 4, 5]


def test_a_big_list_answer_goes_to_the_session(pair: Pair) -> None:
    parts = [b"x"] * 65

    async def many(nodeid: int, caller: Caller, body: memoryview) -> list[bytes]:
        return parts

    pair.handlers[GETATTR] = many
    pair.request(GETATTR, 8)
    status, _, _, _, _, n, answer, unique, opcode, _ = pair.serve()
    assert (status, n, unique, opcode) == (_loop.ANSWER, p.IN_HEADER.size, 8, GETATTR)
    assert answer is parts
    assert pair.no_answer()


def test_errors_of_the_descriptor(pair: Pair) -> None:
    pair.kernel.close()
    pair.handlers[GETATTR] = None
    status, _, _, _, _, n, *_ = pair.serve()
    # the peer gone: a read of 0 bytes, which /dev/fuse never gives: SPECIAL(0)
    assert (status, n) == (_loop.SPECIAL, 0)
    pair.server.close()
    status, _, _, _, _, n, *_ = _loop.serve(
        pair.server.fileno(), pair.buf, pair.view, {}, Caller, FUSEError, pair.by_opcode, 0, 32
    )
    assert (status, n) == (_loop.READ_ERROR, errno.EBADF)


def test_an_answer_the_peer_refuses_is_reported(pair: Pair) -> None:
    async def big(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        return bytes(1 << 20)  # larger than the socket takes in one datagram

    pair.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pair.handlers[GETATTR] = big
    pair.request(GETATTR, 31)
    status, served, _, _, _, code, unique, *_ = pair.serve()
    assert (status, served, unique) == (_loop.WRITE_ERROR, 1, 31)
    assert code in (errno.EMSGSIZE, errno.EAGAIN, errno.ENOBUFS)
    assert not any(pair.buf)


def test_arguments_are_checked() -> None:
    buf = bytearray(64)
    with pytest.raises(TypeError):
        _loop.serve(0, buf, memoryview(buf), [], Caller, FUSEError, [0] * 64, 0, 32)  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        _loop.serve(0, b"read-only", memoryview(buf), {}, Caller, FUSEError, [0] * 64, 0, 32)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _loop.serve(0, buf, memoryview(buf), {}, Caller, "FUSEError", [0] * 64, 0, 32)  # type: ignore[arg-type]
