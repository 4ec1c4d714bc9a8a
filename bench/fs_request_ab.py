#!/usr/bin/env python3
"""The worker's cost per small file: this tree against another commit, and gocryptfs.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_request_ab.py --base HEAD~3 [--files 2000] [--runs 3]

Two mounts of the real worker (``keyfence.testing.mount_worker``: keys in
an in-process KeyService, no daemon round trips), one running the source
tree of ``--base`` (``git archive`` into a temporary directory, its native
parts built there as this tree's are, put first on the worker's
``PYTHONPATH``) and one this tree, each with a plain and an
encrypted directory; and a gocryptfs mount (``--no-gocryptfs`` to leave it
out).  Each run, interleaved: create ``--files`` files of 4 KiB
(``open(O_CREAT|O_EXCL)``, ``write``, ``close``) in each directory; then
read them all back (open, read, close: what ``grep -r`` does); then remove
them (``unlink``).  Figures: files/s of each of the three loops, and the
worker's CPU time per file (``/proc/PID/stat``, every thread), user and
system apart: the user time is the worker's own Python, which load on the
machine changes much less than wall-clock rates; the system time is mostly
the backing filesystem's (an ext4 create swings with the disk's other
users) and the FUSE answers.
Run 0 is a warm-up and not counted; medians of the rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.bench.peers import GocryptfsPeer
from keyfence.testing.mounting import Mount

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), seconds; 0 without one."""
    if pid is None:
        return 0.0, 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def create_files(d: Path, count: int) -> None:
    data = os.urandom(4096)
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)


def read_files(d: Path, count: int) -> None:
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_RDONLY)
        while os.read(fd, 65536):
            pass
        os.close(fd)


def remove_files(d: Path, count: int) -> None:
    for i in range(count):
        os.unlink(d / f"f{i:05d}")


def measure(
    fn: Callable[[Path, int], None], d: Path, count: int, pid: int | None
) -> tuple[float, float, float]:
    """files/s, and the worker's user and system CPU microseconds per file."""
    user, system = cpu_seconds(pid)
    t = time.perf_counter()
    fn(d, count)
    took = time.perf_counter() - t
    user_after, system_after = cpu_seconds(pid)
    return (
        count / took,
        (user_after - user) / count * 1e6,
        (system_after - system) / count * 1e6,
    )


def build_extensions(tree: Path) -> None:
    """Build ``tree``'s native parts (the sealer, the loop) in place, as
    this tree's are: without them its worker would seal and serve in
    Python, and the comparison would be of that, not of the commits."""
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    built = sorted(p.name.split(".")[0] for p in (tree / "src").rglob("_*.so"))
    if "_loop" not in built or "_sealer" not in built:
        raise SystemExit(f"{tree}: native parts not built ({built})")


def keyfence_mount(tmp: Path, name: str, src: Path | None) -> Mount:
    old = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src) + (os.pathsep + old if old else "")
    try:
        m = Mount(tmp, "--dirty-expire", "60", name=name)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    master = MasterKey(os.urandom(64))
    m.add_key(master)
    (m.mnt / "plain").mkdir()
    (m.mnt / "enc").mkdir()
    os.setxattr(m.mnt / "enc", "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", default="HEAD", help="the commit to compare this tree with")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-gocryptfs", action="store_true")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kf-request-ab-", dir="/var/tmp"))
    base_src = tmp / "base"
    base_src.mkdir()
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "archive",
            a.base,
            "src",
            "setup.py",
            "pyproject.toml",
            "README.md",
        ],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive, check=True)
    build_extensions(base_src)
    mounts: dict[str, Mount] = {}
    gocryptfs: GocryptfsPeer | None = None
    try:
        mounts["base"] = keyfence_mount(tmp, "base", base_src / "src")
        mounts["tree"] = keyfence_mount(tmp, "tree", None)
        targets: list[tuple[str, Path, int | None]] = []
        for what in ("plain", "enc"):
            for side in ("base", "tree"):
                m = mounts[side]
                targets.append((f"{side} {what}", m.mnt / what, m.proc.pid if m.proc else None))
        if not a.no_gocryptfs:
            gocryptfs = GocryptfsPeer(tmp / "gocryptfs")
            gocryptfs.setup()
            targets.append(("gocryptfs", gocryptfs.work, None))
        figures: dict[str, list[float]] = {}
        for run in range(a.runs + 1):
            for label, d, pid in targets:
                steps = (("create", create_files), ("read", read_files), ("remove", remove_files))
                for step, fn in steps:
                    rate, user, system = measure(fn, d, a.files, pid)
                    if run:
                        figures.setdefault(f"{step} {label} files/s", []).append(rate)
                        if pid is not None:
                            for unit, cpu in (("user", user), ("sys", system)):
                                key = f"{step} {label} {unit}-us/file"
                                figures.setdefault(key, []).append(cpu)
                        line = f"{rate:,.0f} files/s, user {user:,.0f} + sys {system:,.0f} us"
                        print(f"run {run} {step} {label}: {line}", flush=True)
        med = {k: statistics.median(v) for k, v in figures.items()}
        for k, v in med.items():
            print(f"{k:36s} median {v:10,.1f}  ({', '.join(f'{x:,.1f}' for x in figures[k])})")
        for step in ("create", "read", "remove"):
            for what in ("plain", "enc"):
                for unit in ("user-us/file", "sys-us/file", "files/s"):
                    base = med[f"{step} base {what} {unit}"]
                    tree = med[f"{step} tree {what} {unit}"]
                    print(f"{step} {what} {unit}: tree / base = {tree / base:.2f}x")
                if gocryptfs is not None:
                    go = med[f"{step} gocryptfs files/s"]
                    for side in ("base", "tree"):
                        ratio = med[f"{step} {side} {what} files/s"] / go
                        print(f"{step} {what} files/s: {side} / gocryptfs = {ratio:.2f}x")
    finally:
        for m in mounts.values():
            m.unmount()
        if gocryptfs is not None:
            gocryptfs.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
