"""keyfence/fdtable.py: the descriptor table grown once, never a doubling later.

Each case runs in a fresh interpreter, with a second thread running: that is
when Linux makes the thread that grows the table wait for an RCU grace
period (7-22 ms here), and the table's size (``FDSize``) is the process's
own, not pytest's."""

from __future__ import annotations

import subprocess
import sys

CASE = """
import os, resource, threading
from keyfence import fdtable
stop = threading.Event()
threading.Thread(target=stop.wait).start()
try:
{body}
finally:
    stop.set()
"""


def run(body: str) -> str:
    code = CASE.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_reserve_makes_the_room_once() -> None:
    out = run(
        """
before = fdtable.table_size()
after = fdtable.reserve(2048)
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1500)]
print(before, after, fdtable.table_size())
"""
    )
    before, after, end = map(int, out.split())
    assert before < 2048 <= after
    assert end == after  # 1,500 descriptors later: never grown again


def test_reserve_never_replaces_a_descriptor_in_use() -> None:
    out = run(
        """
r, w = os.pipe()
os.dup2(w, 3000)  # the table holds 3001 now; 3000 is the pipe's
fdtable.reserve(3001)
os.write(3000, b"still the pipe")
print(os.read(r, 100).decode())
"""
    )
    assert out == "still the pipe"


def test_reserve_stays_within_the_soft_limit_it_may_raise() -> None:
    out = run(
        """
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
size = fdtable.reserve(1 << 16)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard, size >= min(hard, 1 << 16))
"""
    )
    assert out == "True True"
