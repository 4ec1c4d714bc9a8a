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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs import syscalls
from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount, fuse_available
from tests.security.mount_helpers import OTHER, USER, scene, skip_without_facilities

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


@pytest.mark.parametrize("path", ["statx", "careful"])
def test_stat_refuses_a_mount_point(
    nested: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of ``stat_at``: one statx refusing a mount root
    (fs/_statx.c) and ``O_PATH`` + ``fstat``.  A mount root named as "."
    (the backing root may be one) is the directory itself, never refused."""
    if path == "careful":
        monkeypatch.setattr(syscalls, "_STATX", None)
    elif syscalls._STATX is None:
        pytest.skip("fs/_statx.c not built")
    parent = os.open(nested.parent, os.O_PATH | os.O_DIRECTORY)
    root = os.open(nested, os.O_PATH | os.O_DIRECTORY)
    try:
        assert _errno(syscalls.stat_at, parent, "other") == errno.EXDEV
        assert syscalls.stat_at(parent, "mine").st_size == len("backing file\n")
        assert syscalls.stat_at(root, ".").st_dev == os.fstat(root).st_dev
        assert syscalls.stat_at(root, "theirs").st_dev == os.fstat(root).st_dev
        assert not syscalls.exists_at(parent, "missing")
    finally:
        os.close(parent)
        os.close(root)


# --------------------------------------------------- a FUSE mount in the tree
# Red-team pass on the FUSE mount, finding 1: the worker looked a name up
# with fstatat and compared devices only afterwards, and a stat of a mount
# point is answered by the filesystem mounted there.  A FUSE mount in the
# backing tree (any user may make one on a directory they own) was asked
# GETATTR by the worker: refused (EACCES: the whole directory could no
# longer be listed) or never answered (its server stopped: the worker's
# request thread hung, and with it the mount for everyone).


def _mount_on(tmp: Path, mnt: Path) -> Mount:
    """A second worker (root's, attributes never cached) mounted on ``mnt``."""
    m = Mount.__new__(Mount)
    m.tmp, m.mnt, m.backing = tmp, mnt, tmp / "n-backing"
    m.backing.mkdir()
    (m.backing / "nested-file").write_text("the nested mount's\n")
    m.control_path, m.log_path = str(tmp / "n-control.sock"), tmp / "n-worker.log"
    m.worker_args, m.proc = ("--attr-timeout", "0"), None
    m.start()
    return m


_THROUGH_THE_MOUNT = r"""
import errno, os, sys
top = sys.argv[1]
print(sorted(os.listdir(top)))
# a missing name first: from then on, in an encrypted directory, the FUSE
# loop's C part looks names up before the handler (fs/fuse/_answers.c)
for name in ("missing", "sub"):
    try:
        os.stat(os.path.join(top, name))
    except OSError as err:
        print(errno.errorcode[err.errno])
print(open(os.path.join(top, "file")).read().strip())
"""


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_stopped_fuse_server_in_the_backing_tree_hangs_nothing(
    tmp_path: Path, encrypted: bool
) -> None:
    """Checked failing before: the listing hung in the kernel (D state)
    until the nested server was resumed; plain and encrypted."""
    outer = Mount(tmp_path, "--attr-timeout", "0.2")
    nested: Mount | None = None
    reader: subprocess.Popen[str] | None = None
    try:
        top = outer.mnt / "top"
        top.mkdir()
        if encrypted:
            master = MasterKey(os.urandom(64))
            outer.add_key(master)
            os.setxattr(top, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
        (top / "sub").mkdir()
        (top / "file").write_text("outer file\n")
        (sub_backing,) = [p for p in (outer.backing / "top").iterdir() if p.is_dir()]
        nested = _mount_on(tmp_path, sub_backing)
        assert nested.proc is not None
        os.kill(nested.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # the outer mount's entries and attributes expire
        reader = subprocess.Popen(
            [sys.executable, "-c", _THROUGH_THE_MOUNT, str(top)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while reader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        hung = reader.poll() is None
        os.kill(nested.proc.pid, signal.SIGCONT)  # a hung reader returns now
        out, err = reader.communicate(timeout=60)
        assert not hung, "the outer mount hung on the stopped nested server"
        assert reader.returncode == 0, err
        assert out.split("\n")[:4] == ["['file']", "ENOENT", "EXDEV", "outer file"], out
    finally:
        if nested is not None and nested.proc is not None:
            os.kill(nested.proc.pid, signal.SIGCONT)
            nested.unmount()
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(30)
        assert outer.unmount() == 0, outer.log()
    assert "Traceback" not in outer.log(), outer.log()


@skip_without_facilities()
def test_a_users_mount_in_roots_backing_tree_leaves_the_listing_alone() -> None:
    """A user mounts their own keyfence mount on a directory of theirs in a
    shared directory of root's backing tree (the daemon allows it: their
    home may live there).  Root's worker may not use it (no allow_other):
    its stat was EACCES, and the whole shared directory could no longer be
    listed through root's mount.  Checked failing before: ``ls`` of the
    shared directory failed with EACCES for everyone."""
    with scene() as s:
        rb, rm = s.directory("rb", owner=0), s.directory("rm", owner=0)
        shared = s.directory("rb/shared", owner=0, mode=0o1777)
        (shared / "rootfile").write_text("root's file\n")
        theirs, their_mnt = s.directory("ub"), s.directory("rb/shared/their-mnt")
        assert s.keyfence(0, "mount", str(rb), str(rm)).returncode == 0
        done = s.keyfence(USER, "mount", str(theirs), str(their_mnt))
        assert done.returncode == 0, done.stderr
        for uid in (0, OTHER):
            done = s.run(uid, f"ls {rm}/shared; cat {rm}/shared/rootfile")
            assert done.returncode == 0, done.stderr
            assert done.stdout.split("\n")[:2] == ["rootfile", "root's file"], done.stdout
        assert s.keyfence(USER, "umount", str(their_mnt)).returncode == 0
        assert s.keyfence(0, "umount", str(rm)).returncode == 0
