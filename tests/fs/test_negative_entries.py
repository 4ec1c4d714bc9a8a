"""Negative entries (keyfence.fs.negative): a missing name is cached by the
kernel for the entry timeout, creating it through the mount still works at
once, and a key removal drops the cached negatives of its directories.

The mounts run with a 60 s timeout so that "cached" is not a race with the
clock; the backing store is written directly only to show what the kernel
answers from its cache (keyfence assumes nobody else writes there).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.negative import NegativeEntries
from keyfence.testing.mounting import Mount, fuse_available

from .test_mount import Enc, errno_of

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--dirty-expire", "60", "--attr-timeout", "60")
    try:
        yield m
    finally:
        m.unmount_checked()


def test_a_missing_name_is_answered_by_the_kernel_until_created(mount: Mount) -> None:
    plain = mount.mnt / "plain"
    plain.mkdir()
    assert errno_of(os.stat, plain / "missing") == errno.ENOENT
    # behind the mount's back: the kernel still has its negative entry
    (mount.backing / "plain" / "missing").write_bytes(b"x")
    assert errno_of(os.stat, plain / "missing") == errno.ENOENT
    # created through the mount, the name is there at once
    assert errno_of(os.stat, plain / "made") == errno.ENOENT
    (plain / "made").write_bytes(b"made")
    assert (plain / "made").read_bytes() == b"made"
    assert errno_of(os.stat, plain / "dir") == errno.ENOENT
    (plain / "dir").mkdir()
    assert (plain / "dir").is_dir()
    assert errno_of(os.stat, plain / "moved") == errno.ENOENT
    os.rename(plain / "made", plain / "moved")
    assert (plain / "moved").read_bytes() == b"made"
    assert errno_of(os.stat, plain / "made") == errno.ENOENT


def test_created_in_an_encrypted_directory_after_a_negative_lookup(mount: Mount) -> None:
    enc = Enc(mount)
    for name in ("a", "journal-journal"):
        assert errno_of(os.stat, enc.dir / name) == errno.ENOENT
        (enc.dir / name).write_bytes(name.encode())
        assert (enc.dir / name).read_bytes() == name.encode()
        os.unlink(enc.dir / name)
        assert errno_of(os.stat, enc.dir / name) == errno.ENOENT


def test_a_key_removal_drops_the_negative_entries_of_its_directories(mount: Mount) -> None:
    enc = Enc(mount)
    (enc.dir / "secret").write_bytes(b"data")
    enc.lock()
    (disk_name,) = os.listdir(enc.dir)  # the locked view: the backing name
    assert errno_of(os.stat, enc.dir / disk_name) is None
    enc.unlock()
    os.listdir(enc.dir)  # binds the key again
    assert os.listdir(enc.dir) == ["secret"]
    # unlocked, the backing name is no name: a negative entry, cached
    assert errno_of(os.stat, enc.dir / disk_name) == errno.ENOENT
    enc.lock()
    # locked again: the backing name is there, not the stale negative entry
    assert errno_of(os.stat, enc.dir / disk_name) is None
    assert os.listdir(enc.dir) == [disk_name]


def test_a_locked_directory_caches_no_negative_entry(mount: Mount) -> None:
    enc = Enc(mount)
    (enc.dir / "later").write_bytes(b"data")
    enc.lock()
    assert errno_of(os.stat, enc.dir / "later") == errno.ENOENT  # locked: no such name
    enc.unlock()
    assert (enc.dir / "later").read_bytes() == b"data"


def test_names_made_through_the_mount_leave_the_table(mount: Mount) -> None:
    """Every way of making a name after a miss (open(O_CREAT), mkdir,
    symlink, mknod, link, rename) takes it out of the table: the table
    holds only names that are still missing.  (It used to keep them all,
    so after 65,536 files made this way no miss was cached any more.)"""
    enc = Enc(mount)
    plain = mount.mnt / "plain"
    plain.mkdir()
    for d in (plain, enc.dir):
        (d / "source").write_bytes(b"s")
        made = ("file", "dir", "link", "fifo", "hard", "moved")
        for name in (*made, "missing"):
            assert errno_of(os.stat, d / name) == errno.ENOENT
        before = mount.control("negatives")
        assert before >= 7
        (d / "file").write_bytes(b"x")
        (d / "dir").mkdir()
        os.symlink("file", d / "link")
        os.mkfifo(d / "fifo")
        os.link(d / "source", d / "hard")
        os.rename(d / "source", d / "moved")
        assert mount.control("negatives") == before - len(made)
        assert errno_of(os.stat, d / "missing") == errno.ENOENT  # still cached, still missing


def test_the_table_is_bounded() -> None:
    table = NegativeEntries(limit=3)
    assert table.remember(1, b"a") and table.remember(1, b"b") and table.remember(2, b"c")
    assert table.remember(1, b"a")  # known already: still cached
    assert not table.remember(2, b"d")  # full: no timeout for this one
    assert table.take(1) == [b"a", b"b"]
    assert len(table) == 1
    assert table.remember(2, b"d")
    table.discard(2, b"d")
    table.discard(2, b"never")  # not there: nothing happens
    assert len(table) == 1 and table.take(2) == [b"c"]
    assert table.remember(3, b"e")
    table.forget_dir(3)
    assert len(table) == 0 and table.take(3) == []
