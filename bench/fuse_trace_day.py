#!/usr/bin/env python3
"""The everyday steps seen from the kernel: requests and server time per step.

Usage (root, from the repository root; tracefs with the ``fuse`` events)::

    .venv/bin/python bench/fuse_trace_day.py [--scratch /var/tmp]
        [--systems keyfence,gocryptfs] [--runs 1] [--stdlib DIR] [--json PATH]

bench/fs_everyday.py's tree steps (``tar -xf`` of the standard library,
``find``, ``grep -r``, ``git add`` + ``commit``, ``git status``, ``git
commit -a``, ``rm -rf``), each recorded with the kernel's
``fuse:fuse_request_send``/``fuse_request_end`` events (bench/fuse_trace.py).
Per step and system: the wall time, then per opcode the number of requests
and the mean time from a request being queued to its answer (``send ->
end``: the server's time, queueing behind earlier requests included), and
the sum of those over the step.  Where keyfence is behind a peer, the
difference of ``count x mean`` per opcode says where: more requests (the
kernel's doing: docs/performance.md) or dearer ones (the server's).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fs_everyday import day, make_tarball
from fuse_trace import PEERS, TRACING, tracing_problem
from keyfence.testing.bench.peers import PeerError

_SEND = " fuse_request_send: "
_END = " fuse_request_end: "


def _write(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def analyse(lines: list[str]) -> dict[str, dict[str, float]]:
    """Per opcode: requests and mean send -> end in microseconds."""
    sent: dict[str, tuple[float, str]] = {}
    spent: dict[str, list[float]] = collections.defaultdict(list)
    for line in lines:
        for marker in (_SEND, _END):
            at = line.find(marker)
            if at < 0:
                continue
            ts = float(line[:at].rsplit(" ", 1)[-1].rstrip(":"))
            words = line[at + len(marker) :].split()
            req = words[words.index("req") + 1] if "req" in words else None
            if req is None:
                break
            if marker == _SEND and "opcode" in words:
                name = words[words.index("opcode") + 2].strip("()").removeprefix("FUSE_")
                sent[req] = (ts, name)
            elif marker == _END and req in sent:
                start, name = sent.pop(req)
                spent[name].append((ts - start) * 1e6)
            break
    return {
        op: {"count": len(v), "mean_us": round(statistics.fmean(v), 1)}
        for op, v in sorted(spent.items(), key=lambda kv: -sum(kv[1]))
    }


class Recorder:
    """``around`` for fs_everyday.day: traces each step."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        _write("tracing_on", "0")
        _write("trace", "")
        _write("buffer_size_kb", "131072")
        _write("events/fuse/enable", "1")
        _write("tracing_on", "1")
        start = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - start
            _write("tracing_on", "0")
            _write("events/fuse/enable", "0")
            lines = (TRACING / "trace").read_text().splitlines()
            _write("trace", "")
            ops = analyse(lines)
            total = sum(row["count"] * row["mean_us"] for row in ops.values())
            self.steps[step] = {"wall_s": round(wall, 4), "server_ms": round(total / 1000, 1)}
            self.steps[step]["ops"] = ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--systems", default="keyfence,gocryptfs")
    ap.add_argument("--runs", type=int, default=1, help="the last run is reported")
    ap.add_argument("--stdlib", type=Path, help="the tree from another interpreter")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    problem = tracing_problem()
    if problem is not None:
        print(f"fuse_trace_day: {problem}", file=sys.stderr)
        return 2
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in PEERS]
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(PEERS)})")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kftraceday-") as top:
        tarball = Path(top) / "stdlib.tar"
        files, size = make_tarball(tarball, False, args.stdlib)
        for system in systems:
            peer = PEERS[system](Path(top) / system)
            (Path(top) / system).mkdir()
            recorder = Recorder()
            try:
                peer.setup()
                for _ in range(args.runs):
                    day(peer, tarball, recorder)
            except PeerError as err:
                print(f"{system}: {err}", file=sys.stderr)
                return 1
            finally:
                peer.teardown()
            out[system] = recorder.steps
    for step in next(iter(out.values())):
        print(f"\n{step}")
        for system, steps in out.items():
            row = steps[step]
            ops = "  ".join(
                f"{op} {r['count']}x{r['mean_us']:.0f}" for op, r in list(row["ops"].items())[:8]
            )
            print(f"  {system:10} {row['wall_s']:7.3f} s  server {row['server_ms']:7.1f} ms  {ops}")
    if args.json is not None:
        meta = {"files": files, "bytes": size, "runs": args.runs}
        args.json.write_text(json.dumps({"meta": meta, "systems": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
