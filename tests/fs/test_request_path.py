"""The small-file request path: what a create costs the worker in backing
syscalls, and that the shortcuts taken for it keep POSIX's answers.

- A create makes no ``ioctl`` (the new file is opened blocking at once, no
  ``O_NONBLOCK`` to clear), no ``fgetxattr`` (a file made just now has no
  ``security.capability``: the kernel's question before the first write is
  answered from memory) and no ``fstat`` of its directory (the group of
  new entries comes from the directory's last GETATTR, ``Inode.group``).
  Counted with strace on the worker, the real kernel as the oracle.
- New entries still get their group as POSIX says after the directory's
  set-group-ID bit or group changed through the mount.
- A read-only open answers ``FOPEN_NOFLUSH``: its close sends no FLUSH
  request (a writer's close still does, so close(2) reports its errors).
- A name the kernel believes missing but that exists in the backing store
  (CREATE for an existing file) is opened as open(2) would: O_EXCL gives
  EEXIST, otherwise the file keeps its owner and contents (the worker
  answers ESTALE and the kernel opens the file after a fresh lookup:
  tests/security/test_backing_create.py checks the modes).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.fuse import protocol as fuse_proto
from keyfence.testing.mounting import Mount, fuse_available

from .test_mount import Enc, errno_of

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

GROUP = 61200  # numeric, of this branch's range: no account needed


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--dirty-expire", "60", "--attr-timeout", "60")
    try:
        yield m
    finally:
        m.unmount_checked()


def _create_files(d: Path, count: int) -> None:
    for i in range(count):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)


def _traced(pid: int, out: Path) -> subprocess.Popen[bytes]:
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=ioctl,fgetxattr,newfstatat,fstat,openat2",
         "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # attached once the worker shows a tracer
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            if re.search(r"^TracerPid:\s+[1-9]", f.read(), re.M):
                break
        time.sleep(0.05)
    else:
        tracer.kill()
        pytest.fail("strace did not attach to the worker")
    time.sleep(0.5)  # every thread
    return tracer


@pytest.mark.skipif(shutil.which("strace") is None, reason="no strace (apt-get install strace)")
@pytest.mark.parametrize("kind", ["plain", "enc"])
def test_a_create_costs_no_ioctl_no_xattr_and_no_directory_fstat(
    mount: Mount, tmp_path: Path, kind: str
) -> None:
    if kind == "enc":
        d = Enc(mount).dir
    else:
        d = mount.mnt / "plain"
        d.mkdir()
    _create_files(d, 2)  # keys bound, directory known
    assert mount.proc is not None
    out = tmp_path / "strace.txt"
    tracer = _traced(mount.proc.pid, out)
    try:
        count = 5
        for i in range(count):
            name = d / f"new{i}"
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"y" * 4096)
            finally:
                os.close(fd)
        time.sleep(0.5)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
    calls = out.read_text().splitlines()
    assert not [c for c in calls if "FIONBIO" in c], calls
    assert not [c for c in calls if "fgetxattr" in c], calls
    creates = [c for c in calls if "openat2(" in c and "O_CREAT" in c]
    assert len(creates) == count, calls
    # per file: the directory's GETATTR (the kernel asks it after every
    # change of the directory), the lookup's probe, the new file's fstat
    stats = [c for c in calls if "newfstatat(" in c or "fstat(" in c]
    assert len(stats) <= 3 * count, calls
    for i in range(count):
        assert (d / f"new{i}").read_bytes() == b"y" * 4096


def test_new_entries_follow_a_set_group_id_change_made_through_the_mount(
    mount: Mount,
) -> None:
    for d in (mount.mnt / "plain", Enc(mount).dir):
        d.mkdir(exist_ok=True)
        shared = d / "shared"
        shared.mkdir()
        os.chown(shared, -1, GROUP)
        (shared / "before").write_bytes(b"")  # the directory's group is known now
        assert os.stat(shared / "before").st_gid == os.getgid()
        os.chmod(shared, 0o2775)
        (shared / "file").write_bytes(b"")
        os.mkdir(shared / "sub")
        os.symlink("target", shared / "link")
        for name in ("file", "sub", "link"):
            assert os.lstat(shared / name).st_gid == GROUP, name
        assert os.stat(shared / "sub").st_mode & 0o2000
        os.chmod(shared, 0o775)
        (shared / "after").write_bytes(b"")
        assert os.stat(shared / "after").st_gid == os.getgid()
        os.chmod(shared, 0o2775)
        os.chown(shared, -1, GROUP + 1)
        (shared / "regrouped").write_bytes(b"")
        assert os.stat(shared / "regrouped").st_gid == GROUP + 1


def test_create_of_a_name_the_kernel_believes_missing(mount: Mount) -> None:
    plain = mount.mnt / "plain"
    plain.mkdir()
    assert errno_of(os.stat, plain / "there") == errno.ENOENT  # a negative entry
    # behind the mount's back (keyfence assumes nobody does; it must not harm)
    behind = mount.backing / "plain" / "there"
    behind.write_bytes(b"old contents")
    os.chown(behind, GROUP, GROUP)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert errno_of(os.open, plain / "there", flags, 0o600) == errno.EEXIST
    fd = os.open(plain / "there", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"new")
    finally:
        os.close(fd)
    st = os.stat(behind)
    assert (st.st_uid, st.st_gid) == (GROUP, GROUP)  # kept its owner
    assert behind.read_bytes() == b"new contents"  # not truncated


def _requests(mount: Mount) -> list[int]:
    counts = mount.control("requests")
    assert counts is not None, "the worker does not run keyfence's own loop"
    return list(counts)


@pytest.mark.parametrize("where", ["plain", "enc"])
def test_closing_a_read_only_descriptor_sends_no_flush(mount: Mount, where: str) -> None:
    """A read-only open answers FOPEN_NOFLUSH (nothing of its own to write
    back); a writer's close still flushes, so close(2) reports its errors."""
    top = Enc(mount).dir if where == "enc" else mount.mnt
    path = top / "read-only"
    path.write_bytes(b"contents " * 1000)
    before = _requests(mount)
    for _ in range(20):
        with open(path, "rb") as f:
            assert f.read(9) == b"contents "
    after = _requests(mount)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert delta[fuse_proto.OPEN] == 20, delta
    assert delta[fuse_proto.FLUSH] == 0, delta
    with open(path, "r+b") as f:
        f.write(b"C")
    final = _requests(mount)
    assert final[fuse_proto.FLUSH] - after[fuse_proto.FLUSH] == 1
    assert path.read_bytes()[:9] == b"Contents "


@pytest.mark.parametrize("where", ["plain", "enc"])
def test_a_file_written_in_unaligned_pieces_is_read_in_one_request(
    mount: Mount, where: str
) -> None:
    """tar writes 10 KiB at a time, then sets the mtime.  The kernel keeps
    a file's pages from one open to the next, but only those one write
    covered whole: the others are holes, and a reader used to fetch each
    hole with a READ of its own (three here; without the utime the mtime
    the kernel had changed, and FUSE_AUTO_INVAL_DATA dropped the pages).
    The next open drops the file's pages instead (no FOPEN_KEEP_CACHE):
    one READ, and then the file is cached whole."""
    top = Enc(mount).dir if where == "enc" else mount.mnt
    path = top / "pieces"
    data = os.urandom(40_000)
    with open(path, "wb", buffering=0) as f:
        for at in range(0, len(data), 10_240):
            f.write(data[at : at + 10_240])
    os.utime(path, (1_000_000_000, 1_000_000_000))  # as tar does: the kernel learns the mtime
    before = _requests(mount)
    assert path.read_bytes() == data
    after = _requests(mount)
    assert after[fuse_proto.READ] - before[fuse_proto.READ] == 1
    assert path.read_bytes() == data
    final = _requests(mount)
    assert final[fuse_proto.READ] - after[fuse_proto.READ] == 0  # cached whole
