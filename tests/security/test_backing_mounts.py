"""A filesystem mounted inside the backing tree is not crossed (issue 11).

The worker's inode table is keyed by the backing filesystem's inode
numbers, and a lock makes the backing store durable with ``syncfs`` of that
filesystem: neither holds across a mount point.  So a directory of the
backing tree that is a mount point of another filesystem reads as EXDEV
(``RESOLVE_NO_XDEV``; the check by device where openat2 is missing) and is
left out of listings, as fscrypt's policy cannot reach across a mount
(docs/security.md, "Mount points inside the backing store").  A real
worker, a real tmpfs mounted in its backing directory.  Failed before: the
worker served the tmpfs (its root under an inode number of the backing
filesystem's) and wrote into it.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs import syscalls
from keyfence.testing.mounting import Mount, fuse_available

_why = fuse_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture
def nested(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs on ``tmp_path/m-backing/other`` holding ``theirs``."""
    backing = tmp_path / "m-backing"
    (backing / "other").mkdir(parents=True)
    (backing / "mine").write_text("backing file\n")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "kftest", str(backing / "other")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (backing / "other" / "theirs").write_text("another filesystem\n")
        yield backing / "other"
    finally:
        subprocess.run(["umount", "-l", str(backing / "other")], check=False)


def _errno(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as err:
        return err.errno or 0
    return 0


def test_a_mount_point_in_the_backing_tree_is_not_crossed(tmp_path: Path, nested: Path) -> None:
    m = Mount(tmp_path)
    try:
        assert sorted(os.listdir(m.mnt)) == ["mine"]
        assert (m.mnt / "mine").read_text() == "backing file\n"
        assert _errno(os.stat, m.mnt / "other") == errno.EXDEV
        assert _errno(os.listdir, m.mnt / "other") == errno.EXDEV
        assert _errno(open, m.mnt / "other" / "theirs") == errno.EXDEV
        assert _errno(os.mkdir, m.mnt / "other" / "new") == errno.EXDEV
        assert sorted(os.listdir(nested)) == ["theirs"]
    finally:
        assert m.unmount() == 0, m.log()


@pytest.mark.parametrize("openat2", [True, False])
def test_opens_refuse_to_cross_a_mount_point(
    nested: Path, openat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if openat2 and not syscalls.HAVE_OPENAT2:
        pytest.skip("no openat2(2) on this kernel")
    monkeypatch.setattr(syscalls, "HAVE_OPENAT2", openat2)
    parent = os.open(nested.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        for flags in (os.O_PATH, os.O_RDONLY):
            assert _errno(syscalls.open_dir, parent, "other", flags) == errno.EXDEV
        fd = syscalls.open_dir(parent, ".", os.O_PATH)  # the directory itself is fine
        os.close(fd)
        fd, _st = syscalls.open_regular(parent, "mine", os.O_RDONLY)
        os.close(fd)
    finally:
        os.close(parent)
