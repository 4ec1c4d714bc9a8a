"""Random file-system call sequences on a keyfence mount and on the backing
filesystem itself, side by side: every call's result and errno, and at the
end the whole tree (names, types, modes, link counts, contents, symlink
targets, xattrs), must be the same.

    .venv/bin/python -m tests.fs.fs_random SEED COUNT LENGTH [--plain]

runs COUNT sequences of LENGTH calls (an encrypted directory, or with
``--plain`` a plain one) and prints each sequence's first difference;
tests/fs/test_fs_random.py runs a few fixed seeds.  As root (the reference
side is a directory beside the backing store, on the same filesystem).

Not compared, on purpose (docs/fs.md, "What does not work (yet)" and the
encrypted-directory rules): ``SEEK_DATA``/``SEEK_HOLE`` (a file is all
data) and offsets in directories; EXDEV for a link or rename a symlink's
sealed target forbids, and a symlink's link count after such a move (a new
inode); the fallocate modes that punch or zero a range of an encrypted
file.  A sequence that meets one of these ends there.  Symlink targets are
relative and stay inside the test's directories.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_AT_FDCWD = -100

NAMES = [
    "a", "b", "c", "d", "e", "d/a", "d/b", "d/e", "e/x", "d/e/y", "n" * 255, "d/" + "m" * 200,
    "sp ace", "é", "a.b", ".hid", "d/.", "d/..", "", "a/x", "n" * 256,
]  # fmt: skip
ACCESS = [
    os.O_RDONLY,
    os.O_WRONLY,
    os.O_RDWR,
    os.O_RDWR,
    os.O_RDWR | os.O_APPEND,
    os.O_WRONLY | os.O_TRUNC,
]
CREATE = [
    0, os.O_CREAT, os.O_CREAT, os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_CREAT | os.O_TRUNC,
    os.O_DIRECTORY, os.O_NOFOLLOW, os.O_CREAT | os.O_DIRECTORY,
]  # fmt: skip
TARGETS = ["a", "d", "../x", "t" * 1000, "d/e", "", "ä" * 10]
XATTRS = ["user.a", "user.b", "user." + "x" * 200, "trusted.t", "security.s", "user.", "bad"]
SIZES = [1, 100, 4095, 4096, 4097, 8192, 70000, 300000]
OFFSETS = [0, 1, 4095, 4096, 5000, 65536, 1 << 20, 10 << 20]

Op = tuple[object, ...]
Result = object


def _check(ret: int) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass
class Side:
    """One of the two trees and the descriptors open in it (by slot)."""

    root: Path
    fds: dict[int, int] = field(default_factory=dict)
    dirs: set[int] = field(default_factory=set)

    def path(self, name: str) -> str:
        return str(self.root / name) if name else str(self.root) + "/"

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.dirs.clear()


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


def _stat_tuple(st: os.stat_result) -> tuple[int, int, int, int]:
    size = -1 if stat.S_ISDIR(st.st_mode) else st.st_size  # a directory's size is its own
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, st.st_nlink)


def _on_fd(side: Side, kind: str, slot: int, *a: Any) -> Result:
    fd = side.fds.get(slot)
    if fd is None:
        return "no descriptor"
    if kind == "pwrite":
        return os.pwrite(fd, a[0], a[1])
    if kind == "write":
        return os.write(fd, a[0])
    if kind == "pread":
        return _digest(os.pread(fd, a[0], a[1]))
    if kind == "read":
        return _digest(os.read(fd, a[0]))
    if kind == "ftruncate":
        os.ftruncate(fd, a[0])
    elif kind == "fsync":
        os.fsync(fd)
    elif kind == "fstat":
        return _stat_tuple(os.fstat(fd))
    elif kind == "lseek":
        if slot in side.dirs or a[1] in (os.SEEK_DATA, os.SEEK_HOLE):
            return "not compared"
        return os.lseek(fd, a[0], a[1])
    elif kind == "fallocate":
        if slot in side.dirs:
            return "not compared"
        _check(_libc.fallocate(fd, a[0], a[1], a[2]))
    elif kind == "copy_file_range":
        dst = side.fds.get(a[0])
        if dst is None:
            return "no descriptor"
        return os.copy_file_range(fd, dst, a[1], a[2], a[3])
    return "ok"


def _read_all(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never wait at a fifo
    try:
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return _digest(bytes(out))
    finally:
        os.close(fd)


def apply(side: Side, op: Op) -> Result:
    """Run ``op`` in ``side``: its result, or ("err", errno name)."""
    kind, *rest = op
    a: list[Any] = list(rest)
    p = side.path
    try:
        if kind == "open":
            slot, name, flags, mode = a
            fd = os.open(p(name), flags | os.O_NONBLOCK, mode)
            old = side.fds.pop(slot, None)
            if old is not None:
                os.close(old)
            side.fds[slot] = fd
            side.dirs.discard(slot)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                side.dirs.add(slot)
        elif kind == "close":
            fd = side.fds.pop(a[0], None)
            if fd is None:
                return "no descriptor"
            os.close(fd)
        elif kind in _FD_OPS:
            return _on_fd(side, str(kind), *a)
        elif kind == "truncate":
            os.truncate(p(a[0]), a[1])
        elif kind == "rename":
            _check(
                _libc.renameat2(
                    _AT_FDCWD, os.fsencode(p(a[0])), _AT_FDCWD, os.fsencode(p(a[1])), a[2]
                )
            )
        elif kind == "link":
            os.link(p(a[0]), p(a[1]))
        elif kind == "unlink":
            os.unlink(p(a[0]))
        elif kind == "mkdir":
            os.mkdir(p(a[0]), a[1])
        elif kind == "rmdir":
            os.rmdir(p(a[0]))
        elif kind == "symlink":
            os.symlink(a[1], p(a[0]))
        elif kind == "readlink":
            return os.readlink(p(a[0]))
        elif kind == "chmod":
            os.chmod(p(a[0]), a[1])
        elif kind == "stat":
            return _stat_tuple(os.stat(p(a[0]), follow_symlinks=a[1]))
        elif kind == "listdir":
            return sorted(os.listdir(p(a[0])))
        elif kind == "utime":
            os.utime(p(a[0]), ns=(a[1], a[1]))
            st = os.stat(p(a[0]))
            return (st.st_mtime_ns, st.st_atime_ns)
        elif kind == "setxattr":
            os.setxattr(p(a[0]), a[1], a[2], a[3], follow_symlinks=False)
        elif kind == "getxattr":
            return os.getxattr(p(a[0]), a[1], follow_symlinks=False)
        elif kind == "listxattr":
            return _own_xattrs(p(a[0]))
        elif kind == "removexattr":
            os.removexattr(p(a[0]), a[1], follow_symlinks=False)
        elif kind == "readfile":
            return _read_all(p(a[0]))
        elif kind == "mknod":
            os.mknod(p(a[0]), a[1], 0)
        elif kind == "access":
            return os.access(p(a[0]), a[1])
        else:
            raise ValueError(f"unknown op {kind}")
        return "ok"
    except OSError as err:
        return ("err", errno.errorcode.get(err.errno or 0, err.errno))


_FD_OPS = frozenset(
    {"pwrite", "write", "pread", "read", "ftruncate", "fsync", "fstat", "lseek", "fallocate",
     "copy_file_range"}
)  # fmt: skip


def _own_xattrs(path: str) -> list[str]:
    """The xattrs a user set (keyfence's own ``user.keyfence.*`` left out)."""
    names = os.listxattr(path, follow_symlinks=False)
    return sorted(x for x in names if not x.startswith(("user.keyfence.", "security.selinux")))


def tree(root: Path, *, plain: bool) -> list[list[object]]:
    """Everything under ``root`` that the two sides must agree on."""
    out: list[list[object]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError as err:  # a directory this user may list, not search
                out.append([os.path.relpath(path, root), errno.errorcode.get(err.errno or 0)])
                continue
            # a symlink moved between encrypted directories is a new inode
            counted = stat.S_ISREG(st.st_mode) or (plain and not stat.S_ISDIR(st.st_mode))
            item: list[object] = [
                os.path.relpath(path, root),
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_nlink if counted else None,
            ]
            if stat.S_ISREG(st.st_mode):
                try:
                    item += [_read_all(path), st.st_size]
                except OSError as err:  # not readable by this user
                    item += [errno.errorcode.get(err.errno or 0), st.st_size]
            elif stat.S_ISLNK(st.st_mode):
                item += [os.readlink(path), st.st_size]
            try:
                item.append(
                    [(x, os.getxattr(path, x, follow_symlinks=False)) for x in _own_xattrs(path)]
                )
            except OSError as err:
                item.append(errno.errorcode.get(err.errno or 0))
            out.append(item)
    return out


def random_op(r: random.Random) -> Op:
    """One call, with arguments drawn from small pools (so that names meet)."""
    name = lambda: r.choice(NAMES)  # noqa: E731
    slot = r.randrange(4)
    c = r.randrange(100)
    if c < 14:
        mode = r.choice([0o644, 0o644, 0o600, 0o777, 0o4755, 0])
        return (
            "open",
            slot,
            r.choice(NAMES[:6]) if c < 8 else name(),
            r.choice(ACCESS) | r.choice(CREATE),
            mode,
        )
    if c < 18:
        return ("close", slot)
    if c < 30:
        size = r.choice(SIZES)
        data = (bytes(r.randrange(256) for _ in range(64)) * (size // 64 + 1))[:size]
        if c < 26:
            return ("pwrite", slot, data, r.choice(OFFSETS))
        return ("write", slot, data)
    if c < 34:
        return (
            "pread",
            slot,
            r.choice([1, 4096, 5000, 1 << 20]),
            r.choice([0, 1, 4095, 4096, 9000, 1 << 20]),
        )
    if c < 38:
        return ("read", slot, r.choice([1, 4096, 100000]))
    if c < 42:
        return ("ftruncate", slot, r.choice([0, 1, 4095, 4096, 4097, 100000, 1 << 22]))
    if c < 44:
        return ("truncate", name(), r.choice([0, 5, 4096, 12345]))
    if c < 46:
        return ("fsync", slot)
    if c < 48:
        return ("fstat", slot)
    if c < 50:
        whence = r.choice([os.SEEK_SET, os.SEEK_END, os.SEEK_CUR])
        return ("lseek", slot, r.choice([0, 10, 4096, 1 << 20]), whence)
    if c < 57:
        return ("rename", name(), name(), r.choice([0, 0, 0, 1, 2]))  # NOREPLACE, EXCHANGE
    if c < 60:
        return ("link", name(), name())
    if c < 64:
        return ("unlink", name())
    if c < 69:
        return ("mkdir", name(), r.choice([0o755, 0o700, 0o1777, 0]))
    if c < 71:
        return ("rmdir", name())
    if c < 74:
        return ("symlink", name(), r.choice(TARGETS))
    if c < 76:
        return ("readlink", name())
    if c < 78:
        return ("chmod", name(), r.choice([0o644, 0o2755, 0o4711, 0o1777, 0o000]))
    if c < 84:
        return ("stat", name(), r.random() < 0.7)
    if c < 87:
        return ("listdir", r.choice(["", "d", "e", "d/e", "a"]))
    if c < 88:
        return ("utime", name(), r.choice([0, 1, 10**18, 1234567890123456789]))
    if c < 91:
        value = r.choice([b"", b"v", b"x" * 3000])
        flags = r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
        return ("setxattr", name(), r.choice(XATTRS), value, flags)
    if c < 93:
        return ("getxattr", name(), r.choice(XATTRS))
    if c < 94:
        return ("listxattr", name())
    if c < 95:
        return ("removexattr", name(), r.choice(XATTRS))
    if c < 97:
        return ("readfile", name())
    if c < 98:
        mode = r.choice([0, 0, 1, 2, 3, 0x10])  # KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
        return ("fallocate", slot, mode, r.choice([0, 4096, 5000]), r.choice([1, 4096, 100000]))
    if c < 99 and r.random() < 0.5:
        return (
            "copy_file_range",
            slot,
            r.randrange(4),
            r.choice([1, 4096, 100000]),
            r.choice([None, 0, 4095]),
            r.choice([None, 0, 8192]),
        )
    if c < 99:
        return (
            "mknod",
            name(),
            r.choice([stat.S_IFIFO | 0o644, stat.S_IFREG | 0o600, stat.S_IFSOCK | 0o600]),
        )
    return ("access", name(), r.choice([os.R_OK, os.W_OK, os.X_OK, os.F_OK]))


def not_compared(op: Op, got: Result, want: Result, *, plain: bool) -> bool:
    """A difference the module's docstring lists (the sequence ends there)."""
    if op[0] in ("link", "rename") and got == ("err", "EXDEV") and not plain:
        return True  # a symlink's target is sealed with its directory's nonce
    if op[0] == "fallocate" and got == ("err", errno.errorcode[errno.EOPNOTSUPP]) and not plain:
        return op[2] != 0 and op[2] != 1  # PUNCH_HOLE, ZERO_RANGE (not KEEP_SIZE)
    return False


def show(op: Op) -> str:
    parts = []
    for x in op:
        if isinstance(x, bytes) and len(x) > 16:
            parts.append(f"<{len(x)} bytes>")
        elif isinstance(x, str) and len(x) > 20:
            parts.append(f"{x[:8]}...<{len(x)}>")
        else:
            parts.append(repr(x))
    return "(" + ", ".join(parts) + ")"


@dataclass
class Outcome:
    difference: list[str] | None = None
    """The calls up to the first difference, and both results; None if none."""
    ended_early: bool = False
    """The sequence met a difference the module does not compare."""


def run_sequence(
    mount_root: Path, reference_root: Path, seed: int, length: int, *, plain: bool
) -> Outcome:
    """``length`` calls from ``seed`` in both roots (made empty by the
    caller, the first inside the mount), then the trees compared."""
    r = random.Random(seed)
    mine, theirs = Side(mount_root), Side(reference_root)
    log: list[str] = []
    try:
        for _ in range(length):
            op = random_op(r)
            got, want = apply(mine, op), apply(theirs, op)
            log.append(f"{show(op)} -> {want!r}")
            if got == want:
                continue
            if not_compared(op, got, want, plain=plain):
                return Outcome(ended_early=True)
            return Outcome([*log[-12:], f"keyfence: {got!r}", f"reference: {want!r}"])
    finally:
        mine.close_all()
        theirs.close_all()
    got_tree, want_tree = tree(mount_root, plain=plain), tree(reference_root, plain=plain)
    if got_tree != want_tree:
        import difflib

        lines = difflib.unified_diff(
            [repr(x) for x in want_tree],
            [repr(x) for x in got_tree],
            "reference",
            "keyfence",
            lineterm="",
        )
        return Outcome(["the trees differ:", *lines])
    return Outcome()


@dataclass
class Playground:
    """A mount with an encrypted directory's key, and the reference beside it."""

    mount: Mount
    master: MasterKey
    reference: Path

    def roots(self, name: str, *, plain: bool) -> tuple[Path, Path]:
        """Two fresh empty directories ``name``: in the mount (encrypted
        unless ``plain``) and in the reference."""
        mine = self.mount.mnt / name
        mine.mkdir()
        if not plain:
            os.setxattr(mine, "user.keyfence.policy", f"keyfence:{self.master.identifier}".encode())
        theirs = self.reference / name
        theirs.mkdir()
        return mine, theirs


@contextlib.contextmanager
def playground(tmp: Path) -> Iterator[Playground]:
    mount = Mount(tmp, "--dirty-expire", "60")
    try:
        master = MasterKey(os.urandom(64))
        mount.add_key(master)
        reference = tmp / "reference"  # beside the backing store: the same filesystem
        reference.mkdir()
        yield Playground(mount, master, reference)
    finally:
        mount.unmount_checked()


def main() -> int:
    seed, count, length = (int(x) for x in sys.argv[1:4])
    plain = "--plain" in sys.argv
    tmp = Path(tempfile.mkdtemp(prefix="kf-fs-random-", dir="/var/tmp"))
    differ = early = 0
    try:
        with playground(tmp) as ground:
            for i in range(count):
                mine, theirs = ground.roots(f"t{i}", plain=plain)
                outcome = run_sequence(mine, theirs, seed * 1_000_003 + i, length, plain=plain)
                early += outcome.ended_early
                if outcome.difference is not None:
                    differ += 1
                    print(
                        f"=== seed {seed}, sequence {i}", *outcome.difference, sep="\n", flush=True
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{differ} of {count} sequences differ; {early} ended at a difference not compared")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
