#!/usr/bin/env python3
"""What one request costs a lone client: keyfence, keyfence not spinning, gocryptfs.

Usage (root, from the repository root)::

    .venv/bin/python bench/request_latency.py [--runs 3] [--calls 5000]

The same peers as bench/fs_compare.py (keyfence through its real daemon and
worker; ``keyfence-nospin`` is keyfence mounted with ``-o spin_us=0``, its
request loop sleeping whenever the queue is empty).  One process makes one
call after another, as a database or ``git`` does; figures are microseconds
of wall time per call (per transaction for SQLite), medians of the runs,
the systems interleaved run by run:

* ``getxattr``: a missing ``user.`` attribute of one file (one request);
* ``negative lookup``: ``stat`` of a name never seen (one LOOKUP each);
* ``open+read+close``: a 10 KB file, cached (OPEN, READ, RELEASE);
* ``listdir+stat``: a directory of 20 files (OPENDIR, READDIRPLUS x2,
  RELEASEDIR, GETATTR);
* ``pwrite 4 KiB``: random aligned writes into a 64 MiB file (one WRITE);
* ``sqlite tx``: one INSERT per transaction, ``synchronous=FULL``
  (~35 requests, three fsyncs).

docs/performance.md ("Everyday speed, part 4") has the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from keyfence.testing.bench.peers import GocryptfsPeer, KeyfenceNoSpinPeer, KeyfencePeer, Peer

Probe = Callable[[Path, int], None]


def getxattr(work: Path, calls: int) -> None:
    path = work / "x"
    for _ in range(calls):
        with contextlib.suppress(OSError):
            os.getxattr(path, "user.nope")


def negative_lookup(work: Path, calls: int) -> None:
    base = f"missing-{time.monotonic_ns()}-"
    for i in range(calls):
        with contextlib.suppress(FileNotFoundError):
            os.stat(work / f"{base}{i}")


def open_read_close(work: Path, calls: int) -> None:
    path = work / "x"
    for _ in range(calls):
        with open(path, "rb") as f:
            f.read(100)


def listdir_stat(work: Path, calls: int) -> None:
    d = work / "d"
    for _ in range(calls):
        os.listdir(d)
        os.stat(d)


def pwrite_4k(work: Path, calls: int) -> None:
    fd = os.open(work / "big", os.O_RDWR)
    block = os.urandom(4096)
    pages = random.Random(1)
    try:
        for _ in range(calls):
            os.pwrite(fd, block, pages.randrange(16384) * 4096)
    finally:
        os.close(fd)


def sqlite_tx(work: Path, calls: int) -> None:
    db = sqlite3.connect(work / "t.db", isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        for i in range(calls):
            db.execute("BEGIN")
            db.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 100))
            db.execute("COMMIT")
    finally:
        db.close()


PROBES: dict[str, tuple[Probe, int]] = {
    # name: (probe, share of --calls it makes)
    "getxattr": (getxattr, 1),
    "negative lookup": (negative_lookup, 1),
    "open+read+close": (open_read_close, 5),
    "listdir+stat": (listdir_stat, 10),
    "pwrite 4 KiB": (pwrite_4k, 1),
    "sqlite tx": (sqlite_tx, 20),
}


def prepare(work: Path) -> None:
    (work / "x").write_bytes(b"a" * 10000)
    (work / "d").mkdir()
    for i in range(20):
        (work / "d" / f"f{i}").write_bytes(b"x")
    with open(work / "big", "wb") as f:
        f.truncate(64 << 20)
    db = sqlite3.connect(work / "t.db", isolation_level=None)
    db.execute("CREATE TABLE t (a, b)")
    db.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", type=int, default=5000)
    a = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kf-latency-", dir="/var/tmp"))
    peers: dict[str, Peer] = {}
    try:
        for name, make in (
            ("keyfence", KeyfencePeer),
            ("keyfence-nospin", KeyfenceNoSpinPeer),
            ("gocryptfs", GocryptfsPeer),
        ):
            (scratch / name).mkdir()
            peer = make(scratch / name)
            peer.setup()
            peers[name] = peer
            prepare(peer.work)
        figures: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.runs):
            for probe_name, (probe, share) in PROBES.items():
                calls = max(1, a.calls // share)
                for name, peer in peers.items():
                    t = time.perf_counter()
                    probe(peer.work, calls)
                    took = (time.perf_counter() - t) / calls * 1e6
                    figures.setdefault((probe_name, name), []).append(took)
        names = list(peers)
        print(f"{'us per call, median of ' + str(a.runs):28}" + "".join(f"{n:>18}" for n in names))
        for probe_name in PROBES:
            row = [statistics.median(figures[(probe_name, n)]) for n in names]
            print(f"{probe_name:28}" + "".join(f"{v:18.1f}" for v in row))
    finally:
        for peer in peers.values():
            with contextlib.suppress(Exception):
                peer.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
