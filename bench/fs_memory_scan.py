"""How much plaintext a mount worker keeps in memory, and after a lock.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_memory_scan.py [--mib 8]

A real mount worker (keyfence.testing.mount_worker: the worker with an
in-process key service) gets an encrypted directory; a file of ``--mib``
MiB made of one 16-byte marker repeated is written through the mount (1 MiB
writes) and closed.  The worker's readable memory (/proc/PID/mem) is
searched for the marker: after the write, after a fenced ``clear`` of the
session keyring, and, with the file written again under the key added
back, after an emergency ``clear``.  Prints the hit counts (one copy of the
file is ``mib * 65536`` hits).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.memory import count_in_memory
from keyfence.testing.mounting import Mount


def write(path: Path, marker: bytes, mib: int) -> None:
    chunk = marker * ((1 << 20) // len(marker))
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=8)
    a = p.parse_args()
    marker = os.urandom(16)
    with tempfile.TemporaryDirectory(prefix="kf-memscan-") as tmp:
        m = Mount(Path(tmp), "--dirty-expire", "60")
        try:
            assert m.proc is not None
            pid = m.proc.pid
            master = MasterKey(os.urandom(64))
            m.add_key(master)
            enc = m.mnt / "enc"
            enc.mkdir()
            os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
            print(f"one copy of the file: {a.mib * (1 << 20) // 16:,} hits")
            write(enc / "f", marker, a.mib)
            print(f"after the write (closed, written back): {count_in_memory(pid, marker):,}")
            m.clear()
            print(f"after a fenced clear:                   {count_in_memory(pid, marker):,}")
            m.add_key(master)
            write(enc / "g", marker, a.mib)
            m.clear(emergency=True)
            print(f"after an emergency clear (second file): {count_in_memory(pid, marker):,}")
        finally:
            m.unmount()


if __name__ == "__main__":
    main()
