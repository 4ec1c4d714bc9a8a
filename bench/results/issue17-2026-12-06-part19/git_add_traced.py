"""Part 19's git probe: ``git add -A`` of the standard library's tree on a
real mount, with the kernel's FUSE events recorded; per opcode the
requests and their time from sent to answered (mean, median, p90).

    .venv/bin/python git_add_traced.py SCRATCH_DIR keyfence|gocryptfs [MOUNT_OPTION ...]

(root: tracefs.)  The tree is extracted and ``git init`` run before the
trace starts; only ``git add`` is traced.
"""

from __future__ import annotations

import collections
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keyfence.testing.bench.everyday import make_tarball
from keyfence.testing.bench.kernel_trace import TRACING, write
from keyfence.testing.bench.peers import GocryptfsPeer, KeyfencePeer, Peer

EVENT = re.compile(r"(\d+\.\d+): (fuse_request_send|fuse_request_end): (.*)")
GIT_ENV = {
    "PATH": "/usr/bin:/bin",
    "GIT_AUTHOR_NAME": "a",
    "GIT_AUTHOR_EMAIL": "a@b",
    "GIT_COMMITTER_NAME": "a",
    "GIT_COMMITTER_EMAIL": "a@b",
}


def traced_git_add(peer: Peer, tarball: Path, home: str) -> tuple[float, list[str]]:
    tree = peer.work / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(tree)], check=True)
    env = {**GIT_ENV, "HOME": home}
    subprocess.run(["git", "init", "-q"], cwd=tree, env=env, check=True)
    write("tracing_on", "0")
    write("trace", "")
    write("buffer_size_kb", "131072")
    write("events/fuse/enable", "1")
    write("tracing_on", "1")
    start = time.perf_counter()
    subprocess.run(["git", "add", "-A"], cwd=tree, env=env, check=True)
    wall = time.perf_counter() - start
    write("tracing_on", "0")
    write("events/fuse/enable", "0")
    lines = (TRACING / "trace").read_text().splitlines()
    write("trace", "")
    return wall, lines


def main() -> None:
    scratch, system, options = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    with tempfile.TemporaryDirectory(dir=scratch) as top:
        tarball = Path(top) / "t.tar"
        make_tarball(tarball, False, None)
        (Path(top) / "p").mkdir()
        peer: Peer = (
            KeyfencePeer(Path(top) / "p", options=options)
            if system == "keyfence"
            else GocryptfsPeer(Path(top) / "p")
        )
        peer.setup()
        try:
            wall, lines = traced_git_add(peer, tarball, top)
        finally:
            peer.teardown()
    sent: dict[str, tuple[float, str]] = {}
    spent: dict[str, list[float]] = collections.defaultdict(list)
    for line in lines:
        m = EVENT.search(line)
        if not m:
            continue
        ts, kind, rest = float(m.group(1)), m.group(2), m.group(3)
        found = re.search(r"req (\d+)", rest)
        if found is None:
            continue
        req = found.group(1)
        if kind.endswith("send"):
            op = re.search(r"\((\w+)\)", rest)
            sent[req] = (ts, op.group(1).removeprefix("FUSE_") if op else "?")
        elif req in sent:
            start, op_name = sent.pop(req)
            spent[op_name].append((ts - start) * 1e6)
    print(f"{system} {' '.join(options)}: git add {wall:.3f} s")
    for op_name, times in sorted(spent.items(), key=lambda kv: -sum(kv[1]))[:10]:
        times.sort()
        print(
            f"  {op_name:12} n={len(times):5} mean={statistics.fmean(times):6.1f} "
            f"median={times[len(times) // 2]:6.1f} p90={times[int(len(times) * 0.9)]:7.1f} us"
        )


if __name__ == "__main__":
    main()
