#!/usr/bin/env python3
"""The lock's write-back of 1 GiB in process, eight times, with what the
kernel did meanwhile (part 20).

Usage (root, from the repository root):
    .venv/bin/python bench/results/issue17-2026-12-06-part20/writeback_modes.py /mnt/kfbench

As ``bench/writeback_lock.py``: 1 GiB dirty in one cached file,
``PageCache.flush(start_io=True)``, then ``fsync``.  Per run: the flush's
wall time, how busy the two CPUs were (/proc/stat), this process's user
and system CPU, and /proc/vmstat's counters over the flush (pages
allocated and freed, faults, compaction, reclaim).
"""

import os
import resource
import sys
import time

from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import DEFAULT_CHUNK_PAGES, PageCache

MIB = 1 << 20
KEYS = (
    "pgalloc_normal",
    "pgfree",
    "pgfault",
    "compact_stall",
    "allocstall_normal",
    "pgscan_kswapd",
)


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def cpustat() -> list[int]:
    with open("/proc/stat") as f:
        return list(map(int, f.readline().split()[1:]))


def main() -> None:
    scratch = sys.argv[1]
    data = os.urandom(MIB)
    for run in range(8):
        cache = PageCache(dirty_limit=1088 * MIB, expire=1e9, chunk_pages=DEFAULT_CHUNK_PAGES)
        path = os.path.join(scratch, "cached")
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
        f = cache.open(
            1, "keyfence:bench", MasterKey(os.urandom(64)), lambda fd=fd: fd, disk_size=0
        )
        for i in range(1024):
            cache.write(f, i * MIB, data)
        os.sync()
        v0, s0, r0 = vmstat(), cpustat(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        cache.flush(f, start_io=True)
        t1 = time.perf_counter()
        v1, s1, r1 = vmstat(), cpustat(), resource.getrusage(resource.RUSAGE_SELF)
        os.fsync(fd)
        t2 = time.perf_counter()
        d = [b - a for a, b in zip(s0, s1, strict=True)]
        busy = 100 - 100 * (d[3] + d[4]) / max(1, sum(d))
        print(
            f"run {run + 1}: flush {t1 - t0:.3f} s, CPUs {busy:.0f}% busy, this process "
            f"user {r1.ru_utime - r0.ru_utime:.2f} s system {r1.ru_stime - r0.ru_stime:.2f} s; "
            f"fsync {t2 - t1:.3f} s",
            flush=True,
        )
        print("      ", {k: v1[k] - v0[k] for k in KEYS if k in v0}, flush=True)
        cache.release(f)
        os.unlink(path)


if __name__ == "__main__":
    main()
