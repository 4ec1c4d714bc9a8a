#!/usr/bin/env python3
"""The lock with 1 GiB dirty, seen from the disk and from the worker's threads.

Scratch for docs/performance.md, part 22.  Run from a worktree with
instrumentation.diff applied (it prints ``TIMING`` lines in the worker's
log), as root, with a scratch filesystem at /mnt/kfbench::

    PYTHONPATH=<worktree>/src .venv/bin/python lock_timeline.py RUNS [--fork]

Each run: a test mount (2 GiB dirty limit, an hour's expiry), 1 GiB written
through it into a file that stays open, ``sync``, then the key removed
(timed) while a thread samples /sys/block/loop0/stat every 5 ms; then the
same GiB written to a plain file and ``syncfs`` (timed, sampled alike).
``--fork`` runs ``true`` through subprocess between the sync and the
removal: the child's close of the inherited descriptor is a FUSE FLUSH,
which writes the file back before the removal (the removal then finds
0 MiB dirty).
"""

import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount

MIB = 1 << 20
libc = ctypes.CDLL(None)


def sectors() -> tuple[int, int]:
    with open("/sys/block/loop0/stat") as stat:
        f = stat.read().split()
    return int(f[6]), int(f[8])  # sectors written, requests in flight


class Sampler:
    def __init__(self) -> None:
        self.rows: list[tuple[float, int, int]] = []
        self.stop = False

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop:
            w, inflight = sectors()
            self.rows.append((time.perf_counter() - t0, w, inflight))
            time.sleep(0.005)

    def __enter__(self) -> "Sampler":
        self.th = threading.Thread(target=self.run)
        self.th.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop = True
        self.th.join()

    def summary(self) -> str:
        w0 = self.rows[0][1]
        total = (self.rows[-1][1] - w0) * 512 / MIB
        first = next((t for t, w, _ in self.rows if w > w0), 0.0)
        marks = [
            next((t for t, w, _ in self.rows if (w - w0) * 512 / MIB >= q * total), 0.0)
            for q in (0.1, 0.5, 0.9, 0.99)
        ]
        return (
            f"{total:.0f} MiB to disk, first write {first * 1000:.0f} ms, 10/50/90/99 % at "
            + "/".join(f"{m * 1000:.0f}" for m in marks)
            + " ms"
        )


def threads(pid: int) -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            st = stat.read()
        name = st[st.index("(") + 1 : st.rindex(")")]
        f = st[st.rindex(")") + 2 :].split()
        out[(tid, name)] = (int(f[11]), int(f[12]))
    return out


def run(tmp: str, fork: bool) -> None:
    m = Mount(Path(tmp), "--dirty-limit", "2048M", "--dirty-expire", "3600", name="l")
    try:
        master = MasterKey(os.urandom(64))
        serial = m.add_key(master)
        enc = m.mnt / "enc"
        enc.mkdir()
        os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
        chunk = os.urandom(MIB)
        with open(enc / "dirty", "wb", buffering=0) as f:
            for _ in range(1024):
                f.write(chunk)
            os.sync()
            if fork:
                subprocess.run(["true"], check=True)
                time.sleep(1.5)
            before = threads(m.proc.pid)
            with Sampler() as removal:
                t = time.perf_counter()
                m.unlink_key(serial)
                took = time.perf_counter() - t
            after = threads(m.proc.pid)
        p = Path(tmp) / "plain"
        with open(p, "wb", buffering=0) as f:
            for _ in range(1024):
                f.write(chunk)
        with Sampler() as sync:
            t = time.perf_counter()
            fd = os.open(tmp, os.O_RDONLY)
            libc.syncfs(fd)
            os.close(fd)
            plain = time.perf_counter() - t
        os.unlink(p)
    finally:
        m.unmount()
    cpu = ", ".join(
        f"{k[1]} u{(v[0] - was[0]) * 10}/s{(v[1] - was[1]) * 10}"
        for k, v in after.items()
        if v != (was := before.get(k, (0, 0)))
    )
    log = [line.split("TIMING ", 1)[1] for line in m.log().splitlines() if "TIMING " in line]
    print(f"removal {took * 1000:.0f} ms: {removal.summary()}")
    print(f"  syncfs {plain * 1000:.0f} ms: {sync.summary()}; ratio {took / plain:.2f}")
    print(f"  worker threads' CPU ms (user/sys, exited threads not shown): {cpu}")
    for line in log:
        print(f"  {line}")


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        with tempfile.TemporaryDirectory(dir="/mnt/kfbench") as tmp:
            run(tmp, "--fork" in sys.argv)
    sys.stdout.flush()
