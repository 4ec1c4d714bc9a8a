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
import os
import socket
import struct
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyfuse3 import EntryAttributes, FUSEError

# built by setup.py (build_ext): not built is a failure here, not a skip
from keyfence.fs.fuse import _loop
from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse.dispatch import Caller, attr_out_bytes

GETATTR, LOOKUP, FORGET, GETXATTR = p.GETATTR, p.LOOKUP, p.FORGET, p.GETXATTR


class Pair:
    def __init__(self) -> None:
        self.kernel, self.server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.setblocking(False)
        self.buf = bytearray(p.BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.by_opcode = [0] * 64
        self.handlers: dict[int, Any] = {}
        self.dirs: dict[int, tuple[Any, ...]] | None = None
        self.no_capability: set[int] | None = None
        self.on_miss: Any = None

    def request(self, opcode: int, unique: int, body: bytes = b"", *, length: int | None = None):
        size = p.IN_HEADER.size + len(body) if length is None else length
        head = p.IN_HEADER.pack(size, opcode, unique, 7, 1000, 1001, 4242, 0, 0)
        self.kernel.send(head + body)

    def serve(self, *, budget: int = 32, spin_ns: int = 0) -> tuple[Any, ...]:
        return _loop.serve(
            self.server.fileno(), self.buf, self.view, self.handlers, Caller, FUSEError,
            self.by_opcode, spin_ns, budget, self.dirs, self.no_capability, self.on_miss,
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
    status, served, _, _, _, n, exc, unique, opcode, _, _ = pair.serve()
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
    status, served, _, _, _, n, coro, yielded, unique, opcode, _ = pair.serve()
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
    status, _, _, _, _, n, answer, unique, opcode, _, _ = pair.serve()
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
    with pytest.raises(TypeError):
        _loop.serve(0, buf, memoryview(buf), {}, Caller, FUSEError, [0] * 64, 0, 32, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _loop.serve(0, buf, memoryview(buf), {}, Caller, FUSEError, [0] * 64, 0, 32, None, [7])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _loop.serve(0, buf, memoryview(buf), {}, Caller, FUSEError, [0] * 64, 0, 32, {}, None, 7)  # type: ignore[arg-type]


# ----------------------------------------- directories answered from the table


def _attr_out(nodeid: int, st: os.stat_result, seconds: int, ns: int) -> bytes:
    """What the handler answers for a directory (ops._attrs, dispatch.attr_out_bytes)."""
    a = EntryAttributes()
    a.st_ino, a.st_mode, a.st_nlink = nodeid, st.st_mode, st.st_nlink
    a.st_uid, a.st_gid, a.st_rdev, a.st_size = st.st_uid, st.st_gid, st.st_rdev, st.st_size
    a.st_blksize, a.st_blocks = 4096, st.st_blocks
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    a.attr_timeout = seconds + ns / 1e9
    return attr_out_bytes(a)


@pytest.fixture
def a_dir(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    d = tmp_path / "d"
    d.mkdir(mode=0o751)
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        yield fd, d
    finally:
        os.close(fd)


def test_a_directory_in_the_table_is_answered_from_an_fstat_without_its_handler(
    pair: Pair, a_dir: tuple[int, Path]
) -> None:
    fd, d = a_dir
    (d / "f").write_bytes(b"x")
    called: list[int] = []

    async def getattr_(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        called.append(nodeid)
        return b"from the handler"

    pair.handlers[GETATTR] = getattr_
    st = os.fstat(fd)
    pair.dirs = {7: (fd, st.st_ino, 10, 500_000_000)}
    pair.request(GETATTR, 41, p.GETATTR_IN.pack(0, 0, 0))
    status, served, *_, tabled = pair.serve()
    assert (status, served, tabled) == (_loop.IDLE, 1, 1)
    assert called == []
    assert pair.answer() == (0, 41, _attr_out(7, os.fstat(fd), 10, 500_000_000))
    assert pair.by_opcode[GETATTR] == 1
    assert not any(pair.buf)
    os.chmod(d, 0o700)  # every answer is a new fstat
    pair.request(GETATTR, 42)
    assert pair.serve()[-1] == 1
    error, unique, body = pair.answer()
    assert (error, unique) == (0, 42) and body == _attr_out(7, os.fstat(fd), 10, 500_000_000)
    assert os.fstat(fd).st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "case",
    ["not in the table", "a regular file", "another inode", "removed", "not a tuple",
     "wrong types", "not a getattr"],
)  # fmt: skip
def test_the_handler_answers_what_the_table_cannot(
    pair: Pair, a_dir: tuple[int, Path], tmp_path: Path, case: str
) -> None:
    fd, _ = a_dir
    st = os.fstat(fd)
    entry: Any = (fd, st.st_ino, 10, 0)
    opcode, key = GETATTR, 7  # the requests are for nodeid 7
    held = -1
    if case == "not in the table":
        key = 8
    elif case == "a regular file":
        (tmp_path / "file").write_bytes(b"x")
        held = os.open(tmp_path / "file", os.O_RDONLY)
        entry = (held, os.fstat(held).st_ino, 10, 0)
    elif case == "another inode":
        entry = (fd, st.st_ino + 1, 10, 0)
    elif case == "removed":  # rmdir'd: its number may be another's soon
        (tmp_path / "gone").mkdir()
        held = os.open(tmp_path / "gone", os.O_PATH | os.O_DIRECTORY)
        entry = (held, os.fstat(held).st_ino, 10, 0)
        (tmp_path / "gone").rmdir()
    elif case == "not a tuple":
        entry = [fd, st.st_ino, 10, 0]
    elif case == "wrong types":
        entry = (fd, "inode", 10, 0)
    else:
        opcode = LOOKUP
    called: list[int] = []

    async def handler(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        called.append(nodeid)
        return b"from the handler"

    pair.handlers[opcode] = handler
    pair.dirs = {key: entry}
    try:
        pair.request(opcode, 51, b"d\0" if opcode == LOOKUP else b"")
        status, served, *_, tabled = pair.serve()
    finally:
        if held >= 0:
            os.close(held)
    assert (status, served, tabled) == (_loop.IDLE, 1, 0)
    assert called == [7]
    assert pair.answer() == (0, 51, b"from the handler")


# ------------------------------------ security.capability of a file known without


def _getxattr(name: bytes, size: int = 0) -> bytes:
    return p.GETXATTR_IN.pack(size, 0) + name + b"\0"


def test_the_capability_of_an_inode_known_without_is_enodata_without_its_handler(
    pair: Pair,
) -> None:
    called: list[int] = []

    async def getxattr_(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        called.append(nodeid)
        return b"from the handler"

    pair.handlers[GETXATTR] = getxattr_
    pair.no_capability = {7}
    pair.request(GETXATTR, 61, _getxattr(b"security.capability"))
    pair.request(GETXATTR, 62, _getxattr(b"security.capability", 4096))
    status, served, *_, tabled = pair.serve()
    assert (status, served, tabled) == (_loop.IDLE, 2, 2)
    assert called == []
    assert pair.answer() == (-errno.ENODATA, 61, b"")
    assert pair.answer() == (-errno.ENODATA, 62, b"")
    assert pair.by_opcode[GETXATTR] == 2
    assert not any(pair.buf)


@pytest.mark.parametrize(
    ("known", "body"),
    [
        (set(), _getxattr(b"security.capability")),  # not known: the backing file says
        ({7}, _getxattr(b"security.selinux")),
        ({7}, _getxattr(b"security.capabilityx")),
        ({7}, _getxattr(b"security.capabilit")),
        ({7}, p.GETXATTR_IN.pack(0, 0) + b"security.capability"),  # no NUL: the handler says
        ({7}, b"short"),
        ({8}, _getxattr(b"security.capability")),
    ],
)
def test_the_handler_answers_every_other_getxattr(pair: Pair, known: set[int], body: bytes) -> None:
    called: list[int] = []

    async def getxattr_(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        called.append(nodeid)
        return b"from the handler"

    pair.handlers[GETXATTR] = getxattr_
    pair.no_capability = known
    pair.request(GETXATTR, 71, body)
    status, served, *_, tabled = pair.serve()
    assert (status, served, tabled) == (_loop.IDLE, 1, 0)
    assert called == [7]
    assert pair.answer() == (0, 71, b"from the handler")
