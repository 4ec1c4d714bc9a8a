#!/usr/bin/env python3
"""keyfence's two FUSE loops side by side: the create loop alone.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_loop_ab.py [--files 2000] [--runs 3] [--json PATH]

Two mounts of the real worker (``keyfence.testing.mount_worker``: keys in
an in-process KeyService, no daemon round trips), one per loop
(``--fuse-loop pyfuse3`` and ``keyfence``), each with a plain and an
encrypted directory.  Each run creates ``--files`` files of 4 KiB
(``open(O_CREAT|O_EXCL)``, ``write``, ``close``) in each directory of each
mount, the loops interleaved, and removes them; files/s of the creating
loop alone (no sync), medians.  Then 1 MiB ``write``s of a 64 MiB file
(page cache, no fsync), MB/s.  Each figure also as the worker process's
CPU time (``/proc/PID/stat`` utime + stime, every thread) per file or per
MiB: on a loaded machine wall-clock rates swing with the neighbours, the
CPU the worker spent much less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount

LOOPS = ("pyfuse3", "keyfence")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_loop(d: Path, count: int, pid: int) -> tuple[float, float]:
    """files/s, and the worker's CPU microseconds per file."""
    data = os.urandom(4096)
    cpu = cpu_seconds(pid)
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    took = time.perf_counter() - t
    cpu = cpu_seconds(pid) - cpu
    for i in range(count):
        os.unlink(d / f"f{i:05d}")
    return count / took, cpu / count * 1e6


def big_writes(d: Path, mib: int, pid: int) -> tuple[float, float]:
    """MB/s, and the worker's CPU milliseconds per MiB."""
    block = os.urandom(1 << 20)
    cpu = cpu_seconds(pid)
    t = time.perf_counter()
    fd = os.open(d / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, block)
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    cpu = cpu_seconds(pid) - cpu
    os.unlink(d / "big")
    return mib * (1 << 20) / took / 1e6, cpu / mib * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--write-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kf-loop-ab-", dir="/var/tmp"))
    mounts: dict[str, Mount] = {}
    try:
        for loop in LOOPS:
            m = Mount(tmp, f"--fuse-loop={loop}", "--dirty-expire", "60", name=loop)
            mounts[loop] = m
            master = MasterKey(os.urandom(64))
            m.add_key(master)
            (m.mnt / "plain").mkdir()
            (m.mnt / "enc").mkdir()
            os.setxattr(
                m.mnt / "enc", "user.keyfence.policy", f"keyfence:{master.identifier}".encode()
            )
        figures: dict[str, list[float]] = {}

        def keep(name: str, run: int, value: float, unit: str) -> None:
            if run:
                figures.setdefault(name, []).append(value)
                print(f"run {run} {name}: {value:,.1f} {unit}", flush=True)

        for run in range(a.runs + 1):  # run 0: warm-up, not counted
            for what in ("plain", "enc"):
                for loop in LOOPS:
                    pid = mounts[loop].proc.pid  # type: ignore[union-attr]
                    rate, cpu = create_loop(mounts[loop].mnt / what, a.files, pid)
                    keep(f"create-{what} {loop} files/s", run, rate, "files/s")
                    keep(f"create-{what} {loop} worker-cpu-us/file", run, cpu, "us")
            for loop in LOOPS:
                pid = mounts[loop].proc.pid  # type: ignore[union-attr]
                rate, cpu = big_writes(mounts[loop].mnt / "enc", a.write_mib, pid)
                keep(f"write-1MiB {loop} MB/s", run, rate, "MB/s")
                keep(f"write-1MiB {loop} worker-cpu-ms/MiB", run, cpu, "ms")
        medians = {k: statistics.median(v) for k, v in figures.items()}
        for k, v in medians.items():
            print(f"{k:44s} median {v:10,.1f}  ({', '.join(f'{x:,.1f}' for x in figures[k])})")
        for what in ("create-plain", "create-enc", "write-1MiB"):
            for unit in ("files/s", "worker-cpu-us/file", "MB/s", "worker-cpu-ms/MiB"):
                own = medians.get(f"{what} keyfence {unit}")
                lib = medians.get(f"{what} pyfuse3 {unit}")
                if own is not None and lib is not None:
                    print(f"{what} {unit}: keyfence loop / pyfuse3 = {own / lib:.2f}x")
        if a.json:
            Path(a.json).write_text(json.dumps({"runs": figures, "medians": medians}, indent=1))
    finally:
        for m in mounts.values():
            m.unmount()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
