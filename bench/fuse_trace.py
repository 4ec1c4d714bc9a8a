#!/usr/bin/env python3
"""Where a small file's time goes, seen from the kernel: keyfence and gocryptfs.

Usage (root, from the repository root; needs tracefs with the ``fuse``
events, Linux 6.x)::

    .venv/bin/python bench/fuse_trace.py [--scratch /var/tmp] [--files 3000]
        [--runs 3] [--systems keyfence,gocryptfs] [--together] [--json PATH]
    .venv/bin/python bench/fuse_trace.py --day [--scratch DIR] [--systems ...]
        [--stdlib DIR] [--json PATH]

One process makes ``--files`` small files, one after another (``open``
with ``O_CREAT|O_EXCL``, ``write`` 4 KiB, ``close``), on each system in
turn, while the kernel's ``fuse:fuse_request_send``/``fuse_request_end``
and ``sched:sched_wakeup`` events are recorded.  Per system (medians of the
runs):

* ``us_per_file``: wall time of the loop per file (with tracing on, so a
  little slower than bench/fs_smallfiles.py's);
* per opcode: requests per file and the median time from the request being
  queued to its answer (``send -> end``): the server's own time per request,
  queueing behind an earlier one included;
* ``wake``: from an answer to the waiting process running again, split by
  whether the server answered on the CPU the process waits on (``same
  CPU``) or on another (``other CPU``); the share of each.

``--together`` pins the creating process and every thread of the server
to one CPU (``sched_setaffinity``, as ``taskset -a`` would): the figure a
server gets when each answer wakes its caller on the CPU it runs on.
docs/performance.md ("Everyday speed, part 9") explains what the figures
show on a VM whose idle vCPUs halt (a wake on another CPU there costs tens
of microseconds).

``--day`` traces bench/fs_everyday.py's tree steps instead (``tar -xf`` of
the standard library, ``find``, ``grep -r``, ``git add`` + ``commit``, ``git
status``, ``git commit -a``, ``rm -rf``), once per system: per step the
wall time and, per opcode, the requests and their mean ``send -> end``
(``count x mean``, the dearest first).  Where keyfence is behind a peer,
the difference says where: more requests (the kernel's doing) or dearer
ones (the server's).  docs/performance.md, part 10.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keyfence.testing.bench.everyday import day, make_tarball
from keyfence.testing.bench.kernel_trace import (
    TRACING,
    StepTracer,
    tracing_problem,
    write,
)
from keyfence.testing.bench.peers import (
    GocryptfsAllowOtherPeer,
    GocryptfsPeer,
    KeyfencePeer,
    Peer,
    PeerError,
)

PEERS: dict[str, type[Peer]] = {
    "keyfence": KeyfencePeer,
    "gocryptfs": GocryptfsPeer,
    "gocryptfs-allow-other": GocryptfsAllowOtherPeer,
}
_EVENT = re.compile(
    r"-(\d+)\s+\[(\d+)\].*?\s(\d+\.\d+): (fuse_request_send|fuse_request_end|sched_wakeup): (.*)"
)
_OPCODE = re.compile(r"req (\d+) opcode \d+ \((\w+)\)")
_REQ = re.compile(r"req (\d+)")
_WOKEN = re.compile(r"pid=(\d+) ")


@contextlib.contextmanager
def traced(caller: int) -> Iterator[list[str]]:
    """Record the FUSE requests and the wakeups of ``caller`` meanwhile;
    the trace's lines are in the yielded list afterwards."""
    lines: list[str] = []
    write("tracing_on", "0")
    write("trace", "")
    write("buffer_size_kb", "65536")
    write("events/sched/sched_wakeup/filter", f"pid == {caller}")
    for event in ("fuse/enable", "sched/sched_wakeup/enable"):
        write(f"events/{event}", "1")
    write("tracing_on", "1")
    try:
        yield lines
    finally:
        write("tracing_on", "0")
        for event in ("fuse/enable", "sched/sched_wakeup/enable"):
            write(f"events/{event}", "0")
        write("events/sched/sched_wakeup/filter", "0")
        lines.extend((TRACING / "trace").read_text().splitlines())
        write("trace", "")


def analyse(lines: list[str], caller: int, files: int) -> dict[str, Any]:
    """Requests per file and median latency by opcode; the caller's wakeups."""
    sent: dict[str, tuple[float, str, int]] = {}
    latency: dict[str, list[float]] = collections.defaultdict(list)
    answered: tuple[float, int] | None = None  # last answer to the caller: time, CPU
    wake: dict[str, list[float]] = {"same CPU": [], "other CPU": []}
    for line in lines:
        m = _EVENT.search(line)
        if m is None:
            continue
        pid, cpu, ts, event, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
        if event == "fuse_request_send":
            op = _OPCODE.search(rest)
            if op is not None:
                sent[op[1]] = (ts, op[2].removeprefix("FUSE_"), pid)
        elif event == "fuse_request_end":
            req = _REQ.search(rest)
            if req is not None and req[1] in sent:
                start, op_name, asker = sent.pop(req[1])
                latency[op_name].append((ts - start) * 1e6)
                if asker == caller:
                    answered = (ts, cpu)
        elif answered is not None:  # sched_wakeup of the caller
            woken = _WOKEN.search(rest)
            if woken is not None and int(woken[1]) == caller:
                # logged on the CPU the caller wakes on
                where = "same CPU" if cpu == answered[1] else "other CPU"
                wake[where].append((ts - answered[0]) * 1e6)
                answered = None
    ops = {
        op: {"per_file": round(len(v) / files, 2), "median_us": round(statistics.median(v), 1)}
        for op, v in sorted(latency.items(), key=lambda kv: -sum(kv[1]))
    }
    total = sum(len(v) for v in wake.values()) or 1
    wakes = {
        where: {
            "share": round(len(v) / total, 2),
            "median_us": round(statistics.median(v), 1) if v else None,
        }
        for where, v in wake.items()
    }
    return {"ops": ops, "wake": wakes}


def server_pids(peer: Peer) -> list[int]:
    """The processes serving ``peer``'s mount (their command line names it)."""
    mnt = str(getattr(peer, "mnt", peer.root))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
            if any(arg.decode(errors="replace") == mnt for arg in argv) and (
                b"worker" in b" ".join(argv) or argv[0].endswith(b"gocryptfs")
            ):
                found.append(int(entry))
    return found


def pin(pids: list[int], cpu: int) -> None:
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), {cpu})


def one_run(peer: Peer, files: int, run: int) -> dict[str, Any]:
    data = b"x" * 4096
    d = peer.work / f"trace-{run}"
    d.mkdir()
    for i in range(200):  # warm: the first files make the directory's blocks
        fd = os.open(d / f"warm-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    names = [d / f"f{i}" for i in range(files)]
    with traced(os.getpid()) as lines:
        start = time.perf_counter()
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
        elapsed = time.perf_counter() - start
    out = analyse(lines, os.getpid(), files)
    out["us_per_file"] = round(elapsed / files * 1e6, 1)
    return out


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ops: dict[str, dict[str, float]] = {}
    for op in runs[0]["ops"]:
        rows = [r["ops"][op] for r in runs if op in r["ops"]]
        ops[op] = {k: round(statistics.median(row[k] for row in rows), 2) for k in rows[0]}
    wake = {
        where: {
            "share": statistics.median(r["wake"][where]["share"] for r in runs),
            "median_us": statistics.median([r["wake"][where]["median_us"] or 0.0 for r in runs]),
        }
        for where in runs[0]["wake"]
    }
    return {
        "us_per_file": statistics.median(r["us_per_file"] for r in runs),
        "runs_us_per_file": [r["us_per_file"] for r in runs],
        "ops": ops,
        "wake": wake,
    }


def report(name: str, figures: dict[str, Any]) -> None:
    runs = ", ".join(f"{v:.0f}" for v in figures["runs_us_per_file"])
    print(f"\n{name}: {figures['us_per_file']:.0f} us per file (runs: {runs})")
    for op, row in figures["ops"].items():
        print(f"  {op:12} {row['per_file']:5.2f}/file  send -> end {row['median_us']:6.1f} us")
    for where, row in figures["wake"].items():
        print(
            f"  answer -> caller running, {where:9}: {row['share']:4.0%} of wakes, "
            f"median {row['median_us']:5.1f} us"
        )


def trace_day(systems: list[str], scratch: Path, stdlib: Path | None, out: Path | None) -> int:
    """``--day``: each tree step of fs_everyday once per system, traced."""
    steps: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=scratch, prefix="kftraceday-") as top:
        tarball = Path(top) / "stdlib.tar"
        files, size = make_tarball(tarball, False, stdlib)
        for system in systems:
            (Path(top) / system).mkdir()
            peer = PEERS[system](Path(top) / system)
            tracer = StepTracer()
            try:
                peer.setup()
                day(peer, tarball, tracer)
            except PeerError as err:
                print(f"{system}: {err}", file=sys.stderr)
                return 1
            finally:
                peer.teardown()
            steps[system] = tracer.steps
    for step in steps[systems[0]]:
        print(f"\n{step}")
        for system in systems:
            row = steps[system][step]
            ops = "  ".join(
                f"{op} {r['count']}x{r['mean_us']:.0f}" for op, r in list(row["ops"].items())[:8]
            )
            print(f"  {system:10} {row['wall_s']:7.3f} s  server {row['server_ms']:7.1f} ms  {ops}")
    if out is not None:
        meta = {"day": True, "files": files, "bytes": size}
        out.write_text(json.dumps({"meta": meta, "systems": steps}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--systems", default="keyfence,gocryptfs")
    ap.add_argument("--together", action="store_true", help="caller and server on one CPU")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--day", action="store_true", help="fs_everyday's tree steps instead")
    ap.add_argument("--stdlib", type=Path, help="--day: the tree from another interpreter")
    args = ap.parse_args(argv)
    problem = tracing_problem()
    if problem is not None:
        print(f"fuse_trace: {problem}", file=sys.stderr)
        return 2
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in PEERS]
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(PEERS)})")
    if args.day:
        return trace_day(systems, args.scratch, args.stdlib, args.json)
    cpus = sorted(os.sched_getaffinity(0))
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    mine = os.sched_getaffinity(0)
    for run in range(args.runs):
        for system in systems:
            scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix=f"kftrace-{system}-"))
            peer = PEERS[system](scratch)
            try:
                peer.setup()
                if args.together:
                    pin(server_pids(peer), cpus[-1])
                    os.sched_setaffinity(0, {cpus[-1]})
                runs[system].append(one_run(peer, args.files, run))
            except PeerError as err:
                print(f"{system}: {err}", file=sys.stderr)
                return 1
            finally:
                os.sched_setaffinity(0, mine)
                peer.teardown()
                with contextlib.suppress(OSError):
                    scratch.rmdir()
    for system in systems:
        results[system] = medians(runs[system])
        report(system, results[system])
    if args.json is not None:
        meta = {"files": args.files, "runs": args.runs, "together": args.together}
        meta["cpus"] = len(cpus)
        args.json.write_text(json.dumps({"meta": meta, "systems": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
