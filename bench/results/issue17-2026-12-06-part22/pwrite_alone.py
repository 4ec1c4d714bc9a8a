#!/usr/bin/env python3
"""1 GiB of 1 MiB buffered pwrites at the lock's record offsets, then fsync,
alone (no sealing beside them): what the lock's store path costs on this
disk by itself.  Scratch for docs/performance.md, part 22; root, with a
scratch filesystem at /mnt/kfbench."""

import os
import time

MIB = 1 << 20
BATCH = 256 * 4112  # a batch of 256 records (docs/format.md)
buf = os.urandom(MIB)
for _ in range(3):
    path = "/mnt/kfbench/pw.bin"
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    os.sync()
    t = time.perf_counter()
    for i in range(1024):
        os.pwrite(fd, buf, 24 + i * BATCH)
    wrote = time.perf_counter() - t
    t = time.perf_counter()
    os.fsync(fd)
    synced = time.perf_counter() - t
    os.close(fd)
    os.unlink(path)
    print(
        f"pwrite 1 GiB: {wrote * 1000:.0f} ms ({wrote * 1e6 / 1024:.0f} us/MiB),"
        f" then fsync {synced * 1000:.0f} ms, both {(wrote + synced) * 1000:.0f} ms"
    )
