"""``syscalls.stat_at``: the one-statx path (fs/_statx.c) answers exactly as
``lstat`` does, and as the careful ``O_PATH`` + ``fstat`` path does.

The mount-point rule itself (EXDEV, never asking the mounted filesystem)
is tested on real mounts in tests/security/test_backing_mounts.py, on both
paths.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from keyfence.fs import syscalls

native = pytest.mark.skipif(syscalls._STATX is None, reason="fs/_statx.c not built")

FIELDS = [f for f in dir(os.lstat("/")) if f.startswith("st_")]


def _same(a: os.stat_result, b: os.stat_result) -> list[str]:
    return [
        f"{f}: {getattr(a, f)!r} != {getattr(b, f)!r}"
        for f in FIELDS
        if getattr(a, f) != getattr(b, f)
    ]


@pytest.fixture
def entries(tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_bytes(b"x" * 5000)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("nowhere")
    os.mkfifo(tmp_path / "fifo")
    os.link(tmp_path / "file", tmp_path / "hardlink")
    (tmp_path / "nanos").write_text("")
    os.utime(tmp_path / "nanos", ns=(1_700_000_000_123_456_789, 987_654_321))
    (tmp_path / "before-1970").write_text("")
    os.utime(tmp_path / "before-1970", ns=(-86_400_000_000_001, -1))
    (tmp_path / "setid").write_text("")
    os.chmod(tmp_path / "setid", 0o6755 | stat.S_ISVTX)
    names = ["file", "dir", "link", "fifo", "hardlink", "nanos", "before-1970", "setid", "."]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(tmp_path / "file", 4242, 4343)
        names.append("null")
    return names


@native
def test_one_statx_answers_as_lstat(tmp_dir_fd: int, entries: list[str]) -> None:
    for name in entries:
        want = os.stat(name, dir_fd=tmp_dir_fd, follow_symlinks=False)
        assert syscalls._STATX is not None
        got = syscalls._STATX.stat_at(tmp_dir_fd, os.fsencode(name))
        assert got is not None, name
        assert _same(got, want) == [], name
        assert _same(syscalls._stat_at_careful(tmp_dir_fd, name), want) == [], name
        assert got == want and type(got) is os.stat_result


@native
def test_a_time_too_far_out_takes_the_careful_path(tmp_dir_fd: int, tmp_path: Path) -> None:
    (tmp_path / "far").write_text("")
    far = 10_000_000_000 * 10**9 + 5  # year 2286: its nanoseconds overflow the C arithmetic
    try:
        os.utime(tmp_path / "far", ns=(far, far))
    except OSError:
        pytest.skip("the filesystem does not store times past 2262")
    assert syscalls._STATX is not None
    assert syscalls._STATX.stat_at(tmp_dir_fd, b"far") is None
    want = os.stat("far", dir_fd=tmp_dir_fd, follow_symlinks=False)
    assert syscalls.stat_at(tmp_dir_fd, "far").st_mtime_ns == want.st_mtime_ns


@pytest.mark.parametrize("path", ["native", "careful"])
def test_errors(
    tmp_dir_fd: int, tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "careful":
        monkeypatch.setattr(syscalls, "_STATX", None)
    elif syscalls._STATX is None:
        pytest.skip("fs/_statx.c not built")
    (tmp_path / "file").write_text("")
    for name, code in [
        ("missing", errno.ENOENT),
        ("..", errno.EINVAL),
        ("a/b", errno.EINVAL),
        ("", errno.EINVAL),
        ("nul\0", errno.EINVAL),
        ("x" * 256, errno.ENAMETOOLONG),
    ]:
        with pytest.raises(OSError) as caught:
            syscalls.stat_at(tmp_dir_fd, name)
        assert caught.value.errno == code, name
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            syscalls.stat_at(fd, "x")
        assert caught.value.errno == errno.ENOTDIR
    finally:
        os.close(fd)


@native
def test_bad_arguments_are_type_errors() -> None:
    assert syscalls._STATX is not None
    with pytest.raises(TypeError):
        syscalls._STATX.stat_at(0, "str")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        syscalls._STATX.stat_at(0)  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        syscalls._STATX.stat_at(2**40, b"x")
    with pytest.raises(OSError) as caught:
        syscalls._STATX.stat_at(0, b"a\0b")
    assert caught.value.errno == errno.EINVAL
