#!/usr/bin/env python3
"""Small-file creation: keyfence beside gocryptfs and the plain disk, one run.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_smallfiles.py [--files 5000] [--runs 3] [--json PATH]
        [--worker-args "..."] [--tmp DIR] [--only TARGET ...] [--before TREE]

Each run creates ``--files`` files of 4 KiB in a fresh directory (for each:
``open(O_CREAT|O_WRONLY|O_TRUNC)``, one 4 KiB ``write``, ``close``), then
``syncfs`` of the backing filesystem.  Two figures: files/s of the creating
alone, and including the syncfs (everything on disk when the clock stops;
noisier: the disk is shared, and syncfs writes whatever else is dirty on it).
Targets, all over the same disk (``--tmp``):

* ``disk``: the backing filesystem itself,
* ``gocryptfs``: a gocryptfs mount (default options, fast scrypt for init),
* ``keyfence``: an encrypted directory of a keyfence mount (the test
  launcher: the real worker with an in-process key service),
* ``keyfence-plain``: a pass-through directory of the same mount.

Every run visits every target (in a rotated order); the files are deleted
only at the end, outside the timing (deleting on ext4 slows the next
creates).  Reported: files/s, median over the runs (min-max), and
keyfence's ratio to gocryptfs and to the disk.  ``--tmp /dev/shm`` puts all
backing directories on tmpfs: what is left is the FUSE and crypto cost.
``--before TREE`` adds ``keyfence-before``: an encrypted directory of a
second mount whose worker runs from another tree (``git archive COMMIT src
tests | tar -x -C TREE``), measured in the same runs: before/after figures
that share the machine's moods.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from keyfence.fs.crypto import MasterKey  # noqa: E402
from keyfence.testing.bench.results import report, result, write_json  # noqa: E402
from keyfence.testing.mounting import Mount  # noqa: E402

BLOCK = b"\xa5" * 4096


def syncfs(path: Path) -> None:
    """syncfs(2): the filesystem holding ``path`` only (``sync`` would also
    wait for every other disk's dirty data, other jobs' included)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def create_files(directory: Path, count: int, backing_fs: Path) -> tuple[float, float]:
    """Create ``count`` 4 KiB files in ``directory``, then syncfs the backing
    filesystem: (seconds creating, seconds syncing)."""
    directory.mkdir()
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC
    base = os.fspath(directory)
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(f"{base}/file{i}", flags, 0o644)
        try:
            os.write(fd, BLOCK)
        finally:
            os.close(fd)
    created = time.perf_counter()
    syncfs(backing_fs)
    return created - t, time.perf_counter() - created


@contextlib.contextmanager
def gocryptfs_mount(tmp: Path) -> Iterator[Path | None]:
    if shutil.which("gocryptfs") is None:
        yield None
        return
    cipher, mnt = tmp / "gc-cipher", tmp / "gc-mnt"
    cipher.mkdir()
    mnt.mkdir()
    password = ["-extpass", "echo bench-password"]
    subprocess.run(
        ["gocryptfs", "-q", "-init", "-scryptn", "10", *password, str(cipher)], check=True
    )
    subprocess.run(["gocryptfs", "-q", *password, str(cipher), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


@contextlib.contextmanager
def keyfence_mount(
    tmp: Path, worker_args: list[str], *, name: str = "kf", source: str | None = None
) -> Iterator[tuple[Path, Path]]:
    """An encrypted and a plain directory of a fresh mount; ``source``: run
    the worker from another tree (its ``src`` first on the path)."""
    saved = os.environ.get("PYTHONPATH")
    if source is not None:
        os.environ["PYTHONPATH"] = os.path.join(os.path.abspath(source), "src")
    try:
        m = Mount(tmp, *worker_args, name=name)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        master = MasterKey(os.urandom(64))
        m.add_key(master)
        enc = m.mnt / "enc"
        enc.mkdir()
        os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
        plain = m.mnt / "plain"
        plain.mkdir()
        yield enc, plain
    finally:
        m.unmount()


def wanted(a: argparse.Namespace, name: str) -> bool:
    return not a.only or name in a.only


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="500 files, 1 run (CI)")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--worker-args", default="", help="extra keyfence worker options")
    p.add_argument(
        "--before", help="also measure the worker of this tree (keyfence-before), same runs"
    )
    p.add_argument("--only", action="append", default=[], help="targets to run (default all)")
    a = p.parse_args()
    if a.quick:
        a.files, a.runs = min(a.files, 500), 1
    worker_args = shlex.split(a.worker_args)
    rates: dict[str, list[float]] = {}
    synced_rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kf-small-", dir=a.tmp) as tmp_name:
        tmp = Path(tmp_name)
        with contextlib.ExitStack() as stack:
            targets: dict[str, Path] = {}
            if wanted(a, "disk"):
                targets["disk"] = tmp / "disk"
                targets["disk"].mkdir()
            if wanted(a, "gocryptfs"):
                where = stack.enter_context(gocryptfs_mount(tmp))
                if where is None:
                    print("gocryptfs: not installed, skipped", flush=True)
                else:
                    targets["gocryptfs"] = where
            if wanted(a, "keyfence") or wanted(a, "keyfence-plain"):
                enc, plain = stack.enter_context(keyfence_mount(tmp, worker_args))
                if wanted(a, "keyfence"):
                    targets["keyfence"] = enc
                if wanted(a, "keyfence-plain"):
                    targets["keyfence-plain"] = plain
            if a.before:
                enc, _ = stack.enter_context(
                    keyfence_mount(tmp, worker_args, name="before", source=a.before)
                )
                targets["keyfence-before"] = enc
            names = list(targets)
            for r in range(a.runs):
                # every run visits every target, in a rotated order, so that
                # the disk's moods (journal commits, discards) hit all alike;
                # nothing is deleted until the end
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    syncfs(tmp)
                    time.sleep(0.5)
                    made, synced = create_files(targets[name] / f"run{r}", a.files, tmp)
                    rates.setdefault(name, []).append(a.files / made)
                    synced_rates.setdefault(name, []).append(a.files / (made + synced))
            for name in names:
                for r in range(a.runs):
                    shutil.rmtree(targets[name] / f"run{r}", ignore_errors=True)
    rows = [
        result(group, name, "files/s", v, higher_is_better=True, params={"tmp": a.tmp})
        for group, table in (
            (f"create-{a.files}-4KiB-files", rates),
            (f"create-{a.files}-4KiB-files+syncfs", synced_rates),
        )
        for name, v in table.items()
    ]
    out = report(
        "fs-smallfiles",
        quick=a.quick,
        results=rows,
        machine_path=a.tmp,
        detail={"worker_args": a.worker_args, "before": a.before},
    )
    for row in out["results"]:
        if row["system"] == next(iter(rates)):
            print(row["group"], flush=True)
        ratios = "  ".join(f"/{k} {v:.2f}" for k, v in (row.get("ratios") or {}).items())
        print(
            f"  {row['system']:15} {row['median']:7.0f} files/s "
            f"({row['min']:.0f}-{row['max']:.0f})  {ratios}",
            flush=True,
        )
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
