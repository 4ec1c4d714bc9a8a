#!/usr/bin/env python3
"""Sequential throughput of the encrypted mount with dd, per worker setting.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_dd.py [--size-mib 256] [--runs 3] [--json PATH]
        [--config NAME=ARGS ...]

For each configuration a fresh mount is made with the test launcher
(``src/keyfence/testing/mount_worker.py``: the real worker, keys from an in-process
KeyService), an encrypted directory is set up, and each run does:

* write: ``dd if=/dev/zero of=FILE bs=1M count=N conv=fsync`` (write-back
  and fsync of the ciphertext included),
* read cold: drop the kernel's caches, ``dd if=FILE of=/dev/null bs=1M``,
* read warm: the backing file in the page cache, the mount's pages not
  (``echo 1 > drop_caches`` then ``cat`` the backing file),

* small files: create 5,000 files of 4 KiB (open, write, close each),
  files/s,

and the same for a plain (pass-through) directory and for the backing disk
itself.  Reported: median over the runs (min, max).  ``--tmp DIR`` puts the
backing directories elsewhere (``/dev/shm`` measures the mount's own cost
without the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from keyfence.fs.crypto import MasterKey  # noqa: E402
from keyfence.testing.mounting import Mount  # noqa: E402

DEFAULT_CONFIGS = {
    "default": "",
    "writeback-cache": "--writeback-cache",
    "readahead-128k": "--readahead-kb 128",
    "readahead-4m": "--readahead-kb 4096",
}


def drop_caches(level: int = 3) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")


def dd(args: list[str]) -> float:
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"copied, ([0-9.]+) s", out)
    assert m is not None, out
    return float(m.group(1))


def measure(target_dir: Path, backing_dir: Path | None, size_mib: int) -> dict[str, float]:
    f = target_dir / "dd.bin"
    n = size_mib << 20
    drop_caches()
    w = dd(["if=/dev/zero", f"of={f}", "bs=1M", f"count={size_mib}", "conv=fsync"])
    drop_caches()
    rc = dd([f"if={f}", "of=/dev/null", "bs=1M"])
    drop_caches(1)
    if backing_dir is not None:
        for p in backing_dir.iterdir():
            if p.is_file():
                p.read_bytes()
    rw = dd([f"if={f}", "of=/dev/null", "bs=1M"])
    f.unlink()
    small = target_dir / "small"
    small.mkdir()
    block = b"x" * 4096
    t = time.perf_counter()
    for i in range(5000):
        with open(small / f"file{i}", "wb") as out:
            out.write(block)
    files = 5000 / (time.perf_counter() - t)
    subprocess.run(["rm", "-rf", str(small)], check=True)
    return {
        "write": n / w / 1e6,
        "read_cold": n / rc / 1e6,
        "read_warm": n / rw / 1e6,
        "files_per_s": files,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values)),
        "min": round(min(values)),
        "max": round(max(values)),
    }


def run_config(name: str, args: str, size_mib: int, runs: int, tmpdir: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kf-bench-", dir=tmpdir) as tmp:
        m = Mount(Path(tmp), *shlex.split(args), name="b")
        try:
            master = MasterKey(os.urandom(64))
            m.add_key(master)
            enc = m.mnt / "enc"
            enc.mkdir()
            os.setxattr(enc, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
            (m.mnt / "plain").mkdir()
            results: dict[str, dict[str, list[float]]] = {"encrypted": {}, "plain": {}}
            for _ in range(runs):
                for kind, d, b in (
                    ("encrypted", enc, m.backing / "enc"),
                    ("plain", m.mnt / "plain", m.backing / "plain"),
                ):
                    for k, v in measure(d, b, size_mib).items():
                        results[kind].setdefault(k, []).append(v)
        finally:
            m.unmount()
    return {
        "args": args,
        **{kind: {k: summary(v) for k, v in r.items()} for kind, r in results.items()},
    }


def disk(size_mib: int, runs: int, tmpdir: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kf-bench-", dir=tmpdir) as tmp:
        r: dict[str, list[float]] = {}
        for _ in range(runs):
            for k, v in measure(Path(tmp), None, size_mib).items():
                r.setdefault(k, []).append(v)
    return {k: summary(v) for k, v in r.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--tmp", default="/tmp", help="where backing directories go")
    p.add_argument("--config", action="append", default=[], help="NAME=WORKER ARGS")
    a = p.parse_args()
    configs = dict(DEFAULT_CONFIGS)
    if a.config:
        configs = dict(c.split("=", 1) for c in a.config)
    out: dict[str, object] = {
        "size_mib": a.size_mib,
        "runs": a.runs,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "tmp": a.tmp,
        "disk": disk(a.size_mib, a.runs, a.tmp),
    }
    print(f"disk: {out['disk']}", flush=True)
    for name, args in configs.items():
        out[name] = r = run_config(name, args, a.size_mib, a.runs, a.tmp)
        print(f"{name} ({args or 'no options'}):", flush=True)
        for kind in ("encrypted", "plain"):
            table: dict[str, dict[str, float]] = r[kind]  # type: ignore[assignment]
            cells = "  ".join(
                f"{k} {v['median']} ({v['min']}-{v['max']})" for k, v in table.items()
            )
            print(f"  {kind:9} MB/s: {cells}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
