"""Missing names of encrypted directories answered by the C loop, under a
real mount (src/keyfence/fs/fuse/dir_attrs.py, fs/fuse/_answers.c).

The first miss in a directory whose key is bound goes to the handler,
which offers the directory's NameSealer; the next misses are answered in
C, remembered as negative entries all the same (so a key removal drops
them from the kernel), and the names they encoded serve the create that
follows.  A lock takes every sealer out; a directory that is not
encrypted, a long name, or a name that exists go to the handler.
tests/fs/test_fuse_native_lookup.py drives the C side on its own.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from keyfence.fs.fuse import protocol as fuse_proto
from keyfence.testing.mounting import Mount, fuse_available

from . import test_dir_attrs
from .test_dir_attrs import _table
from .test_mount import Enc, errno_of
from .test_request_path import _requests

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

mount = test_dir_attrs.mount  # the fixture: a mount with 60 s timeouts


def _served(mount: Mount) -> int:
    return int(_table(mount)["served"])


def _negatives(mount: Mount) -> int:
    return int(mount.control("negatives"))


def _lookups(mount: Mount) -> int:
    return _requests(mount)[fuse_proto.LOOKUP]


def _with_sealer(mount: Mount, d: Path) -> int:
    """A first miss in ``d``: the handler answers it and offers the sealer."""
    assert errno_of(os.stat, d / "first-miss") == errno.ENOENT
    ino = os.stat(d).st_ino
    assert ino in _table(mount)["names"]
    return ino


def test_misses_are_answered_in_c_remembered_and_then_created(mount: Mount) -> None:
    enc = Enc(mount)
    _with_sealer(mount, enc.dir)
    served, lookups, negatives = _served(mount), _lookups(mount), _negatives(mount)
    names = [f"file-{i}" for i in range(20)] + ["ünïcode", "a", "x" * 150]
    for name in names:
        assert errno_of(os.stat, enc.dir / name) == errno.ENOENT
    assert _lookups(mount) - lookups == len(names)
    assert _served(mount) - served == len(names)  # none reached a handler
    assert _negatives(mount) - negatives == len(names)
    for name in names:  # the kernel answers from its negative entries now
        assert errno_of(os.stat, enc.dir / name) == errno.ENOENT
    assert _lookups(mount) - lookups == len(names)
    for name in names:  # creating replaces a negative entry, in C's encoding
        (enc.dir / name).write_bytes(name.encode())
    assert sorted(os.listdir(enc.dir)) == sorted(names)
    assert [(enc.dir / n).read_bytes() for n in names] == [n.encode() for n in names]
    assert len(os.listdir(enc.backing)) == len(names) + 1  # and the policy file


def test_a_negative_entry_answered_in_c_is_dropped_at_a_lock(mount: Mount) -> None:
    """As tests/fs/test_negative_entries.py's key-removal test, with the
    miss answered in C: unremembered, the kernel would keep it past the lock."""
    enc = Enc(mount)
    (enc.dir / "secret").write_bytes(b"data")
    enc.lock()
    (disk_name,) = os.listdir(enc.dir)  # the locked view: the backing name
    enc.unlock()
    assert os.listdir(enc.dir) == ["secret"]
    _with_sealer(mount, enc.dir)
    os.stat(enc.dir)  # its attributes cached: the next requests are lookups alone
    served, lookups = _served(mount), _lookups(mount)
    # unlocked, the backing name is no name: answered in C, cached (the
    # kernel asks twice: once to revalidate the locked view's dentry)
    assert errno_of(os.stat, enc.dir / disk_name) == errno.ENOENT
    assert _served(mount) - served == _lookups(mount) - lookups > 0
    enc.lock()
    assert _table(mount)["names"] == []
    # locked: the backing name is there, not the stale negative entry
    assert errno_of(os.stat, enc.dir / disk_name) is None
    assert os.listdir(enc.dir) == [disk_name]


def test_a_locked_directory_is_answered_by_its_handler(mount: Mount) -> None:
    enc = Enc(mount)
    _with_sealer(mount, enc.dir)
    enc.lock(op="clear")
    assert _table(mount)["names"] == []
    served, lookups = _served(mount), _lookups(mount)
    for i in range(5):  # no timeout while locked: each one asks
        assert errno_of(os.stat, enc.dir / f"missing-{i}") == errno.ENOENT
        assert errno_of(os.stat, enc.dir / f"missing-{i}") == errno.ENOENT
    assert _lookups(mount) - lookups == 10
    assert _served(mount) == served
    enc.unlock()
    _with_sealer(mount, enc.dir)  # offered again by the next handled miss
    served, lookups = _served(mount), _lookups(mount)
    assert errno_of(os.stat, enc.dir / "after") == errno.ENOENT
    assert (_served(mount) - served, _lookups(mount) - lookups) == (1, 1), _table(mount)


def test_what_the_handler_still_answers(mount: Mount) -> None:
    plain = mount.mnt / "plain"
    plain.mkdir()
    assert errno_of(os.stat, plain / "first") == errno.ENOENT
    assert os.stat(plain).st_ino not in _table(mount)["names"]
    enc = Enc(mount)
    _with_sealer(mount, enc.dir)
    (enc.dir / "there").write_bytes(b"x")
    os.stat(enc.dir)  # the directory's own attributes, from the table: counted apart
    served = _served(mount)
    assert errno_of(os.stat, plain / "missing") == errno.ENOENT  # not encrypted
    long = "l" * 200  # encoded beyond 255 bytes: a long name
    assert errno_of(os.stat, enc.dir / long) == errno.ENOENT
    os.close(os.open(enc.dir / "there", os.O_RDONLY))  # found: the handler's
    assert _served(mount) == served
    (enc.dir / long).write_bytes(b"long")
    assert (enc.dir / long).read_bytes() == b"long"
