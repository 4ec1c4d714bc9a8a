"""Real tools against a real mount: fio with verification, stress-ng.

Each test mounts a fresh backing directory (``src/keyfence/testing/mounting.py``),
sets up an encrypted directory and lets the tool loose in it, with the
worker's page cache kept small (``--dirty-limit``) so that write-back runs
all the time.  What must hold afterwards:

* the tool exits 0 (fio verifies every block it wrote; stress-ng's
  ``--verify`` checks what its stressors read back),
* the data verifies again after an unmount and remount, or after the key
  was removed and added again (fio ``--verify_only``),
* the backing directory never held a plaintext name (watched *while* the
  tools run: stress-ng removes its files at the end),
* the mount is healthy: a new file round-trips, the worker logged no error
  and no traceback, and it unmounts cleanly.

Also here: ``fallocate`` of encrypted and plain files, and what the mount
answers for operations it has no handler for (``copy_file_range``,
``SEEK_DATA``/``SEEK_HOLE``), as documented in docs/fs.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import POLICY_FILE_NAME, record_offset
from keyfence.testing.mounting import Mount, fuse_available

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

needs_fio = pytest.mark.skipif(
    shutil.which("fio") is None, reason="fio not installed (apt-get install fio)"
)
needs_stress_ng = pytest.mark.skipif(
    shutil.which("stress-ng") is None, reason="stress-ng not installed (apt-get install stress-ng)"
)

POLICY = "user.keyfence.policy"

# A backing name in an encrypted directory: base64url (an encrypted name),
# or one of the mount's own reserved names.
_ENCRYPTED_NAME = re.compile(r"[A-Za-z0-9_-]+|kf\.long\.[A-Za-z0-9_-]+(\.name)?|kf\.tmp\.[0-9a-f]+")


class Encrypted:
    """An encrypted directory ``enc`` on a mount, with its key."""

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        self.master = MasterKey(os.urandom(64))
        self.serial = mount.add_key(self.master)
        self.dir = mount.mnt / "enc"
        self.backing = mount.backing / "enc"
        self.dir.mkdir()
        os.setxattr(self.dir, POLICY, f"keyfence:{self.master.identifier}".encode())

    def lock(self) -> None:
        self.mount.unlink_key(self.serial)

    def unlock(self) -> None:
        self.serial = self.mount.add_key(self.master)


class Mounted(Mount):
    expected_errors: tuple[str, ...] = ()
    """Error lines the test provokes on purpose (any other fails it)."""


@contextlib.contextmanager
def mounted(tmp_path: Path, *args: str) -> Iterator[Mounted]:
    m = Mounted(tmp_path, "--dirty-expire", "1", *args, name="t")
    try:
        yield m
    finally:
        code = m.unmount()
        log = m.log()
        assert "Traceback" not in log, log
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert all(any(e in line for e in m.expected_errors) for line in errors), log
        assert code == 0, log


class NameWatcher:
    """Lists the backing tree over and over while a tool runs, keeping every
    name it saw: plaintext names must never appear, even briefly."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: set[str] = set()
        self.walks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NameWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for _dirpath, dirnames, filenames in os.walk(self.root):
                self.names.update(dirnames)
                self.names.update(filenames)
            self.walks += 1
            self._stop.wait(0.02)

    def check(self, plaintext_words: list[str]) -> None:
        """``plaintext_words`` of five letters or more: a random 43-letter
        base64 name holds a given 3-letter word once in ~6,000 names."""
        assert self.walks > 3, "the watcher did not run"
        assert all(len(word) >= 5 for word in plaintext_words), plaintext_words
        names = self.names - {POLICY_FILE_NAME}
        for name in names:
            assert _ENCRYPTED_NAME.fullmatch(name), f"not an encrypted name: {name!r}"
            for word in plaintext_words:
                assert word not in name, f"plaintext name in the backing dir: {name!r}"


def assert_healthy(e: Encrypted) -> None:
    """The mount still works: a new file round-trips, listing works."""
    data = os.urandom(70_000)
    probe = e.dir / "health-probe"
    probe.write_bytes(data)
    assert probe.read_bytes() == data
    assert "health-probe" in os.listdir(e.dir)
    probe.unlink()
    os.statvfs(e.dir)


def run_tool(argv: list[str], timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{argv[0]} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


FIO_COMMON = [
    "--name=kf",
    "--ioengine=psync",
    "--verify_fatal=1",
    "--verify_state_save=0",
    "--randrepeat=1",
]


def fio(directory: Path, *job: str) -> str:
    return run_tool(["fio", *FIO_COMMON, f"--directory={directory}", *job])


def assert_read_back(out: str, amount: str) -> None:
    """fio read everything back (the verify pass) and said nothing failed."""
    assert re.search(rf"READ: .*io={re.escape(amount)}", out), out
    assert "verify:" not in out and "bad" not in out.lower(), out


# ------------------------------------------------------------------- fio

RANDOM_JOB = ["--rw=randwrite", "--bs=4k", "--size=32M", "--verify=crc32c", "--fsync=256"]
SEQUENTIAL_JOB = ["--rw=write", "--bs=1M", "--size=64M", "--verify=sha256", "--end_fsync=1"]


@needs_fio
def test_fio_random_writes_verify_and_survive_a_remount(tmp_path: Path) -> None:
    """4 KiB random writes through a 1 MiB page cache (write-back under
    constant pressure), verified, then verified again by a new worker."""
    with mounted(tmp_path, "--dirty-limit", "1M") as m:
        e = Encrypted(m)
        with NameWatcher(e.backing) as watcher:
            out = fio(e.dir, *RANDOM_JOB, "--do_verify=1")
        assert_read_back(out, "32.0MiB")
        watcher.check(["kf.0.0"])
        plain = (e.dir / "kf.0.0").read_bytes()
        assert len(plain) == 32 << 20
        assert m.unmount() == 0, m.log()
        m.start()
        e.unlock()
        assert_read_back(fio(e.dir, *RANDOM_JOB, "--verify_only"), "32.0MiB")
        # the ciphertext holds none of the plaintext
        (backing,) = [p for p in e.backing.iterdir() if p.name != POLICY_FILE_NAME]
        raw = backing.read_bytes()
        for at in range(0, len(plain), 4 << 20):
            assert plain[at : at + 64] not in raw
        # and the verification can fail: one flipped ciphertext byte (block
        # 100) reads as EIO, which fio reports
        with open(backing, "r+b") as f:
            f.seek(record_offset(100) + 50)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the kernel's copy too
        r = subprocess.run(
            ["fio", *FIO_COMMON, f"--directory={e.dir}", *RANDOM_JOB, "--verify_only"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode != 0, r.stdout
        assert "Input/output error" in r.stdout + r.stderr
        # the log names the file by inode (no plaintext names in logs)
        m.expected_errors = (": Input/output error: block 100 failed authentication",)
        assert m.expected_errors[0] in m.log()
        with open(backing, "r+b") as f:  # repaired, for the health check's sake
            f.seek(record_offset(100) + 50)
            f.write(byte)
        assert_healthy(e)


@needs_fio
def test_fio_sequential_writes_verify_across_a_lock(tmp_path: Path) -> None:
    """1 MiB sequential writes (sha256 verify) with a 4 MiB dirty limit;
    the key is removed (fenced: everything written back first) and added
    again; every block verifies."""
    with mounted(tmp_path, "--dirty-limit", "4M") as m:
        e = Encrypted(m)
        assert_read_back(fio(e.dir, *SEQUENTIAL_JOB, "--do_verify=1"), "64.0MiB")
        e.lock()
        assert "kf.0.0" not in os.listdir(e.dir)  # ciphertext names only
        (listed,) = os.listdir(e.dir)
        with pytest.raises(OSError) as err:
            (e.dir / listed).read_bytes()
        assert err.value.errno == errno.ENOKEY
        e.unlock()
        assert_read_back(fio(e.dir, *SEQUENTIAL_JOB, "--verify_only"), "64.0MiB")
        assert_healthy(e)


# -------------------------------------------------------------- stress-ng


def stress_ng(temp_path: Path, *stressors: str, seconds: int = 3) -> str:
    return run_tool(
        [
            "stress-ng",
            *stressors,
            "--timeout",
            f"{seconds}s",
            "--temp-path",
            str(temp_path),
            "--verify",
            "--metrics-brief",
        ],
        timeout=120,
    )


@needs_stress_ng
def test_stress_ng_hdd_verified(tmp_path: Path) -> None:
    """stress-ng's hdd stressor (random and sequential writes and reads of
    its own files, verified) through a 1 MiB page cache."""
    with mounted(tmp_path, "--dirty-limit", "1M") as m:
        e = Encrypted(m)
        with NameWatcher(e.backing) as watcher:
            stress_ng(
                e.dir,
                "--hdd",
                "2",
                "--hdd-bytes",
                "16M",
                "--hdd-opts",
                "wr-rnd,rd-rnd",
                "--iomix",
                "1",
                "--iomix-bytes",
                "8M",
            )
        watcher.check(["stress", "iomix"])
        assert_healthy(e)


@needs_stress_ng
def test_stress_ng_metadata_stressors(tmp_path: Path) -> None:
    """rename, link, symlink, dir, chmod, dentry and fallocate stressors at
    once (fallocate's modes that punch or zero a range get EOPNOTSUPP in an
    encrypted file: docs/fs.md)."""
    with mounted(tmp_path) as m:
        e = Encrypted(m)
        with NameWatcher(e.backing) as watcher:
            out = stress_ng(
                e.dir,
                "--rename",
                "1",
                "--link",
                "1",
                "--symlink",
                "1",
                "--dir",
                "1",
                "--chmod",
                "1",
                "--dentry",
                "1",
                "--fallocate",
                "1",
                seconds=2,
            )
        assert "successful run completed" in out
        watcher.check(["stress", "rename", "symlink", "dentry", "chmod"])
        assert os.listdir(e.dir) == []  # stress-ng cleaned up after itself
        assert_healthy(e)


# ------------------------------------------- operations pyfuse3 3.5 lacks


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _fallocate(fd: int, length: int, mode: int = 0, offset: int = 0) -> int:
    """fallocate(2) itself (``os.posix_fallocate`` would fall back to
    writing zeros, hiding what the filesystem answers): 0 or the errno."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def test_fallocate_of_an_encrypted_file(tmp_path: Path) -> None:
    """Mode 0 grows the file as ftruncate would and reserves its backing
    records; KEEP_SIZE only reserves; a punched or zeroed range would not
    be zeros in plaintext: EOPNOTSUPP (docs/fs.md)."""
    with mounted(tmp_path) as m:
        e = Encrypted(m)
        data = os.urandom(3 << 20)
        path = e.dir / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR)
        try:
            assert _fallocate(fd, 8 << 20) == 0
            assert os.fstat(fd).st_size == 8 << 20
            assert _fallocate(fd, 1 << 20, FALLOC_FL_KEEP_SIZE, 16 << 20) == 0
            assert os.fstat(fd).st_size == 8 << 20
            assert _fallocate(fd, 5, 0, (8 << 20) + 3) == 0  # a partial last block
            assert os.fstat(fd).st_size == (8 << 20) + 8
            for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
                assert _fallocate(fd, 4096, mode) == errno.EOPNOTSUPP
            assert _fallocate(fd, 0) == errno.EINVAL  # the kernel's own check
            os.fsync(fd)
        finally:
            os.close(fd)
        assert path.read_bytes() == data + bytes((8 << 20) + 8 - len(data))
        (backing,) = [b for b in e.backing.iterdir() if b.stat().st_size > 1 << 20]
        # reserved: the records of 0-8 MiB and of 16-17 MiB (KEEP_SIZE)
        assert backing.stat().st_blocks * 512 >= 9 << 20
        ro = os.open(path, os.O_RDONLY)
        try:
            assert _fallocate(ro, 4096) == errno.EBADF
        finally:
            os.close(ro)
        # posix_fallocate(3) no longer falls back to writing zeros (which an
        # O_APPEND descriptor cannot: EBADF)
        fd = os.open(e.dir / "appended", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, 100_000)
            assert os.fstat(fd).st_size == 100_000
        finally:
            os.close(fd)
        assert (e.dir / "appended").read_bytes() == bytes(100_000)
        assert_healthy(e)


def test_fallocate_of_a_plain_file(tmp_path: Path) -> None:
    """Every mode the kernel lets through is the backing file's."""
    with mounted(tmp_path) as m:
        path = m.mnt / "plain"
        path.write_bytes(b"x" * 20_000)
        fd = os.open(path, os.O_RDWR)
        try:
            assert _fallocate(fd, 1 << 20) == 0
            assert os.fstat(fd).st_size == 1 << 20
            assert _fallocate(fd, 8192, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096) == 0
            assert _fallocate(fd, 10, FALLOC_FL_ZERO_RANGE, 0) == 0
            assert os.fstat(fd).st_size == 1 << 20
        finally:
            os.close(fd)
        got = path.read_bytes()
        assert got == bytes(10) + b"x" * 4086 + bytes(8192) + b"x" * 7712 + bytes(
            (1 << 20) - 20_000
        )


def test_operations_without_a_handler(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        e = Encrypted(m)
        data = os.urandom(3 << 20)
        (e.dir / "src").write_bytes(data)
        src = os.open(e.dir / "src", os.O_RDWR)
        dst = os.open(e.dir / "dst", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # no copy_file_range handler: the kernel copies through
            # read and write requests instead (the data is right)
            copied = 0
            while copied < len(data):
                n = os.copy_file_range(src, dst, len(data) - copied, copied, copied)
                assert n > 0
                copied += n
            # no lseek handler: the kernel's generic lseek, a file is all
            # data (holes are not reported)
            assert os.lseek(src, 0, os.SEEK_DATA) == 0
            assert os.lseek(src, 0, os.SEEK_HOLE) == len(data)
        finally:
            os.close(src)
            os.close(dst)
        assert (e.dir / "dst").read_bytes() == data
        assert_healthy(e)
