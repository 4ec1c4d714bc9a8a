"""Scratch A/B loops of part 16, through a real keyfence mount (daemon and
worker); medians of the wall time and of the worker's CPU time.

    .venv/bin/python scratch_ab.py SCRATCH_DIR LABEL files
    .venv/bin/python scratch_ab.py SCRATCH_DIR LABEL tree

``files``: 2,000 small files created (open, write 4 KiB, close), then
unlinked, six rounds; microseconds a file.  ``tree``: ``tar -xf`` of the
standard library, then ``rm -rf`` of it, four rounds; seconds.  The
tarball is made once, beside SCRATCH_DIR (``stdlib.tar``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from keyfence.testing.bench.everyday import make_tarball
from keyfence.testing.bench.peers import KeyfencePeer

FILES = 2000


def worker_pid(peer: KeyfencePeer) -> str:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    mine = [
        line.split()[0]
        for line in ps.splitlines()
        if "worker" in line and "keyfence" in line and str(peer.mnt) in line
    ]
    return mine[0]


def cpu(pid: str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(res: dict[str, list[float]], name: str, pid: str, fn: Callable[[], object]) -> None:
    c0, t = cpu(pid), time.perf_counter()
    fn()
    res.setdefault(name, []).append(time.perf_counter() - t)
    res.setdefault(f"{name}_cpu", []).append(cpu(pid) - c0)


def create(d: Path) -> None:
    for i in range(FILES):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 4096)
        os.close(fd)


def unlink(d: Path) -> None:
    for i in range(FILES):
        os.unlink(d / f"f{i}")


def main() -> None:
    scratch, label, what = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    tarball = scratch.parent / "stdlib.tar"
    if what == "tree" and not tarball.exists():
        make_tarball(tarball, False)
    peer = KeyfencePeer(scratch)
    peer.setup()
    try:
        pid = worker_pid(peer)
        res: dict[str, list[float]] = {}
        for r in range(6 if what == "files" else 4):
            d = peer.work / f"r{r}"
            d.mkdir()
            if what == "files":
                timed(res, "create", pid, lambda: create(d))  # noqa: B023 - called at once
                timed(res, "unlink", pid, lambda: unlink(d))  # noqa: B023
            else:
                tar = ["tar", "-xf", str(tarball)]
                timed(res, "tar", pid, lambda: subprocess.run(tar, cwd=d, check=True))  # noqa: B023
                subprocess.run(["sync", "-f", str(d)], check=True)
                rm = ["rm", "-rf", str(d)]
                timed(res, "rm", pid, lambda: subprocess.run(rm, check=True))  # noqa: B023
        scale, unit = (1e6 / FILES, "us a file") if what == "files" else (1.0, "seconds")
        medians = {k: round(statistics.median(v) * scale, 3) for k, v in res.items()}
        print(label, unit, medians, flush=True)
    finally:
        peer.teardown()


if __name__ == "__main__":
    main()
