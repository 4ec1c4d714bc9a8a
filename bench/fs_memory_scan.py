"""How much plaintext (contents and names) a mount worker keeps in memory.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_memory_scan.py [--mib 8] [--names 256]

A real mount worker (keyfence.testing.mount_worker: the worker with an
in-process key service) gets an encrypted directory.  A file of ``--mib``
MiB made of one 16-byte random marker repeated is written through the mount
(1 MiB writes) and closed; ``--names`` empty files whose names carry a
second (text) marker are made in a subdirectory and listed; the file is
read back.  The worker's readable memory (/proc/PID/mem) is searched for
both markers after each step: after the write, after the listing, after the
read, after a fenced ``clear`` of the session keyring, and -- with the key
added back, a second file written and read, the directory listed again --
after an emergency ``clear``.  Prints one line per step: contents hits (one
copy of the file is ``mib * 65536``) and name hits (one listing is
``names``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.memory import count_in_memory
from keyfence.testing.mounting import Mount


def write(path: Path, marker: bytes, mib: int) -> None:
    chunk = marker * ((1 << 20) // len(marker))
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)


def read(path: Path) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            total += len(block)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=8)
    p.add_argument("--names", type=int, default=256)
    a = p.parse_args()
    marker = os.urandom(16)
    name_marker = "kfname" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="kf-memscan-") as tmp:
        m = Mount(Path(tmp), "--dirty-expire", "60")
        try:
            assert m.proc is not None
            pid = m.proc.pid

            def show(step: str) -> None:
                data = count_in_memory(pid, marker)
                names = count_in_memory(pid, name_marker.encode())
                print(f"{step:<40} contents {data:>9,}   names {names:>7,}", flush=True)

            master = MasterKey(os.urandom(64))
            m.add_key(master)
            enc = m.mnt / "enc"
            enc.mkdir()
            os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
            print(f"one copy of the file: {a.mib * (1 << 20) // 16:,} hits; names: {a.names}")
            write(enc / "f", marker, a.mib)
            show("after the write (closed, written back)")
            (enc / "d").mkdir()
            for i in range(a.names):
                (enc / "d" / f"{name_marker}-{i}").touch()
            assert len(os.listdir(enc / "d")) == a.names
            show("after making and listing the names")
            assert read(enc / "f") == a.mib << 20
            show("after reading the file back")
            m.clear()
            show("after a fenced clear")
            m.add_key(master)
            write(enc / "g", marker, a.mib)
            assert read(enc / "g") == a.mib << 20
            assert len(os.listdir(enc / "d")) == a.names
            m.clear(emergency=True)
            time.sleep(1)  # an emergency removal returns before the worker has dropped
            show("after an emergency clear (second file)")
        finally:
            m.unmount()


if __name__ == "__main__":
    main()
