"""Part 19's think-time probe: a client calling ``statvfs`` on a real
keyfence mount (daemon and worker) with a busy-wait of GAP µs between
calls; per call, the client's wall time (gap included) and the worker's
CPU time (all its threads, from /proc).

    .venv/bin/python think_time.py SCRATCH_DIR [MOUNT_OPTION ...]

e.g. ``spin_us=50`` (the fixed window before part 19) or ``spin_us=200``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from keyfence.testing.bench.peers import KeyfencePeer

CLIENT = """
import os, sys, time
mnt, gap_ns, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clock = time.perf_counter_ns
t0 = clock()
for _ in range(n):
    os.statvfs(mnt)
    until = clock() + gap_ns
    while clock() < until:
        pass
print((clock() - t0) / n / 1000)
"""


def worker_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    scratch, options = Path(sys.argv[1]), sys.argv[2:]
    with tempfile.TemporaryDirectory(dir=scratch) as top:
        (Path(top) / "p").mkdir()
        peer = KeyfencePeer(Path(top) / "p", options=options)
        peer.setup()
        try:
            pgrep = ["pgrep", "-f", "keyfence.fs.worker"]
            pid = int(subprocess.run(pgrep, capture_output=True, text=True).stdout.split()[0])
            for gap in (0, 100, 150, 300, 1000):
                calls = 20000 if gap < 300 else 4000
                before = worker_cpu(pid)
                args = [sys.executable, "-c", CLIENT, str(peer.work), str(gap * 1000), str(calls)]
                out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
                wall = float(out)
                cpu = (worker_cpu(pid) - before) / calls * 1e6
                print(
                    f"gap {gap:5} us: client {wall:7.1f} us/call (gap included), "
                    f"worker CPU {cpu:7.1f} us/call",
                    flush=True,
                )
        finally:
            peer.teardown()


if __name__ == "__main__":
    main()
