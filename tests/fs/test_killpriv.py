"""Set-id bits and capabilities on write, with FUSE_HANDLE_KILLPRIV_V2
(fs/privileges.py; docs/security.md "Set-id bits and capabilities on write").

keyfence's own loop asks the kernel for HANDLE_KILLPRIV_V2, so the kernel
stops clearing set-id bits on write and stops asking ``getxattr
security.capability`` before every write; the handlers clear them.  These
tests write through a real mount, as another uid (``setpriv``: no
CAP_FSETID) and as root, into a plain and an encrypted directory, and
count the FUSE requests a write costs.  With the flag asked for and the
handlers' clearing taken out, the set-id tests fail (pjdfstest chmod/12
found that first).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.fuse import protocol as fuse_proto
from keyfence.testing.mounting import Mount, fuse_available
from keyfence.testing.users import as_uid, python_argv, why_no_other_uids

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

OTHER_UID = 61101
"""A uid of this branch's range (no account needed: setpriv takes numbers)."""
POLICY = "user.keyfence.policy"
CAP = "security.capability"
# VFS_CAP_REVISION_2 with CAP_NET_RAW permitted, effective bit set
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)

WRITER = r"""
import os, sys
path, how = sys.argv[1], sys.argv[2]
if how == "write":
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"x")
elif how == "o_trunc":
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
elif how == "ftruncate":
    fd = os.open(path, os.O_WRONLY)
    os.ftruncate(fd, 1)
elif how == "truncate":
    os.truncate(path, 2)
    fd = os.open(path, os.O_RDONLY)
elif how == "fallocate":
    fd = os.open(path, os.O_WRONLY)
    os.posix_fallocate(fd, 0, 3)
print(oct(os.fstat(fd).st_mode & 0o7777))
"""


@pytest.fixture(scope="module")
def mount() -> Iterator[Mount]:
    # under a directory other uids may enter (pytest's tmp_path is 0700)
    top = Path(tempfile.mkdtemp(prefix="kp-killpriv-"))
    os.chmod(top, 0o755)
    m = Mount(top, "--dirty-expire", "60", "--fuse-loop", "keyfence")
    try:
        os.chmod(m.mnt, 0o777)
        master = MasterKey(os.urandom(64))
        m.add_key(master)
        (m.mnt / "enc").mkdir(mode=0o777)
        os.setxattr(m.mnt / "enc", POLICY, f"keyfence:{master.identifier}".encode())
        (m.mnt / "plain").mkdir(mode=0o777)
        os.chmod(m.mnt / "enc", 0o777)
        os.chmod(m.mnt / "plain", 0o777)
        yield m
    finally:
        try:
            m.unmount_checked()
        finally:
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(params=["plain", "enc"])
def where(request: pytest.FixtureRequest, mount: Mount) -> Path:
    return mount.mnt / str(request.param)


def _file(where: Path, name: str, mode: int) -> Path:
    path = where / name
    path.write_bytes(b"#!/bin/sh\n")  # root: this also binds the directory's key
    os.chmod(path, mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    return path


def _as_other(path: Path, how: str) -> int:
    """The file's mode after ``how`` by OTHER_UID, as that process saw it."""
    why = why_no_other_uids()
    if why is not None:
        pytest.skip(why)
    r = subprocess.run(
        as_uid(OTHER_UID, python_argv("-c", WRITER, str(path), how)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout, 8)


@pytest.mark.parametrize(
    ("mode", "after"),
    [
        (0o4777, 0o777),
        (0o2777, 0o777),
        (0o6777, 0o777),
        (0o2767, 0o2767),  # setgid without group-exec: mandatory locking's mark, stays
        (0o4767, 0o767),
    ],
)
def test_a_write_by_another_uid_drops_set_id_bits(where: Path, mode: int, after: int) -> None:
    path = _file(where, f"w{mode:o}", mode)
    assert _as_other(path, "write") == after
    assert stat.S_IMODE(os.stat(path).st_mode) == after
    assert path.read_bytes() == b"x!/bin/sh\n"


def test_a_file_created_set_id_loses_its_bits_at_a_write(where: Path) -> None:
    # a create remembers a new file as having nothing to drop (no extra
    # syscall before its first write) only when its mode has no set-id bit
    path = where / "made-set-id"
    old = os.umask(0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4777)
    finally:
        os.umask(old)
    try:
        os.write(fd, b"#!/bin/sh\n")  # root: CAP_FSETID, the bit stays
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4777
    assert _as_other(path, "write") == 0o777


@pytest.mark.parametrize("how", ["o_trunc", "ftruncate", "truncate", "fallocate"])
def test_truncation_by_another_uid_drops_set_id_bits(where: Path, how: str) -> None:
    """fallocate too, as ext4's does (the kernel sends FUSE no flag for it:
    a caller other than root is taken to lack CAP_FSETID)."""
    path = _file(where, f"t-{how}", 0o6777)
    assert _as_other(path, how) == 0o777
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    size = {"o_trunc": 0, "ftruncate": 1, "truncate": 2, "fallocate": 10}[how]
    assert os.stat(path).st_size == size


def test_root_keeps_set_id_bits_on_write(where: Path) -> None:
    """CAP_FSETID: the kernel does not ask the server to drop them."""
    path = _file(where, "root", 0o6755)
    with open(path, "r+b", buffering=0) as f:
        f.write(b"x")
        os.ftruncate(f.fileno(), 5)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o6755


def test_chown_drops_set_id_bits(where: Path) -> None:
    path = _file(where, "chown", 0o6755)
    os.chown(path, OTHER_UID, OTHER_UID)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (OTHER_UID, OTHER_UID)


@pytest.mark.parametrize("how", ["write", "pwrite-again", "o_trunc", "truncate", "chown"])
def test_a_capability_goes_on_write_truncate_and_chown(where: Path, how: str) -> None:
    path = _file(where, f"cap-{how}", 0o755)
    if how == "pwrite-again":  # the mount remembered "no capability": must look again
        with open(path, "r+b", buffering=0) as f:
            f.write(b"#")
    os.setxattr(path, CAP, CAPABILITY)
    assert os.getxattr(path, CAP) == CAPABILITY
    if how in ("write", "pwrite-again"):
        with open(path, "r+b", buffering=0) as f:
            f.write(b"#")
    elif how == "o_trunc":
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    elif how == "truncate":
        os.truncate(path, 1)
    else:
        os.chown(path, OTHER_UID, -1)
    with pytest.raises(OSError) as caught:
        os.getxattr(path, CAP)
    assert caught.value.errno == errno.ENODATA


def _requests(mount: Mount) -> list[int]:
    counts = mount.control("requests")
    assert counts is not None, "the worker does not run keyfence's own loop"
    return list(counts)


def test_one_fuse_request_per_write(where: Path, mount: Mount) -> None:
    """No getxattr security.capability before every write: at most the
    kernel's one look per inode (then S_NOSEC)."""
    path = where / "pages"
    path.write_bytes(bytes(256 << 10))
    writes = 200
    before = _requests(mount)
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(writes):
            os.pwrite(fd, os.urandom(4096), (i * 7919 % 64) * 4096)
    finally:
        os.close(fd)
    after = _requests(mount)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert delta[fuse_proto.WRITE] == writes
    assert delta[fuse_proto.GETXATTR] <= 1, delta
    assert delta[fuse_proto.SETATTR] == 0, delta


CREATOR = r"""
import os, sys
os.umask(0)
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY, int(sys.argv[2], 8))
print(oct(os.fstat(fd).st_mode & 0o7777))
"""


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6711, 0o1755])
def test_set_id_bits_asked_for_at_create_are_kept(where: Path, mode: int) -> None:
    """open(O_CREAT) by a user who is not root, with set-id bits in its
    mode: the new file has them, as on ext4 (the kernel has already
    dropped a set-group-ID the creator may not have).  The worker made the
    file as itself and gave it to the caller with fchown, which cleared
    them.  Found by a random differential run as uid 65534."""
    why = why_no_other_uids()
    if why is not None:
        pytest.skip(why)
    reference = where.parent.parent / f"reference-{where.name}"
    reference.mkdir(mode=0o777, exist_ok=True)
    os.chmod(reference, 0o777)
    seen = []
    for d in (reference, where):
        path = d / f"made-{mode:o}"
        r = subprocess.run(
            as_uid(OTHER_UID, python_argv("-c", CREATOR, str(path), oct(mode))),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        st = os.stat(path)
        seen.append((int(r.stdout, 8), stat.S_IMODE(st.st_mode), st.st_uid))
    assert seen[1] == seen[0] == (mode, mode, OTHER_UID)
