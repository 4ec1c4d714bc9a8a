#!/usr/bin/env python3
"""What the kernel's ACL checks cost through a mount: its owner against another uid.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_acl_cost.py [--dirs 20] [--files 50] [--runs 3]
        [--other-uid 61115]

A tree of ``--dirs`` x ``--files`` files of 2 KiB, root's and 0644, in an
encrypted directory of a fresh mount (keyfence's loop, a root worker as on
a shared mount).  Each run mounts it again and runs ``grep -r`` over it
twice (cold: the kernel knows nothing yet; warm), as root (the owner) and
as ``--other-uid`` (``setpriv``).  Printed: median wall times, and the FUSE
requests of the last warm run of each (tracefs, when it can be used).
With FUSE_POSIX_ACL (fs/acl.py) the owner's checks need no ACL; another
uid's read each entry's ACL once per attribute refresh (docs/fs.md,
"POSIX ACLs").
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from keyfence.fs.crypto import MasterKey
from keyfence.testing.bench.kernel_trace import recorded, tracing_problem
from keyfence.testing.mounting import Mount
from keyfence.testing.users import as_uid

POLICY = "user.keyfence.policy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirs", type=int, default=20)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--other-uid", type=int, default=61115)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="kf-acl-cost-"))
    os.chmod(top, 0o755)
    master = MasterKey(os.urandom(64))
    try:
        m = Mount(top, "--fuse-loop", "keyfence")
        try:
            m.add_key(master)
            os.chmod(m.mnt, 0o755)
            (m.mnt / "enc").mkdir(mode=0o755)
            os.setxattr(m.mnt / "enc", POLICY, f"keyfence:{master.identifier}".encode())
            for i in range(args.dirs):
                d = m.mnt / "enc" / f"d{i}"
                d.mkdir(mode=0o755)
                for j in range(args.files):
                    (d / f"f{j}.txt").write_bytes(os.urandom(1024).hex().encode())
        finally:
            m.unmount_checked()
        trace = tracing_problem() is None
        for who in ("owner", "other"):
            cold: list[float] = []
            warm: list[float] = []
            counts: dict[str, int] = {}
            for _ in range(args.runs):
                m = Mount(top, "--fuse-loop", "keyfence")
                try:
                    m.add_key(master)
                    argv = ["grep", "-r", "-c", "zzzz", str(m.mnt / "enc")]
                    if who == "other":
                        argv = as_uid(args.other_uid, argv)
                    cold.append(_timed(argv))
                    if trace:
                        with recorded() as lines:
                            warm.append(_timed(argv))
                        found = re.findall(r"opcode \d+ \(FUSE_(\w+)\)", "\n".join(lines))
                        counts = dict(collections.Counter(found).most_common())
                    else:
                        warm.append(_timed(argv))
                finally:
                    m.unmount_checked()
            print(
                f"{who:5}  cold {1000 * statistics.median(cold):6.1f} ms"
                f"  warm {1000 * statistics.median(warm):6.1f} ms  warm requests {counts}"
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
