#!/usr/bin/env python3
"""What keyfence's request handlers cost on their own: no kernel, no FUSE.

Usage (from the repository root; any user who can write ``--scratch``)::

    .venv/bin/python bench/fs_handlers.py [--scratch /var/tmp] [--files 3000]
        [--plain] [--tar] [--profile]

The real :class:`~keyfence.fs.fuse.dispatch.Dispatcher` over a real
:class:`~keyfence.fs.ops.KeyfenceOperations` and a real backing directory,
driven in this process with the request bodies the kernel would send for
one small file after another: LOOKUP (a miss), CREATE, GETXATTR
``security.capability``, WRITE 4 KiB, FLUSH, RELEASE, GETATTR of the
directory, in an encrypted directory (``--plain``: one that is not).
``--tar``: files as ``tar -x`` makes them, 25 KiB written 10 KiB at a
time, then their owner, mode and times set by name.  The key source is
the injected dependency (fs/keysource.KeySource): it hands out one known
key, where a mount asks the daemon.

Printed: requests per file, the median and tenth percentile per opcode,
in microseconds, and the sum of the medians (times the requests per
file): the server's own part of bench/fuse_trace.py's ``send -> end``
(the rest there is the kernel, the loop and the wait).  ``--profile``:
cProfile of the whole loop instead (its figures are inflated).
"""

from __future__ import annotations

import argparse
import cProfile
import errno
import os
import pstats
import statistics
import struct
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio
from pyfuse3 import FUSEError

from keyfence.fs.crypto import MasterKey
from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse.dispatch import Caller, Dispatcher
from keyfence.fs.keysource import FoundKey
from keyfence.fs.ops import KeyfenceOperations
from keyfence.fs.xattrs import POLICY_XATTR

CYCLE = ("LOOKUP", "CREATE", "GETXATTR", "WRITE", "FLUSH", "RELEASE", "GETATTR")
TAR_WRITES = ((0, b"t" * 10240), (10240, b"t" * 10240), (20480, b"t" * 5120))
"""``--tar``: a 25 KiB file as tar writes it, 10 KiB at a time."""
TAR_SETATTRS = (
    ("SETATTR owner", p.FATTR_UID | p.FATTR_GID),
    ("SETATTR mode", p.FATTR_MODE),
    ("SETATTR times", p.FATTR_ATIME | p.FATTR_MTIME),
)


class OneKey:
    """Hands out one master key; watches and reports go nowhere."""

    def __init__(self) -> None:
        self.raw = os.urandom(64)
        self.description = MasterKey(bytes(self.raw)).key_ref().description

    def find(self, descriptions: list[str], pid: int) -> FoundKey | None:
        # a fresh copy each time: the mount wipes the one it is given
        return FoundKey(1, self.description, bytes(bytearray(self.raw)))

    def watch(self, serial: int, on_going: Any) -> None:
        del serial, on_going

    def report(self, event: str, detail: dict[str, Any]) -> None:
        del event, detail


class Driver:
    def __init__(self, backing: Path, source: OneKey) -> None:
        self.ops = KeyfenceOperations(str(backing), "/nonexistent-keyfence-bench", source)
        self.table = Dispatcher(self.ops).table()
        self.times: dict[str, list[int]] = defaultdict(list)
        self.source = source

    async def request(
        self, op: str, nodeid: int, body: bytes, *, timed: bool = True, label: str = ""
    ) -> Any:
        handler = self.table[getattr(p, op)]
        start = time.perf_counter_ns()
        try:
            answer = await handler(nodeid, Caller(0, 0, os.getpid()), memoryview(bytearray(body)))
        except FUSEError as err:
            if err.errno != errno.ENODATA:  # GETXATTR of a missing attribute
                raise
            answer = None
        if timed:
            self.times[label or op].append(time.perf_counter_ns() - start)
        return answer

    async def run(self, files: int, plain: bool, tar: bool = False) -> None:
        entry = await self.request("MKDIR", 1, p.MKDIR_IN.pack(0o755, 0) + b"d\0", timed=False)
        d = struct.unpack_from("=Q", entry)[0]
        if not plain:
            value = self.source.description.encode()
            body = p.SETXATTR_IN.pack(len(value), 0) + POLICY_XATTR + b"\0" + value
            await self.request("SETXATTR", d, body, timed=False)
        data = b"x" * 4096
        create = p.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0o022, 0)
        warm = 200
        for i in range(warm + files):
            if i == warm:
                self.times.clear()
            name = f"f{i}".encode() + b"\0"
            await self.request("LOOKUP", d, name)
            made = bytes(await self.request("CREATE", d, create + name))
            ino = struct.unpack_from("=Q", made)[0]
            fh = struct.unpack_from("=Q", made, p.ENTRY_OUT.size + p.ATTR.size)[0]
            xattr = p.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
            await self.request("GETXATTR", ino, xattr)
            for offset, piece in TAR_WRITES if tar else ((0, data),):
                write = p.WRITE_IN.pack(fh, offset, len(piece), 0, 0, 0, 0) + piece
                await self.request("WRITE", ino, write)
            await self.request("FLUSH", ino, p.FH_IN.pack(fh) + bytes(16))
            await self.request("RELEASE", ino, p.FH_IN.pack(fh) + bytes(16))
            if tar:  # then tar sets the owner, the mode and the times, by name
                for label, valid in TAR_SETATTRS:
                    body = p.SETATTR_IN.pack(
                        valid, 0, 0, 0, 0, 1_700_000_000, 1_700_000_000, 0, 0, 0, 0,
                        0o100640, 0, 0, 0, 0,
                    )  # fmt: skip
                    await self.request("SETATTR", ino, body, label=label)
            await self.request("GETATTR", d, p.GETATTR_IN.pack(0, 0, 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--plain", action="store_true", help="a directory that is not encrypted")
    ap.add_argument("--tar", action="store_true", help="files as tar -x makes them")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kfhandlers-") as backing:
        driver = Driver(Path(backing), OneKey())
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(trio.run, driver.run, args.files, args.plain, args.tar)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            return 0
        trio.run(driver.run, args.files, args.plain, args.tar)
    total = 0.0
    for op in (*CYCLE, *(label for label, _ in TAR_SETATTRS if args.tar)):
        values = sorted(driver.times[op])
        median = statistics.median(values) / 1000
        total += median
        count = len(values) / args.files
        p10 = values[len(values) // 10] / 1000
        total += median * (count - 1)  # every one of them (tar's writes)
        print(f"{op:13} {count:3.0f}/file  median {median:6.2f} us   p10 {p10:6.2f} us")
    print(f"sum of the medians: {total:.1f} us per file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
