#!/usr/bin/env python3
"""Where each thread of the lock's write-back spends a 1 GiB flush (part 20).

Usage (root), for the tree on PYTHONPATH:
    PYTHONPATH=TREE/src .venv/bin/python writeback_threads.py /mnt/kfbench

As ``bench/writeback_lock.py`` (1 GiB dirty, ``flush(start_io=True)``),
four times; per thread of the pass: wall time inside ``pwrite`` (the store,
under the cache's lock), inside the sealing, and inside the zeroing of the
written plaintext.  What is left of the flush's wall time is each thread's
Python between them and its waiting (for the lock, for its turn).
"""

import os
import sys
import threading
import time

from keyfence.fs import writeback
from keyfence.fs.crypto import MasterKey
from keyfence.fs.pagecache import DEFAULT_CHUNK_PAGES, PageCache

MIB = 1 << 20
spent: dict[str, dict[int, float]] = {"pwrite": {}, "seal": {}, "zero": {}}


def timed(kind: str, call):  # type: ignore[no-untyped-def]
    def wrapper(*args):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return call(*args)
        finally:
            table = spent[kind]
            me = threading.get_ident()
            table[me] = table.get(me, 0.0) + time.perf_counter() - t

    return wrapper


class _Os:
    """``os`` for fs/writeback.py, with its ``pwrite`` timed."""

    pwrite = staticmethod(timed("pwrite", os.pwrite))

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(os, name)


writeback.os = _Os()  # type: ignore[assignment]
writeback._encrypt_batch = timed("seal", writeback._encrypt_batch)
writeback.zero_pages = timed("zero", writeback.zero_pages)

data = os.urandom(MIB)
for run in range(4):
    for table in spent.values():
        table.clear()
    cache = PageCache(dirty_limit=1088 * MIB, expire=1e9, chunk_pages=DEFAULT_CHUNK_PAGES)
    path = os.path.join(sys.argv[1], "cached")
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    f = cache.open(1, "keyfence:bench", MasterKey(os.urandom(64)), lambda fd=fd: fd, disk_size=0)
    for i in range(1024):
        cache.write(f, i * MIB, data)
    os.sync()
    t = time.perf_counter()
    cache.flush(f, start_io=True)
    took = time.perf_counter() - t
    threads = sorted(spent["pwrite"])
    parts = [
        "/".join(f"{spent[k].get(th, 0.0):.3f}" for k in ("pwrite", "seal", "zero"))
        for th in threads
    ]
    per_thread = ", ".join(parts)
    print(f"run {run + 1}: flush {took:.3f} s; per thread pwrite/seal/zero s: {per_thread}")
    cache.release(f)
    os.unlink(path)
