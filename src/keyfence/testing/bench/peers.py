"""The filesystems bench/fs_compare.py puts side by side, each set up over the same disk.

Every peer gives a directory to measure in (``work``), a way to make its
caches cold, and its way of removing the key (``lock``) and getting it back
(``unlock``).  ``teardown`` undoes everything ``setup`` did, also after a
failure half-way; it is safe to call twice.

* :class:`DiskPeer`: a plain directory; "lock" is ``syncfs``, the I/O limit.
* :class:`KeyfencePeer`: a private keyfence daemon, ``keyfence mount`` (the
  real worker the daemon spawns), an e4crypt key in the caller's session
  keyring; lock is ``kfctl clear @s``.  The peer joins a session keyring of
  its own first (as a login has), so that ``@s`` is the benchmark's.
* :class:`GocryptfsPeer`: gocryptfs in the foreground; lock is unmounting it
  plus a syncfs of the backing disk (gocryptfs writes straight through to the
  backing files without syncing them, so its unmount alone persists nothing).
  :class:`GocryptfsAllowOtherPeer` mounts it ``-allow_other``, which also
  turns on ``default_permissions``: the options every mount root makes with
  keyfence has.
* :class:`FscryptPeer`: kernel ext4 + fscrypt v2 on a loop device backed by
  an image file on the same disk; a raw 64-byte key added with
  ``FS_IOC_ADD_ENCRYPTION_KEY``, removed with ``FS_IOC_REMOVE_ENCRYPTION_KEY``
  (which syncs the filesystem and evicts the files' pages before it returns).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PASSPHRASE = "keyfence fs_compare passphrase\n"
SALT = "s:keyfence-fs-compare"
MIB = 1 << 20


class PeerError(Exception):
    """A peer could not be set up or used; reported, never fatal to the run."""


def drop_caches() -> None:
    """Write back, then drop the kernel's page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def syncfs(path: Path) -> None:
    """syncfs(2): write back the one filesystem holding ``path`` (a global
    sync would also wait for other jobs' dirty data on other filesystems)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _run(argv: list[str], *, env: dict[str, str] | None = None, stdin: str = "") -> str:
    done = subprocess.run(
        argv, input=stdin, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise PeerError(f"{' '.join(argv[:3])}: {detail[-1] if detail else done.returncode}")
    return done.stdout


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise PeerError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _lazy_unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Peer:
    name = "peer"
    encrypted = True

    def __init__(self, scratch: Path) -> None:
        self.root = scratch / self.name
        self.work = self.root / "work"

    def setup(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Put what was written through ``work`` on the disk: syncfs of the
        mount, then of the filesystem under it."""
        for path in self.sync_paths():
            syncfs(path)

    def sync_paths(self) -> list[Path]:
        return [self.work]

    def cold(self) -> None:
        """Make every cache between the reader and the disk cold."""
        drop_caches()

    def lock(self) -> dict[str, float]:
        """Remove the key (or the equivalent); seconds, as ``{"total": s, ...}``."""
        raise NotImplementedError

    def unlock(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError


class DiskPeer(Peer):
    name = "disk"
    encrypted = False

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)

    def lock(self) -> dict[str, float]:
        t = time.perf_counter()
        self.sync()
        return {"total": time.perf_counter() - t}

    def unlock(self) -> None:
        pass

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- keyfence ---------------------------------------------------------------


class KeyfencePeer(Peer):
    """The real thing: daemon, ``keyfence mount``, a key in our session."""

    name = "keyfence"

    def __init__(self, scratch: Path, options: list[str] | None = None) -> None:
        super().__init__(scratch)
        self.socket = self.root / "sock"
        self.backing = self.root / "backing"
        self.mnt = self.root / "mnt"
        self.work = self.mnt / "work"
        self.options = list(options or [])
        self.daemon: subprocess.Popen[bytes] | None = None
        self.env = dict(
            os.environ,
            KEYFENCE_SOCKET=str(self.socket),
            KEYFENCE_NO_AUTOSTART="1",
            PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        )

    def _keyfence(self, *args: str, stdin: str = "") -> str:
        return _run([str(BIN / "keyfence"), *args], env=self.env, stdin=stdin)

    def setup(self) -> None:
        if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
            raise PeerError("FUSE is not available (/dev/fuse, fusermount3)")
        self.backing.mkdir(parents=True)
        self.mnt.mkdir()
        log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 - the daemon keeps it
        with log:
            self.daemon = subprocess.Popen(
                [str(BIN / "keyfence"), "daemon", "--socket", str(self.socket)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = self.daemon
        _wait_for(
            lambda: self.socket.exists() or daemon.poll() is not None, 10, "the keyfence daemon"
        )
        if daemon.poll() is not None:
            raise PeerError(f"the keyfence daemon exited ({daemon.returncode})")
        # our own session keyring, as a login has one: our children (kfctl
        # clear @s, the writers) inherit it; the lock clears it, nobody else's
        from keyfence.client import Client

        deadline = time.monotonic() + 10
        while True:  # the socket's name exists a moment before the daemon listens
            try:
                client = Client.connect(str(self.socket), autostart=False)
                break
            except OSError as err:  # KeyfenceError, ECONNREFUSED
                if err.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with client:
            client.join_session_keyring(None)
        self.mount()
        self.work.mkdir()
        # the e4crypt way a user would do it; the key lands in our @s
        self._keyfence(
            "e4crypt", "add_key", "-S", SALT, "-k", "@s", str(self.work), stdin=PASSPHRASE
        )

    def sync_paths(self) -> list[Path]:
        return [self.mnt, self.backing]

    def mount(self, options: list[str] | None = None) -> None:
        if options is not None:
            self.options = list(options)
        opts = [f"--option={o}" for o in self.options]
        self._keyfence("mount", *opts, str(self.backing), str(self.mnt))

    def umount(self) -> None:
        self._keyfence("umount", str(self.mnt))

    def remount(self, options: list[str] | None = None) -> None:
        self.umount()
        self.mount(options)

    def cold(self) -> None:
        # the worker has a page cache of its own: a fresh worker is cold
        self.umount()
        drop_caches()
        self.mount()

    def lock(self) -> dict[str, float]:
        t = time.perf_counter()
        _run([str(BIN / "kfctl"), "clear", "@s"], env=self.env)
        return {"total": time.perf_counter() - t}

    def emergency_kfctl(self) -> float:
        t = time.perf_counter()
        _run([str(BIN / "kfctl"), "--emergency", "clear", "@s"], env=self.env)
        return time.perf_counter() - t

    def unlock(self) -> None:
        self._keyfence("unlock", "-S", SALT, str(self.work), stdin=PASSPHRASE)

    def teardown(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(PeerError, subprocess.TimeoutExpired):
                self.umount()
        _lazy_unmount(self.mnt)
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    self.daemon.wait(10)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait()
            self.daemon = None
        if not os.path.ismount(self.mnt):
            shutil.rmtree(self.root, ignore_errors=True)


class KeyfencePyfuse3Peer(KeyfencePeer):
    """keyfence served by pyfuse3's loop (``-o fuse_loop=pyfuse3``)."""

    name = "keyfence-pyfuse3"

    def __init__(self, scratch: Path, options: list[str] | None = None) -> None:
        super().__init__(scratch, ["fuse_loop=pyfuse3", *(options or [])])


class KeyfenceOwnLoopPeer(KeyfencePeer):
    """keyfence served by its own loop, src/keyfence/fs/fuse/ (``-o fuse_loop=keyfence``)."""

    name = "keyfence-ownloop"

    def __init__(self, scratch: Path, options: list[str] | None = None) -> None:
        super().__init__(scratch, ["fuse_loop=keyfence", *(options or [])])


class KeyfenceNoSpinPeer(KeyfencePeer):
    """keyfence whose loop sleeps as soon as the queue is empty (``-o spin_us=0``)."""

    name = "keyfence-nospin"

    def __init__(self, scratch: Path, options: list[str] | None = None) -> None:
        super().__init__(scratch, ["spin_us=0", *(options or [])])


class KeyfenceUringPeer(KeyfencePeer):
    """keyfence with FUSE requests through io_uring, one queue per CPU
    (fs/fuse/ring.py): the kernel's ``fuse.enable_uring`` is set while it
    mounts and its queues register, then put back."""

    name = "keyfence-uring"

    def mount(self, options: list[str] | None = None) -> None:
        from keyfence.testing.mounting import fuse_uring

        with fuse_uring(True):
            super().mount(options)
            time.sleep(0.5)  # the queues register just after INIT (checked at registration)


# -- gocryptfs --------------------------------------------------------------


class GocryptfsPeer(Peer):
    name = "gocryptfs"

    def __init__(self, scratch: Path) -> None:
        super().__init__(scratch)
        self.cipher = self.root / "cipher"
        self.mnt = self.root / "mnt"
        self.work = self.mnt / "work"
        self.process: subprocess.Popen[bytes] | None = None
        self.passfile = self.root / "pass"

    def setup(self) -> None:
        if shutil.which("gocryptfs") is None:
            raise PeerError("gocryptfs is not installed (apt install gocryptfs)")
        self.cipher.mkdir(parents=True)
        self.mnt.mkdir()
        self.passfile.write_text(PASSPHRASE)
        # a cheap scrypt only makes mounting faster; the data path is the same
        _run(
            [
                "gocryptfs", "-init", "-q", "-scryptn", "10",
                "-passfile", str(self.passfile), str(self.cipher),
            ]
        )  # fmt: skip
        self.mount()
        self.work.mkdir(exist_ok=True)

    def sync_paths(self) -> list[Path]:
        return [self.mnt, self.cipher]

    options: tuple[str, ...] = ()

    def mount(self) -> None:
        self.process = subprocess.Popen(
            [
                "gocryptfs", "-fg", "-q", "-nosyslog", *self.options,
                "-passfile", str(self.passfile), str(self.cipher), str(self.mnt),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        proc = self.process
        _wait_for(lambda: os.path.ismount(self.mnt) or proc.poll() is not None, 20, "gocryptfs")
        if proc.poll() is not None:
            raise PeerError(f"gocryptfs exited ({proc.returncode}) instead of mounting")

    def umount(self) -> float:
        """Unmount; seconds until the gocryptfs process has exited."""
        t = time.perf_counter()
        _run(["fusermount3", "-u", str(self.mnt)])
        if self.process is not None:
            self.process.wait(120)
            self.process = None
        return time.perf_counter() - t

    def cold(self) -> None:
        self.umount()
        drop_caches()
        self.mount()

    def lock(self) -> dict[str, float]:
        t = time.perf_counter()
        unmounted = self.umount()
        syncfs(self.cipher)  # what the others guarantee: the ciphertext is on disk
        return {"total": time.perf_counter() - t, "unmount": unmounted}

    def unlock(self) -> None:
        self.mount()

    def teardown(self) -> None:
        _lazy_unmount(self.mnt)
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if not os.path.ismount(self.mnt):
            shutil.rmtree(self.root, ignore_errors=True)


class GocryptfsAllowOtherPeer(GocryptfsPeer):
    """gocryptfs as a mount shared with other users: ``-allow_other``, which
    gocryptfs pairs with ``default_permissions`` (the kernel checks modes,
    asking for a directory's attributes again after each change in it), as
    every keyfence mount made by root is."""

    name = "gocryptfs-allow-other"
    options = ("-allow_other",)


# -- kernel ext4 + fscrypt v2 ------------------------------------------------

# include/uapi/linux/fscrypt.h (facts, written out here): ioctl numbers are
# _IOR/_IOWR('f', nr, size) = dir << 30 | size << 16 | ord('f') << 8 | nr
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("f") << 8 | nr


# SET_ENCRYPTION_POLICY is declared with the v1 struct's size (12) but reads the version byte
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_IOC_READ, 19, 12)
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 23, 80)
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 24, 64)
KEY_SPEC_TYPE_IDENTIFIER = 2
POLICY_V2 = 2
MODE_AES_256_XTS, MODE_AES_256_CTS = 1, 4
POLICY_FLAGS_PAD_32 = 0x03
REMOVAL_FILES_BUSY = 0x1
LOOP_DIRECT_IO = os.environ.get("FS_COMPARE_LOOP_DIRECT_IO", "on")


def _key_spec(identifier: bytes = b"") -> bytes:
    """struct fscrypt_key_specifier: u32 type, u32 reserved, u8 u[32]."""
    return struct.pack("=II32s", KEY_SPEC_TYPE_IDENTIFIER, 0, identifier)


def fscrypt_add_key(mountpoint: Path, raw: bytes) -> bytes:
    """Add a v2 master key to the filesystem; its 16-byte identifier."""
    # struct fscrypt_add_key_arg: key_spec, u32 raw_size, u32 key_id, u32 reserved[8], raw[]
    arg = bytearray(_key_spec() + struct.pack("=II32x", len(raw), 0) + raw)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
    finally:
        os.close(fd)
    return bytes(arg[8:24])


def fscrypt_remove_key(mountpoint: Path, identifier: bytes) -> int:
    """Remove the key (the kernel syncs and evicts first); its status flags."""
    # struct fscrypt_remove_key_arg: key_spec, u32 removal_status_flags, u32 reserved[5]
    arg = bytearray(_key_spec(identifier) + bytes(24))
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY, arg)
    finally:
        os.close(fd)
    (flags,) = struct.unpack_from("=I", arg, 40)
    return int(flags)


def fscrypt_set_policy(directory: Path, identifier: bytes) -> None:
    # struct fscrypt_policy_v2: version, contents mode, names mode, flags,
    # log2_data_unit_size, reserved[3], master_key_identifier[16]
    policy = struct.pack(
        "=BBBBB3x16s", POLICY_V2, MODE_AES_256_XTS, MODE_AES_256_CTS, POLICY_FLAGS_PAD_32, 0,
        identifier,
    )  # fmt: skip
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
    finally:
        os.close(fd)


def kernel_cipher_driver(name: str) -> str | None:
    """The driver the kernel picks for cipher ``name`` (highest priority in
    /proc/crypto); fscrypt's speed depends on it (aesni or a generic C AES).
    Only what is registered now: fscrypt instantiates xts(aes) on first use."""
    best: tuple[int, str] | None = None
    with contextlib.suppress(OSError), open("/proc/crypto") as f:
        entry: dict[str, str] = {}
        for line in [*f, ""]:
            if not line.strip():
                if entry.get("name") == name and "driver" in entry:
                    prio = int(entry.get("priority", "0"))
                    if best is None or prio > best[0]:
                        best = (prio, entry["driver"])
                entry = {}
                continue
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
    return best[1] if best else None


class FscryptPeer(Peer):
    name = "fscrypt"

    def __init__(self, scratch: Path, image_bytes: int) -> None:
        super().__init__(scratch)
        self.image = self.root / "ext4.img"
        self.mnt = self.root / "mnt"
        self.work = self.mnt / "work"
        self.image_bytes = image_bytes
        self.loop: str | None = None
        self.raw_key = os.urandom(64)
        self.identifier: bytes | None = None
        self.key_added = False

    def setup(self) -> None:
        if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
            raise PeerError("mkfs.ext4 or losetup missing (e2fsprogs, util-linux)")
        self.mnt.mkdir(parents=True)
        with open(self.image, "wb") as f:
            f.truncate(self.image_bytes)
        _run(["mkfs.ext4", "-q", "-F", "-O", "encrypt", str(self.image)])
        # direct I/O: the loop device then behaves like a partition of the disk,
        # without a second page cache for the image file
        try:
            self.loop = _run(
                ["losetup", "--find", "--show", f"--direct-io={LOOP_DIRECT_IO}", str(self.image)]
            ).strip()
        except PeerError:
            self.loop = _run(["losetup", "--find", "--show", str(self.image)]).strip()
        _run(["mount", "-t", "ext4", self.loop, str(self.mnt)])
        self.unlock()
        self.work.mkdir()
        assert self.identifier is not None
        fscrypt_set_policy(self.work, self.identifier)

    def lock(self) -> dict[str, float]:
        assert self.identifier is not None
        t = time.perf_counter()
        flags = fscrypt_remove_key(self.mnt, self.identifier)
        took = time.perf_counter() - t
        self.key_added = False
        return {"total": took, "files_busy": float(flags & REMOVAL_FILES_BUSY)}

    def unlock(self) -> None:
        self.identifier = fscrypt_add_key(self.mnt, self.raw_key)
        self.key_added = True

    def teardown(self) -> None:
        if self.key_added and self.identifier is not None:
            with contextlib.suppress(OSError):
                fscrypt_remove_key(self.mnt, self.identifier)
            self.key_added = False
        if os.path.ismount(self.mnt):
            done = subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
        if self.loop is not None:
            for _ in range(50):  # a lazily unmounted filesystem may hold it a moment
                done = subprocess.run(["losetup", "-d", self.loop], capture_output=True)
                if done.returncode == 0:
                    break
                time.sleep(0.1)
            self.loop = None
        if not os.path.ismount(self.mnt):
            shutil.rmtree(self.root, ignore_errors=True)
