#!/usr/bin/env python3
"""What people do all day, on keyfence, gocryptfs, ext4+fscrypt and the plain disk.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_everyday.py [--quick] [--json PATH] [--runs 3]
        [--systems keyfence,gocryptfs,fscrypt,disk] [--scratch /var/tmp]
        [--tree full|small] [--stdlib DIR] [--sqlite-tx 10000] [--fio-mib 256]
        [--fio-io-mib 80] [--before TREE]
        (also keyfence-nospin: keyfence whose loop never spins for the next request;
        keyfence-uring: keyfence taking requests through io_uring, the kernel's
        fuse.enable_uring set while it mounts;
        gocryptfs-allow-other: gocryptfs shared with other users, default_permissions)

The peers (keyfence.testing.bench.peers) are set up over the same disk as for
bench/fs_compare.py (keyfence through its real daemon and worker with an
e4crypt key in this run's session keyring).  One run of one system is the
whole day, in order; the runs interleave the systems (run 1 of every
system, then run 2, ...); figures are medians:

* ``extract``: ``tar -xf`` of a tarball of this Python's standard library
  (about 2,500 files and 58 MB without ``__pycache__`` and ``site-packages``;
  ``--tree small`` or ``--quick``: four packages, about 100 files).
  Debian's own Python ships its ``test`` package apart (about 720 files,
  14 MB): ``--stdlib`` takes the tree from another interpreter's
  standard library, for figures comparable across interpreters; s.
* ``find``: ``find TREE -type f`` of the tree just extracted (caches as
  the extraction left them); s.
* ``grep``: ``grep -r -c import TREE``: reads every file; s.
* ``git-add-commit``: ``git init``, ``git add -A``, ``git commit`` of the
  tree (a repository inside the mount); s.
* ``git-status``: ``git status`` after appending a line to every tenth file;
  s.  ``git-commit-a``: then ``git commit -a``; s.
* ``rm``: ``rm -rf`` of the tree and its repository; s.
* ``sqlite``: 10,000 transactions of one small ``INSERT`` each, ``PRAGMA
  synchronous=FULL`` (rollback journal, the default); transactions/s.
* ``fio-randwrite``: fio, random 4 KiB ``pwrite``s (psync, one job) into an
  existing file, then fsync; MB/s from the wall time of the whole fio run.

Ratios are "times better" (> 1: keyfence faster): gocryptfs' time ÷
keyfence's, or keyfence's rate ÷ gocryptfs'.  A peer that fails a step is
an error row for that step and skips the rest of its day.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keyfence.testing.bench.everyday import day, make_tarball, sh
from keyfence.testing.bench.peers import (
    MIB,
    DiskPeer,
    FscryptPeer,
    GocryptfsAllowOtherPeer,
    GocryptfsPeer,
    KeyfenceNoSpinPeer,
    KeyfencePeer,
    KeyfenceUringPeer,
    Peer,
    PeerError,
)
from keyfence.testing.bench.process import (
    Interrupted,
    die_with_parent,
    lead_own_session,
    raise_interrupted,
)
from keyfence.testing.bench.quiet import wait_for_quiet_disks
from keyfence.testing.bench.results import error, ratio, report, result, rotated, write_json

SYSTEMS = ["keyfence", "gocryptfs", "fscrypt", "disk"]


class KeyfenceBeforePeer(KeyfencePeer):
    """keyfence from another tree (``--before TREE``: ``git archive COMMIT src
    | tar -x -C TREE``): its daemon and worker import ``TREE/src``."""

    name = "keyfence-before"

    def __init__(self, scratch: Path, tree: str) -> None:
        super().__init__(scratch)
        self.env["PYTHONPATH"] = str(Path(tree).resolve() / "src")


STEPS = ("extract", "find", "grep", "git-add-commit", "git-status", "git-commit-a", "rm")
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", flush=True)


def sqlite_tx(peer: Peer, transactions: int) -> float:
    path = peer.work / "everyday.sqlite"
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        row = os.urandom(100)
        t = time.perf_counter()
        for _ in range(transactions):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (v) VALUES (?)", (row,))
            db.execute("COMMIT")
        took = time.perf_counter() - t
        (count,) = db.execute("SELECT count(*) FROM t").fetchone()
    except sqlite3.Error as err:
        raise PeerError(f"sqlite: {err}") from err
    finally:
        db.close()
    if count != transactions:
        raise PeerError(f"sqlite: {count} rows after {transactions} transactions")
    os.unlink(path)
    return transactions / took


def fio_randwrite(peer: Peer, file_mib: int, io_mib: int, seed: int) -> float:
    path = peer.work / "everyday.fio"
    if not path.exists() or path.stat().st_size != file_mib * MIB:
        chunk = os.urandom(MIB)
        with open(path, "wb") as f:
            for _ in range(file_mib):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    argv = [
        "fio", "--name=randwrite", f"--filename={path}", "--rw=randwrite", "--bs=4k",
        f"--size={file_mib}M", f"--io_size={io_mib}M", "--ioengine=psync", "--end_fsync=1",
        "--fallocate=none", f"--randseed={seed}", "--output-format=terse",
    ]  # fmt: skip
    took = sh(argv, cwd=peer.work)
    return io_mib * MIB / took / 1e6


class Everyday:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.peers: dict[str, Peer] = {}
        self.values: dict[tuple[str, str], list[float]] = {}
        self.errors: list[dict[str, str]] = []
        self.failed: dict[str, set[str]] = {}  # system -> "tree", "sqlite", "fio"

    def fail(self, group: str, system: str, err: BaseException, part: str) -> None:
        text = str(err) if isinstance(err, PeerError) else f"{type(err).__name__}: {err}"
        self.errors.append(error(group, system, text))
        self.failed.setdefault(system, set()).add(part)
        say(f"{group} {system}: FAILED: {text}")

    def setup(self) -> None:
        makers: dict[str, Callable[[], Peer]] = {
            "keyfence": lambda: KeyfencePeer(self.scratch),
            "keyfence-nospin": lambda: KeyfenceNoSpinPeer(self.scratch),
            "keyfence-uring": lambda: KeyfenceUringPeer(self.scratch),
            "gocryptfs": lambda: GocryptfsPeer(self.scratch),
            "gocryptfs-allow-other": lambda: GocryptfsAllowOtherPeer(self.scratch),
            "fscrypt": lambda: FscryptPeer(self.scratch, 2 << 30),
            "disk": lambda: DiskPeer(self.scratch),
            "keyfence-before": lambda: KeyfenceBeforePeer(self.scratch, self.args.before),
        }
        for name in self.args.systems:
            peer = makers[name]()
            try:
                peer.setup()
                self.peers[name] = peer
                say(f"{name}: ready at {peer.work}")
            except (OSError, PeerError, subprocess.SubprocessError) as err:
                self.fail("setup", name, err, "all")
                with contextlib.suppress(Exception):
                    peer.teardown()

    def teardown(self) -> None:
        for name, peer in reversed(list(self.peers.items())):
            try:
                peer.teardown()
            except Exception as err:  # cleanup goes on for the others
                say(f"{name}: teardown failed: {err}")
        self.peers.clear()

    def add(self, group: str, system: str, value: float, unit: str) -> None:
        self.values.setdefault((group, system), []).append(value)
        say(f"{group} {system}: {value:,.3f} {unit}")

    def run(self, tarball: Path) -> None:
        a = self.args
        for r in range(a.runs):
            say(f"run {r + 1}/{a.runs}")
            for name in rotated(list(self.peers), r):
                peer = self.peers[name]
                failed = self.failed.get(name, set())
                # the disks quiet first: the run before (another system's, or
                # another benchmark's) is not this one's to pay for
                waited = wait_for_quiet_disks()
                if waited > 1.5:
                    say(f"{name}: waited {waited:.1f} s for the disks to go quiet")
                if "tree" not in failed:
                    try:
                        for step, seconds in day(peer, tarball).items():
                            self.add(step, name, seconds, "s")
                    except (OSError, PeerError, subprocess.SubprocessError) as err:
                        self.fail("tree", name, err, "tree")
                if "sqlite" not in failed:
                    try:
                        self.add("sqlite", name, sqlite_tx(peer, a.sqlite_tx), "tx/s")
                    except (OSError, PeerError) as err:
                        self.fail("sqlite", name, err, "sqlite")
                if "fio" not in failed:
                    try:
                        mbs = fio_randwrite(peer, a.fio_mib, a.fio_io_mib, seed=r + 1)
                        self.add("fio-randwrite", name, mbs, "MB/s")
                    except (OSError, PeerError, subprocess.SubprocessError) as err:
                        self.fail("fio-randwrite", name, err, "fio")
            for peer in self.peers.values():
                with contextlib.suppress(OSError):
                    os.unlink(peer.work / "everyday.fio")

    def rows(self, notes: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        units = {"sqlite": ("tx/s", True), "fio-randwrite": ("MB/s", True)}
        for group in [*STEPS, "sqlite", "fio-randwrite"]:
            unit, higher = units.get(group, ("s", False))
            for name in self.args.systems:
                runs = self.values.get((group, name))
                # a system that failed part-way has fewer runs: not comparable
                if runs and len(runs) == self.args.runs:
                    rows.append(
                        result(group, name, unit, runs, higher_is_better=higher, note=notes[group])
                    )
        medians = {(r["group"], r["system"]): r for r in rows}
        for row in rows:
            if row["system"] != "keyfence":
                continue
            ratios = {}
            for peer in ("gocryptfs", "gocryptfs-allow-other", "fscrypt", "disk"):
                other = medians.get((row["group"], peer))
                if other is not None:
                    value = ratio(row["median"], other["median"], row["higher_is_better"])
                    if value is not None:
                        ratios[peer] = value
            if ratios:
                row["ratios"] = ratios
        return rows


def table(results: list[dict[str, Any]], errors: list[dict[str, str]]) -> str:
    head = f"{'group':<16} {'system':<10} {'median':>10} {'min':>10} {'max':>10} {'unit':<6}"
    lines = [f"{head} ratios"]
    for r in results:
        text = " ".join(f"{k} {v:.2f}x" for k, v in (r.get("ratios") or {}).items())
        lines.append(
            f"{r['group']:<16} {r['system']:<10} {r['median']:>10,.3f} {r['min']:>10,.3f} "
            f"{r['max']:>10,.3f} {r['metric']:<6} {text}"
        )
    lines.append("ratios: times better than that system (> 1: keyfence faster)")
    lines += [f"ERROR {e['group']} {e['system']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small tree, few transactions (CI)")
    p.add_argument("--json", help="write the results (bench/results schema) here")
    p.add_argument("--runs", type=int, help="runs per system (3; quick: 1)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--scratch", default="/var/tmp", help="a directory on the disk to compare on")
    p.add_argument("--tree", choices=("full", "small"), help="full stdlib, or four packages")
    p.add_argument("--stdlib", type=Path, help="the standard library to extract (this Python's)")
    p.add_argument(
        "--before", metavar="TREE", help="also keyfence-before: the daemon and worker of TREE/src"
    )
    p.add_argument("--sqlite-tx", type=int, help="transactions (10000; quick: 100)")
    p.add_argument("--fio-mib", type=int, help="size of fio's file, MiB (256; quick: 8)")
    p.add_argument("--fio-io-mib", type=int, help="MiB of random writes (80; quick: 1)")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.tree = a.tree or ("small" if a.quick else "full")
    a.sqlite_tx = a.sqlite_tx or (100 if a.quick else 10000)
    a.fio_mib = a.fio_mib or (8 if a.quick else 256)
    a.fio_io_mib = a.fio_io_mib or (1 if a.quick else 80)
    a.systems = [s for s in a.systems.split(",") if s]
    if a.before and "keyfence-before" not in a.systems:
        a.systems.insert(1, "keyfence-before")
    known = {*SYSTEMS, "keyfence-nospin", "keyfence-uring", "gocryptfs-allow-other"}
    known |= {"keyfence-before"} if a.before else set()
    unknown = set(a.systems) - known
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if a.stdlib is not None and not (a.stdlib / "os.py").is_file():
        p.error(f"--stdlib {a.stdlib}: not a Python standard library (no os.py)")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    status = lead_own_session(__file__, argv)
    if status is not None:
        return status
    die_with_parent()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupted)
    if os.geteuid() != 0:
        print("fs_everyday: needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    errors: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    missing = [cmd for cmd in ("tar", "find", "grep", "git", "fio") if shutil.which(cmd) is None]
    with tempfile.TemporaryDirectory(prefix="kf-everyday-", dir=args.scratch) as scratch:
        tarball = Path(scratch) / "stdlib.tar"
        files, size = make_tarball(tarball, args.tree == "small", args.stdlib)
        say(f"fs-everyday: tree of {files:,} files, {size / 1e6:.1f} MB; {args.runs} run(s)")
        notes = {
            "extract": f"tar -xf of {files:,} files, {size / 1e6:.1f} MB (Python's stdlib)",
            "find": "find -type f of the tree",
            "grep": "grep -r -c import over the tree",
            "git-add-commit": "git init, add -A, commit of the tree",
            "git-status": "git status after appending to every tenth .py file",
            "git-commit-a": "git commit -a of those changes",
            "rm": "rm -rf of the tree and its repository",
            "sqlite": f"{args.sqlite_tx} one-INSERT transactions, synchronous=FULL",
            "fio-randwrite": f"fio psync 4 KiB random writes, {args.fio_io_mib} MiB into "
            f"{args.fio_mib} MiB, end_fsync",
        }
        bench = Everyday(args, Path(scratch))
        for cmd in missing:
            bench.errors.append(error("setup", "-", f"{cmd} is not installed"))
            if cmd == "fio":
                for system in args.systems:
                    bench.failed.setdefault(system, set()).add("fio")
        interrupted = None
        try:
            if not (set(missing) - {"fio"}):
                bench.setup()
                bench.run(tarball)
        except Interrupted as err:
            interrupted = err
            say(f"interrupted ({err}); cleaning up")
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            bench.teardown()
        if interrupted is not None:
            return 130
        rows = bench.rows(notes)
        errors = bench.errors
    doc = report(
        "fs-everyday",
        quick=args.quick,
        results=rows,
        errors=errors,
        machine_path=args.scratch,
        params={
            "runs": args.runs,
            "tree": args.tree,
            "tree_files": files,
            "tree_bytes": size,
            "sqlite_tx": args.sqlite_tx,
            "fio_mib": args.fio_mib,
            "fio_io_mib": args.fio_io_mib,
            "scratch": args.scratch,
        },
        load_average=os.getloadavg(),
    )
    print(table(doc["results"], doc["errors"]), flush=True)
    if args.json:
        write_json(args.json, doc)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
