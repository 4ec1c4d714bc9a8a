#!/usr/bin/env python3
"""Small files with the server on its client's CPU, and without: keyfence and gocryptfs.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_placement.py [--tmp DIR] [--files 3000] [--runs 3] [--cpu 1]

One process makes ``--files`` files of 4 KiB (``open(O_CREAT)``, one
``write``, ``close``: bench/fs_smallfiles.py's loop, without its syncfs) on
each system under three placements:

* ``free``: nothing pinned, as a benchmark (and a user) runs;
* ``client``: the creating process pinned to ``--cpu`` (``sched_setaffinity``),
  the server free;
* ``together``: the creating process and every thread of the server pinned
  to ``--cpu``: each answer wakes its caller on the CPU it was sent from.

Systems: ``keyfence`` (the test launcher's mount, its loop as a mount
makes it: spinning for the next request), ``keyfence-nospin`` (``--spin-us
0``) and ``gocryptfs``.  Every run visits every pair in turn.  Printed:
files/s, median (each run).  docs/performance.md, part 26, reads it: on a
VM whose idle vCPUs halt, where each side of a request runs decides more
than what either side does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keyfence.testing.bench.peers import GocryptfsPeer, PeerError
from keyfence.testing.mounting import Mount

PLACEMENTS = ("free", "client", "together")
BLOCK = b"\xa5" * 4096
CREATE = r"""
import os, sys, time
directory, count, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
block = bytes.fromhex(sys.argv[4])
flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC
start = time.perf_counter()
for i in range(count):
    fd = os.open(f"{directory}/file{i}", flags, 0o644)
    os.write(fd, block)
    os.close(fd)
print(count / (time.perf_counter() - start))
"""


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def one_run(directory: Path, pid: int, placement: str, files: int, cpu: int) -> float:
    everywhere = set(range(os.cpu_count() or 1))
    work = directory / f"run{time.monotonic_ns()}"
    work.mkdir()
    pin(pid, {cpu} if placement == "together" else everywhere)
    try:
        out = subprocess.run(
            [
                sys.executable, "-c", CREATE, str(work), str(files),
                str(cpu if placement != "free" else -1), BLOCK.hex(),
            ],
            capture_output=True, text=True, check=True, timeout=600,
        ).stdout  # fmt: skip
    finally:
        pin(pid, everywhere)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return float(out)


def _keyfence(
    stack: contextlib.ExitStack, tmp: Path, name: str, args: list[str]
) -> tuple[Path, int]:
    """An encrypted directory of a fresh mount (the test launcher's worker)
    and the worker's pid."""
    m = Mount(tmp, *args, name=name)
    stack.callback(m.unmount)
    enc, _ = m.encrypted_dir()
    assert m.proc is not None
    return enc, m.proc.pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cpu", type=int, default=1)
    a = p.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=a.tmp)))
        targets: dict[str, tuple[Path, int]] = {}
        for name, args in (("keyfence", []), ("keyfence-nospin", ["--spin-us", "0"])):
            targets[name] = _keyfence(stack, tmp, name, args)
        gocryptfs = GocryptfsPeer(tmp)
        stack.callback(gocryptfs.teardown)
        try:
            gocryptfs.setup()
        except PeerError as err:
            print(f"gocryptfs: {err}, skipped", flush=True)
        else:
            assert gocryptfs.process is not None
            targets["gocryptfs"] = gocryptfs.work, gocryptfs.process.pid
        for _ in range(a.runs):
            for name, (directory, pid) in targets.items():
                for placement in PLACEMENTS:
                    rate = one_run(directory, pid, placement, a.files, a.cpu)
                    results.setdefault((name, placement), []).append(rate)
    for (name, placement), rates in results.items():
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{name:16} {placement:9} {statistics.median(rates):8,.0f} files/s  ({shown})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
