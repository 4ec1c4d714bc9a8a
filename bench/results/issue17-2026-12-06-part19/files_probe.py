"""Part 19's files probe: 3,000 files of 4 KiB created (open, write, close)
through a real keyfence mount per ``spin_us`` setting; per setting the
median of the rounds, in µs a file and the worker's CPU µs a file.

    .venv/bin/python files_probe.py SCRATCH_DIR ROUNDS SPIN_US [SPIN_US ...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keyfence.testing.bench.peers import KeyfencePeer

FILES = 3000


def worker_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(scratch: Path, spin: str) -> tuple[float, float]:
    data = b"x" * 4096
    with tempfile.TemporaryDirectory(dir=scratch) as top:
        (Path(top) / "p").mkdir()
        peer = KeyfencePeer(Path(top) / "p", options=[f"spin_us={spin}"])
        peer.setup()
        try:
            pgrep = ["pgrep", "-f", "keyfence.fs.worker"]
            pid = int(subprocess.run(pgrep, capture_output=True, text=True).stdout.split()[0])
            d = peer.work / "f"
            d.mkdir()
            cpu, start = worker_cpu(pid), time.perf_counter()
            for i in range(FILES):
                fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
            wall = (time.perf_counter() - start) / FILES * 1e6
            return wall, (worker_cpu(pid) - cpu) / FILES * 1e6
        finally:
            peer.teardown()


def main() -> None:
    scratch, rounds, spins = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    results: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds):
        for spin in spins:
            wall, cpu = one(scratch, spin)
            results.setdefault(spin, []).append((wall, cpu))
            print(f"round {r} spin {spin}: {wall:.0f} us/file, worker {cpu:.0f} us CPU/file")
    for spin, runs in results.items():
        wall = statistics.median(x[0] for x in runs)
        cpu = statistics.median(x[1] for x in runs)
        print(f"{spin} median us/file {wall} cpu {cpu}")


if __name__ == "__main__":
    main()
