#!/usr/bin/env python3
"""The lock's write-back in process, against a plain fsync of the same bytes.

Usage (from the repository root; any user)::

    .venv/bin/python bench/writeback_lock.py [MIB] [--runs 5] [--scratch DIR]
        [--chunk-pages N] [--start-io-mib N]

What a key removal does to a file with MIB MiB dirty, without FUSE or the
daemon: ``PageCache.flush(start_io=True)`` (seal and store on two threads,
disk writes started every few MiB) then ``fsync`` of the backing file.  Each
run also writes the same number of plaintext bytes to a plain file of the
same directory and times its ``fsync`` (``bench/fs_compare.py --only
lock-open`` does this through a real mount against a plain ``syncfs``).
Prints, per run and as medians, both wall times and their ratio.
``--chunk-pages`` and ``--start-io-mib`` try other batch sizes and start-I/O
steps (the defaults are the cache's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from keyfence.fs import writeback
from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import DEFAULT_CHUNK_PAGES, PageCache

MIB = 1 << 20


def locked(scratch: str, mib: int, data: bytes, chunk_pages: int) -> float:
    """Seconds to write back and fsync ``mib`` MiB dirty in one cached file."""
    cache = PageCache(dirty_limit=(mib + 64) * MIB, expire=1e9, chunk_pages=chunk_pages)
    path = os.path.join(scratch, "cached")
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    f = cache.open(1, "keyfence:bench", MasterKey(os.urandom(64)), lambda: fd, disk_size=0)
    for i in range(mib):
        cache.write(f, i * MIB, data)
    os.sync()
    start = time.perf_counter()
    cache.flush(f, start_io=True)
    os.fsync(fd)
    took = time.perf_counter() - start
    cache.release(f)
    os.unlink(path)
    return took


def plain(scratch: str, mib: int, data: bytes) -> float:
    """Seconds to fsync ``mib`` MiB written to a plain file."""
    path = os.path.join(scratch, "plain")
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    try:
        for i in range(mib):
            os.pwrite(fd, data, i * MIB)
        start = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mib", type=int, nargs="?", default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scratch", default="/var/tmp")
    parser.add_argument("--chunk-pages", type=int, default=DEFAULT_CHUNK_PAGES)
    parser.add_argument("--start-io-mib", type=int, default=writeback.START_IO_BYTES // MIB)
    args = parser.parse_args()
    writeback.START_IO_BYTES = args.start_io_mib * MIB
    data = os.urandom(MIB)
    ratios, lock_times, plain_times = [], [], []
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kf-writeback-lock-") as scratch:
        for run in range(args.runs):
            lock_s = locked(scratch, args.mib, data, args.chunk_pages)
            plain_s = plain(scratch, args.mib, data)
            lock_times.append(lock_s)
            plain_times.append(plain_s)
            ratios.append(lock_s / plain_s)
            print(f"run {run + 1}: write-back + fsync {lock_s:.3f} s, plain fsync {plain_s:.3f} s")
    print(
        f"median: write-back + fsync {statistics.median(lock_times):.3f} s, "
        f"plain fsync {statistics.median(plain_times):.3f} s, "
        f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
