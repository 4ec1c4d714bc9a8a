"""The encrypted overlay on a real FUSE mount (docs/fs.md).

Each test mounts a fresh backing directory with a real worker process
(``src/keyfence/testing/mount_worker.py``: the worker over an in-process KeyService
with real keys and synchronous watches) and unmounts it with
``fusermount3 -u``.  Keys live in the test process's session keyring, so
requests from this process find them; a process in another session does
not (whose keys count).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyfence.fs import e4crypt_compat
from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import (
    FILE_HEADER_SIZE,
    POLICY_FILE_NAME,
    FileHeader,
    FormatError,
    Policy,
    backing_size,
    plaintext_size,
    record_offset,
)
from keyfence.testing.mounting import Mount, fuse_available

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

POLICY = "user.keyfence.policy"
STATUS = "user.keyfence.status"


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--dirty-expire", "60")
    try:
        yield m
    finally:
        m.unmount_checked()


class Enc:
    """An encrypted directory ``enc`` on a mount, with its key."""

    def __init__(self, mount: Mount, master: MasterKey | None = None) -> None:
        self.mount = mount
        self.master = master or MasterKey(os.urandom(64))
        self.serial = mount.add_key(self.master)
        self.dir = mount.mnt / "enc"
        self.backing = mount.backing / "enc"
        self.dir.mkdir()
        os.setxattr(self.dir, POLICY, self.ref.encode())

    @property
    def ref(self) -> str:
        return f"keyfence:{self.master.identifier}"

    def lock(self, *, op: str = "unlink", emergency: bool = False) -> None:
        if op == "unlink":
            self.mount.unlink_key(self.serial, emergency=emergency)
        elif op == "clear":
            self.mount.clear(emergency=emergency)
        elif op == "revoke":
            self.mount.revoke(self.serial, emergency=emergency)
        else:
            raise ValueError(op)

    def unlock(self) -> None:
        self.serial = self.mount.add_key(self.master)


@pytest.fixture
def enc(mount: Mount) -> Enc:
    return Enc(mount)


def decrypt_backing_file(path: Path, master: MasterKey) -> bytes:
    raw = path.read_bytes()
    if len(raw) in (0, FILE_HEADER_SIZE):
        return b""
    header = FileHeader.parse(raw[:FILE_HEADER_SIZE])
    cipher = master.file_cipher(header.file_id)
    return bytes(cipher.decrypt_blocks(0, raw[FILE_HEADER_SIZE:]))[: plaintext_size(len(raw))]


def backing_file_of(enc: Enc, name: str) -> Path:
    """The backing file of ``name`` in the encrypted dir (by inode number)."""
    ino = os.stat(enc.dir / name).st_ino
    for p in enc.backing.rglob("*"):
        if os.lstat(p).st_ino == ino:
            return p
    raise FileNotFoundError(name)


def assert_no_plaintext(root: Path, needles: list[bytes]) -> None:
    """No backing name or file content holds any of ``needles`` (five bytes
    or more: a random base64 name holds a given two-letter word about once
    in a hundred names)."""
    assert all(len(needle) >= 5 for needle in needles), needles
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            for needle in needles:
                assert needle not in os.fsencode(n), (n, needle)
        for n in filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                target = os.fsencode(os.readlink(p))
                assert not any(needle in target for needle in needles), (p, target)
                continue
            with open(p, "rb") as f:
                data = f.read()
            for needle in needles:
                assert needle not in data, (p, needle)
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                target = os.fsencode(os.readlink(p))
                assert not any(needle in target for needle in needles), (p, target)


def in_other_session(code: str) -> Any:
    """Run Python ``code`` in a new session (no access to our keyrings);
    it prints one JSON value."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        start_new_session=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def errno_of(fn: Any, *args: Any, **kwargs: Any) -> int | None:
    try:
        fn(*args, **kwargs)
    except OSError as err:
        return err.errno
    return None


# ---------------------------------------------------------------- plain


def test_plain_directories_pass_through(mount: Mount) -> None:
    m = mount.mnt
    (m / "a.txt").write_bytes(b"plain text")
    (m / "d").mkdir()
    (m / "d" / "b").write_bytes(b"x" * 10000)
    os.symlink("../a.txt", m / "d" / "link")
    os.rename(m / "d" / "b", m / "d" / "c")
    os.setxattr(m / "a.txt", "user.note", b"hi")
    assert (mount.backing / "a.txt").read_bytes() == b"plain text"
    assert (mount.backing / "d" / "c").read_bytes() == b"x" * 10000
    assert os.readlink(mount.backing / "d" / "link") == "../a.txt"
    assert (m / "d" / "link").read_bytes() == b"plain text"
    assert os.getxattr(mount.backing / "a.txt", "user.note") == b"hi"
    assert sorted(os.listdir(m / "d")) == ["c", "link"]
    assert os.stat(m / "a.txt").st_ino == os.stat(mount.backing / "a.txt").st_ino
    assert errno_of(os.getxattr, m / "a.txt", POLICY) == errno.ENODATA
    assert json.loads(os.getxattr(m / "a.txt", STATUS)) == {"encrypted": False}
    # a plain directory cannot be made to look encrypted through the mount
    assert errno_of(os.open, m / POLICY_FILE_NAME, os.O_CREAT | os.O_WRONLY) == errno.EPERM


# ------------------------------------------------------------ round trips


def test_encrypted_round_trip_and_no_plaintext_in_backing(enc: Enc) -> None:
    d = enc.dir
    secret = b"the quick brown fox jumps over the lazy dog. " * 2000
    (d / "notes.txt").write_bytes(secret)
    (d / "sub").mkdir()
    (d / "sub" / "deeper.txt").write_bytes(b"nested-plaintext-content")
    long_name = "L" * 200
    (d / long_name).write_bytes(b"long-name-content")
    os.symlink("notes.txt-target-plaintext", d / "sym")
    unicode_name = "héllo wörld ☃.txt"
    (d / unicode_name).write_bytes(b"unicode-name-content")

    assert sorted(os.listdir(d)) == sorted(["notes.txt", "sub", long_name, "sym", unicode_name])
    assert (d / "notes.txt").read_bytes() == secret
    assert (d / "sub" / "deeper.txt").read_bytes() == b"nested-plaintext-content"
    assert (d / long_name).read_bytes() == b"long-name-content"
    assert os.readlink(d / "sym") == "notes.txt-target-plaintext"
    assert os.lstat(d / "sym").st_size == len("notes.txt-target-plaintext")
    assert os.stat(d / "notes.txt").st_size == len(secret)

    assert_no_plaintext(
        enc.backing,
        [
            b"notes",
            b"deeper",
            b"LLLLLLLL",
            b"quick brown",
            b"nested-plaintext",
            b"long-name-content",
            b"target-plaintext",
            "héllo".encode(),
            b"unicode-name",
        ],
    )
    # the format: header + records, decryptable with the master key alone
    backing = backing_file_of(enc, "notes.txt")
    assert backing.stat().st_size == backing_size(len(secret))
    assert decrypt_backing_file(backing, enc.master) == secret
    # every encrypted directory has its own policy: same key, fresh nonce
    top = Policy.parse((enc.backing / POLICY_FILE_NAME).read_bytes())
    sub = next(p for p in enc.backing.iterdir() if p.is_dir())
    child = Policy.parse((sub / POLICY_FILE_NAME).read_bytes())
    assert child.key == top.key and child.dir_nonce != top.dir_nonce
    assert top.key.description == enc.ref
    # long names have a sidecar
    assert any(
        p.name.startswith("kf.long.") and p.name.endswith(".name") for p in enc.backing.iterdir()
    )
    assert os.getxattr(d / "sub", POLICY).decode() == enc.ref
    assert os.getxattr(d / "notes.txt", POLICY).decode() == enc.ref


def test_every_operation_round_trips(enc: Enc) -> None:
    d = enc.dir
    f = d / "f"
    with open(f, "wb") as out:
        out.write(b"0123456789" * 1000)
        out.seek(5)
        out.write(b"abc")
    data = bytearray(b"0123456789" * 1000)
    data[5:8] = b"abc"
    assert f.read_bytes() == data
    # append
    with open(f, "ab") as out:
        out.write(b"tail")
    data += b"tail"
    assert f.read_bytes() == data
    # read-write in the middle of a block
    with open(f, "r+b") as io:
        io.seek(4095)
        io.write(b"XY")
        io.seek(0)
        data[4095:4097] = b"XY"
        assert io.read() == data
    # chmod / chown / utimens
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_100_000_000_000_000_000
    bst = os.stat(backing_file_of(enc, "f"))
    assert (stat.S_IMODE(bst.st_mode), bst.st_uid, bst.st_mtime_ns) == (
        0o640,
        1234,
        1_100_000_000_000_000_000,
    )
    # mkdir / rmdir, unlink
    (d / "dir").mkdir(mode=0o750)
    assert stat.S_IMODE(os.stat(d / "dir").st_mode) == 0o750
    (d / "dir" / "x").write_bytes(b"x")
    assert errno_of(os.rmdir, d / "dir") == errno.ENOTEMPTY
    os.unlink(d / "dir" / "x")
    os.rmdir(d / "dir")
    assert "dir" not in os.listdir(d)
    # rename within a directory, onto an existing file
    (d / "g").write_bytes(b"g")
    os.rename(f, d / "g")
    assert (d / "g").read_bytes() == data
    assert sorted(os.listdir(d)) == ["g"]
    # long names: rename to and from, unlink
    long_a, long_b = "a" * 250, "b" * 230
    os.rename(d / "g", d / long_a)
    os.rename(d / long_a, d / long_b)
    assert os.listdir(d) == [long_b]
    assert (d / long_b).read_bytes() == data
    sidecars = [p for p in enc.backing.iterdir() if p.name.endswith(".name")]
    assert len(sidecars) == 1
    os.unlink(d / long_b)
    assert sorted(p.name for p in enc.backing.iterdir()) == [POLICY_FILE_NAME]
    # a name too long for any filesystem
    assert errno_of(os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    # fsyncdir
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # statfs passes through
    assert os.statvfs(d).f_blocks == os.statvfs(enc.mount.backing).f_blocks
    # mknod of a fifo in an encrypted directory gets an encrypted name
    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    assert not any("fifo" in p.name for p in enc.backing.iterdir())


def test_new_directories_get_the_kernels_modes(enc: Enc, tmp_path: Path) -> None:
    """Every mode a new encrypted directory can ask for, against ext4 making
    the same (umask 0): made with the mode it keeps where it can, chmod'ed
    after its policy where it cannot (group or other writable, set-id,
    sticky, no owner bits)."""
    modes = [0o755, 0o700, 0o750, 0o751, 0o777, 0o775, 0o555, 0o000, 0o1777, 0o2755, 0o4755]
    plain = tmp_path / "kernel"
    plain.mkdir()
    old = os.umask(0)
    try:
        for mode in modes:
            os.mkdir(enc.dir / f"d{mode:o}", mode)
            os.mkdir(plain / f"d{mode:o}", mode)
    finally:
        os.umask(old)
    for mode in modes:
        want = stat.S_IMODE(os.stat(plain / f"d{mode:o}").st_mode)
        assert stat.S_IMODE(os.stat(enc.dir / f"d{mode:o}").st_mode) == want, oct(mode)
    backing = sorted(stat.S_IMODE(p.stat().st_mode) for p in enc.backing.iterdir() if p.is_dir())
    assert backing == sorted(stat.S_IMODE(os.stat(plain / f"d{m:o}").st_mode) for m in modes)


def test_symlinks_are_encrypted_and_follow(enc: Enc) -> None:
    d = enc.dir
    (d / "target.txt").write_bytes(b"pointed to")
    os.symlink("target.txt", d / "rel")
    os.symlink("/etc/hostname", d / "abs")
    assert (d / "rel").read_bytes() == b"pointed to"
    assert os.readlink(d / "abs") == "/etc/hostname"
    (d / "s1").mkdir()
    (d / "s2").mkdir()
    os.symlink("../target.txt", d / "s1" / "up")
    # a symlink moved to another directory gets its target re-encrypted
    os.rename(d / "s1" / "up", d / "s2" / "moved")
    assert os.readlink(d / "s2" / "moved") == "../target.txt"
    assert (d / "s2" / "moved").read_bytes() == b"pointed to"
    assert_no_plaintext(enc.backing, [b"target", b"hostname"])


# -------------------------------------------------------- rename and link


def test_rename_across_policies_is_exdev(mount: Mount) -> None:
    a = Enc(mount)
    b_master = MasterKey(os.urandom(64))
    mount.add_key(b_master)
    (mount.mnt / "other").mkdir()
    os.setxattr(mount.mnt / "other", POLICY, f"keyfence:{b_master.identifier}".encode())
    (mount.mnt / "plain").mkdir()
    (a.dir / "f").write_bytes(b"f")
    (a.dir / "sub-one").mkdir()
    (a.dir / "sub-two").mkdir()
    (mount.mnt / "plain" / "p").write_bytes(b"p")
    (mount.mnt / "plain" / "pd").mkdir()
    # across policies, into and out of plain directories: EXDEV (as fscrypt)
    assert errno_of(os.rename, a.dir / "f", mount.mnt / "other" / "f") == errno.EXDEV
    assert errno_of(os.rename, a.dir / "f", mount.mnt / "plain" / "f") == errno.EXDEV
    assert errno_of(os.rename, mount.mnt / "plain" / "p", a.dir / "p") == errno.EXDEV
    assert errno_of(os.rename, mount.mnt / "plain" / "pd", a.dir / "pd") == errno.EXDEV
    assert errno_of(os.rename, a.dir / "sub-one", mount.mnt / "other" / "sub-one") == errno.EXDEV
    assert errno_of(os.link, a.dir / "f", mount.mnt / "other" / "f") == errno.EXDEV
    assert errno_of(os.link, a.dir / "f", mount.mnt / "plain" / "f") == errno.EXDEV
    assert errno_of(os.link, mount.mnt / "plain" / "p", a.dir / "p") == errno.EXDEV
    # within one policy, across directories: fine
    os.rename(a.dir / "f", a.dir / "sub-one" / "f")
    os.rename(a.dir / "sub-one", a.dir / "sub-two" / "sub-one")
    assert (a.dir / "sub-two" / "sub-one" / "f").read_bytes() == b"f"
    # an encrypted directory keeps its policy and may move into a plain one
    os.rename(a.dir / "sub-two", mount.mnt / "plain" / "sub-two")
    assert (mount.mnt / "plain" / "sub-two" / "sub-one" / "f").read_bytes() == b"f"
    assert (mount.backing / "plain" / "sub-two").is_dir()
    assert_no_plaintext(mount.backing / "plain" / "sub-two", [b"sub-one"])


def test_rename_noreplace_and_exchange(enc: Enc) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    d = enc.dir
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")

    def renameat2(old: Path, new: Path, flags: int) -> int:
        r = libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
        return 0 if r == 0 else ctypes.get_errno()

    assert renameat2(d / "a", d / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert renameat2(d / "a", d / "b", 2) == 0  # RENAME_EXCHANGE
    assert (d / "a").read_bytes() == b"B"
    assert (d / "b").read_bytes() == b"A"
    assert renameat2(d / "a", d / "c", 1) == 0
    assert sorted(os.listdir(d)) == ["b", "c"]


def test_hard_links_within_a_policy(enc: Enc) -> None:
    d = enc.dir
    (d / "sub").mkdir()
    (d / "one").write_bytes(b"shared")
    os.link(d / "one", d / "two")
    os.link(d / "one", d / "sub" / "three")
    st = os.stat(d / "one")
    assert st.st_nlink == 3
    assert os.stat(d / "two").st_ino == st.st_ino == os.stat(d / "sub" / "three").st_ino
    with open(d / "two", "r+b") as f:
        f.write(b"SH")
    assert (d / "sub" / "three").read_bytes() == b"SHared"
    os.unlink(d / "one")
    assert (d / "two").read_bytes() == b"SHared"
    assert os.stat(d / "two").st_nlink == 2
    # symlinks are bound to their directory: no hard link elsewhere
    os.symlink("two", d / "sym")
    assert errno_of(os.link, d / "sym", d / "sub" / "sym", follow_symlinks=False) == errno.EXDEV
    os.link(d / "sym", d / "sym2", follow_symlinks=False)
    assert os.readlink(d / "sym2") == "two"


# ---------------------------------------------------- sizes and holes


def test_truncate(enc: Enc) -> None:
    f = enc.dir / "t"
    data = os.urandom(20000)
    f.write_bytes(data)
    os.truncate(f, 5000)
    assert f.read_bytes() == data[:5000]
    with open(f, "r+b") as io:
        os.ftruncate(io.fileno(), 9000)
        assert io.read() == data[:5000] + bytes(4000)
        os.ftruncate(io.fileno(), 4096)
    assert f.read_bytes() == data[:4096]
    assert backing_file_of(enc, "t").stat().st_size == backing_size(4096)
    with open(f, "wb") as io:  # O_TRUNC
        io.write(b"new")
    assert f.read_bytes() == b"new"
    os.truncate(f, 0)
    assert f.read_bytes() == b""
    assert backing_file_of(enc, "t").stat().st_size == 0
    assert decrypt_backing_file(backing_file_of(enc, "t"), enc.master) == b""


def test_sparse_files(enc: Enc) -> None:
    f = enc.dir / "sparse"
    with open(f, "wb") as io:
        io.seek(100 << 20)
        io.write(b"end")
    assert os.stat(f).st_size == (100 << 20) + 3
    with open(f, "rb") as io:
        assert io.read(1 << 20) == bytes(1 << 20)
        io.seek(50 << 20)
        assert io.read(4096) == bytes(4096)
        io.seek(100 << 20)
        assert io.read() == b"end"
    bst = backing_file_of(enc, "sparse").stat()
    assert bst.st_size == backing_size((100 << 20) + 3)
    assert bst.st_blocks * 512 < (1 << 20)
    g = enc.dir / "grown"
    g.write_bytes(b"")
    os.truncate(g, 1 << 30)
    assert os.stat(g).st_size == 1 << 30
    with open(g, "rb") as io:
        io.seek((1 << 30) - 10)
        assert io.read() == bytes(10)
    assert backing_file_of(enc, "grown").stat().st_blocks * 512 <= 8192


# -------------------------------------------------------- write-back


def test_fsync_writes_ciphertext_while_open(enc: Enc) -> None:
    f = enc.dir / "s"
    data = os.urandom(300000)
    with open(f, "wb", buffering=0) as io:
        io.write(data)
        back = backing_file_of(enc, "s")
        assert back.stat().st_size == 0  # still in the page cache
        status = json.loads(os.getxattr(enc.dir, STATUS))
        assert status["dirty_bytes"] >= len(data)
        os.fsync(io.fileno())
        assert decrypt_backing_file(back, enc.master) == data
        io.write(b"more")
        os.fdatasync(io.fileno())
        assert decrypt_backing_file(back, enc.master) == data + b"more"
    assert json.loads(os.getxattr(enc.dir, STATUS))["dirty_bytes"] == 0


def test_close_writes_back(enc: Enc) -> None:
    data = os.urandom(100000)
    (enc.dir / "c").write_bytes(data)
    assert decrypt_backing_file(backing_file_of(enc, "c"), enc.master) == data


def test_flusher_writes_back_after_expiry(tmp_path: Path) -> None:
    m = Mount(tmp_path, "--dirty-expire", "0.3", name="exp")
    try:
        e = Enc(m)
        with open(e.dir / "x", "wb", buffering=0) as io:
            io.write(b"expire me" * 1000)
            back = backing_file_of(e, "x")
            deadline = time.monotonic() + 30
            # until the flusher has written it all: a file read while it
            # writes has a header and a block or two (IntegrityError)
            while True:
                try:
                    if decrypt_backing_file(back, e.master) == b"expire me" * 1000:
                        break
                except (OSError, FormatError):
                    pass
                assert time.monotonic() < deadline, "not written back"
                time.sleep(0.05)
    finally:
        assert m.unmount() == 0


def test_dirty_limit_bounds_dirty_memory(tmp_path: Path) -> None:
    m = Mount(tmp_path, "--dirty-expire", "600", "--dirty-limit", "1M", name="lim")
    try:
        e = Enc(m)
        data = os.urandom(8 << 20)
        with open(e.dir / "big", "wb", buffering=0) as io:
            for i in range(0, len(data), 128 << 10):
                io.write(data[i : i + (128 << 10)])
            status = json.loads(os.getxattr(e.dir, STATUS))
            assert status["dirty_bytes"] <= (1 << 20) + (128 << 10)
            assert backing_file_of(e, "big").stat().st_size >= 6 << 20
        assert (e.dir / "big").read_bytes() == data
    finally:
        assert m.unmount() == 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


def test_the_worker_gives_a_bursts_memory_back(tmp_path: Path) -> None:
    """glibc's own heap trimming is off in the worker (it landed in a key
    removal's eviction); the flusher trims once a burst is written back.
    Without either, 320 MiB of freed pages would stay in the worker."""
    m = Mount(tmp_path, "--dirty-expire", "600", "--dirty-limit", "512M", name="rss")
    try:
        assert m.proc is not None
        pid = m.proc.pid
        e = Enc(m)
        before = _rss(pid)
        chunk = os.urandom(1 << 20)
        with open(e.dir / "burst", "wb", buffering=0) as io:
            for _ in range(320):
                io.write(chunk)
            assert _rss(pid) > before + (256 << 20)  # held dirty
        deadline = time.monotonic() + 30
        while _rss(pid) > before + (128 << 20):  # written back at the close
            assert time.monotonic() < deadline, f"RSS {_rss(pid) >> 20} MiB, {before >> 20} before"
            time.sleep(0.1)
    finally:
        assert m.unmount() == 0


def test_sigterm_writes_everything_back(tmp_path: Path) -> None:
    m = Mount(tmp_path, "--dirty-expire", "600", name="term")
    e = Enc(m)
    data = os.urandom(1 << 20)
    io = open(e.dir / "open", "wb", buffering=0)  # noqa: SIM115 - kept open on purpose
    io.write(data)
    back = backing_file_of(e, "open")
    assert back.stat().st_size == 0
    assert m.proc is not None
    m.proc.terminate()
    assert m.proc.wait(30) == 0
    with pytest.raises(OSError):
        io.close()
    assert decrypt_backing_file(back, e.master) == data
    m.unmount()


# ------------------------------------------------------------ key removal


@pytest.mark.parametrize("op", ["unlink", "clear", "revoke"])
def test_key_removal_flushes_unflushed_writes(enc: Enc, op: str) -> None:
    data = os.urandom(5 << 20)
    io = open(enc.dir / "dirty.bin", "w+b", buffering=0)  # noqa: SIM115
    io.write(data)
    (enc.dir / "closed.txt").write_bytes(b"closed and flushed")
    back = backing_file_of(enc, "dirty.bin")
    assert back.stat().st_size == 0
    enc.lock(op=op)
    # the removal returned: the data is on disk, encrypted, complete
    assert back.stat().st_size == backing_size(len(data))
    assert decrypt_backing_file(back, enc.master) == data
    assert_no_plaintext(enc.backing, [data[:32], data[-32:], b"dirty", b"closed"])
    # the open file is locked: no plaintext through it any more
    assert errno_of(io.write, b"x") == errno.ENOKEY
    assert errno_of(os.pread, io.fileno(), 10, 0) == errno.ENOKEY
    busy = enc.mount.reports("busy")
    assert busy and busy[-1]["files"] == ["enc/dirty.bin"]
    assert busy[-1]["key"] == enc.ref
    io.close()
    # the directory shows ciphertext names now
    names = sorted(os.listdir(enc.dir))
    assert names == sorted(p.name for p in enc.backing.iterdir() if p.name != POLICY_FILE_NAME)
    assert errno_of(os.stat, enc.dir / "dirty.bin") == errno.ENOENT
    assert errno_of(open, enc.dir / names[0], "rb") == errno.ENOKEY
    assert errno_of(open, enc.dir / "new", "wb") == errno.ENOKEY
    assert json.loads(os.getxattr(enc.dir, STATUS))["state"] == "locked"
    # progress was reported as bytes left
    progress = enc.mount.control("progress")
    assert any(p and max(x or 0 for x in p) >= len(data) for p in progress)
    # the key comes back: everything reads back
    enc.unlock()
    assert (enc.dir / "dirty.bin").read_bytes() == data
    assert (enc.dir / "closed.txt").read_bytes() == b"closed and flushed"


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
sys.stdout.write(m[:16].hex() + "\n"); sys.stdout.flush()
sys.stdin.readline()  # the key goes meanwhile
sys.stdout.write(m[8192:8208].hex() + "\n"); sys.stdout.flush()
"""


def test_open_files_lose_their_key_too_unlike_fscrypt(enc: Enc) -> None:
    """A deliberate difference (docs/fs.md): fscrypt leaves files that are
    open at removal readable until closed ("incompletely removed"); keyfence
    reports them busy too, but wipes their key: a descriptor opened before
    the lock reads and writes ENOKEY, a mapping gets SIGBUS, no plaintext is
    served.  Once the key is back (bound by any request that finds it), the
    same descriptor works again."""
    data = os.urandom(64 << 10)
    (enc.dir / "open").write_bytes(data)
    reader = open(enc.dir / "open", "rb")  # noqa: SIM115
    writer = open(enc.dir / "open", "r+b", buffering=0)  # noqa: SIM115
    try:
        assert reader.read(100) == data[:100]
        with subprocess.Popen(
            [sys.executable, "-c", MAPPER, str(enc.dir / "open")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as mapper:
            assert mapper.stdin is not None and mapper.stdout is not None
            assert mapper.stdout.readline().strip() == data[:16].hex()
            enc.lock()
            busy = enc.mount.reports("busy")
            assert busy and busy[-1]["files"] == ["enc/open"]
            assert errno_of(os.pread, reader.fileno(), 100, 0) == errno.ENOKEY
            assert errno_of(os.pwrite, writer.fileno(), b"x", 0) == errno.ENOKEY
            # the mapped pages were taken away; faulting them in again fails
            mapper.stdin.write("go\n")
            mapper.stdin.flush()
            assert mapper.stdout.read() == ""
            assert mapper.wait(30) == -signal.SIGBUS
        enc.unlock()
        assert errno_of(os.pread, reader.fileno(), 100, 0) == errno.ENOKEY  # not bound yet
        os.listdir(enc.dir)  # a request from a process holding the key binds it
        assert os.pread(reader.fileno(), 100, 0) == data[:100]
        assert os.pwrite(writer.fileno(), b"again", 0) == 5
    finally:
        reader.close()
        writer.close()
    assert (enc.dir / "open").read_bytes() == b"again" + data[5:]


def test_a_small_new_files_write_is_on_disk_before_its_close(enc: Enc) -> None:
    """The first write of a new file (up to 64 KiB at offset 0) is sealed
    and stored by the write itself (PageCache._write_through): the backing
    file is whole while the file is still open, and an emergency removal
    has nothing of it to drop; a second write to another file is cached
    (dirty) and dropped."""
    data = os.urandom(5000)
    small = os.open(enc.dir / "small", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    other = os.open(enc.dir / "other", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert os.write(small, data) == len(data)
        backing = backing_file_of(enc, "small")
        assert backing.stat().st_size == backing_size(len(data))
        assert decrypt_backing_file(backing, enc.master) == data
        os.write(other, b"first")
        os.write(other, b" and cached")
        enc.lock(emergency=True)
        deadline = time.monotonic() + 10
        while not (dropped := enc.mount.reports("dropped")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dropped and dropped[-1]["files"] == {"enc/other": len("first and cached")}
    finally:
        os.close(small)
        os.close(other)
    enc.unlock()
    assert (enc.dir / "small").read_bytes() == data
    assert (enc.dir / "other").read_bytes() == b"first"


def test_after_lock_pages_the_kernel_cached_are_gone(enc: Enc) -> None:
    data = os.urandom(1 << 20)
    (enc.dir / "cached").write_bytes(data)
    io = open(enc.dir / "cached", "rb")  # noqa: SIM115
    assert io.read() == data  # now in the kernel's page cache
    enc.lock()
    assert errno_of(os.pread, io.fileno(), 4096, 0) == errno.ENOKEY
    assert errno_of(os.pread, io.fileno(), 4096, 512 << 10) == errno.ENOKEY
    io.close()
    assert errno_of(os.stat, enc.dir / "cached") == errno.ENOENT


@pytest.fixture
def cached_enc(tmp_path: Path) -> Iterator[Enc]:
    """``enc`` on a mount that caches first writes too (``--write-through 0``):
    for tests of what happens to dirty data, small files included."""
    m = Mount(tmp_path, "--dirty-expire", "60", "--write-through", "0", name="c")
    try:
        yield Enc(m)
    finally:
        m.unmount_checked()


def test_emergency_removal_drops_and_reports(cached_enc: Enc) -> None:
    enc = cached_enc
    (enc.dir / "safe").write_bytes(b"written before")
    dirty = os.urandom(3 * 4096 + 100)
    io = open(enc.dir / "lost", "w+b", buffering=0)  # noqa: SIM115
    io.write(dirty)
    (enc.dir / "sub").mkdir()
    io2 = open(enc.dir / "sub" / "lost2", "wb", buffering=0)  # noqa: SIM115
    io2.write(b"z" * 5000)
    t = time.monotonic()
    enc.lock(op="clear", emergency=True)
    assert time.monotonic() - t < 2
    # watchers hear of an emergency after the fact (the key is gone already)
    deadline = time.monotonic() + 10
    while not (dropped := enc.mount.reports("dropped")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dropped and dropped[-1]["files"] == {"enc/lost": len(dirty), "enc/sub/lost2": 5000}
    assert errno_of(io.write, b"x") == errno.ENOKEY
    assert errno_of(os.pread, io.fileno(), 1, 0) == errno.ENOKEY
    io.close()
    io2.close()
    assert_no_plaintext(enc.backing, [dirty[:32], b"zzzzzzzz"])
    enc.unlock()
    assert (enc.dir / "safe").read_bytes() == b"written before"
    assert (enc.dir / "lost").read_bytes() == b""
    assert (enc.dir / "sub" / "lost2").read_bytes() == b""


def test_locked_directory_and_whose_keys_count(enc: Enc) -> None:
    (enc.dir / "visible.txt").write_bytes(b"for key holders")
    (enc.dir / "sub").mkdir()
    os.symlink("visible.txt", enc.dir / "ln")
    (enc.dir / "doomed").write_bytes(b"x")
    doomed = backing_file_of(enc, "doomed").name
    enc.lock()
    probe = f"""
import errno, json, os
d = {str(enc.dir)!r}
os.unlink(os.path.join(d, {doomed!r}))  # no key needed to delete
out = {{"names": sorted(os.listdir(d))}}
def err(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return e.errno
out["plain_lookup"] = err(os.stat, os.path.join(d, "visible.txt"))
enc_file = [n for n in out["names"] if os.path.isfile(os.path.join(d, n))][0]
out["open_listed"] = err(open, os.path.join(d, enc_file), "rb")
out["create"] = err(open, os.path.join(d, "new.txt"), "wb")
out["mkdir"] = err(os.mkdir, os.path.join(d, "newdir"))
link = [n for n in out["names"] if os.path.islink(os.path.join(d, n))][0]
out["readlink"] = os.readlink(os.path.join(d, link))
out["status"] = json.loads(os.getxattr(d, "user.keyfence.status"))["state"]
out["rename"] = err(os.rename, os.path.join(d, link), os.path.join(d, "renamed"))
print(json.dumps(out))
"""
    locked = in_other_session(probe)
    on_disk = sorted(p.name for p in enc.backing.iterdir() if p.name != POLICY_FILE_NAME)
    assert locked["names"] == on_disk
    assert "visible.txt" not in locked["names"]
    assert len(locked["names"]) == 3
    assert locked["plain_lookup"] == errno.ENOENT
    assert locked["open_listed"] == errno.ENOKEY
    assert locked["create"] == errno.ENOKEY
    assert locked["mkdir"] == errno.ENOKEY
    assert locked["readlink"] != "visible.txt"
    assert locked["status"] == "locked"
    assert locked["rename"] == errno.ENOKEY
    assert doomed not in locked["names"]
    # the key is in *our* session: our request unlocks it, for everyone
    enc.unlock()
    assert (enc.dir / "visible.txt").read_bytes() == b"for key holders"
    unlocked = in_other_session(
        f"import json; print(json.dumps(open({str(enc.dir / 'visible.txt')!r}).read()))"
    )
    assert unlocked == "for key holders"


def test_wrong_key_under_the_right_name_is_not_used(mount: Mount) -> None:
    e = Enc(mount)
    (e.dir / "f").write_bytes(b"data")
    e.lock()
    impostor = MasterKey(os.urandom(64))
    mount.add_key(impostor, description=e.ref)
    assert errno_of(open, e.dir / os.listdir(e.dir)[0], "rb") == errno.ENOKEY
    e.unlock()
    assert (e.dir / "f").read_bytes() == b"data"


def test_e4crypt_keys_and_user_keys(mount: Mount) -> None:
    raw = e4crypt_compat.derive_key(b"hunter2", bytes.fromhex("0102030405060708"))
    desc = e4crypt_compat.descriptor(raw)
    mount.add_key(
        MasterKey(raw),
        description=f"ext4:{desc}",
        payload=e4crypt_compat.kernel_payload(raw),
    )
    d = mount.mnt / "e4"
    d.mkdir()
    os.setxattr(d, POLICY, f"ext4:{desc}".encode())
    (d / "f").write_bytes(b"e4crypt style")
    assert (d / "f").read_bytes() == b"e4crypt style"
    assert os.getxattr(d, POLICY) == f"ext4:{desc}".encode()
    u = MasterKey(os.urandom(64))
    mount.add_key(u, type="user")
    (mount.mnt / "u").mkdir()
    os.setxattr(mount.mnt / "u", POLICY, f"keyfence:{u.identifier}".encode())
    (mount.mnt / "u" / "f").write_bytes(b"user key")
    assert (mount.mnt / "u" / "f").read_bytes() == b"user key"


def test_setting_a_policy(mount: Mount) -> None:
    master = MasterKey(os.urandom(64))
    ref = f"keyfence:{master.identifier}".encode()
    d = mount.mnt / "d"
    d.mkdir()
    assert errno_of(os.getxattr, d, POLICY) == errno.ENODATA
    assert errno_of(os.setxattr, d, POLICY, ref) == errno.ENOKEY  # no such key
    mount.add_key(master)
    (d / "x").write_bytes(b"")
    assert errno_of(os.setxattr, d, POLICY, ref) == errno.ENOTEMPTY
    os.unlink(d / "x")
    assert errno_of(os.setxattr, d, POLICY, b"keyfence:nothex") == errno.EINVAL
    (mount.mnt / "file").write_bytes(b"")
    assert errno_of(os.setxattr, mount.mnt / "file", POLICY, ref) == errno.ENOTDIR
    os.setxattr(d, POLICY, ref)
    os.setxattr(d, POLICY, ref)  # the same policy again: fine
    other = MasterKey(os.urandom(64))
    mount.add_key(other)
    assert errno_of(os.setxattr, d, POLICY, f"keyfence:{other.identifier}".encode()) == errno.EEXIST
    assert os.getxattr(d, POLICY) == ref
    assert POLICY not in os.listxattr(d) and STATUS not in os.listxattr(d)  # by name only
    root = json.loads(os.getxattr(mount.mnt, STATUS))
    assert [k["key"] for k in root["mount"]["keys"]] == [ref.decode()] or ref.decode() in [
        k["key"] for k in root["mount"]["keys"]
    ]


# -------------------------------------------------------------- integrity


def test_tampered_block_reads_as_eio_and_is_logged(enc: Enc) -> None:
    data = os.urandom(3 * 4096)
    (enc.dir / "t").write_bytes(data)
    back = backing_file_of(enc, "t")
    raw = bytearray(back.read_bytes())
    raw[record_offset(1) + 50] ^= 0x01
    back.write_bytes(raw)
    with open(enc.dir / "t", "rb") as io:  # open drops the kernel's cached pages
        assert os.pread(io.fileno(), 4096, 0) == data[:4096]
        assert os.pread(io.fileno(), 4096, 8192) == data[8192:]
        assert errno_of(os.pread, io.fileno(), 4096, 4096) == errno.EIO
    log = enc.mount.log()
    ino = os.stat(enc.dir / "t").st_ino
    assert f"inode {ino}: " in log and "block 1" in log  # by inode: logs name no file
    assert "enc/t" not in log


def test_truncated_and_torn_blocks_read_as_eio(enc: Enc) -> None:
    data = os.urandom(2 * 4096 + 10)
    (enc.dir / "t").write_bytes(data)
    back = backing_file_of(enc, "t")
    with open(back, "r+b") as f:
        f.truncate(record_offset(2) + 20)  # the last record cut short
    with open(enc.dir / "t", "rb") as io:
        assert os.pread(io.fileno(), 4096, 0) == data[:4096]
        assert errno_of(os.pread, io.fileno(), 100, 8192) == errno.EIO
    # a torn record: the second half of block 0 never written
    with open(back, "r+b") as f:
        f.seek(record_offset(0) + 2000)
        f.write(bytes(2124))
    with open(enc.dir / "t", "rb") as io:
        assert errno_of(os.pread, io.fileno(), 100, 0) == errno.EIO


@pytest.mark.parametrize("planted", ["fifo", "symlink", "directory", "socket"])
def test_a_sidecar_that_is_no_regular_file_leaves_out_its_name_only(enc: Enc, planted: str) -> None:
    """A long name's sidecar replaced in the backing store by something
    that cannot be read as one leaves that name out of the listing, as a
    missing or mismatched sidecar does (docs/fs.md, "Integrity"); the
    directory stays listable.  Before, the open's error (EIO for a fifo,
    socket or directory, ELOOP for a symlink) failed the whole listing:
    whoever could write one entry of a shared backing directory made it
    unlistable for every user."""
    (enc.dir / ("L" * 200)).write_bytes(b"long")
    (enc.dir / "short").write_bytes(b"short")
    (sidecar,) = [p for p in enc.backing.iterdir() if p.name.endswith(".name")]
    sidecar.unlink()
    if planted == "fifo":
        os.mkfifo(sidecar)
    elif planted == "symlink":
        os.symlink("/etc/hostname", sidecar)
    elif planted == "directory":
        sidecar.mkdir()
    else:
        os.mknod(sidecar, stat.S_IFSOCK | 0o644)
    enc.mount.unmount()  # a fresh worker: no name of the directory known
    enc.mount.start()
    enc.unlock()
    assert os.listdir(enc.dir) == ["short"]
    assert (enc.dir / "short").read_bytes() == b"short"
    assert "(sidecar: " in enc.mount.log()


# ----------------------------------------------------------------- tools


def test_many_files_and_a_big_directory(enc: Enc) -> None:
    names = [f"file-{i:04d}" for i in range(300)]
    for n in names:
        (enc.dir / n).write_bytes(n.encode())
    assert sorted(os.listdir(enc.dir)) == names
    for n in names[::37]:
        assert (enc.dir / n).read_bytes() == n.encode()
    shutil.rmtree(enc.dir / "..." if False else enc.dir)
    assert not (enc.backing).exists()


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed (apt-get install fio)")
def test_fio_verify(enc: Enc) -> None:
    r = subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--directory={enc.dir}",
            "--rw=randwrite",
            "--bs=4k,64k",
            "--bsrange=512-128k",
            "--size=32m",
            "--numjobs=2",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--ioengine=psync",
            "--fsync=64",
            "--verify_state_save=0",
        ],
        cwd=enc.mount.tmp,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" in r.stdout


WRITER = r"""
import os, struct, sys
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
sys.stdout.write("started\n"); sys.stdout.flush()
n = 0
try:
    while True:
        os.write(fd, struct.pack(">Q", n) * 8192)  # 64 KiB chunk number n
        n += 1
except OSError as err:
    sys.stdout.write(f"{n} {err.errno}\n")
"""


def chunks_ok(data: bytes, n: int) -> bool:
    import struct

    return all(data[i << 16 : (i + 1) << 16] == struct.pack(">Q", i) * 8192 for i in range(n))


def lock_during(enc: Enc, script: str, *args: str, settle: float) -> list[str]:
    """Run ``script`` (it prints "started", then one line when its I/O
    fails), lock ``enc`` ``settle`` seconds after it started: the words
    of that line."""
    with subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(settle)
        enc.lock()
        words = child.stdout.readline().split()
        child.wait(30)
    return words


def test_removal_under_load_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    m = Mount(tmp_path, "--dirty-expire", "60", name="load")
    try:
        e = Enc(m)
        line = lock_during(e, WRITER, str(e.dir / "stream"), settle=0.5)
        acknowledged, code = int(line[0]), int(line[1])
        assert code == errno.ENOKEY
        assert acknowledged > 10
        e.unlock()
        data = (e.dir / "stream").read_bytes()
        assert len(data) >= acknowledged << 16
        assert chunks_ok(data, acknowledged)
    finally:
        assert m.unmount() == 0, m.log()


def test_emergency_under_load_reports_what_it_dropped(tmp_path: Path) -> None:
    m = Mount(tmp_path, "--dirty-expire", "60", name="eload")
    try:
        e = Enc(m)
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, str(e.dir / "stream")],
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "started"
            time.sleep(0.3)
            e.lock(op="clear", emergency=True)
            line = writer.stdout.readline().split()
            writer.wait(30)
        acknowledged = int(line[0])
        deadline = time.monotonic() + 10
        while not (dropped := m.reports("dropped")) and time.monotonic() < deadline:
            time.sleep(0.02)
        lost = dropped[-1]["files"]["enc/stream"] if dropped else 0
        e.unlock()
        data = (e.dir / "stream").read_bytes()
        # what was written back before the wipe is intact; the rest was
        # reported; nothing in between is garbage
        good = len(data) >> 16
        assert chunks_ok(data, good)
        assert good * 65536 + lost >= acknowledged * 65536 - 65536
    finally:
        assert m.unmount() == 0, m.log()


def test_writeback_cache_mode_pushes_kernel_dirty_pages_before_removal(tmp_path: Path) -> None:
    """With the kernel's writeback cache, written pages may sit in the
    kernel: the removal pushes them to the worker (syncfs) and writes them."""
    m = Mount(tmp_path, "--dirty-expire", "60", "--writeback-cache", name="wbc")
    try:
        e = Enc(m)
        data = os.urandom(3 << 20)
        io = open(e.dir / "f", "w+b", buffering=0)  # noqa: SIM115
        try:
            io.write(data)
            mm_target = e.dir / "mapped"
            mm_target.write_bytes(bytes(1 << 20))
            import mmap

            with open(mm_target, "r+b") as mf, mmap.mmap(mf.fileno(), 1 << 20) as mm:
                mm[:8] = b"mmapped!"
                e.lock()
            assert decrypt_backing_file(backing_file_of_locked(e, io), e.master) == data
        finally:
            io.close()
        e.unlock()
        assert (e.dir / "f").read_bytes() == data
        assert (e.dir / "mapped").read_bytes()[:8] == b"mmapped!"
    finally:
        assert m.unmount() == 0, m.log()


def backing_file_of_locked(enc: Enc, io: Any) -> Path:
    ino = os.fstat(io.fileno()).st_ino
    for p in enc.backing.rglob("*"):
        if os.lstat(p).st_ino == ino:
            return p
    raise FileNotFoundError(ino)


def test_long_names_for_directories_and_symlinks(enc: Enc) -> None:
    d = enc.dir
    name = "d" * 240
    (d / name).mkdir()
    (d / name / ("f" * 200)).write_bytes(b"deep")
    os.symlink("t" * 3000, d / ("s" * 220))
    assert sorted(os.listdir(d)) == sorted([name, "s" * 220])
    assert (d / name / ("f" * 200)).read_bytes() == b"deep"
    assert os.readlink(d / ("s" * 220)) == "t" * 3000
    assert errno_of(os.symlink, "t" * 3056, d / "toolong") == errno.ENAMETOOLONG
    os.unlink(d / name / ("f" * 200))
    os.rmdir(d / name)
    os.unlink(d / ("s" * 220))
    assert sorted(p.name for p in enc.backing.iterdir()) == [POLICY_FILE_NAME]


def test_the_mount_root_can_be_encrypted(mount: Mount) -> None:
    master = MasterKey(os.urandom(64))
    mount.add_key(master)
    os.setxattr(mount.mnt, POLICY, f"keyfence:{master.identifier}".encode())
    (mount.mnt / "top.txt").write_bytes(b"top")
    assert os.listdir(mount.mnt) == ["top.txt"]
    assert "top.txt" not in os.listdir(mount.backing)
    status = json.loads(os.getxattr(mount.mnt, STATUS))
    assert status["encrypted"] and status["state"] == "unlocked"
    assert status["mount"]["keys"][0]["key"] == f"keyfence:{master.identifier}"
    assert status["mount"]["dirty_limit"] == 64 << 20


def test_other_xattrs_pass_through(enc: Enc) -> None:
    f = enc.dir / "x"
    f.write_bytes(b"")
    os.setxattr(f, "user.color", b"blue")
    assert os.getxattr(f, "user.color") == b"blue"
    assert "user.color" in os.listxattr(f)
    os.removexattr(f, "user.color")
    assert errno_of(os.getxattr, f, "user.color") == errno.ENODATA
    assert errno_of(os.setxattr, f, STATUS, b"x") == errno.EPERM
    assert errno_of(os.removexattr, enc.dir, POLICY) == errno.EPERM


def test_a_write_still_drops_file_capabilities(enc: Enc) -> None:
    """The mount remembers that a file has no security.capability (the kernel
    asks before every write); a capability set later must still be dropped
    by the next write, as on any filesystem."""
    import struct

    f = enc.dir / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    with open(f, "r+b", buffering=0) as out:  # the kernel asked: no capability
        out.write(b"#")
    # VFS_CAP_REVISION_2 with CAP_NET_RAW permitted, effective bit set
    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    os.setxattr(f, "security.capability", cap)
    assert os.getxattr(f, "security.capability") == cap
    with open(f, "r+b", buffering=0) as out:
        out.write(b"#")
    assert errno_of(os.getxattr, f, "security.capability") == errno.ENODATA


READER = r"""
import os, sys
path = sys.argv[1]
with open(sys.argv[2], "rb") as f:
    expected = f.read()
fd = os.open(path, os.O_RDONLY)
good = short = 0
announced = False
while True:
    try:
        data = os.pread(fd, len(expected), 0)
    except OSError as err:
        outcome = str(err.errno)
        break
    if data != expected[: len(data)]:
        outcome = "garbage"
        break
    if len(data) == len(expected):
        good += 1
    else:  # a read cut short by the removal: what came is right
        short += 1
    if not announced:  # after one whole read: a slow machine still has one
        sys.stdout.write("started\n"); sys.stdout.flush()
        announced = True
if not announced:
    sys.stdout.write("started\n")
sys.stdout.write(f"{good} {short} {outcome}\n")
"""


def lock_while_reading(enc: Enc, name: str, data: bytes) -> tuple[str, str]:
    """Lock ``enc`` while another process reads ``name`` over and over
    (READER, comparing with ``data``): (whole good reads, how it ended)."""
    expected = enc.mount.tmp / "expected"
    expected.write_bytes(data)
    good, _short, outcome = lock_during(enc, READER, str(enc.dir / name), str(expected), settle=0.3)
    return good, outcome


def test_big_dirty_file_read_during_its_write_back_keeps_its_bytes(enc: Enc) -> None:
    """A file of 32 MiB (past the size whose kernel pages a removal drops
    beside the write-back, fs/ops.py ``_drop_kernel_pages_early``), all of
    it dirty in the worker and open, read over and over while the key goes:
    every read is right or ENOKEY, and the bytes are all there after."""
    data = os.urandom(32 << 20)
    writer = os.open(enc.dir / "big", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        for off in range(0, len(data), 1 << 20):
            os.pwrite(writer, view[off : off + (1 << 20)], off)
        good, outcome = lock_while_reading(enc, "big", data)
    finally:
        os.close(writer)
    assert int(good) > 0
    assert outcome == str(errno.ENOKEY)
    enc.unlock()
    assert (enc.dir / "big").read_bytes() == data


def test_removal_under_concurrent_reads_never_serves_garbage(enc: Enc) -> None:
    data = os.urandom(8 << 20)
    (enc.dir / "r").write_bytes(data)
    good, outcome = lock_while_reading(enc, "r", data)
    assert int(good) > 0
    assert outcome == str(errno.ENOKEY)
