#!/usr/bin/env python3
"""The ceiling of each FUSE request loop: one do-nothing filesystem, served by
each candidate loop, side by side in one run (issue 17, first item).

Usage (root, from the repository root)::

    .venv/bin/python bench/fuse_loops.py [--quick] [--json PATH] [--runs 3]
        [--files 5000] [--write-mib 256] [--loops pyfuse3,llfuse-4,...] [--threads 4]

The filesystem is the same everywhere (bench/fuse_loops_fs.py has the
pyfuse3, llfuse and mfusepy versions, keyfence.testing.bench.rawloop the loop of our
own): a root directory whose files keep a size and no contents, a
``getxattr`` that answers ENODATA (keyfence has xattrs, so the kernel keeps
asking ``security.capability`` before every write unless the loop can set
``FUSE_HANDLE_KILLPRIV_V2``), entry and attribute timeouts of 1 s and
``default_permissions``, as keyfence mounts.  Each loop serves its own
mount from a child process; the runs interleave the loops (run 1 of every
loop, then run 2, ...) and the figures are medians.

Groups:

* ``fuse-create-4KiB``: the 5,000-file loop of bench/fs_smallfiles.py
  (``open(O_CREAT|O_EXCL)``, one 4 KiB ``write``, ``close``); files/s.
* ``fuse-write-1MiB``: 1 MiB ``write``s over one file from its start, then
  ``close`` (the same file every run, after an untimed first run: the kernel's
  page cache already has its pages, so allocating them is not what is timed);
  MB/s.

Each row carries the FUSE requests the filesystem saw per file (per MiB),
by opcode, as counted in its handlers (a libfuse loop answers some requests
itself: those are not counted).  Ratios are against ``pyfuse3``, the loop
keyfence uses today.  Loops:

* ``pyfuse3``: pyfuse3 + trio, one thread (keyfence today).
* ``llfuse-N``: llfuse (libfuse 2) with N worker threads (1: the calling
  thread serves every request).
* ``mfusepy``: mfusepy (ctypes over libfuse 3's high-level, path-based API)
  on libfuse 3's multi-threaded loop.
* ``raw-1``, ``raw-N``: keyfence.testing.bench.rawloop: /dev/fuse read into one
  reused buffer per thread (zeroed after each request), one descriptor
  cloned per thread (``FUSE_DEV_IOC_CLONE``), mounted by fusermount3,
  ``FUSE_HANDLE_KILLPRIV_V2`` and ``max_pages`` 256 set; ``raw-N-no-killpriv2``
  without KILLPRIV_V2 shows what the capability lookup costs, ``raw-1-no-zero``
  what zeroing the buffer costs.

A loop whose library is missing becomes an error row, never a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keyfence.testing.bench.results import error, ratio, report, result, write_json

BENCH_DIR = Path(__file__).resolve().parent

MIB = 1 << 20
BLOCK = 4096
COUNTS_XATTR = "user.fuseloops.counts"  # the filesystems answer it with their request counts
BASELINE = "pyfuse3"

# What each loop lets a filesystem set (read from the libraries' APIs and
# headers: pyfuse3 3.5, llfuse 1.5 on libfuse 2.9, mfusepy 3.1 on libfuse
# 3.14, the kernel's fuse.h 7.38).  Shown in the report and docs/performance.md.
SETTINGS: dict[str, dict[str, str]] = {
    "pyfuse3": {
        "threads": "one trio thread (handlers are coroutines)",
        "killpriv_v2": "no (libfuse 3.14 has no FUSE_CAP_HANDLE_KILLPRIV_V2; pyfuse3 hides conn)",
        "max_pages": "libfuse's 256 pages (1 MiB writes), not settable",
        "writeback_cache": "yes (Operations.enable_writeback_cache); no other conn->want bit",
        "parallel_dirops": "libfuse's default, not settable (one thread anyway)",
        "timeouts": "per reply (EntryAttributes), negative entries too (st_ino 0)",
        "buffers": "libfuse's buffer, copied into a new bytes per write: not zeroable",
    },
    "llfuse": {
        "threads": "N libfuse 2 worker threads, one shared /dev/fuse descriptor",
        "killpriv_v2": "no (libfuse 2 speaks protocol 7.19)",
        "max_pages": "no: 32 pages, 128 KiB writes (libfuse 2 limit)",
        "writeback_cache": "no (libfuse 2)",
        "parallel_dirops": "no (libfuse 2)",
        "timeouts": "per reply (EntryAttributes), negative entries too (st_ino 0)",
        "buffers": "libfuse's buffer, copied into bytes: not zeroable",
        "maintenance": "kept building for borgbackup; libfuse 2 itself is legacy",
    },
    "mfusepy": {
        "threads": "libfuse 3 multi-threaded loop (threads on demand, max_idle 10)",
        "killpriv_v2": "not with libfuse 3.14 (FUSE_CAP_HANDLE_KILLPRIV_V2 came later)",
        "max_pages": "libfuse's 256 pages",
        "writeback_cache": "yes (conn.want in init_with_config)",
        "parallel_dirops": "yes (conn.want)",
        "timeouts": "global only (fuse_config entry_timeout, attr_timeout, negative_timeout)",
        "buffers": "libfuse's buffer via ctypes: zeroable with ctypes.memset, by hand",
    },
    "raw": {
        "threads": "N threads, one cloned /dev/fuse descriptor each (FUSE_DEV_IOC_CLONE)",
        "killpriv_v2": "yes (any INIT flag the kernel offers)",
        "max_pages": "yes (init_out.max_pages)",
        "writeback_cache": "yes",
        "parallel_dirops": "yes",
        "timeouts": "per reply, negative entries too (nodeid 0)",
        "buffers": "one reused bytearray per thread, zeroed after each request",
    },
}


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", flush=True)


START = time.perf_counter()


class LoopError(Exception):
    """A loop could not be started or measured: an error row."""


class Loop:
    """One loop serving one mount from a child process."""

    def __init__(self, name: str, scratch: Path) -> None:
        self.name = name
        self.mnt = scratch / name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = scratch / f"{name}.log"

    def start(self) -> None:
        self.mnt.mkdir()
        env = dict(os.environ)
        # mfusepy picks libfuse 2 when libfuse-dev is installed: ask for 3
        env["FUSE_LIBRARY_NAME"] = "fuse3"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "fuse_loops_fs.py"), self.name, str(self.mnt)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise LoopError(f"exited {self.proc.returncode}: {self.last_log_line()}")
            if time.monotonic() > deadline:
                raise LoopError("did not mount within 30 s")
            time.sleep(0.02)
        self.counts()  # the first request: the loop is up

    def last_log_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1][-300:]
        return "(no output)"

    def counts(self) -> dict[str, int]:
        try:
            raw = os.getxattr(self.mnt, COUNTS_XATTR)
        except OSError as err:
            raise LoopError(f"reading the request counts: {err}") from err
        counts: dict[str, int] = json.loads(raw)
        return counts

    def stop(self) -> None:
        # not os.path.ismount: a mount whose server died fails lstat (ENOTCONN)
        # and reads as no mount, but still has to go
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, check=False)


def diff(after: dict[str, int], before: dict[str, int], per: int) -> dict[str, float]:
    out = {}
    for op, n in after.items():
        d = n - before.get(op, 0)
        if op == "getxattr":
            d -= 1  # the counts request itself
        if d > 0:
            out[op] = round(d / per, 2)
    return out


def create_files(loop: Loop, run: int, files: int) -> tuple[float, dict[str, float]]:
    data = os.urandom(BLOCK)
    before = loop.counts()
    t = time.perf_counter()
    for i in range(files):
        fd = os.open(loop.mnt / f"r{run}-f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    took = time.perf_counter() - t
    return files / took, diff(loop.counts(), before, files)


def write_big(loop: Loop, run: int, mib: int) -> tuple[float, dict[str, float]]:
    data = os.urandom(MIB)
    before = loop.counts()
    t = time.perf_counter()
    # the same file every run: its pages stay in the kernel's page cache, so
    # what is timed is the requests, not allocating 256 MiB of fresh pages
    fd = os.open(loop.mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, data)
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    return mib * MIB / took / 1e6, diff(loop.counts(), before, mib)


def default_loops(threads: int) -> list[str]:
    return [
        "pyfuse3",
        "llfuse-1",
        f"llfuse-{threads}",
        "mfusepy",
        "raw-1",
        "raw-1-no-zero",
        "raw-2",
        f"raw-{threads}",
        f"raw-{threads}-no-killpriv2",
    ]


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    groups = {
        "fuse-create-4KiB": ("files/s", lambda lp, r: create_files(lp, r, args.files)),
        "fuse-write-1MiB": ("MB/s", lambda lp, r: write_big(lp, r, args.write_mib)),
    }
    with tempfile.TemporaryDirectory(prefix="kf-fuse-loops-") as scratch:
        loops: list[Loop] = []
        try:
            for name in args.loops:
                loop = Loop(name, Path(scratch))
                try:
                    loop.start()
                    loops.append(loop)
                    say(f"{name}: mounted at {loop.mnt}")
                except (LoopError, OSError) as err:
                    loop.stop()
                    errors.append(error("setup", name, str(err)))
                    say(f"{name}: FAILED: {err}")
            values: dict[tuple[str, str], list[float]] = {}
            requests: dict[tuple[str, str], dict[str, float]] = {}
            failed: set[str] = set()
            for r in range(-1, args.runs):  # run -1 warms up, not counted
                for group, (metric, one) in groups.items():
                    for loop in loops:
                        if loop.name in failed:
                            continue
                        try:
                            value, per = one(loop, r)
                        except (LoopError, OSError) as err:
                            failed.add(loop.name)
                            errors.append(error(group, loop.name, f"{err}: {loop.last_log_line()}"))
                            say(f"{group} {loop.name}: FAILED: {err}")
                            continue
                        if r < 0:
                            continue
                        values.setdefault((group, loop.name), []).append(value)
                        requests[(group, loop.name)] = per
                        say(f"{group} {loop.name} run {r + 1}/{args.runs}: {value:,.1f} {metric}")
        finally:
            for loop in loops:
                loop.stop()
        for group, (metric, _) in groups.items():
            for name in args.loops:
                runs = values.get((group, name))
                if not runs or name in failed:
                    continue
                results.append(
                    result(
                        group,
                        name,
                        metric,
                        runs,
                        higher_is_better=True,
                        requests=requests[(group, name)],
                        per="file" if group.startswith("fuse-create") else "MiB",
                    )
                )
    medians = {(r["group"], r["system"]): r["median"] for r in results}
    for row in results:
        base = medians.get((row["group"], BASELINE))
        if base is not None and row["system"] != BASELINE:
            value = ratio(row["median"], base, True)
            if value is not None:
                row["ratios"] = {BASELINE: value}
    return results, errors


def table(results: list[dict[str, Any]], errors: list[dict[str, str]]) -> str:
    lines = [f"{'group':<18} {'loop':<18} {'median':>10} {'min':>10} {'max':>10}  vs pyfuse3"]
    for r in results:
        vs = (r.get("ratios") or {}).get(BASELINE)
        reqs = " ".join(f"{k}={v:g}" for k, v in sorted(r["requests"].items()))
        lines.append(
            f"{r['group']:<18} {r['system']:<18} {r['median']:>10,.1f} {r['min']:>10,.1f} "
            f"{r['max']:>10,.1f}  {f'{vs:.2f}x' if vs else '':>6}  {r['metric']}; "
            f"requests per {r['per']}: {reqs}"
        )
    lines += [f"ERROR {e['group']} {e['system']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few hundred files: seconds, for CI")
    p.add_argument("--json", help="write the results (bench/results schema) here")
    p.add_argument("--runs", type=int, help="runs per loop (3; quick: 1)")
    p.add_argument("--files", type=int, help="files per run (5000; quick: 200)")
    p.add_argument("--write-mib", type=int, help="MiB written per run (256; quick: 8)")
    p.add_argument("--threads", type=int, default=4, help="threads of llfuse and raw-N (4)")
    p.add_argument("--loops", default="", help="comma separated (default: every loop)")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.files = a.files or (200 if a.quick else 5000)
    a.write_mib = a.write_mib or (8 if a.quick else 256)
    a.loops = [x for x in a.loops.split(",") if x] or default_loops(a.threads)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("fuse_loops: needs root (mounts)", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        errors.append(error("setup", "-", "FUSE is not available (/dev/fuse, fusermount3)"))
    else:
        say(f"fuse-loops: {', '.join(args.loops)}; {args.runs} run(s)")
        results, errors = run(args)
    doc = report(
        "fuse-loops",
        quick=args.quick,
        results=results,
        errors=errors,
        params={"runs": args.runs, "files": args.files, "write_mib": args.write_mib},
        settings=SETTINGS,
    )
    print(table(doc["results"], doc["errors"]), flush=True)
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
