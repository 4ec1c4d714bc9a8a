"""A user who can write inside the backing tree cannot turn the root worker
against files outside it (issue 11, finding 1; docs/security.md).

The attacker is a real unprivileged uid (setpriv) owning ``att/`` in the
backing directory of a root mount worker.  It swaps a backing entry the
kernel already knows for a symlink to a root-owned file or directory
outside the backing tree, once (then the request follows) and in a loop
racing the requests.  Two places for the symlink:

* ``final``: ``att/sub/f`` itself becomes a symlink to the root file;
* ``parent``: ``att/sub`` becomes a symlink to the root directory (an
  ``O_NOFOLLOW`` on the last component does not help there).

Every operation that touches the backing store is made through the mount
on the swapped entry; afterwards the root directory must be exactly as it
was (contents, mode, owner, size, links, mtime, xattrs) and nothing read
through the mount may carry its data or names.  On the worker before
``fs/syscalls.py`` every ``parent`` case and the ``final`` cases of open,
chmod and truncate changed or read the root files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount, fuse_available
from keyfence.testing.users import (
    as_uid,
    environment,
    python_argv,
    reachable_directory,
    why_no_other_uids,
)

ATTACKER = 4610
SECRET = b"root-only secret contents\n"
SECRET_XATTR = b"secret-xattr-value"
POLICY = "user.keyfence.policy"

_why = fuse_available() or why_no_other_uids()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

# Run by the attacker uid: swap ``name`` in ``directory`` for a symlink to
# ``target`` once ("swap"), back ("restore"), or back and forth ("race").
_SWAPPER = r"""
import os, sys, time
directory, name, target, mode, seconds = sys.argv[1:6]
os.chdir(directory)
if mode == "swap":
    os.rename(name, ".kf-saved")
    os.symlink(target, name)
elif mode == "restore":
    os.unlink(name)
    os.rename(".kf-saved", name)
else:
    end = time.monotonic() + float(seconds)
    if not os.path.lexists(".kf-link"):
        os.symlink(target, ".kf-link")
    steps = ((name, ".kf-saved"), (".kf-link", name), (name, ".kf-link"), (".kf-saved", name))
    while time.monotonic() < end:
        for a, b in steps:
            try:
                os.rename(a, b)
            except OSError:
                pass
    if not os.path.lexists(name) and os.path.lexists(".kf-saved"):
        os.rename(".kf-saved", name)
"""


def attacker(directory: Path, name: str, target: Path, mode: str, seconds: float = 0) -> Any:
    argv = as_uid(
        ATTACKER,
        python_argv("-c", _SWAPPER, str(directory), name, str(target), mode, str(seconds)),
    )
    if mode == "race":
        return subprocess.Popen(argv, env=environment())
    done = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def snapshot(root: Path) -> dict[str, Any]:
    """Everything an attack could change under ``root`` (not atimes)."""
    out: dict[str, Any] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        entry: dict[str, Any] = {
            "mode": st.st_mode,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "nlink": st.st_nlink,
            "mtime": st.st_mtime_ns,
            "xattrs": {
                a: os.getxattr(path, a, follow_symlinks=False)
                for a in os.listxattr(path, follow_symlinks=False)
            },
        }
        if stat.S_ISREG(st.st_mode):
            entry["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = entry
    return out


def leaked(result: object) -> bool:
    """Whether something read through the mount came from the root files."""
    text = repr(result).encode()
    return any(s in text for s in (SECRET[:9], SECRET_XATTR, b"rootonly"))


# ------------------------------------------------------------- operations
# Each takes a descriptor of ``att/sub`` on the mount and returns what it
# read.  The client itself never follows a symlink (names relative to the
# descriptor, O_NOFOLLOW, AT_SYMLINK_NOFOLLOW, or an O_PATH descriptor's
# /proc/self/fd link, which is the inode it holds): a root process that
# follows a user's symlink is a problem of any filesystem, not the worker's.
# What is tested is whether the *worker* follows one.


@contextlib.contextmanager
def held(sub: int, name: str) -> Iterator[str]:
    """A path naming exactly the inode ``name`` is now (never its target)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=sub)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# An open as a victim makes it (no O_NOFOLLOW: the kernel passes that on
# to the worker), of the inode the kernel has under the name.


def op_read(sub: int) -> object:
    with held(sub, "f") as path:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the worker
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def op_write(sub: int) -> object:
    with held(sub, "f") as path:
        fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, b"PWNED")
    finally:
        os.close(fd)
    return None


def op_open_trunc(sub: int) -> object:
    with held(sub, "f") as path:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    return None


def op_truncate(sub: int) -> object:
    with held(sub, "f") as path:
        os.truncate(path, 3)  # a setattr without a file handle
    return None


def op_chmod(sub: int) -> object:
    with held(sub, "f") as path:
        os.chmod(path, 0o666)
    return None


def op_chown(sub: int) -> object:
    os.chown("f", ATTACKER, ATTACKER, dir_fd=sub, follow_symlinks=False)
    return None


def op_utimes(sub: int) -> object:
    os.utime("f", ns=(0, 0), dir_fd=sub, follow_symlinks=False)
    return None


def op_getxattr(sub: int) -> object:
    with held(sub, "f") as path:
        return os.getxattr(path, "user.secret")


def op_setxattr(sub: int) -> object:
    with held(sub, "f") as path:
        os.setxattr(path, "user.pwned", b"1")
    return None


def op_listxattr(sub: int) -> object:
    with held(sub, "f") as path:
        return os.listxattr(path)


def op_removexattr(sub: int) -> object:
    with held(sub, "f") as path:
        os.removexattr(path, "user.secret")
    return None


def op_readdir(sub: int) -> object:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=sub)  # a new opendir
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def op_lookup(sub: int) -> object:
    found = []
    for name in ("f", "rootonly"):
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=sub, follow_symlinks=False)
            found.append(name)
    return found


def op_create(sub: int) -> object:
    os.close(os.open("new-file", os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644, dir_fd=sub))
    return None


def op_mkdir(sub: int) -> object:
    os.mkdir("new-dir", dir_fd=sub)
    return None


def op_symlink(sub: int) -> object:
    os.symlink("anywhere", "new-link", dir_fd=sub)
    return None


def op_mknod(sub: int) -> object:
    os.mkfifo("new-fifo", dir_fd=sub)
    return None


def op_unlink(sub: int) -> object:
    for name in ("rootonly", "f"):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=sub)
    return None


def op_rmdir(sub: int) -> object:
    os.rmdir("vdir", dir_fd=sub)
    return None


def op_rename(sub: int) -> object:
    os.rename("f", "renamed", src_dir_fd=sub, dst_dir_fd=sub)
    return None


def op_link(sub: int) -> object:
    os.link("f", "hard-link", src_dir_fd=sub, dst_dir_fd=sub, follow_symlinks=False)
    return None


OPS: dict[str, Callable[[int], object]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)
}
FILE_OPS = [
    "read",
    "write",
    "open_trunc",
    "truncate",
    "chmod",
    "chown",
    "utimes",
    "getxattr",
    "setxattr",
    "listxattr",
    "removexattr",
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A scratch directory other uids can traverse (pytest's is 0700)."""
    with reachable_directory("kffsb-", 0o711) as top:
        yield top


@pytest.fixture(scope="module")
def mount(world: Path) -> Iterator[Mount]:
    # the kernel keeps its entries for the whole test: every request reaches
    # the worker by inode, as for a process that holds a file or directory
    # open.  (A fresh lookup would show the swapped entry as the symlink it
    # is, and a root process following it through the mount would be
    # following a user's symlink itself, as on any filesystem.)
    m = Mount(world, "--dirty-expire", "60", "--attr-timeout", "3600")
    try:
        yield m
    finally:
        m.unmount_checked()


class Scene:
    """``att/sub`` on the mount (owned by the attacker in the backing store)
    and a root directory outside the backing tree with the same names."""

    def __init__(self, mount: Mount, world: Path, label: str, *, encrypted: bool) -> None:
        self.mount = mount
        self.root_dir = world / f"root-{label}"
        self.root_dir.mkdir(mode=0o755)
        secret = self.root_dir / "f"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        os.setxattr(secret, "user.secret", SECRET_XATTR)
        os.setxattr(secret, "user.rootonly", b"1")
        (self.root_dir / "rootonly").write_bytes(SECRET)
        (self.root_dir / "vdir").mkdir(mode=0o700)
        self.before = snapshot(self.root_dir)

        att = mount.mnt / f"att-{label}"
        att.mkdir()
        if encrypted:
            master = MasterKey(os.urandom(64))
            mount.add_key(master)
            os.setxattr(att, POLICY, f"keyfence:{master.identifier}".encode())
        self.sub = att / "sub"
        self.sub.mkdir()
        (self.sub / "f").write_bytes(b"user data\n")
        os.setxattr(self.sub / "f", "user.secret", b"user's own value")
        (self.sub / "vdir").mkdir()
        self.att_backing = mount.backing / f"att-{label}"
        for path in [self.att_backing, *self.att_backing.rglob("*")]:
            os.lchown(path, ATTACKER, ATTACKER)
        sub_backing = [p for p in self.att_backing.iterdir() if p.is_dir()]
        assert len(sub_backing) == 1
        self.sub_backing = sub_backing[0]
        files = [
            p for p in self.sub_backing.iterdir() if p.is_file() and p.name != ".keyfence-policy"
        ]
        assert len(files) == 1
        self.f_backing = files[0]
        # the kernel and the worker know every entry before the swap
        self.sub_fd = os.open(self.sub, os.O_RDONLY | os.O_DIRECTORY)
        os.listdir(self.sub)
        for name in ("f", "vdir"):
            os.lstat(self.sub / name)

    def swap(self, where: str, mode: str, seconds: float = 0) -> Any:
        if where == "final":
            return attacker(
                self.sub_backing, self.f_backing.name, self.root_dir / "f", mode, seconds
            )
        return attacker(self.att_backing, self.sub_backing.name, self.root_dir, mode, seconds)

    def check(self) -> None:
        assert snapshot(self.root_dir) == self.before

    def close(self) -> None:
        os.close(self.sub_fd)


def attack(scene: Scene, op: str, where: str) -> None:
    fn = OPS[op]
    # 1. swapped once: every request after it meets the symlink
    scene.swap(where, "swap")
    try:
        result = fn(scene.sub_fd)
    except OSError:
        result = None
    assert not leaked(result), f"{op} through a swapped {where} entry read root data"
    scene.check()
    scene.swap(where, "restore")
    # 2. swapped back and forth while the requests run
    racer = scene.swap(where, "race", 1.5)
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                result = fn(scene.sub_fd)
            except OSError:
                continue
            assert not leaked(result), f"{op} racing a {where} swap read root data"
    finally:
        racer.wait(30)
    scene.check()


# the final symlink matters only to the operations on att/sub/f
PLAIN_CASES = [(op, "parent") for op in sorted(OPS)] + [(op, "final") for op in FILE_OPS]


@pytest.mark.parametrize(("op", "where"), PLAIN_CASES)
def test_plain_directory(mount: Mount, world: Path, op: str, where: str) -> None:
    scene = Scene(mount, world, f"p-{op}-{where}", encrypted=False)
    try:
        attack(scene, op, where)
    finally:
        scene.close()


@pytest.mark.parametrize("op", FILE_OPS)
def test_encrypted_directory(mount: Mount, world: Path, op: str) -> None:
    """In an encrypted directory the attacker sees the backing names and
    swaps the encrypted name of ``f``."""
    scene = Scene(mount, world, f"e-{op}", encrypted=True)
    try:
        attack(scene, op, "final")
    finally:
        scene.close()
