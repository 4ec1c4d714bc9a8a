"""Wait for the machine's disks to go quiet before a timed run.

Why: a benchmark that follows another (``make bench`` runs them back to
back) can start while the disk still writes the last one's data back or
frees its files (fs_compare's 4 GiB ext4 image, its 1 GiB files).  Seen on
2026-12-07: fs_everyday's first system's first run, two seconds after
fs_compare ended, took 2.2 s to extract what took 1.0 s in its third run,
and its SQLite ran at 70 transactions/s against 160: whichever system is
measured first pays for the one before.  So each system's run starts
after a global ``sync`` and a spell in which no block device has I/O in
flight and the disks together wrote at most :data:`QUIET_SECTORS`.

The same wait for every system: it moves no ratio except by taking the
previous run's noise out of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["QUIET_SECTORS", "disk_activity", "wait_for_quiet_disks"]

QUIET_SECTORS = 256
"""Sectors (512 bytes) the disks may write in a quiet spell: 128 KiB,
a journal commit or a log line, not a write-back."""


def disk_activity(sys_block: Path = Path("/sys/block")) -> tuple[int, int]:
    """(sectors written so far, requests in flight now), over every block
    device but RAM disks and zram (Documentation/block/stat.rst: field 7 is
    write sectors, field 9 in_flight)."""
    written = in_flight = 0
    for device in sys_block.iterdir():
        if device.name.startswith(("ram", "zram")):
            continue
        try:
            fields = (device / "stat").read_text().split()
        except OSError:
            continue
        if len(fields) >= 9:
            written += int(fields[6])
            in_flight += int(fields[8])
    return written, in_flight


def wait_for_quiet_disks(*, spell: float = 1.0, most: float = 30.0) -> float:
    """``sync``, then wait until the disks have been quiet for ``spell``
    seconds, at most ``most`` seconds in all; the seconds waited (``most``
    if they never went quiet: the run goes on, as the benchmark must)."""
    started = time.monotonic()
    os.sync()
    while True:
        before, _ = disk_activity()
        time.sleep(spell)
        after, in_flight = disk_activity()
        waited = time.monotonic() - started
        if (after - before <= QUIET_SECTORS and in_flight == 0) or waited >= most:
            return waited
