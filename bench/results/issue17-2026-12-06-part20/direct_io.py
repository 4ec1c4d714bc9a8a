#!/usr/bin/env python3
"""1 GiB to a fresh file three ways, on the scratch ext4 (part 20).

Usage (root): python3 direct_io.py /mnt/kfbench

* buffered: 1 MiB ``pwrite``s into the page cache, then ``fsync``;
* direct: the same with ``O_DIRECT`` from a page-aligned buffer, one
  request at a time (what the lock's store thread would do), then ``fsync``;
* direct, deeper: 1, 4 or 16 MiB direct writes from 1, 2 or 4 threads;
* syncfs-like: the buffered write untimed, only its ``fsync`` timed (what
  the plain disk's lock costs in ``bench/fs_compare.py``).
"""

import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

MIB = 1 << 20
DIR = sys.argv[1]


def drop() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def one_at_a_time(name: str, flags: int) -> None:
    buf = mmap.mmap(-1, MIB)
    buf.write(os.urandom(MIB))
    path = os.path.join(DIR, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    drop()
    t0 = time.perf_counter()
    for i in range(1024):
        os.pwrite(fd, buf, i * MIB)
    t1 = time.perf_counter()
    os.fsync(fd)
    t2 = time.perf_counter()
    os.close(fd)
    os.unlink(path)
    times = f"write {t1 - t0:.3f} s, fsync {t2 - t1:.3f} s, total {t2 - t0:.3f} s"
    print(f"{name:10} {times}", flush=True)


def deeper(chunk_mib: int, threads: int) -> None:
    size = chunk_mib * MIB
    bufs = [mmap.mmap(-1, size) for _ in range(threads)]
    for b in bufs:
        b.write(os.urandom(size))
    path = os.path.join(DIR, "deeper")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    drop()
    n = 1024 // chunk_mib
    t0 = time.perf_counter()

    def writer(t: int) -> None:
        for i in range(t, n, threads):
            os.pwrite(fd, bufs[t], i * size)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(writer, range(threads)))
    os.fsync(fd)
    took = time.perf_counter() - t0
    os.close(fd)
    os.unlink(path)
    print(f"direct {chunk_mib:2d} MiB x {threads} threads: write + fsync {took:.3f} s", flush=True)


for _ in range(3):
    one_at_a_time("buffered", 0)
    one_at_a_time("direct", os.O_DIRECT)
for _ in range(2):
    for c, t in ((1, 1), (1, 2), (1, 4), (4, 1), (4, 2), (16, 1)):
        deeper(c, t)
