"""A minimal FUSE request loop of our own over /dev/fuse, for bench/fuse_loops.py.

Only what the benchmark's do-nothing filesystem needs: mounting through
fusermount3 (the ``_FUSE_COMMFD`` protocol: fusermount3 opens /dev/fuse,
mounts, and hands the descriptor back over a socketpair), INIT with the
flags we choose, one thread per cloned descriptor (``FUSE_DEV_IOC_CLONE``:
requests come from one queue, each reply goes back on the descriptor its
request was read from), and the opcodes of ``open(O_CREAT)/write/close``.
Each thread reads every request into one reused buffer and zeroes the bytes
it read once the request is answered (what keyfence would do with
plaintext).  The structures are those of include/uapi/linux/fuse.h, 7.38.

This is a measuring instrument, not a filesystem: unknown opcodes get
ENOSYS, and nothing here is used by keyfence.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, WRITE, STATFS, RELEASE = 14, 16, 17, 18
GETXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 25, 26, 27, 28, 29
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 34, 35, 36, 38, 42
NAMES = {
    LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", SETATTR: "setattr", OPEN: "open",
    WRITE: "write", STATFS: "statfs", RELEASE: "release", GETXATTR: "getxattr", FLUSH: "flush",
    INIT: "init", OPENDIR: "opendir", READDIR: "readdir", RELEASEDIR: "releasedir",
    ACCESS: "access", CREATE: "create", INTERRUPT: "interrupt", DESTROY: "destroy",
    BATCH_FORGET: "forget",
}  # fmt: skip
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)

# INIT flags
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FATTR_SIZE = 1 << 3

MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * 4096
BUFFER = MAX_WRITE + 8192  # the kernel refuses a read buffer smaller than a whole request
OUR_MINOR = 38
FUSE_DEV_IOC_CLONE = 2 << 30 | 4 << 16 | 229 << 8 | 0  # _IOR(229, 0, uint32_t)

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")
SETATTR_IN = struct.Struct("=IIQQ")  # valid padding fh size (the rest unread)
KSTATFS = struct.Struct("=QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize

ROOT_INO = 1
TIMEOUT_S = 1


class Tree(Protocol):
    names: dict[bytes, int]
    sizes: dict[int, int]
    modes: dict[int, int]
    counts: Any
    now_ns: int

    def create(self, name: bytes, mode: int) -> int: ...

    def wrote(self, ino: int, offset: int, size: int) -> None: ...

    def counts_json(self) -> bytes: ...


class ErrorReply(Exception):
    """An error reply: the kernel's errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def mount(mountpoint: str, options: Sequence[str]) -> int:
    """fusermount3 mounts and passes /dev/fuse back over ``_FUSE_COMMFD``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        done = subprocess.run(
            ["fusermount3", "-o", ",".join(options), "--", mountpoint],
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(errno.EIO, f"fusermount3: {done.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, "fusermount3 sent no descriptor")
    return fds[0]


def clone(fd: int) -> int:
    """A second descriptor on the same connection, with its own processing list."""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("=I", fd))
    return new


class Session:
    def __init__(self, tree: Tree, fd: int, killpriv_v2: bool, zero: bool) -> None:
        self.tree = tree
        self.fd = fd
        self.killpriv_v2 = killpriv_v2
        self.zero = zero
        self.handlers: dict[int, Callable[[int, memoryview], bytes]] = {
            LOOKUP: self.lookup,
            GETATTR: self.getattr,
            SETATTR: self.setattr,
            CREATE: self.create,
            OPEN: self.open,
            WRITE: self.write,
            FLUSH: self.empty,
            RELEASE: self.empty,
            GETXATTR: self.getxattr,
            STATFS: self.statfs,
            ACCESS: self.empty,
            OPENDIR: self.open,
            READDIR: self.empty,
            RELEASEDIR: self.empty,
            DESTROY: self.empty,
        }

    # -- replies' parts

    def attr(self, ino: int) -> bytes:
        t = self.tree
        s = t.now_ns // 10**9
        ns = t.now_ns % 10**9
        size = t.sizes.get(ino, 0)
        return ATTR.pack(
            ino, size, (size + 511) // 512, s, s, s, ns, ns, ns,
            t.modes[ino], 2 if ino == ROOT_INO else 1, 0, 0, 0, 4096, 0,
        )  # fmt: skip

    def entry(self, ino: int) -> bytes:
        return ENTRY_HEAD.pack(ino, 0, TIMEOUT_S, TIMEOUT_S, 0, 0) + self.attr(ino)

    # -- handlers: (nodeid, body) -> reply payload, or raise ErrorReply(errno)

    def lookup(self, nodeid: int, body: memoryview) -> bytes:
        name = bytes(body[: len(body) - 1])
        ino = self.tree.names.get(name) if nodeid == ROOT_INO else None
        if ino is None:
            raise ErrorReply(errno.ENOENT)
        return self.entry(ino)

    def getattr(self, nodeid: int, body: memoryview) -> bytes:
        if nodeid not in self.tree.modes:
            raise ErrorReply(errno.ENOENT)
        return ATTR_OUT_HEAD.pack(TIMEOUT_S, 0, 0) + self.attr(nodeid)

    def setattr(self, nodeid: int, body: memoryview) -> bytes:
        valid, _, _, size = SETATTR_IN.unpack_from(body)
        if valid & FATTR_SIZE:
            self.tree.sizes[nodeid] = size
        return self.getattr(nodeid, body)

    def create(self, nodeid: int, body: memoryview) -> bytes:
        _flags, mode, _umask, _ = CREATE_IN.unpack_from(body)
        name = bytes(body[CREATE_IN.size : len(body) - 1])
        try:
            ino = self.tree.create(name, mode)
        except OSError as err:
            raise ErrorReply(err.errno or errno.EIO) from None
        return self.entry(ino) + OPEN_OUT.pack(ino, 0, 0)

    def open(self, nodeid: int, body: memoryview) -> bytes:
        return OPEN_OUT.pack(nodeid, 0, 0)

    def write(self, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = WRITE_IN.unpack_from(body)
        self.tree.wrote(fh, offset, size)
        return WRITE_OUT.pack(size, 0)

    def getxattr(self, nodeid: int, body: memoryview) -> bytes:
        (size, _) = GETXATTR_IN.unpack_from(body)
        name = bytes(body[GETXATTR_IN.size : len(body) - 1])
        if name != b"user.fuseloops.counts":
            raise ErrorReply(errno.ENODATA)
        value = self.tree.counts_json()
        if size == 0:
            return GETXATTR_OUT.pack(len(value), 0)
        if size < len(value):
            raise ErrorReply(errno.ERANGE)
        return value

    def statfs(self, nodeid: int, body: memoryview) -> bytes:
        return KSTATFS.pack(0, 0, 0, 0, 0, 4096, 255, 4096)

    def empty(self, nodeid: int, body: memoryview) -> bytes:
        return b""

    # -- the loop

    def init(self) -> None:
        """Read INIT on the first descriptor and answer it."""
        buf = bytearray(BUFFER)
        n = os.readv(self.fd, [buf])
        _, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
        if opcode != INIT:
            raise OSError(errno.EPROTO, f"first request was {opcode}, not INIT")
        major, minor, max_readahead, offered = INIT_IN.unpack_from(buf, IN_HEADER.size)
        if major != 7:
            raise OSError(errno.EPROTO, f"the kernel speaks FUSE {major}.{minor}, not 7.x")
        want = FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_MAX_PAGES
        want |= FUSE_PARALLEL_DIROPS | (FUSE_HANDLE_KILLPRIV_V2 if self.killpriv_v2 else 0)
        payload = INIT_OUT.pack(
            7, min(minor, OUR_MINOR), max_readahead, want & offered,
            64, 48, MAX_WRITE, 1, MAX_PAGES, 0, 0,
        )  # fmt: skip
        os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload)
        self.tree.counts["init"] += 1
        buf[:n] = bytes(n)

    def serve(self, fd: int) -> None:
        """Answer requests read from ``fd`` until the mount goes away."""
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        counts = self.tree.counts
        handlers = self.handlers
        zero = self.zero
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # an interrupted request, or a signal
                if err.errno == errno.ENODEV:
                    return  # unmounted
                raise
            length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
            counts[NAMES.get(opcode, str(opcode))] += 1
            if opcode not in NO_REPLY:
                handler = handlers.get(opcode)
                try:
                    if handler is None:
                        raise ErrorReply(errno.ENOSYS)
                    payload = handler(nodeid, view[IN_HEADER.size : length])
                    out = OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload
                except ErrorReply as err:
                    out = OUT_HEADER.pack(OUT_HEADER.size, -err.errno, unique)
                try:
                    os.write(fd, out)
                except OSError as err:
                    if err.errno == errno.ENODEV:
                        return
                    if err.errno != errno.ENOENT:  # ENOENT: the request was interrupted
                        raise
            if zero:
                ctypes.memset(address, 0, n)  # no request bytes outlive their request


def serve(
    tree: Tree,
    mountpoint: str,
    *,
    threads: int,
    killpriv_v2: bool,
    zero: bool,
    options: Sequence[str],
) -> None:
    fd = mount(mountpoint, [*options, "fsname=fuseloops-raw", "subtype=fuseloops"])
    session = Session(tree, fd, killpriv_v2, zero)
    session.init()
    fds = [fd] + [clone(fd) for _ in range(threads - 1)]
    workers = [threading.Thread(target=session.serve, args=(f,), daemon=True) for f in fds[1:]]
    for w in workers:
        w.start()
    try:
        session.serve(fd)
        for w in workers:
            w.join()
    finally:
        for f in fds:
            os.close(f)
