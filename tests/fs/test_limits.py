"""The largest file a mount stores (fs/limits.py): the backing
filesystem's limit asked of it, and the largest plaintext whose backing
file fits it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from keyfence.fs import limits
from keyfence.fs.format import backing_size
from keyfence.fs.limits import backing_max_size, encrypted_max_size

EXT4_4K = (2**32 - 1) * 4096


@pytest.mark.parametrize("backing_max", [0, 24, 25, 52, 53, 4148, 4149, 10**9, EXT4_4K, 2**63 - 1])
def test_the_largest_plaintext_is_the_largest_that_fits(backing_max: int) -> None:
    size = encrypted_max_size(backing_max)
    assert backing_size(size) <= backing_max
    assert backing_size(size + 1) > backing_max


def test_asked_of_the_filesystem_leaving_nothing(tmp_path: Path, tmp_dir_fd: int) -> None:
    found = backing_max_size(tmp_dir_fd)
    probe = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(probe, found)
        with pytest.raises(OSError) as err:
            os.ftruncate(probe, found + 1)
        assert err.value.errno in (errno.EFBIG, errno.EINVAL)
    finally:
        os.close(probe)
        os.unlink(tmp_path / "f")
    assert os.listdir(tmp_path) == []


def test_without_o_tmpfile_through_a_named_file(
    tmp_path: Path, tmp_dir_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfat and NFS have no O_TMPFILE: a kf.tmp.* file, removed at once."""
    real_open = os.open

    def no_tmpfile(path: str, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    expected = backing_max_size(tmp_dir_fd)
    monkeypatch.setattr(limits.os, "open", no_tmpfile)
    assert backing_max_size(tmp_dir_fd) == expected
    assert os.listdir(tmp_path) == []


def test_a_directory_nothing_can_be_made_in_gets_ext4s_limit(tmp_path: Path) -> None:
    fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        assert backing_max_size(fd) == limits.FALLBACK_BACKING_MAX
    finally:
        os.close(fd)
