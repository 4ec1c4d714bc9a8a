#!/usr/bin/env python3
"""What filling 1 GiB of a backing file's page cache costs here (part 20).

Usage (root): python3 page_cache_fill.py /mnt/kfbench

* pwrite: 1 MiB ``pwrite``s from one hot buffer (the lock's store: the
  copy into new page-cache pages), CPU of the phase, then ``fsync``;
* mmap: ``posix_fallocate``, a shared mapping, each MiB populated for
  writing (``MADV_POPULATE_WRITE``) and/or copied into (where a sealer
  would write its records directly), then ``msync`` + ``fsync``;
* anonymous: 1 GiB of anonymous memory populated, after pauses of 0-10 s
  (does this VM's free-page reporting make fresh pages dearer?).
"""

import mmap
import os
import resource
import sys
import time

MIB = 1 << 20
N = 1024
DIR = sys.argv[1]
MADV_POPULATE_WRITE = 23
src = mmap.mmap(-1, MIB)
src.write(os.urandom(MIB))


def drop() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def by_pwrite() -> None:
    path = os.path.join(DIR, "a")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    drop()
    t0, c0 = time.perf_counter(), cpu()
    for i in range(N):
        os.pwrite(fd, src, i * MIB)
    t1, c1 = time.perf_counter(), cpu()
    os.fsync(fd)
    t2 = time.perf_counter()
    os.close(fd)
    os.unlink(path)
    times = f"phase {t1 - t0:.3f} s (cpu {c1 - c0:.3f}), fsync {t2 - t1:.3f}, total {t2 - t0:.3f}"
    print(f"pwrite              {times}", flush=True)


def by_mmap(populate: bool, copy: bool) -> None:
    path = os.path.join(DIR, "b")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    drop()
    t0, c0 = time.perf_counter(), cpu()
    os.posix_fallocate(fd, 0, N * MIB)
    m = mmap.mmap(fd, N * MIB, mmap.MAP_SHARED)
    for i in range(N):
        if populate:
            m.madvise(MADV_POPULATE_WRITE, i * MIB, MIB)
        if copy:
            m[i * MIB : (i + 1) * MIB] = src
    t1, c1 = time.perf_counter(), cpu()
    m.flush()
    os.fsync(fd)
    t2 = time.perf_counter()
    m.close()
    os.close(fd)
    os.unlink(path)
    times = f"phase {t1 - t0:.3f} s (cpu {c1 - c0:.3f}), sync {t2 - t1:.3f}, total {t2 - t0:.3f}"
    print(f"mmap populate={populate:d} copy={copy:d} {times}", flush=True)


def anonymous() -> None:
    for pause in (0, 0, 5, 0, 10, 0):
        time.sleep(pause)
        m = mmap.mmap(-1, 1 << 30)
        t = time.perf_counter()
        m.madvise(MADV_POPULATE_WRITE)
        took = time.perf_counter() - t
        m.close()
        print(f"anonymous 1 GiB populated after a {pause:2d} s pause: {took:.3f} s", flush=True)


for _ in range(3):
    by_pwrite()
    by_mmap(True, True)
    by_mmap(False, True)
    by_mmap(True, False)
anonymous()
