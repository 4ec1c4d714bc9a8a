#!/usr/bin/env python3
"""CPU time of the mount worker's page cache, in process: no FUSE, no daemon.

Usage (from the repository root; any user)::

    .venv/bin/python bench/pagecache_cpu.py [MIB] [--runs 5]

Writes MIB MiB in 1 MiB ``PageCache.write`` calls, writes it back
(``flush``), then reads it in 128 KiB ``read`` calls; prints the median
``time.process_time`` (all threads) of each phase.  Compare two trees by
alternating ``PYTHONPATH=<tree>/src`` runs in one loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import PageCache

WRITE = 1 << 20
READ = 128 << 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mib", type=int, nargs="?", default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="kf-pagecache-") as scratch:
        path = os.path.join(scratch, "f")
        cache = PageCache(dirty_limit=1 << 40, expire=1e9)
        f = cache.open(
            1,
            "keyfence:bench",
            MasterKey(os.urandom(64)),
            lambda: os.open(path, os.O_CREAT | os.O_RDWR, 0o600),
        )
        data = os.urandom(WRITE)
        times: dict[str, list[float]] = {"write": [], "flush": [], "read": []}
        for _ in range(args.runs):
            t0 = time.process_time()
            for i in range(args.mib):
                cache.write(f, i * WRITE, data)
            t1 = time.process_time()
            cache.flush(f)
            t2 = time.process_time()
            for i in range(args.mib * WRITE // READ):
                cache.read(f, i * READ, READ)
            t3 = time.process_time()
            times["write"].append(t1 - t0)
            times["flush"].append(t2 - t1)
            times["read"].append(t3 - t2)
        cache.release(f)
    print(" ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items()), "s CPU")


if __name__ == "__main__":
    main()
