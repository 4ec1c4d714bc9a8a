#!/usr/bin/env python3
"""Whole-process cost of a few commands, interleaved: wall and CPU time, medians.

    .venv/bin/python bench/startup_compare.py RUNS 'ARGV0' 'ARGV1' ...

Each round runs every command once, in order (one untimed warm-up round
first); reported are the medians of the wall time and of the child's CPU
time (user + system, from wait4) and each one's ratio to the first
command's: on a loaded machine the CPU time is the steadier figure.  For
kfctl's start-up against the bare interpreter (docs/performance.md)::

    .venv/bin/python bench/startup_compare.py 30 '.venv/bin/python -IS -c pass' \\
        '.venv/bin/kfctl show @s' 'keyctl show @s'

(in a session keyring, with ``KEYFENCE_SOCKET`` naming a daemon).  A command
that fails is an error, not a figure.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    runs = int(argv[0])
    commands = [shlex.split(c) for c in argv[1:]]
    wall: list[list[float]] = [[] for _ in commands]
    cpu: list[list[float]] = [[] for _ in commands]
    devnull = os.open(os.devnull, os.O_WRONLY)
    for run in range(runs + 1):
        for i, command in enumerate(commands):
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=devnull)
            _, status, usage = os.wait4(child.pid, 0)
            elapsed = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                print(f"{shlex.join(command)} failed ({status})", file=sys.stderr)
                return 1
            if run:
                wall[i].append(elapsed * 1000)
                cpu[i].append((usage.ru_utime + usage.ru_stime) * 1000)
    base_wall, base_cpu = statistics.median(wall[0]), statistics.median(cpu[0])
    for i, command in enumerate(commands):
        w, c = statistics.median(wall[i]), statistics.median(cpu[i])
        print(
            f"wall {w:8.2f} ms x{w / base_wall:5.2f}   cpu {c:7.2f} ms x{c / base_cpu:5.2f}   "
            f"{shlex.join(command)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
