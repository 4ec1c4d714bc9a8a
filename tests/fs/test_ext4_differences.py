"""Differences from ext4 that a differential conformance pass found
(docs/fs.md, "What does not work (yet)" for those that remain), one test per
fix.  Real mounts, real keys, as tests/fs/test_posix_fixes.py; what depends
on who asks runs as another uid (``setpriv``)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.limits import backing_max_size, encrypted_max_size
from keyfence.testing.mounting import Mount, fuse_available
from keyfence.testing.users import as_uid, python_argv, why_no_other_uids

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

OTHER_UID = 61701
"""A uid of this file's own (no account needed: setpriv takes numbers)."""
POLICY = "user.keyfence.policy"


class Dirs:
    """A fresh mount with an encrypted and a plain directory, both open to
    every uid, and a reference directory on the host's own filesystem."""

    def __init__(self, top: Path) -> None:
        self.mount = Mount(top, "--dirty-expire", "60")
        os.chmod(self.mount.mnt, 0o777)
        master = MasterKey(os.urandom(64))
        self.serial = self.mount.add_key(master)
        self.enc = self.mount.mnt / "enc"
        self.enc.mkdir()
        os.setxattr(self.enc, POLICY, f"keyfence:{master.identifier}".encode())
        self.plain = self.mount.mnt / "plain"
        self.plain.mkdir()
        self.ref = top / "ext4"
        self.ref.mkdir()
        for d in (self.enc, self.plain, self.ref):
            os.chmod(d, 0o777)

    @property
    def all(self) -> list[Path]:
        """The reference first, then the mount's plain and encrypted ones."""
        return [self.ref, self.plain, self.enc]


@pytest.fixture
def dirs() -> Iterator[Dirs]:
    # under a directory other uids may enter (pytest's tmp_path is 0700)
    top = Path(tempfile.mkdtemp(prefix="kf-ext4diff-"))
    os.chmod(top, 0o755)
    made: Dirs | None = None
    try:
        made = Dirs(top)
        yield made
    finally:
        try:
            if made is not None:
                log = made.mount.unmount_checked()
                assert "failed" not in log, log
        finally:
            shutil.rmtree(top, ignore_errors=True)


def as_other(code: str, *args: str) -> str:
    """``code`` run by the system python as OTHER_UID; its stdout."""
    why = why_no_other_uids()
    if why is not None:
        pytest.skip(why)
    r = subprocess.run(
        as_uid(OTHER_UID, python_argv("-c", code, *args)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _errno_of(call: Callable[..., object], *args: object) -> int:
    """The errno ``call(*args)`` fails with, 0 if it does not."""
    try:
        call(*args)
    except OSError as err:
        return err.errno or 0
    return 0


# --- 1. sizes beyond what an encrypted file can hold ----------------------------


@pytest.mark.parametrize("how", ["truncate", "ftruncate"])
def test_a_size_beyond_the_maximum_leaves_the_file_and_the_fence_alone(
    dirs: Dirs, how: str
) -> None:
    """truncate(f, 2**62) of an encrypted file failed with EFBIG but left the
    size in the worker's cache: stat showed it, close and every fsync failed
    with EFBIG, the flusher retried every second and every key removal was
    refused.  Now EFBIG comes before anything changes, as on ext4.
    Checked failing before: stat showed 4611686018427387904 after the
    failed truncate (ftruncate: close failed with EFBIG)."""
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x" * 100)
        fd = os.open(path, os.O_RDWR)
        try:
            if how == "truncate":
                assert _errno_of(os.truncate, path, 1 << 62) == errno.EFBIG, d
            else:
                assert _errno_of(os.ftruncate, fd, 1 << 62) == errno.EFBIG, d
            assert os.stat(path).st_size == 100, d
            assert os.pwrite(fd, b"W", 150) == 1
            os.fsync(fd)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"x" * 100 + bytes(50) + b"W", d
    dirs.mount.unlink_key(dirs.serial)  # the fence writes back: nothing is stuck


def test_a_write_beyond_the_maximum_is_refused_and_one_below_is_stored(dirs: Dirs) -> None:
    """pwrite(f, b"data", 16 TiB - 8 KiB) into a new encrypted file on ext4
    was acknowledged, then fsync and close failed with EFBIG and the data
    never reached the disk: the plaintext offset fits ext4's maximum file
    size, its ciphertext offset (header, per-record overhead) does not.
    Now a write (or truncate) beyond the largest plaintext size the backing
    filesystem can hold is refused at once, as ext4 refuses one beyond its
    own: EFBIG at or past it, a short write across it.  Checked failing
    before: the pwrite returned 4 and fsync failed with EFBIG."""
    root = os.open(dirs.mount.backing, os.O_PATH)
    try:
        backing_max = backing_max_size(root)
    finally:
        os.close(root)
    limit = encrypted_max_size(backing_max)
    if _is_ext4(dirs.mount.backing) and os.statvfs(dirs.mount.backing).f_bsize == 4096:
        assert backing_max == (2**32 - 1) * 4096  # s_maxbytes, asked of ext4
        assert limit == 17_472_743_458_044
    path = dirs.enc / "g"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert _errno_of(os.pwrite, fd, b"data", 16 * 2**40 - 8192) == errno.EFBIG
        assert _errno_of(os.pwrite, fd, b"data", limit) == errno.EFBIG
        assert _errno_of(os.ftruncate, fd, limit + 1) == errno.EFBIG
        assert os.fstat(fd).st_size == 0
        assert os.pwrite(fd, b"data", limit - 2) == 2  # what fits, as ext4
        os.fsync(fd)
        assert os.fstat(fd).st_size == limit
        assert os.pread(fd, 4, limit - 4) == b"\0\0da"
        os.ftruncate(fd, limit)
        os.fsync(fd)
    finally:
        os.close(fd)
    dirs.mount.unlink_key(dirs.serial)  # the fence writes back: nothing is stuck


def _is_ext4(path: Path) -> bool:
    r = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return r.stdout.strip() in ("ext2/ext3", "ext4")


# --- 4. trusted.* names listed to a user -----------------------------------------

LIST_XATTRS = r"""
import os, sys
print(" ".join(sorted(n for n in os.listxattr(sys.argv[1]) if not n.startswith("user.keyfence."))))
"""


def test_a_user_does_not_see_trusted_names(dirs: Dirs) -> None:
    """listxattr by a user listed the backing file's trusted.* names: the
    worker (root) got the whole list, which the kernel filters only for a
    caller without CAP_SYS_ADMIN.  Now the mount hides them from callers
    other than root, as ext4 does.  Checked failing before: the user saw
    'trusted.secret user.a' where ext4 shows 'user.a'."""
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x")
        os.chmod(path, 0o644)
        os.setxattr(path, "trusted.secret", b"root only")
        os.setxattr(path, "user.a", b"1")
        assert as_other(LIST_XATTRS, str(path)).split() == ["user.a"], d
        assert {"trusted.secret", "user.a"} <= set(os.listxattr(path)), d  # root sees both


# --- 2. times before 1970 --------------------------------------------------------


@pytest.mark.parametrize(
    ("atime", "mtime"), [(-1000 * 10**9, -5 * 10**9), (-1, -1), (-(2**40) * 10**9 + 7, 3)]
)
def test_times_before_1970_are_stored(dirs: Dirs, atime: int, mtime: int) -> None:
    """utimensat with a time before 1970 failed with EIO: the FUSE loop read
    fuse_setattr_in's seconds as unsigned (-5 s became about 1.8e19 s, which
    os.utime refused with OverflowError).  The kernel sends and takes them
    as signed 64-bit numbers: now they are read and answered so, and stored
    as ext4 stores them (clamped to ext4's range, as the reference shows).
    Checked failing before: os.utime raised EIO."""
    seen = []
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x")
        os.utime(path, ns=(atime, mtime))
        st = os.stat(path)
        got = [st.st_atime_ns, st.st_mtime_ns]
        fd = os.open(path, os.O_RDONLY)
        try:
            os.utime(fd, ns=(mtime, atime))
            st = os.fstat(fd)
            got += [st.st_atime_ns, st.st_mtime_ns]
        finally:
            os.close(fd)
        seen.append(got)
    if atime > -(2**31) * 10**9:
        assert seen[0] == [atime, mtime, mtime, atime]
    assert seen == [seen[0]] * 3


# --- 3. an open file whose last name went ---------------------------------------


def test_attributes_of_an_open_file_whose_last_name_went(dirs: Dirs) -> None:
    """fchmod, fchown, futimens, fsetxattr, flistxattr and fremovexattr of
    an open regular file whose last name was unlinked failed with ESTALE:
    the worker changed attributes by (directory, name), and there was no
    name left.  Now it uses the backing descriptor it holds for the open
    file, as ext4 changes the inode.  Checked failing before: fchmod
    raised ESTALE."""
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x")
        os.chmod(path, 0o644)
        fd = os.open(path, os.O_RDWR)
        try:
            os.unlink(path)
            os.fchmod(fd, 0o600)
            os.fchown(fd, 1234, 5678)
            os.utime(fd, ns=(10**9, 2 * 10**9))
            os.setxattr(fd, "user.a", b"1")
            os.setxattr(fd, "user.b", b"2")
            os.removexattr(fd, "user.b")
            assert os.getxattr(fd, "user.a") == b"1", d
            names = [n for n in os.listxattr(fd) if not n.startswith("user.keyfence.")]
            assert names == ["user.a"], d
            st = os.fstat(fd)
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 1234, 5678), d
            assert (st.st_atime_ns, st.st_mtime_ns, st.st_nlink) == (10**9, 2 * 10**9, 0), d
            assert os.pwrite(fd, b"y", 1) == 1
            assert os.pread(fd, 2, 0) == b"xy"
        finally:
            os.close(fd)


# --- 5. chown(f, -1, -1) and set-id bits -----------------------------------------

CHOWN_NOTHING = r"""
import errno, os, sys
try:
    os.chown(sys.argv[1], -1, -1)
except OSError as err:
    print(errno.errorcode[err.errno])
else:
    print(oct(os.stat(sys.argv[1]).st_mode & 0o7777))
"""


@pytest.mark.parametrize("mode", [0o6755, 0o4755, 0o2755, 0o2745, 0o6745], ids=oct)
@pytest.mark.parametrize("who", ["root", "owner in group", "owner not in group", "not owner"])
def test_chown_to_nobody_new_drops_set_id_bits_as_ext4(dirs: Dirs, mode: int, who: str) -> None:
    """chown(f, -1, -1) changes no owner but is a chown: ext4 drops S_ISUID,
    and S_ISGID where group-exec is set or the caller is neither in the
    file's group nor privileged, and updates ctime.  The mount kept both
    bits (the kernel's FUSE client leaves set-id bits of a chown to the
    server, and the request said nothing else); a user other than the
    owner gets EPERM instead.  Checked failing before:
    mode 0o6755 stayed 0o6755 where ext4 shows 0o755."""
    seen = []
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x")
        if who.startswith("owner"):
            os.chown(path, OTHER_UID, OTHER_UID if who == "owner in group" else 0)
        os.chmod(path, mode)
        before = os.stat(path).st_ctime_ns
        time.sleep(0.01)
        if who == "root":
            os.chown(path, -1, -1)
            after = os.stat(path)
            got = oct(after.st_mode & 0o7777)
        else:
            got = as_other(CHOWN_NOTHING, str(path)).strip()
            after = os.stat(path)
        if got != "EPERM":
            assert after.st_ctime_ns > before, d
        seen.append(got)
    assert seen == [seen[0]] * 3, seen
    if who == "not owner":  # another user's chown may not drop them
        assert seen[0] == "EPERM"


# --- 7. setxattr(XATTR_CREATE | XATTR_REPLACE) ----------------------------------


def test_setxattr_with_create_and_replace_as_ext4(dirs: Dirs) -> None:
    """XATTR_CREATE | XATTR_REPLACE together: ext4 answers ENODATA for a
    missing attribute (nothing made) and EEXIST for an existing one; the
    mount created the missing one (the loop tested CREATE alone before
    REPLACE).  Checked failing before: the missing attribute was created."""
    both = os.XATTR_CREATE | os.XATTR_REPLACE
    seen = []
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x")
        got = [_errno_of(os.setxattr, path, "user.c", b"v", both)]
        got.append(_errno_of(os.getxattr, path, "user.c"))
        os.setxattr(path, "user.c", b"v")
        got.append(_errno_of(os.setxattr, path, "user.c", b"w", both))
        got.append(os.getxattr(path, "user.c"))
        seen.append(got)
    assert seen[0] == [errno.ENODATA, errno.ENODATA, errno.EEXIST, b"v"]
    assert seen == [seen[0]] * 3, seen


# --- 8. open(O_TRUNC) of an empty file ------------------------------------------


@pytest.mark.parametrize("access", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY])
def test_o_trunc_of_an_empty_file_updates_its_times(dirs: Dirs, access: int) -> None:
    """Linux truncates on every open(O_TRUNC), and ext4 then sets mtime and
    ctime even when the file was empty already; a plain directory's open
    skipped the truncation of an empty file and changed neither.  Checked
    failing before: in the plain directory mtime and ctime stayed."""
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"")
        before = os.stat(path)
        time.sleep(0.02)
        os.close(os.open(path, access | os.O_TRUNC))
        after = os.stat(path)
        assert after.st_mtime_ns > before.st_mtime_ns, d
        assert after.st_ctime_ns > before.st_ctime_ns, d


# --- 6. ctime of a write ---------------------------------------------------------


def test_a_write_sets_ctime_with_mtime(dirs: Dirs) -> None:
    """write(2) sets mtime and ctime to the same time on ext4.  In an
    encrypted directory the page cache reported the write's mtime but the
    backing file's old ctime until write-back.  Now the write's time is
    kept for both.  Checked failing before: fstat after a write showed the
    old ctime in the encrypted directory."""
    for d in dirs.all:
        path = d / "f"
        path.write_bytes(b"x" * 10)
        before = os.stat(path)
        time.sleep(0.02)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"y" * 5000, 0)  # more than the first write: cached
            after = os.fstat(fd)
        finally:
            os.close(fd)
        assert after.st_mtime_ns > before.st_mtime_ns, d
        assert after.st_ctime_ns == after.st_mtime_ns, d
        assert os.stat(path).st_ctime_ns >= after.st_ctime_ns, d


@pytest.mark.parametrize("files", [2, 2000])
def test_a_listing_has_dot_and_dot_dot_as_ext4(dirs: Dirs, files: int) -> None:
    # before: no "." or ".." (ls -a, a program counting entries saw two
    # fewer); 2,000 entries take several READDIRs: every one listed once
    listings = []
    for d in dirs.all:
        sub = d / f"list{files}"
        sub.mkdir()
        for i in range(files):
            (sub / f"f{i}").write_bytes(b"")
        (sub / "dir").mkdir()
        r = subprocess.run(
            ["ls", "-a1f", str(sub)], capture_output=True, text=True, timeout=60, check=True
        )
        names = r.stdout.split("\n")[:-1]
        if d != dirs.ref:  # ext4's order is its hash's
            assert names[:2] == [".", ".."], d
        listings.append(sorted(names))
        inos = subprocess.run(
            ["ls", "-a1fi", str(sub / "dir")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        # the inode numbers a listing gives the two: the directory's and its parent's
        shown = dict(zip(inos[1::2], inos[0::2], strict=True))
        assert shown == {".": str(os.stat(sub / "dir").st_ino), "..": str(os.stat(sub).st_ino)}
    assert listings[0] == listings[1] == listings[2]
    assert len(listings[0]) == files + 3


# --- 7. blocks of data not written back yet ------------------------------------------

HOLD_OPEN = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
if len(sys.argv) > 2:  # a hole of that size around one page in its middle
    os.ftruncate(fd, int(sys.argv[2]))
    os.pwrite(fd, b"x" * 4096, int(sys.argv[2]) // 2)
else:  # 200,000 bytes, in two writes: past the first write's write-through
    os.write(fd, b"A" * 100_000)
    os.write(fd, b"B" * 100_000)
print("written", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def held_open(*args: str) -> Iterator[None]:
    """A process that writes (HOLD_OPEN) and keeps the file open until the
    block ends.  Not this one: a descriptor of ours would be closed in every
    child at exec, and the FLUSH of that close writes the file back."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "written\n"
        yield
    finally:
        p.communicate("\n", timeout=60)


def test_blocks_count_data_not_written_back_yet(dirs: Dirs) -> None:
    """ext4 counts delayed-allocation blocks in st_blocks.  An encrypted
    file showed its backing file's blocks only: 200,000 bytes written and
    kept open had st_blocks 0, and `tar --sparse` (which takes 0 blocks for
    all holes) archived zeros.  Now the dirty pages count what their
    records will take: as many blocks as after the write-back, and a hole
    stays a hole.  Checked failing before: st_blocks 0 and an archive of
    zeros."""
    data = b"A" * 100_000 + b"B" * 100_000
    for d in dirs.all:
        path = d / "log"
        out = dirs.mount.tmp / f"tar-{d.name}"
        out.mkdir()
        with held_open(str(path)):
            open_blocks = os.stat(path).st_blocks
            subprocess.run(
                ["tar", "--sparse", "-cf", str(out / "a.tar"), "-C", str(d), "log"],
                check=True,
                timeout=60,
            )
        subprocess.run(["tar", "-xf", str(out / "a.tar"), "-C", str(out)], check=True, timeout=60)
        assert (out / "log").read_bytes() == data, d
        assert open_blocks >= len(data) // 512, (d, open_blocks)
        assert open_blocks == os.stat(path).st_blocks, d  # written back: the same
    for d in dirs.all:  # 1 MiB of holes around one page: still sparse
        path = d / "sparse"
        with held_open(str(path), str(1 << 20)):
            open_blocks = os.stat(path).st_blocks
        assert 8 <= open_blocks <= 32, (d, open_blocks)  # a page (and a header), not 1 MiB
        assert open_blocks == os.stat(path).st_blocks, d


# --- 8. keyfence's own attributes are not listed -----------------------------------


def test_keyfence_attributes_are_not_listed(dirs: Dirs) -> None:
    """listxattr listed user.keyfence.status on every entry and
    user.keyfence.policy in encrypted directories, where ext4 (fscrypt)
    lists nothing: `cp -a` copied them off the mount and `tar --xattrs`
    restoring into it failed to set them ("Operation not permitted", "Not
    a directory").  Now they are answered by name only.  Checked failing
    before: the mount listed both."""
    for d in dirs.all:
        (d / "f").write_bytes(b"hello")
        (d / "sub").mkdir()
        for path in (d, d / "f", d / "sub"):
            assert os.listxattr(path) == os.listxattr(dirs.ref), path  # nothing extra
        copy = dirs.mount.tmp / f"copy-{d.name}"
        subprocess.run(["cp", "-a", str(d / "f"), str(copy)], check=True, timeout=60)
        assert os.listxattr(copy) == os.listxattr(dirs.ref), d
    for path in (dirs.enc, dirs.enc / "f", dirs.enc / "sub"):  # asked by name: there
        assert os.getxattr(path, POLICY) == os.getxattr(dirs.enc, POLICY)
        assert b'"encrypted": true' in os.getxattr(path, "user.keyfence.status")
