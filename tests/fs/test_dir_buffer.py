"""A READDIR(PLUS) answer as fs/fuse/dispatch.py's DirBuffer builds it.

Each entry must be what the kernel parses (fs/fuse/protocol.py): for
READDIRPLUS a fuse_entry_out (with its fuse_attr, as ``entry_bytes`` makes
it for a LOOKUP) then a fuse_dirent, the name, and NULs to the next 8
bytes; for READDIR the dirent alone.  An entry that does not fit is left
out whole.  The answer is zeroed when let go.
"""

from __future__ import annotations

import ctypes
import random
import stat

import pytest
from pyfuse3 import EntryAttributes

from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse.dispatch import DirBuffer, entry_bytes


def _attrs(rng: random.Random) -> EntryAttributes:
    a = EntryAttributes()
    a.st_ino = rng.randrange(1, 2**63)  # type: ignore[assignment]
    a.generation = rng.randrange(2**32)
    a.entry_timeout = rng.choice([0.0, 60.25, rng.random() * 1000])
    a.attr_timeout = rng.choice([0.0, 2.5, rng.random() * 100])
    a.st_mode = rng.choice([stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777])  # type: ignore[assignment]
    a.st_nlink, a.st_uid, a.st_gid = (
        rng.randrange(2**32),
        rng.randrange(2**32),
        rng.randrange(2**32),
    )
    a.st_rdev, a.st_size, a.st_blocks = (
        rng.randrange(2**63),
        rng.randrange(2**63),
        rng.randrange(2**63),
    )
    a.st_blksize = 4096
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = (rng.randrange(2**62) for _ in range(3))
    return a


def _entry_out(a: EntryAttributes) -> bytes:
    """fuse_entry_out and its fuse_attr, packed field by field (not with
    dispatch's helpers, which the answers under test use)."""
    ns = 1_000_000_000
    valid = [(int(t), int((t - int(t)) * ns)) for t in (a.entry_timeout, a.attr_timeout)]
    head = p.ENTRY_OUT.pack(
        a.st_ino, a.generation, valid[0][0], valid[1][0], valid[0][1], valid[1][1]
    )
    times = (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns)
    return head + p.ATTR.pack(
        a.st_ino, a.st_size, a.st_blocks, *(t // ns for t in times), *(t % ns for t in times),
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
    )  # fmt: skip


def _expected(name: bytes, a: EntryAttributes, next_id: int, plus: bool) -> bytes:
    dirent = p.DIRENT.pack(a.st_ino, next_id, len(name), stat.S_IFMT(a.st_mode) >> 12) + name
    dirent += b"\0" * (-len(dirent) % 8)
    return (_entry_out(a) if plus else b"") + dirent


def test_a_lookups_entry_is_the_kernels_layout() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        a = _attrs(rng)
        assert entry_bytes(a) == _entry_out(a)


@pytest.mark.parametrize("plus", [True, False])
def test_each_entry_is_the_kernels_layout(plus: bool) -> None:
    rng = random.Random(plus)
    for i in range(2000):
        a = _attrs(rng)
        name = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 256)))
        buf = DirBuffer(1 << 16, plus)
        assert buf.add(name, a, i + 1)
        assert buf.parts == [_expected(name, a, i + 1, plus)]
        assert buf.used == len(buf.parts[0]) and buf.used % 8 == 0


@pytest.mark.parametrize("plus", [True, False])
def test_an_entry_that_does_not_fit_is_left_out_whole(plus: bool) -> None:
    a = _attrs(random.Random(7))
    one = len(_expected(b"name", a, 1, plus))
    buf = DirBuffer(2 * one, plus)
    assert buf.add(b"name", a, 1) and buf.add(b"name", a, 2)  # exactly full
    assert not buf.add(b"n", a, 3)
    assert buf.used == 2 * one
    assert [bytes(part) for part in buf.parts] == [
        _expected(b"name", a, 1, plus) + _expected(b"name", a, 2, plus)
    ]


def test_an_answer_is_zeroed_once_let_go() -> None:
    """The entries are one buffer, zeroed when the answer is freed (after it
    was written): an encrypted directory's listing is its plaintext names.
    Read where the buffer was, after it was freed (malloc's memory: still
    mapped; the allocator writes only its list pointers at the start)."""
    buf = DirBuffer(4096, True)
    assert buf.parts == []
    assert buf.add(b"secret-name", _attrs(random.Random(1)), 1)
    answer = buf.parts
    assert bytes(answer[0]).endswith(b"secret-name\0\0\0\0\0")
    raw = buf.buffer
    assert raw is not None
    size = len(raw)
    address = ctypes.addressof((ctypes.c_char * size).from_buffer(raw))
    del buf, raw, answer
    assert b"secret-name" not in ctypes.string_at(address, size)
