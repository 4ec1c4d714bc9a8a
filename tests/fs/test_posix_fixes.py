"""POSIX behaviour pjdfstest found wrong in an encrypted directory, one test
per fix (docs/fs.md, "POSIX conformance (pjdfstest)").  Real mounts, real
keys, as tests/fs/test_mount.py."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import POLICY_FILE_NAME
from keyfence.testing.mounting import Mount, fuse_available

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture
def enc_dir(tmp_path: Path) -> Iterator[Path]:
    """An encrypted directory ``enc`` on a fresh mount, its key in our @s."""
    mount = Mount(tmp_path, "--dirty-expire", "60")
    try:
        master = MasterKey(os.urandom(64))
        mount.add_key(master)
        enc = mount.mnt / "enc"
        enc.mkdir()
        os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
        yield enc
    finally:
        mount.unmount_checked()


def test_ftruncate_updates_ctime_and_mtime(enc_dir: Path) -> None:
    # pjdfstest ftruncate/00.t: the size changes in the page cache, so the
    # backing file's times used to stay as they were until write-back
    path = enc_dir / "f"
    path.write_bytes(b"x" * 100)
    before = os.stat(path)
    time.sleep(0.05)
    fd = os.open(path, os.O_RDWR)
    try:
        for size in (10_000, 5):  # grow (a hole), then shrink
            os.ftruncate(fd, size)
            after = os.stat(path)
            assert after.st_size == size
            assert after.st_ctime_ns > before.st_ctime_ns
            assert after.st_mtime_ns > before.st_mtime_ns
            before = after
            time.sleep(0.05)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5


@pytest.mark.parametrize("where", ["same", "other"])
def test_rename_a_directory_over_an_empty_one(enc_dir: Path, where: str) -> None:
    # pjdfstest rename/09.t, 10.t: an empty encrypted directory still holds
    # its policy record in the backing store; the backing rename said
    # ENOTEMPTY where ext4 replaces the empty directory
    source_parent = enc_dir / "a"
    target_parent = enc_dir / ("a" if where == "same" else "b")
    source_parent.mkdir()
    target_parent.mkdir(exist_ok=True)
    source, target = source_parent / "src", target_parent / "dst"
    source.mkdir()
    (source / "inside").write_bytes(b"kept")
    target.mkdir()
    inode = os.stat(source).st_ino
    os.rename(source, target)
    assert not source.exists()
    assert os.stat(target).st_ino == inode
    assert (target / "inside").read_bytes() == b"kept"
    assert os.listdir(target_parent) == ["dst"]


def test_rename_over_a_nonempty_encrypted_directory_is_enotempty(enc_dir: Path) -> None:
    (enc_dir / "src").mkdir()
    (enc_dir / "dst").mkdir()
    (enc_dir / "dst" / "file").write_bytes(b"stays")
    with pytest.raises(OSError) as err:
        os.rename(enc_dir / "src", enc_dir / "dst")
    assert err.value.errno == 39  # ENOTEMPTY
    assert (enc_dir / "dst" / "file").read_bytes() == b"stays"
    assert (enc_dir / "src").is_dir()


def test_replaced_directory_leaves_nothing_in_the_backing_store(enc_dir: Path) -> None:
    (enc_dir / "src").mkdir()
    (enc_dir / "dst").mkdir()
    backing = enc_dir.parent.parent / "m-backing" / "enc"
    before = set(os.listdir(backing))
    os.rename(enc_dir / "src", enc_dir / "dst")
    after = set(os.listdir(backing))
    assert len(after) == len(before) - 1  # one encrypted name less, nothing set aside
    assert POLICY_FILE_NAME in after
    assert os.listdir(enc_dir) == ["dst"]


def test_noreplace_and_exchange_of_empty_encrypted_directories(enc_dir: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(old: Path, new: Path, flags: int) -> int:
        r = libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
        return 0 if r == 0 else ctypes.get_errno()

    (enc_dir / "a").mkdir()
    (enc_dir / "b").mkdir()
    (enc_dir / "a" / "mark").write_bytes(b"a")
    assert renameat2(enc_dir / "a", enc_dir / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert renameat2(enc_dir / "a", enc_dir / "b", 2) == 0  # RENAME_EXCHANGE
    assert (enc_dir / "b" / "mark").read_bytes() == b"a"
    assert os.listdir(enc_dir / "a") == []


@pytest.fixture
def three_dirs(enc_dir: Path, tmp_path: Path) -> list[Path]:
    """A directory on the host's own filesystem (the reference), a plain
    one on the mount and the mount's encrypted one: what a fix must make
    behave alike."""
    reference = tmp_path / "ext4"
    reference.mkdir()
    plain_dir = enc_dir.parent / "plain"
    plain_dir.mkdir()
    return [reference, plain_dir, enc_dir]


@pytest.mark.parametrize("create", [False, True])
def test_read_only_open_with_o_trunc_truncates(three_dirs: list[Path], create: bool) -> None:
    """Linux truncates on open(O_RDONLY | O_TRUNC) (open(2): the effect is
    unspecified by POSIX; ext4 truncates).  A plain file's open truncated
    through its own read-only backing descriptor: EINVAL.  Found by a random
    differential run of file-system calls against ext4."""
    flags = os.O_RDONLY | os.O_TRUNC | (os.O_CREAT if create else 0)
    for d in three_dirs:
        path = d / "f"
        path.write_bytes(b"some bytes")
        fd = os.open(path, flags, 0o644)
        try:
            assert os.fstat(fd).st_size == 0, d
            assert os.read(fd, 100) == b""
        finally:
            os.close(fd)
        assert path.read_bytes() == b"", d


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket"])
@pytest.mark.parametrize("how", ["unlink", "rename over"])
def test_fstat_of_a_special_file_whose_last_name_went(
    three_dirs: list[Path], kind: str, how: str
) -> None:
    """An open fifo (or an O_PATH descriptor of a symlink or socket) whose
    last name was removed still has attributes, with no links, as on ext4.
    Such a file has no backing descriptor in the worker, which answered
    ESTALE.  Found by a random differential run of file-system calls."""
    for d in three_dirs:
        path = d / "node"
        if kind == "fifo":
            os.mkfifo(path, 0o640)
        elif kind == "socket":
            os.mknod(path, stat.S_IFSOCK | 0o640)
        else:
            os.symlink("some/target", path)
        flags = os.O_RDONLY | os.O_NONBLOCK if kind == "fifo" else os.O_PATH | os.O_NOFOLLOW
        fd = os.open(path, flags)
        try:
            before = os.fstat(fd)
            if how == "unlink":
                os.unlink(path)
            else:
                (d / "other").write_bytes(b"x")
                os.rename(d / "other", path)
            after = os.fstat(fd)
            assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode), d
            assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode), d
            assert (after.st_nlink, after.st_size, after.st_uid) == (
                0,
                before.st_size,
                before.st_uid,
            ), d
        finally:
            os.close(fd)


def test_symlink_renamed_into_another_encrypted_directory_over_a_name(enc_dir: Path) -> None:
    """The rename that makes a new link for a symlink moved between
    encrypted directories (docs/fs.md) may replace a name there; the
    replaced file keeps its attributes for a descriptor still open."""
    (enc_dir / "one").mkdir()
    (enc_dir / "two").mkdir()
    os.symlink("a target", enc_dir / "one" / "link")
    (enc_dir / "two" / "link").write_bytes(b"replaced")
    fd = os.open(enc_dir / "two" / "link", os.O_RDONLY)
    try:
        os.rename(enc_dir / "one" / "link", enc_dir / "two" / "link")
        assert os.readlink(enc_dir / "two" / "link") == "a target"
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 100) == b"replaced"
    finally:
        os.close(fd)
    assert os.listdir(enc_dir / "one") == []
