#!/usr/bin/env python3
"""The do-nothing filesystem of bench/fuse_loops.py, once per request loop.

Usage: ``fuse_loops_fs.py LOOP MOUNTPOINT``, LOOP one of ``pyfuse3``,
``llfuse-N``, ``mfusepy``, ``raw-N[-no-killpriv2][-no-zero]``; serves until
unmounted.

Every version has the same tree: a root directory whose files keep a size
and no contents; ``getxattr`` answers ENODATA, except for
``user.fuseloops.counts`` (the request counts, JSON), which is how the
benchmark reads them; entry and attribute timeouts of 1 s, and the mount
options keyfence uses (``default_permissions``, ``allow_other``).
"""

from __future__ import annotations

import errno
import json
import stat
import sys
import threading
import time
from collections import Counter
from typing import Any

COUNTS_XATTR = b"user.fuseloops.counts"
TIMEOUT = 1.0
ROOT_INO = 1
OPTIONS = ("default_permissions", "allow_other")


class Tree:
    """The state every version shares: names in the root, sizes, counts."""

    def __init__(self) -> None:
        self.names: dict[bytes, int] = {}
        self.paths: dict[int, bytes] = {}
        self.sizes: dict[int, int] = {}
        self.modes: dict[int, int] = {ROOT_INO: stat.S_IFDIR | 0o755}
        self.next_ino = ROOT_INO + 1
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.now_ns = time.time_ns()

    def create(self, name: bytes, mode: int) -> int:
        with self.lock:
            if name in self.names:
                raise OSError(errno.EEXIST, "exists")
            ino = self.next_ino
            self.next_ino += 1
            self.names[name] = ino
            self.paths[ino] = name
            self.sizes[ino] = 0
            self.modes[ino] = stat.S_IFREG | (mode & 0o7777)
            return ino

    def wrote(self, ino: int, offset: int, size: int) -> None:
        end = offset + size
        if end > self.sizes.get(ino, 0):
            self.sizes[ino] = end

    def counts_json(self) -> bytes:
        return json.dumps(dict(self.counts)).encode()


TREE = Tree()


# -- pyfuse3 ----------------------------------------------------------------


def serve_pyfuse3(mnt: str) -> None:
    import pyfuse3
    import trio

    def attrs(ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = TREE.modes[ino]
        a.st_nlink = 2 if ino == ROOT_INO else 1
        a.st_size = TREE.sizes.get(ino, 0)
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = TREE.now_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    class Ops(pyfuse3.Operations):
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            TREE.counts["lookup"] += 1
            ino = TREE.names.get(name) if parent == ROOT_INO else None
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(ino)

        async def getattr(self, ino: int, ctx: Any = None) -> Any:
            TREE.counts["getattr"] += 1
            return attrs(ino)

        async def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            TREE.counts["setattr"] += 1
            if fields.update_size:
                TREE.sizes[ino] = attr.st_size
            return attrs(ino)

        async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            TREE.counts["create"] += 1
            try:
                ino = TREE.create(name, mode)
            except OSError as err:
                raise pyfuse3.FUSEError(err.errno) from None
            return pyfuse3.FileInfo(fh=ino), attrs(ino)

        async def open(self, ino: int, flags: int, ctx: Any) -> Any:
            TREE.counts["open"] += 1
            return pyfuse3.FileInfo(fh=ino)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            TREE.counts["write"] += 1
            TREE.wrote(fh, off, len(buf))
            return len(buf)

        async def flush(self, fh: int) -> None:
            TREE.counts["flush"] += 1

        async def release(self, fh: int) -> None:
            TREE.counts["release"] += 1

        async def forget(self, inode_list: Any) -> None:
            TREE.counts["forget"] += 1

        async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
            TREE.counts["getxattr"] += 1
            if name == COUNTS_XATTR:
                return TREE.counts_json()
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def statfs(self, ctx: Any) -> Any:
            TREE.counts["statfs"] += 1
            return pyfuse3.StatvfsData()

    opts = set(pyfuse3.default_options) | set(OPTIONS) | {"fsname=fuseloops-pyfuse3"}
    pyfuse3.init(Ops(), mnt, opts)
    try:
        trio.run(pyfuse3.main, 1, 64)  # keyfence's min_tasks, max_tasks
    finally:
        pyfuse3.close(unmount=False)


# -- llfuse -----------------------------------------------------------------


def serve_llfuse(mnt: str, workers: int) -> None:
    import llfuse

    def attrs(ino: int) -> llfuse.EntryAttributes:
        a = llfuse.EntryAttributes()
        a.st_ino = ino
        a.st_mode = TREE.modes[ino]
        a.st_nlink = 2 if ino == ROOT_INO else 1
        a.st_size = TREE.sizes.get(ino, 0)
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = TREE.now_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    class Ops(llfuse.Operations):
        def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            TREE.counts["lookup"] += 1
            ino = TREE.names.get(name) if parent == ROOT_INO else None
            if ino is None:
                raise llfuse.FUSEError(errno.ENOENT)
            return attrs(ino)

        def getattr(self, ino: int, ctx: Any = None) -> Any:
            TREE.counts["getattr"] += 1
            return attrs(ino)

        def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            TREE.counts["setattr"] += 1
            if fields.update_size:
                TREE.sizes[ino] = attr.st_size
            return attrs(ino)

        def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            TREE.counts["create"] += 1
            try:
                ino = TREE.create(name, mode)
            except OSError as err:
                raise llfuse.FUSEError(err.errno) from None
            return ino, attrs(ino)

        def open(self, ino: int, flags: int, ctx: Any) -> int:
            TREE.counts["open"] += 1
            return ino

        def write(self, fh: int, off: int, buf: bytes) -> int:
            TREE.counts["write"] += 1
            TREE.wrote(fh, off, len(buf))
            return len(buf)

        def flush(self, fh: int) -> None:
            TREE.counts["flush"] += 1

        def release(self, fh: int) -> None:
            TREE.counts["release"] += 1

        def forget(self, inode_list: Any) -> None:
            TREE.counts["forget"] += 1

        def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
            TREE.counts["getxattr"] += 1
            if name == COUNTS_XATTR:
                return TREE.counts_json()
            raise llfuse.FUSEError(errno.ENODATA)

        def statfs(self, ctx: Any) -> Any:
            TREE.counts["statfs"] += 1
            return llfuse.StatvfsData()

    opts = set(llfuse.default_options) | set(OPTIONS) | {"fsname=fuseloops-llfuse"}
    llfuse.init(Ops(), mnt, opts)
    try:
        llfuse.main(workers=workers)
    finally:
        llfuse.close(unmount=False)


# -- mfusepy (libfuse 3 high-level API, multi-threaded loop) -----------------


def serve_mfusepy(mnt: str) -> None:
    import mfusepy

    def attrs(ino: int) -> dict[str, int]:
        return {
            "st_ino": ino,
            "st_mode": TREE.modes[ino],
            "st_nlink": 2 if ino == ROOT_INO else 1,
            "st_size": TREE.sizes.get(ino, 0),
            "st_blksize": 4096,
            "st_atime": TREE.now_ns,
            "st_mtime": TREE.now_ns,
            "st_ctime": TREE.now_ns,
        }

    def ino_of(path: str) -> int:
        if path == "/":
            return ROOT_INO
        ino = TREE.names.get(path.lstrip("/").encode("utf-8", "surrogateescape"))
        if ino is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return ino

    class Ops:
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            if config:
                config.entry_timeout = config.attr_timeout = TIMEOUT
                config.use_ino = 1

        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            TREE.counts["getattr"] += 1
            return attrs(ino_of(path))

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            TREE.counts["create"] += 1
            name = path.lstrip("/").encode("utf-8", "surrogateescape")
            try:
                return TREE.create(name, mode)
            except OSError as err:
                raise mfusepy.FuseOSError(err.errno or errno.EIO) from None

        def open(self, path: str, flags: int) -> int:
            TREE.counts["open"] += 1
            return ino_of(path)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            TREE.counts["write"] += 1
            TREE.wrote(fh, offset, len(data))
            return len(data)

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            TREE.counts["setattr"] += 1
            TREE.sizes[ino_of(path)] = length
            return 0

        def flush(self, path: str, fh: int) -> int:
            TREE.counts["flush"] += 1
            return 0

        def release(self, path: str, fh: int) -> int:
            TREE.counts["release"] += 1
            return 0

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            TREE.counts["getxattr"] += 1
            if name.encode() == COUNTS_XATTR:
                return TREE.counts_json()
            raise mfusepy.FuseOSError(errno.ENODATA)

        def statfs(self, path: str) -> dict[str, int]:
            TREE.counts["statfs"] += 1
            return {"f_bsize": 4096, "f_namemax": 255}

    mfusepy.FUSE(
        Ops(),
        mnt,
        foreground=True,
        nothreads=False,
        fsname="fuseloops-mfusepy",
        default_permissions=True,
        allow_other=True,
    )


# -- our own loop --------------------------------------------------------------


def serve_raw(mnt: str, threads: int, flags: str) -> None:
    """``flags``: what follows ``raw-N``: ``-no-killpriv2``, ``-no-zero``."""
    from keyfence.testing.bench import rawloop

    rawloop.serve(
        TREE,
        mnt,
        threads=threads,
        killpriv_v2="-no-killpriv2" not in flags,
        zero="-no-zero" not in flags,
        options=OPTIONS,
    )


def main(argv: list[str]) -> int:
    loop, mnt = argv
    if loop == "pyfuse3":
        serve_pyfuse3(mnt)
    elif loop.startswith("llfuse-"):
        serve_llfuse(mnt, int(loop.split("-")[1]))
    elif loop == "mfusepy":
        serve_mfusepy(mnt)
    elif loop.startswith("raw-"):
        threads, _, flags = loop.removeprefix("raw-").partition("-")
        serve_raw(mnt, int(threads), "-" + flags)
    else:
        print(f"unknown loop {loop}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
