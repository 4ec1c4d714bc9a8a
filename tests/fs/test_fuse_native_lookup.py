"""A LOOKUP of a missing name answered by the C loop (fs/fuse/_answers.c).

The directory table's entry of an encrypted directory carries its
NameSealer (fs/_names.c); the loop encodes the name as
``DirectoryCipher.encrypt_name`` does, looks for it in the table's
descriptor, and for a missing one calls ``on_miss`` and answers inode 0
(or ENOENT), byte for byte as ``KeyfenceOperations._missing`` answers.
Everything else goes to the handler.  The same socket pair as
tests/fs/test_fuse_native_loop.py stands in for /dev/fuse;
tests/fs/test_missing_names.py runs it under a real mount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyfuse3 import EntryAttributes

# built by setup.py (build_ext): not built is a failure here, not a skip
from keyfence.fs import _names
from keyfence.fs.crypto import DirectoryCipher, MasterKey
from keyfence.fs.fuse import _loop
from keyfence.fs.fuse.dispatch import Caller, entry_bytes

from . import test_fuse_native_loop as native_loop
from .test_fuse_native_loop import LOOKUP, Pair

pair = native_loop.pair  # the fixture: the same socket pair
NODEID = 7  # Pair's requests are all for nodeid 7


def _negative(timeout: float) -> bytes:
    """What the handler answers for a missing name (ops._missing)."""
    a = EntryAttributes()
    a.st_ino = 0  # type: ignore[assignment]
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    return entry_bytes(a)


class Directory:
    """An encrypted directory's backing side: its descriptor and cipher."""

    def __init__(self, path: Path, padding: int = 16) -> None:
        path.mkdir()
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        self.cipher = DirectoryCipher(MasterKey(os.urandom(64)), os.urandom(16), padding)
        assert isinstance(self.cipher.names_sealer, _names.NameSealer)

    def make(self, name: bytes) -> None:
        (self.path / self.cipher.encrypt_name(name).disk_name).write_bytes(b"x")

    def entry(self, seconds: int = 30, ns: int = 250_000_000) -> tuple[Any, ...]:
        return (self.fd, os.fstat(self.fd).st_ino, seconds, ns, self.cipher.names_sealer)


@pytest.fixture
def enc(tmp_path: Path) -> Iterator[Directory]:
    d = Directory(tmp_path / "enc")
    try:
        yield d
    finally:
        os.close(d.fd)


class Misses:
    def __init__(self, answer: Any = True) -> None:
        self.answer = answer
        self.calls: list[tuple[int, bytes, str]] = []

    def __call__(self, nodeid: int, name: bytes, disk: str) -> Any:
        self.calls.append((nodeid, name, disk))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _handled(pair: Pair) -> list[bytes]:
    names: list[bytes] = []

    async def lookup(nodeid: int, caller: Caller, body: memoryview) -> bytes:
        names.append(bytes(body))
        return b"from the handler"

    pair.handlers[LOOKUP] = lookup
    return names


@pytest.mark.parametrize("padding", [0, 4, 16, 32])
def test_a_missing_name_is_answered_with_a_negative_entry_without_its_handler(
    pair: Pair, tmp_path: Path, padding: int
) -> None:
    enc = Directory(tmp_path / "enc", padding)
    try:
        enc.make(b"present")
        handled = _handled(pair)
        misses = Misses()
        pair.dirs = {NODEID: enc.entry(30, 250_000_000)}
        pair.on_miss = misses
        names = [b"absent", b"a", b"x" * 150, "ünïcode".encode(), b"\xff\xfe bytes"]
        for i, name in enumerate(names):
            pair.request(LOOKUP, 100 + i, name + b"\0")
        status, served, *_, tabled = pair.serve()
        assert (status, served, tabled) == (_loop.IDLE, len(names), len(names))
        assert handled == []
        for i in range(len(names)):
            assert pair.answer() == (0, 100 + i, _negative(30.25))
        assert misses.calls == [
            (NODEID, name, enc.cipher.encrypt_name(name).disk_name) for name in names
        ]
        assert pair.by_opcode[LOOKUP] == len(names)
        assert not any(pair.buf), "the name stayed in the buffer"
    finally:
        os.close(enc.fd)


def test_a_miss_the_negative_table_cannot_hold_is_enoent(pair: Pair, enc: Directory) -> None:
    handled = _handled(pair)
    pair.dirs = {NODEID: enc.entry()}
    pair.on_miss = Misses(answer=False)
    pair.request(LOOKUP, 120, b"absent\0")
    assert pair.serve()[-1] == 1
    assert handled == []
    assert pair.answer() == (-errno.ENOENT, 120, b"")


@pytest.mark.parametrize(
    "case",
    ["present", "a symlink", "no sealer", "wiped", "dot", "dotdot", "long", "no NUL",
     "empty", "on_miss raises", "no on_miss", "not in the table", "a short entry",
     "not a sealer", "not a directory"],
)  # fmt: skip
def test_the_handler_answers_every_other_lookup(
    pair: Pair, enc: Directory, tmp_path: Path, case: str
) -> None:
    handled = _handled(pair)
    misses = Misses(answer=RuntimeError("table broken") if case == "on_miss raises" else True)
    entry: Any = enc.entry()
    name = b"absent\0"
    key = NODEID
    held = -1
    if case == "present":
        enc.make(b"absent")
    elif case == "a symlink":
        os.symlink("/nonexistent", enc.path / enc.cipher.encrypt_name(b"absent").disk_name)
    elif case == "no sealer":  # not encrypted: its reserved names are the handler's
        entry = (*entry[:4], None)
    elif case == "wiped":
        enc.cipher.names_sealer.wipe()  # type: ignore[union-attr]
    elif case == "dot":
        name = b".\0"
    elif case == "dotdot":
        name = b"..\0"
    elif case == "long":  # encoded beyond 255 bytes: a long name and its sidecar
        name = b"l" * 200 + b"\0"
    elif case == "no NUL":
        name = b"absent"
    elif case == "empty":
        name = b"\0"
    elif case == "no on_miss":
        misses = None  # type: ignore[assignment]
    elif case == "not in the table":
        key = NODEID + 1
    elif case == "a short entry":
        entry = entry[:4]
    elif case == "not a sealer":
        entry = (*entry[:4], "sealer")
    elif case == "not a directory":  # ENOTDIR, not ENOENT: the handler says
        (tmp_path / "file").write_bytes(b"x")
        held = os.open(tmp_path / "file", os.O_PATH)
        entry = (held, os.fstat(held).st_ino, *entry[2:])
    pair.dirs = {key: entry}
    pair.on_miss = misses
    try:
        pair.request(LOOKUP, 130, name)
        status, served, *_, tabled = pair.serve()
    finally:
        if held >= 0:
            os.close(held)
    assert (status, served, tabled) == (_loop.IDLE, 1, 0)
    assert handled == [name]
    assert pair.answer() == (0, 130, b"from the handler")
    if case != "on_miss raises":
        assert misses is None or misses.calls == []


def test_a_removed_directory_has_no_names(pair: Pair, tmp_path: Path) -> None:
    """As the handler's own fstatat would find: every name is missing."""
    gone = Directory(tmp_path / "gone")
    try:
        handled = _handled(pair)
        pair.dirs = {NODEID: gone.entry()}
        pair.on_miss = Misses()
        gone.path.rmdir()
        pair.request(LOOKUP, 140, b"anything\0")
        assert pair.serve()[-1] == 1
        assert handled == []
        assert pair.answer()[0] == 0
    finally:
        os.close(gone.fd)
