#!/usr/bin/env python3
"""What people do all day, on keyfence, gocryptfs, ext4+fscrypt and the plain disk.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_everyday.py [--quick] [--json PATH] [--runs 3]
        [--systems keyfence,gocryptfs,fscrypt,disk] [--scratch /var/tmp]
        [--tree full|small] [--stdlib DIR] [--sqlite-tx 10000] [--fio-mib 256]
        [--fio-io-mib 80] [--before TREE]
        (also keyfence-nospin: keyfence whose loop never spins for the next request)

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
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keyfence.testing.bench.peers import (
    MIB,
    DiskPeer,
    FscryptPeer,
    GocryptfsPeer,
    KeyfenceNoSpinPeer,
    KeyfencePeer,
    Peer,
    PeerError,
)
from keyfence.testing.bench.process import (
    Interrupted,
    die_with_parent,
    lead_own_session,
    raise_interrupted,
)
from keyfence.testing.bench.results import error, ratio, report, result, write_json

SYSTEMS = ["keyfence", "gocryptfs", "fscrypt", "disk"]


class KeyfenceBeforePeer(KeyfencePeer):
    """keyfence from another tree (``--before TREE``: ``git archive COMMIT src
    | tar -x -C TREE``): its daemon and worker import ``TREE/src``."""

    name = "keyfence-before"

    def __init__(self, scratch: Path, tree: str) -> None:
        super().__init__(scratch)
        self.env["PYTHONPATH"] = str(Path(tree).resolve() / "src")


SMALL_TREE = ("email", "json", "asyncio", "concurrent")
STEPS = ("extract", "find", "grep", "git-add-commit", "git-status", "git-commit-a", "rm")
START = time.perf_counter()
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", flush=True)


def make_tarball(path: Path, small: bool, stdlib: Path | None = None) -> tuple[int, int]:
    """A tarball of the standard library (or four of its packages); (files, bytes).
    ``stdlib``: another interpreter's (``--stdlib``), else this one's."""
    stdlib = stdlib or Path(sysconfig.get_path("stdlib"))

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if name in ("__pycache__", "site-packages") or name.startswith("config-"):
            return None
        return info

    files = size = 0
    with tarfile.open(path, "w") as tar:
        for top in SMALL_TREE if small else sorted(os.listdir(stdlib)):
            tar.add(stdlib / top, arcname=f"stdlib/{top}", filter=keep)
        for member in tar.getmembers():
            if member.isfile():
                files += 1
                size += member.size
    return files, size


def sh(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run ``argv``; its wall time in seconds, or PeerError with its complaint."""
    t = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        check=False,
        timeout=1800,
    )
    took = time.perf_counter() - t
    # grep -c exits 1 when some file has no match: that is not a failure
    if done.returncode != 0 and not (argv[0] == "grep" and done.returncode == 1):
        lines = done.stderr.strip().splitlines()
        raise PeerError(f"{' '.join(argv[:3])}: {lines[-1] if lines else done.returncode}")
    return took


def git(*args: str) -> list[str]:
    return ["git", "-c", "safe.directory=*", "-c", "core.fsmonitor=false", *args]


def touch_every_tenth(tree: Path) -> int:
    n = 0
    for i, path in enumerate(sorted(p for p in tree.rglob("*.py") if ".git" not in p.parts)):
        if i % 10 == 0:
            with open(path, "a") as f:
                f.write("# touched by fs_everyday\n")
            n += 1
    return n


def _untraced(step: str) -> contextlib.AbstractContextManager[object]:
    del step
    return contextlib.nullcontext()


def day(
    peer: Peer,
    tarball: Path,
    around: Callable[[str], contextlib.AbstractContextManager[object]] = _untraced,
) -> dict[str, float]:
    """The tree steps, in order, on ``peer``: seconds per step.  ``around``
    wraps each step (bench/fuse_trace_day.py traces them)."""
    top = peer.work / "day"
    if top.exists():
        shutil.rmtree(top)
    top.mkdir()
    peer.sync()
    out: dict[str, float] = {}
    tree = top / "stdlib"
    with around("extract"):
        out["extract"] = sh(["tar", "-xf", str(tarball)], cwd=top)
    with around("find"):
        out["find"] = sh(["find", str(tree), "-type", "f"], cwd=top)
    with around("grep"):
        out["grep"] = sh(["grep", "-r", "-c", "import", str(tree)], cwd=top)
    with around("git-add-commit"):
        t = time.perf_counter()
        sh(git("init", "-q"), cwd=tree, env=GIT_ENV)
        sh(git("add", "-A"), cwd=tree, env=GIT_ENV)
        sh(git("commit", "-q", "-m", "tree"), cwd=tree, env=GIT_ENV)
        out["git-add-commit"] = time.perf_counter() - t
    touch_every_tenth(tree)
    with around("git-status"):
        out["git-status"] = sh(git("status", "--porcelain"), cwd=tree, env=GIT_ENV)
    with around("git-commit-a"):
        out["git-commit-a"] = sh(git("commit", "-q", "-a", "-m", "touched"), cwd=tree, env=GIT_ENV)
    with around("rm"):
        out["rm"] = sh(["rm", "-rf", str(top)], cwd=peer.work)
    peer.sync()
    return out


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
            "gocryptfs": lambda: GocryptfsPeer(self.scratch),
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
            for name, peer in self.peers.items():
                failed = self.failed.get(name, set())
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
            for peer in ("gocryptfs", "fscrypt", "disk"):
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
    known = {*SYSTEMS, "keyfence-nospin", *(["keyfence-before"] if a.before else [])}
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
