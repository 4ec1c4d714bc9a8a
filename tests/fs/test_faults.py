"""Faults, on real processes: the daemon, the mount workers it spawns, login
sessions as shells, a real kernel (issue #6, "Faults"; docs/fs.md "Faults").

* a mount worker SIGKILLed in the middle of a removal's write-back;
* the daemon SIGKILLed with dirty data in two mounts;
* the backing filesystem filling up during a removal's write-back (ENOSPC);
* a slow backing store (the block layer throttled): progress, --timeout.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.syscalls import syncfs_path
from keyfence.testing.mounting import Mount

BIN = Path(sys.executable).parent
PASSPHRASE = "correct horse battery staple"
SALT = "s:keyfence-faults-salt"
BLOCK = 4096
DAEMON = [sys.executable, "-m", "keyfence.cli.main", "daemon"]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE is not available here (/dev/fuse, fusermount3)",
)


# ------------------------------------------------------------------ processes


class Daemon:
    """``keyfence daemon --system --socket S`` as a process (restartable)."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.log = sock + ".log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            KEYFENCE_SOCKET=self.sock,
            KEYFENCE_NO_AUTOSTART="1",
            PATH=f"{BIN}:{os.environ['PATH']}",
        )

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*DAEMON, "--socket", self.sock, "--system"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60  # a poll: a busy machine starts slowly
        while run(self, "kfctl show @u >/dev/null 2>&1", check=False).returncode != 0:
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def run(
    daemon: Daemon, script: str, stdin: str = "", check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh POSIX session (its own @s)."""
    done = subprocess.run(
        ["sh", "-ec", script],
        input=stdin,
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
    return done


class Session:
    """A login session: one long-lived shell in a new POSIX session, so
    that commands sent one by one share its @s (and its background jobs)."""

    def __init__(self, daemon: Daemon) -> None:
        self.shell = subprocess.Popen(
            ["sh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=daemon.env,
            bufsize=0,
            start_new_session=True,
        )
        self.count = 0
        self.pending = b""
        self.ok("kfctl new_session >/dev/null")  # the login's @s, as pam_keyinit makes it

    def do(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run ``command``; (exit status, output with stderr)."""
        assert self.shell.stdin is not None and self.shell.stdout is not None
        self.count += 1
        marker = f"__done_{self.count}__ ".encode()
        self.shell.stdin.write(f"{{ {command}\n}} 2>&1; echo {marker.decode()}$?\n".encode())
        deadline = time.monotonic() + timeout
        fd = self.shell.stdout.fileno()
        while marker not in self.pending or not self.pending.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"{command}: no answer\n{self.pending.decode(errors='replace')}"
            if select.select([fd], [], [], min(left, 1))[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"{command}: the shell ended\n{self.pending!r}"
                self.pending += chunk
        out, _, rest = self.pending.partition(marker)
        status, _, self.pending = rest.partition(b"\n")
        return int(status), out.decode(errors="replace")

    def ok(self, command: str, timeout: float = 120) -> str:
        code, out = self.do(command, timeout)
        assert code == 0, f"{command}: status {code}\n{out}"
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.shell.pid, signal.SIGKILL)
        self.shell.wait()
        for stream in (self.shell.stdin, self.shell.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def session(daemon: Daemon) -> Iterator[Session]:
    s = Session(daemon)
    try:
        yield s
    finally:
        s.close()


def mount(daemon: Daemon, backing: Path, mnt: Path, *options: str) -> int:
    """``keyfence mount``; the worker's pid."""
    opts = " ".join(f"--option={o}" for o in options)
    run(daemon, f"keyfence mount {opts} {backing} {mnt}")
    return worker_pid(daemon, mnt)


def mounts(daemon: Daemon) -> str:
    return run(daemon, "keyfence status").stdout


def worker_pid(daemon: Daemon, mnt: Path) -> int:
    listing = json.loads(run(daemon, "keyfence status --json").stdout)
    for mount in listing["mounts"]:
        if mount["mountpoint"] == os.path.realpath(mnt) and mount["state"] == "mounted":
            return int(mount["pid"])
    raise AssertionError(f"{mnt} is not mounted: {listing}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def exited(pid: int) -> bool:
    return not alive(pid)


def unmount_quietly(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


# The writer a session runs in the background: writes files under DIR,
# fsyncs the ones named "synced*", keeps every file open (so nothing but a
# removal or the flusher writes back the others), then says "written".
WRITER = textwrap.dedent(
    """
    import os, sys, time
    directory, seed = sys.argv[1], sys.argv[2]
    fds = []
    for spec in sys.argv[3:]:
        name, size = spec.split("=")
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fds.append(fd)
        data = payload(seed + name, int(size))
        for off in range(0, len(data), 1 << 20):
            os.write(fd, data[off:off + (1 << 20)])
        if name.startswith("synced"):
            os.fsync(fd)
    print("written", flush=True)
    time.sleep(3600)
    """
)


def payload(tag: str, size: int) -> bytes:
    """Deterministic, incompressible, and different in every 4 KiB block."""
    out = bytearray()
    seed = hashlib.sha256(tag.encode()).digest()
    counter = 0
    while len(out) < size:
        out += hashlib.shake_256(seed + counter.to_bytes(8, "little")).digest(1 << 16)
        counter += 1
    return bytes(out[:size])


PAYLOAD_SRC = (
    "import hashlib\n"
    "def payload(tag, size):\n"
    "    out = bytearray(); seed = hashlib.sha256(tag.encode()).digest(); counter = 0\n"
    "    while len(out) < size:\n"
    "        out += hashlib.shake_256(seed + counter.to_bytes(8, 'little')).digest(1 << 16)\n"
    "        counter += 1\n"
    "    return bytes(out[:size])\n"
)


def start_writer(s: Session, directory: Path, tmp: Path, seed: str, files: dict[str, int]) -> None:
    """The writer as a background job of the session; returns once written."""
    script = tmp / "writer.py"
    script.write_text(PAYLOAD_SRC + WRITER)
    specs = " ".join(f"{n}={size}" for n, size in files.items())
    out = tmp / f"writer-{seed}.out"
    out.write_text("")
    s.ok(f"{sys.executable} {script} {directory} {seed} {specs} > {out} 2>&1 &")
    deadline = time.monotonic() + 120
    while "written" not in out.read_text():
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)


def add_key(s: Session, directory: Path) -> None:
    s.ok(f"echo '{PASSPHRASE}' | keyfence e4crypt add_key -S {SALT} {directory}")


def unlock(s: Session, directory: Path) -> None:
    """Add the key to the session's @s and use it once: the mount binds it
    and the directory is open (to us too) until the key goes."""
    s.ok(f"echo '{PASSPHRASE}' | keyfence unlock -S {SALT} {directory}; ls {directory} >/dev/null")


def check_file(path: Path, seed: str, size: int) -> None:
    """Every byte as written."""
    with open(path, "rb") as f:
        got = f.read()
    assert len(got) == size, (path, len(got), size)
    assert got == payload(seed + path.name, size), f"{path}: contents differ"


def read_blocks(path: Path, expected: bytes) -> tuple[int, int]:
    """Each 4 KiB block is what was written or EIO (never other bytes);
    (blocks read back intact, blocks EIO).  A file cut short is fine."""
    good = bad = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert size <= len(expected), (path, size, len(expected))
        for off in range(0, size, BLOCK):
            try:
                block = os.pread(fd, BLOCK, off)
            except OSError as err:
                assert err.errno == errno.EIO, err
                bad += 1
                continue
            assert block == expected[off : off + len(block)], f"{path}: garbage at {off}"
            good += 1
    finally:
        os.close(fd)
    return good, bad


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="keyfence-faults-") as tmp:
        os.chmod(tmp, 0o755)
        d = Daemon(os.path.join(tmp, "sock"))
        d.start()
        try:
            yield d
        finally:
            d.stop()


# ------------------------------------------------------------------- worker


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60) -> float:
    """Poll until ``predicate()``; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.005)
    return time.monotonic() - start


def backing_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}


def test_worker_killed_mid_flush(daemon: Daemon, tmp_path: Path) -> None:
    """SIGKILL of the worker while `kfctl clear @s` writes back 160 MiB:
    the clear returns (a dead watcher counts as done), the daemon reports
    the dead worker and cleans the mount point up, a new mount of the
    backing reads the fsync'd file back and every block of the interrupted
    one is intact or EIO, never other bytes."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    pid = mount(daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
    home = mnt / "home"
    home.mkdir()
    big = 160 << 20
    try:
        with session(daemon) as s:
            add_key(s, home)
            start_writer(s, home, tmp_path, "w", {"synced": 4 << 20, "dirty": big})
            sizes = backing_files(backing / "home")
            dirty = [
                n for n, size in sizes.items() if size < 1 << 20 and not n.startswith(".keyfence-")
            ]
            assert len(dirty) == 1, sizes
            target = backing / "home" / dirty[0]
            out = tmp_path / "clear.out"
            out.write_text("")
            s.ok(f"(kfctl clear @s; echo status $?) > {out} 2>&1 &")
            wait_for("the write-back to start", lambda: target.stat().st_size > 8 << 20)
            os.kill(pid, signal.SIGKILL)
            flushed = target.stat().st_size
            wait_for("the clear to return", lambda: "status" in out.read_text())
            assert out.read_text().strip().endswith("status 0"), out.read_text()
            assert flushed < big, "the write-back ended before the kill: nothing was tested"
            seen: list[str] = []  # a dead mount is listed once: keep the listing

            def dead() -> bool:
                seen.append(mounts(daemon))
                return ": dead" in seen[-1]

            wait_for("the dead worker", dead, 10)
            assert f"worker exited with status {-signal.SIGKILL}" in seen[-1], seen[-1]
            wait_for("the mount point", lambda: not os.path.ismount(mnt), 10)
        # a torn record (a power cut, or a kill stopping a pwrite between
        # pages: docs/fs.md "Faults"): cut the last record in the middle
        os.truncate(target, target.stat().st_size - 1000)
        # a new mount of the same backing works and reads back what was fsync'd
        mount(daemon, backing, mnt)
        with session(daemon) as s:
            unlock(s, home)
            check_file(home / "synced", "w", 4 << 20)
            good, bad = read_blocks(home / "dirty", payload("wdirty", big))
            assert good > 0 and bad <= 1, (good, bad)
            print(f"killed with {flushed} bytes of ciphertext: {good} blocks intact, {bad} EIO")
    finally:
        unmount_quietly(mnt)


@pytest.mark.parametrize("last", ["synced", "dirty"])
def test_worker_killed_after_a_truncate_into_a_block(tmp_path: Path, last: str) -> None:
    """ftruncate down into the middle of a block cut that block's record in
    the backing file at once and wrote the shorter record only at the next
    write-back: a worker SIGKILLed in between left fsynced bytes below the
    new size reading EIO.  Now the truncate writes the new record itself,
    right after the cut.  ``dirty``: the cut block was written again after
    the fsync (its new bytes go out with the truncate).  Checked failing
    before: bytes 49152..49999 read EIO after the kill."""
    mount = Mount(tmp_path, "--dirty-expire", "600")
    try:
        enc, master = mount.encrypted_dir()
        data = bytearray(payload("cut", 100_000))
        path = enc / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            if last == "dirty":
                data[49_200:49_300] = b"z" * 100
                os.pwrite(fd, data[49_200:49_300], 49_200)
            os.ftruncate(fd, 50_000)
            assert mount.proc is not None
            mount.proc.kill()  # before any close: a close would write it back
            mount.proc.wait()
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        unmount_quietly(mount.mnt)
        mount.proc = None
        mount.start()
        mount.add_key(master)
        assert path.read_bytes() == data[:50_000]
    finally:
        mount.unmount()


# ------------------------------------------------------------------- daemon


def test_daemon_killed_workers_flush_lock_and_unmount(daemon: Daemon, tmp_path: Path) -> None:
    """SIGKILL of the daemon with unsynced writes in two mounts: each worker
    sees its channel close, writes back and fsyncs with the key it holds,
    drops the key and unmounts; a new daemon starts on the same socket
    (stale socket and lock file) and every byte reads back."""
    files = {"a": 24 << 20, "b": 1000, "c": 3 * BLOCK + 17}
    places = []
    for name in ("one", "two"):
        backing, mnt = tmp_path / f"backing-{name}", tmp_path / f"mnt-{name}"
        backing.mkdir()
        mnt.mkdir()
        pid = mount(daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
        places.append((backing, mnt, pid))
    try:
        with session(daemon) as s:
            for _backing, mnt, _pid in places:
                (mnt / "home").mkdir()
                add_key(s, mnt / "home")
                start_writer(s, mnt / "home", tmp_path, mnt.name, files)
            for backing, _mnt, _pid in places:  # the writes are still dirty
                assert sum(backing_files(backing / "home").values()) < 1 << 20
            daemon.kill()
            killed = time.monotonic()
            for _backing, mnt, pid in places:
                wait_for("the worker to exit", functools.partial(exited, pid), 60)
                gone = time.monotonic() - killed
                assert not os.path.ismount(mnt)
                print(f"{mnt.name}: worker flushed, locked and exited {gone:.3f} s after the kill")
                assert gone < 60  # a hang guard: the data check below is the test
        # nothing under the mount point, no plaintext in the backing store
        for backing, mnt, _pid in places:
            assert list(mnt.iterdir()) == []
            for path in backing.rglob("*"):
                assert path.name not in files
        daemon.start()  # the same socket path: stale socket and lock file
        for backing, mnt, _pid in places:
            mount(daemon, backing, mnt)
        with session(daemon) as s:
            for _backing, mnt, _pid in places:
                unlock(s, mnt / "home")
                for name, size in files.items():
                    check_file(mnt / "home" / name, mnt.name, size)
    finally:
        for _backing, mnt, _pid in places:
            unmount_quietly(mnt)


# ------------------------------------------------------- a full backing store


@contextlib.contextmanager
def loop_ext4(
    image: Path,
    size: int,
    at: Path,
    mkfs_options: Sequence[str] = (),
    *,
    mount_options: str = "defaults",
) -> Iterator[str]:
    """A fresh ext4 of ``size`` bytes on a loop device, mounted at ``at``;
    yields the device's ``major:minor``."""
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("losetup or mkfs.ext4 is not installed")
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", *mkfs_options, str(image)], check=True, capture_output=True
    )
    made = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        at.mkdir()
        subprocess.run(
            ["mount", "-o", mount_options, device, str(at)], check=True, capture_output=True
        )
        try:
            st = os.stat(device)
            yield f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        finally:
            subprocess.run(["umount", "-l", str(at)], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink()


def test_backing_store_full_during_removal(daemon: Daemon, tmp_path: Path) -> None:
    """The backing filesystem (64 MiB ext4 on a loop device) fills up while
    `kfctl clear @s` writes back 48 MiB: the clear fails with ENOSPC from
    the mount, the key stays, what was fsync'd before is intact; once space
    is freed the same clear succeeds and every byte reads back."""
    fs = tmp_path / "fs"
    with loop_ext4(tmp_path / "fs.img", 64 << 20, fs):
        backing, mnt = fs / "backing", tmp_path / "mnt"
        backing.mkdir()
        mnt.mkdir()
        ballast = fs / "ballast"
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        ballast.write_bytes(b"\xa5" * (free - (36 << 20)))
        os.sync()
        mount(daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
        files = {"synced": 4 << 20, "dirty": 48 << 20}
        try:
            with session(daemon) as s:
                (mnt / "home").mkdir()
                add_key(s, mnt / "home")
                start_writer(s, mnt / "home", tmp_path, "full", files)
                code, out = s.do("kfctl clear @s")
                assert code != 0, out
                assert "No space left on device" in out, out
                assert "could not write back" in out, out
                # the key stays, the mount still has it, the fsync'd file is intact
                assert "ext4:" in s.ok("kfctl show @s")
                check_file(mnt / "home" / "synced", "full", files["synced"])
                ballast.unlink()  # free space, then the same removal
                s.ok("kfctl clear @s")
                assert "ext4:" not in s.ok("kfctl show @s")
                assert sorted(os.listdir(mnt / "home")) != sorted(files)
            with session(daemon) as s:
                unlock(s, mnt / "home")
                for name, size in files.items():
                    check_file(mnt / "home" / name, "full", size)
        finally:
            unmount_quietly(mnt)


def fill_up(fs: Path) -> list[Path]:
    """Take every free block of ``fs`` (made with ``-m 0``): a big file,
    then small ones until one finds no block left."""
    made = [fs / "ballast"]
    fd = os.open(made[0], os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xa5" * (1 << 16))
    finally:
        os.close(fd)
    for i in range(100_000):
        made.append(fs / f"ballast{i}")
        try:
            made[-1].write_bytes(b"x")
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
            break
    return made


def test_a_policy_the_full_backing_store_refused_leaves_no_record(tmp_path: Path) -> None:
    """Setting a directory's policy while the backing filesystem is full
    fails with ENOSPC and leaves nothing behind: once space is freed, the
    same setxattr encrypts the directory.  Before, an empty .keyfence-policy
    stayed in the backing directory: the directory was plaintext to the
    mount but not empty, the retry failed with ENOTEMPTY, and a new mount
    read it as a bad policy (the same with EIO from fdatasync)."""
    fs = tmp_path / "fs"
    with loop_ext4(tmp_path / "fs.img", 16 << 20, fs, ["-m", "0"]):
        m = Mount(fs)
        try:
            master = MasterKey(os.urandom(64))
            m.add_key(master)
            ref = f"keyfence:{master.identifier}".encode()
            d = m.mnt / "d"
            d.mkdir()
            ballast = fill_up(fs)
            with pytest.raises(OSError) as failed:
                os.setxattr(d, "user.keyfence.policy", ref)
            assert failed.value.errno == errno.ENOSPC
            assert os.listdir(m.backing / "d") == []
            assert os.listdir(d) == []
            for path in ballast:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            os.setxattr(d, "user.keyfence.policy", ref)
            (d / "f").write_bytes(b"secret")
            assert (d / "f").read_bytes() == b"secret"
            assert b"secret" not in b"".join(
                p.read_bytes() for p in (m.backing / "d").iterdir() if p.is_file()
            )
        finally:
            m.unmount_checked()


@contextlib.contextmanager
def tmpfs(at: Path, size: int) -> Iterator[None]:
    at.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False, capture_output=True)


def test_every_open_of_a_file_is_told_of_a_failed_write_back(tmp_path: Path) -> None:
    """Two processes have a file open (one description each, as ext4
    reports errors); the backing store fails the write-back of what one
    wrote (a loop device whose image is on a tmpfs that has run out: a thin
    pool out of space), and the other's fsync gets the error (ENOSPC from
    the loop device; EIO from a failing disk); once the store works again,
    the writer's fsync gets it too, then 0, as on ext4.
    Before: the mount's one backing descriptor had been told, so the
    writer's fsync returned 0, its data not on disk (the file read back as
    zeros)."""
    thin = tmp_path / "thin"
    with tmpfs(thin, 48 << 20):
        fs = tmp_path / "fs"
        with loop_ext4(thin / "fs.img", 40 << 20, fs, ["-O", "^has_journal"]):
            m = Mount(fs)
            try:
                enc, _master = m.encrypted_dir()
                writer = os.open(enc / "f", os.O_WRONLY | os.O_CREAT, 0o600)
                other = os.open(enc / "f", os.O_WRONLY)
                try:
                    os.write(writer, os.urandom(4 << 20))
                    ballast = thin / "ballast"
                    with contextlib.suppress(OSError), open(ballast, "wb") as out:
                        while True:
                            out.write(b"\xa5" * (1 << 20))
                            out.flush()
                    with pytest.raises(OSError) as failed:
                        os.fsync(other)
                    # the loop device's error: ENOSPC (BLK_STS_NOSPC)
                    told = failed.value.errno
                    assert told in (errno.EIO, errno.ENOSPC), failed.value
                    ballast.unlink()
                    with pytest.raises(OSError) as failed:
                        os.fsync(writer)
                    assert failed.value.errno == told
                    os.fsync(writer)  # told once
                    os.fsync(other)
                finally:
                    os.close(writer)
                    os.close(other)
            finally:
                m.unmount_checked()


def forget_cached(directory: Path) -> None:
    """Drop the clean cached pages of every file under ``directory``:
    reads then come from the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextlib.contextmanager
def failing_store(tmp_path: Path) -> Iterator[tuple[Mount, Callable[[], None], Callable[[], None]]]:
    """A mount over an ext4 on a loop device whose image is on a small
    tmpfs (a thin pool): after ``fail()`` fills the tmpfs, the loop device
    fails every write that needs a new block of the image (ENOSPC; EIO
    from a failing disk); ``heal()`` frees it again.

    ext4 is mounted ``dioread_lock``: with the default ``dioread_nolock``
    it allocates blocks as unwritten extents and converts them once their
    write succeeds, and after a failed write it never converts them, so
    it reads zeros there whatever is written again (the kernel logs
    "failed to convert unwritten extents ... potential data loss")."""
    thin = tmp_path / "thin"
    with tmpfs(thin, 48 << 20):
        fs = tmp_path / "fs"
        with loop_ext4(
            thin / "fs.img", 40 << 20, fs, ["-O", "^has_journal"], mount_options="dioread_lock"
        ):
            m = Mount(fs, "--dirty-expire=1")
            ballast = thin / "ballast"

            def fail() -> None:
                with contextlib.suppress(OSError), open(ballast, "wb") as out:
                    while True:
                        out.write(b"\xa5" * (1 << 20))
                        out.flush()

            def heal() -> None:
                ballast.unlink()

            try:
                yield m, fail, heal
            finally:
                m.unmount_checked()


def test_a_removal_retried_after_the_backing_store_failed_loses_nothing(tmp_path: Path) -> None:
    """Files written and closed (their records stored in the backing
    files, not yet on disk); the backing store fails to write them: the key
    removal fails with its errno and the key stays.  Once the store works
    again, the same removal succeeds, and after an unlock every byte reads
    back from the disk.  Before: the retried removal found nothing to
    write, its fsync returned 0 (the error had been reported once), the key
    went, and the files read back as the disk had them (EIO)."""
    with failing_store(tmp_path) as (m, fail, heal):
        enc, master = m.encrypted_dir()
        data = {"big": os.urandom(4 << 20), "small": os.urandom(5000)}
        for name, content in data.items():
            (enc / name).write_bytes(content)
        fail()
        with pytest.raises(OSError) as failed:
            m.clear()
        assert failed.value.errno in (errno.EIO, errno.ENOSPC), failed.value
        heal()
        m.clear()
        forget_cached(m.backing)
        m.add_key(master)
        for name, content in data.items():
            assert (enc / name).read_bytes() == content, name


def test_a_write_the_backing_store_failed_is_written_again(tmp_path: Path) -> None:
    """No removal: the backing store fails to write a closed file's
    records (the kernel's own write-back of the backing file, here a
    syncfs); the mount keeps the pages (its flusher's wait for the backing
    store, or the next fsync, sees the failure) and writes them again
    once the store works.  The writer's next fsync is told of the error
    once, as on ext4, and then every byte is on disk.  Before (and on
    ext4) the error was told and the bytes were lost (EIO)."""
    with failing_store(tmp_path) as (m, fail, heal):
        enc, _master = m.encrypted_dir()
        data = os.urandom(1 << 20)
        fd = os.open(enc / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.close(os.open(enc / "f", os.O_WRONLY))  # a close: stored in the backing file
            fail()
            with contextlib.suppress(OSError):
                syncfs_path(str(m.backing))  # its write fails
            heal()
            with pytest.raises(OSError) as failed:
                os.fsync(fd)
            assert failed.value.errno in (errno.EIO, errno.ENOSPC), failed.value
            os.fsync(fd)  # told once
        finally:
            os.close(fd)
        forget_cached(m.backing)
        forget_cached(enc)
        assert (enc / "f").read_bytes() == data
        m.clear()


# ------------------------------------------------------- a slow backing store

THROTTLE = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device"


@contextlib.contextmanager
def throttled(device: str, bytes_per_second: int) -> Iterator[None]:
    """Writes to ``device`` at most this fast: a cgroup (v1 blkio) limit on
    the root group, which holds the worker and the kernel's flushers."""
    if not os.access(THROTTLE, os.W_OK):
        pytest.skip(f"no block I/O throttling here ({THROTTLE})")
    with open(THROTTLE, "w") as f:
        f.write(f"{device} {bytes_per_second}")
    try:
        yield
    finally:
        with open(THROTTLE, "w") as f:
            f.write(f"{device} 0")


class Terminal:
    """A pty for kfctl's stderr: it draws progress only on a terminal."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.name = os.ttyname(self.slave)
        self.seen = ""

    def drain(self) -> str:
        while select.select([self.master], [], [], 0.05)[0]:
            self.seen += os.read(self.master, 65536).decode(errors="replace")
        return self.seen

    def lines(self) -> list[str]:
        """The progress lines drawn (each redraw starts with CR, erase line)."""
        return [t for t in self.drain().replace("\x1b[K", "").split("\r") if "waiting" in t]

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def test_slow_backing_store_progress_and_timeout(daemon: Daemon, tmp_path: Path) -> None:
    """Writes to the backing device throttled to 2 MiB/s: `kfctl --timeout
    1 clear @s` draws progress, then fails with ETIMEDOUT naming the
    mount worker, keys and data intact; a clear without timeout then waits
    for the write-back (progress lines counting down) and succeeds."""
    fs = tmp_path / "fs"
    with loop_ext4(tmp_path / "fs.img", 256 << 20, fs) as device:
        backing, mnt = fs / "backing", tmp_path / "mnt"
        backing.mkdir()
        mnt.mkdir()
        mount(daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
        files = {"dirty": 16 << 20}
        tty = Terminal()
        try:
            # 16 MiB at 2 MiB/s: the write-back takes 8 s, well past the
            # bound below even on a busy machine
            with session(daemon) as s, throttled(device, 2 << 20):
                (mnt / "home").mkdir()
                add_key(s, mnt / "home")
                start_writer(s, mnt / "home", tmp_path, "slow", files)
                started = time.monotonic()
                code, out = s.do(f"kfctl --timeout 1 clear @s 2>{tty.name}")
                took = time.monotonic() - started
                shown = tty.drain()
                assert code != 0, out
                assert "Connection timed out" in shown, shown
                assert "mount worker" in shown, shown
                assert took < 6, took  # the timeout, not the write-back
                assert tty.lines(), shown
                assert "ext4:" in s.ok("kfctl show @s")  # the key stays
                tty.seen = ""
                started = time.monotonic()
                s.ok(f"kfctl clear @s 2>{tty.name}")
                waited = time.monotonic() - started
                lines = tty.lines()
                print(f"timeout after {took:.2f} s; the clear then waited {waited:.2f} s;")
                print("\n".join(lines))
                assert "ext4:" not in s.ok("kfctl show @s")
                assert len(lines) >= 2, lines
            with session(daemon) as s:
                unlock(s, mnt / "home")
                for name, size in files.items():
                    check_file(mnt / "home" / name, "slow", size)
        finally:
            unmount_quietly(mnt)
            tty.close()
