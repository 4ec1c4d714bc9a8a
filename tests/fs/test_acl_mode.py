"""fs/acl.py's creation mode against the kernel's own (ext4 as the oracle).

No mount: random default ACLs are set on directories of the test's
filesystem and entries made in them with random modes; the mode the kernel
gave each must be :func:`keyfence.fs.acl.creation_mode`'s.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from pathlib import Path

import pytest

from keyfence.fs import acl

_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _xattr(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _random_acl(rng: random.Random) -> bytes:
    # the kernel's order: owner, named users, owning group, named groups, mask, other
    entries = [(_USER_OBJ, rng.randrange(8), 0xFFFFFFFF)]
    named = rng.random() < 0.6
    if named:
        entries.append((_USER, rng.randrange(8), 61113))
    entries.append((_GROUP_OBJ, rng.randrange(8), 0xFFFFFFFF))
    if named:
        entries.append((_GROUP, rng.randrange(8), 61114))
    if named or rng.random() < 0.5:
        entries.append((_MASK, rng.randrange(8), 0xFFFFFFFF))
    entries.append((_OTHER, rng.randrange(8), 0xFFFFFFFF))
    return _xattr(entries)


@pytest.fixture
def acl_dir(tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        os.setxattr(probe, acl.DEFAULT_XATTR, _xattr([(1, 7, 0), (4, 5, 0), (0x20, 5, 0)]))
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            pytest.skip("the test's filesystem has no POSIX ACLs")
        raise
    return tmp_path


@pytest.mark.parametrize("seed", range(4))
def test_the_mode_under_a_default_acl_is_the_kernels(acl_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    old = os.umask(0)  # as the worker runs
    try:
        for i in range(50):
            d = acl_dir / f"s{seed}-{i}"
            d.mkdir()
            os.setxattr(d, acl.DEFAULT_XATTR, _random_acl(rng))
            fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
            try:
                for kind in ("file", "dir"):
                    asked = rng.randrange(0o1000)
                    expected = acl.creation_mode(fd, asked, rng.randrange(0o1000))
                    if kind == "file":
                        os.close(os.open(d / kind, os.O_CREAT | os.O_WRONLY, asked))
                    else:
                        os.mkdir(d / kind, asked)
                    got = os.stat(d / kind).st_mode & 0o7777
                    assert oct(got) == oct(expected & 0o7777), (kind, oct(asked))
            finally:
                os.close(fd)
    finally:
        os.umask(old)


def test_the_umask_applies_without_a_default_acl(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert acl.creation_mode(fd, 0o100666, 0o022) == 0o100644
        assert acl.creation_mode(fd, 0o2777, 0o077) == 0o2700
    finally:
        os.close(fd)


def test_masq_refuses_what_is_not_an_acl() -> None:
    for bad in (b"", b"\x02\x00\x00\x00\x01", struct.pack("<I", 1), _xattr([(0x40, 7, 0)])):
        with pytest.raises(ValueError):
            acl.masq(bad, 0o644)
    with pytest.raises(ValueError):  # no owning group, no mask
        acl.masq(_xattr([(_USER_OBJ, 7, 0), (_OTHER, 7, 0)]), 0o644)
