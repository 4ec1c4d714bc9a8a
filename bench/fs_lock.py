#!/usr/bin/env python3
"""What a key removal costs a mount with dirty data.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_lock.py [--dirty-mib 200] [--runs 3] [--json PATH]

A mount with a dirty limit above ``--dirty-mib`` and a long expiry gets
``--dirty-mib`` MiB written into an encrypted file that stays open (so the
page cache holds all of it), then:

* fenced removal (``unlink`` of the key from the session keyring): the call
  returns after the worker wrote back, fsynced and evicted everything;
  reported as seconds and MB/s of dirty data,
* emergency removal (``kfctl --emergency clear``): seconds until the call returns,
  and until the worker reported what it dropped.

Median over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from keyfence.fs.crypto import MasterKey  # noqa: E402
from keyfence.testing.mounting import Mount  # noqa: E402


def one(dirty_mib: int, emergency: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kf-lock-", dir="/tmp") as tmp:
        m = Mount(
            Path(tmp),
            "--dirty-limit",
            f"{dirty_mib * 2}M",
            "--dirty-expire",
            "3600",
            name="l",
        )
        try:
            master = MasterKey(os.urandom(64))
            serial = m.add_key(master)
            enc = m.mnt / "enc"
            enc.mkdir()
            os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
            chunk = os.urandom(1 << 20)
            with open(enc / "dirty", "wb", buffering=0) as f:
                for _ in range(dirty_mib):
                    f.write(chunk)
                os.sync()
                t = time.perf_counter()
                if emergency:
                    m.clear(emergency=True)
                else:
                    m.unlink_key(serial)
                returned = time.perf_counter() - t
                reported = returned
                if emergency:
                    while not m.reports("dropped"):
                        time.sleep(0.001)
                    reported = time.perf_counter() - t
        finally:
            m.unmount()
    return {"returned_s": returned, "reported_s": reported}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dirty-mib", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    out: dict[str, object] = {"dirty_mib": a.dirty_mib, "runs": a.runs}
    for name, emergency in (("fenced", False), ("emergency", True)):
        rs = [one(a.dirty_mib, emergency) for _ in range(a.runs)]
        ret = statistics.median(r["returned_s"] for r in rs)
        rep = statistics.median(r["reported_s"] for r in rs)
        out[name] = {"returned_s": round(ret, 4), "reported_s": round(rep, 4)}
        if emergency:
            print(f"{name}: returned in {ret * 1e3:.1f} ms, drop reported after {rep * 1e3:.1f} ms")
        else:
            mbps = a.dirty_mib * (1 << 20) / ret / 1e6
            print(
                f"{name}: {a.dirty_mib} MiB dirty written back and fsynced in {ret:.3f} s"
                f" ({mbps:.0f} MB/s)"
            )
            out[name]["mb_per_s"] = round(mbps)  # type: ignore[index]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
