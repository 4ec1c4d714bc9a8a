#!/usr/bin/env python3
"""One request's round trip and an ``rm -rf``, through /dev/fuse and io_uring.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_uring.py [--tmp /mnt/kfbench] [--runs 3]
        [--calls 20000] [--files 2000]

Three real workers (keyfence.testing's Mount, keyfence's own loop) over the
same disk: ``devfuse`` (its loop reading /dev/fuse, spinning for the next
request as mounted), ``devfuse-nospin`` (``--spin-us 0``) and ``uring``
(requests through one io_uring queue per CPU, fs/fuse/ring.py; the kernel's
``fuse.enable_uring`` set while it mounts, then put back) and
``uring-nospin`` (the same, ``--spin-us 0``: no CPU kept busy,
fs/fuse/_awake.c).  For each, in
turns, medians of ``--runs``:

* ``statfs``: microseconds per ``statvfs`` of the mount in a loop of
  ``--calls`` (a request that always reaches the worker, answered at once:
  the loop's own cost and the wakes), and ``moves``: how many times the
  calling process was moved to another CPU meanwhile (se.nr_migrations);
* ``find``, ``rm -rf``: of ``--files`` files of 100 bytes in an encrypted
  directory, seconds (``rm -rf`` also sends a forget per file, which come
  through /dev/fuse either way).

docs/performance.md, "Everyday speed, part 27", reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keyfence.testing.mounting import Mount, fuse_uring, fuse_uring_available

STATFS_LOOP = (
    "import os, sys, time\n"
    "n = int(sys.argv[2])\n"
    "t = time.perf_counter()\n"
    "for _ in range(n): os.statvfs(sys.argv[1])\n"
    "us = (time.perf_counter() - t) / n * 1e6\n"
    "moves = [l for l in open('/proc/self/sched') if l.startswith('se.nr_migrations')]\n"
    "print(us, moves[0].split()[-1] if moves else -1)\n"
)

SYSTEMS = {
    "devfuse": (False, ()),
    "devfuse-nospin": (False, ("--spin-us", "0")),
    "uring": (True, ()),
    "uring-nospin": (True, ("--spin-us", "0")),
}


def _mount(
    stack: contextlib.ExitStack, tmp: Path, name: str, uring: bool, args: tuple[str, ...]
) -> tuple[Mount, Path]:
    with fuse_uring(uring):
        m = Mount(tmp, "--fuse-loop=keyfence", *args, name=name)
        stack.callback(m.unmount)
        if uring:  # the queues register just after INIT, while enable_uring is on
            deadline = time.monotonic() + 10
            while m.control("queues") is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: the worker took no io_uring queues")
                time.sleep(0.05)
            time.sleep(0.5)
    return m, m.encrypted_dir()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--files", type=int, default=2000)
    a = p.parse_args()
    why = fuse_uring_available()
    if why is not None:
        print(f"io_uring: {why}", file=sys.stderr)
        return 2
    results: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=a.tmp)))
        mounts = {name: _mount(stack, tmp, name, *how) for name, how in SYSTEMS.items()}
        for run in range(a.runs):
            for name, (m, enc) in mounts.items():
                out = subprocess.run(
                    [sys.executable, "-c", STATFS_LOOP, str(m.mnt), str(a.calls)],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                results.setdefault((name, "statfs us"), []).append(float(out[0]))
                results.setdefault((name, "moves"), []).append(float(out[1]))
                tree = enc / f"tree{run}"
                tree.mkdir()
                for i in range(a.files):
                    (tree / f"f{i}").write_bytes(b"x" * 100)
                for step, cmd in (
                    ("find s", ["find", str(tree)]),
                    ("rm -rf s", ["rm", "-rf", str(tree)]),
                ):
                    t = time.perf_counter()
                    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
                    results.setdefault((name, step), []).append(time.perf_counter() - t)
    for (name, what), values in results.items():
        shown = ", ".join(f"{v:.4g}" for v in values)
        print(f"{name:16} {what:10} {statistics.median(values):10.4g}  ({shown})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
