#!/usr/bin/env python3
"""What the disk's cache flush at the end of an fsync costs, and what
flushing behind a long write saves (fs/writebehind.py).

Usage (from the repository root; any user who can write to the scratch)::

    .venv/bin/python bench/flush_cost.py [--scratch DIR] [--mib 64,256,512]
        [--runs 3] [--every 64] [--pace-ms 1.0]

1. For each size: write it to a plain file, start and wait for the disk
   writes (``sync_file_range`` WAIT_BEFORE|WRITE|WAIT_AFTER, no cache
   flush), then ``fdatasync``.  The last step is only the flush of the
   disk's volatile cache (and a journal commit): if it grows with the
   size, the disk's cache holds what was written and the flush writes it.
2. The largest size written at ``--pace-ms`` per MiB (a stand-in for
   sealing: keyfence's write-back stores about one MiB a millisecond),
   disk writes started every 8 MiB, then ``fdatasync``; once plain and once
   with an ``fdatasync`` on a description of its own every ``--every`` MiB,
   on another thread (what keyfence's write-back does).  Medians of the
   total and of the final ``fdatasync``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time

MIB = 1 << 20
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def flush_after_written(path: str, mib: int, data: bytes) -> tuple[float, float, float]:
    """(write, write-out and wait, fdatasync) seconds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(mib):
            os.write(fd, data)
        t1 = time.perf_counter()
        sync_file_range(fd, 0, 0, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        t2 = time.perf_counter()
        os.fdatasync(fd)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    os.sync()
    return t1 - t0, t2 - t1, t3 - t2


def paced_write(path: str, mib: int, data: bytes, pace: float, every: int) -> tuple[float, float]:
    """(total, final fdatasync) seconds; ``every`` MiB a flush behind (0: none)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    behind = os.open(path, os.O_RDONLY)  # a description of its own
    pending: threading.Thread | None = None
    try:
        t0 = time.perf_counter()
        for i in range(mib):
            os.write(fd, data)
            if pace:
                time.sleep(pace)
            if (i + 1) % 8 == 0:
                sync_file_range(fd, (i - 7) * MIB, 8 * MIB, _WRITE)
            if every and (i + 1) % every == 0 and (pending is None or not pending.is_alive()):
                pending = threading.Thread(target=os.fdatasync, args=(behind,))
                pending.start()
        t1 = time.perf_counter()
        os.fdatasync(fd)
        t2 = time.perf_counter()
        if pending is not None:
            pending.join()
    finally:
        os.close(behind)
        os.close(fd)
        os.unlink(path)
    os.sync()
    return t2 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", default="/var/tmp")
    p.add_argument("--mib", default="64,256,512")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--every", type=int, default=64)
    p.add_argument("--pace-ms", type=float, default=1.0)
    a = p.parse_args()
    sizes = [int(m) for m in a.mib.split(",") if m]
    path = os.path.join(a.scratch, f"flush-cost-{os.getpid()}")
    data = os.urandom(MIB)
    for mib in sizes:
        runs = [flush_after_written(path, mib, data) for _ in range(a.runs)]
        w, out, flush = (statistics.median(r[k] for r in runs) for k in range(3))
        print(f"{mib:5d} MiB: write {w:.3f} s, write-out {out:.3f} s, then fdatasync {flush:.3f} s")
    mib = max(sizes)
    res: dict[int, list[tuple[float, float]]] = {0: [], a.every: []}
    for _ in range(a.runs):  # alternated
        for every in res:
            res[every].append(paced_write(path, mib, data, a.pace_ms / 1000, every))
    for every, runs in res.items():
        total = statistics.median(r[0] for r in runs)
        final = statistics.median(r[1] for r in runs)
        how = f"a flush behind every {every} MiB" if every else "no flush behind"
        print(
            f"{mib} MiB at {a.pace_ms} ms/MiB, {how}: "
            f"total {total:.3f} s, final fdatasync {final:.3f} s"
        )


if __name__ == "__main__":
    main()
