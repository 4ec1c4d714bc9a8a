"""Part 19's git probe: ``git add -A`` of the standard library's tree on a
real mount, with the kernel's FUSE events recorded; per opcode the
requests and their time from sent to answered (mean, median, p90).

    .venv/bin/python git_add_traced.py SCRATCH_DIR keyfence|gocryptfs [MOUNT_OPTION ...]

(root: tracefs.)  The tree is extracted and ``git init`` run before the
trace starts; only ``git add`` is traced (fs_everyday's git and its
environment, keyfence.testing.bench.everyday).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from keyfence.testing.bench.everyday import GIT_ENV, git, make_tarball, sh
from keyfence.testing.bench.kernel_trace import recorded, request_times
from keyfence.testing.bench.peers import GocryptfsPeer, KeyfencePeer, Peer


def traced_git_add(peer: Peer, tarball: Path) -> tuple[float, list[str]]:
    tree = peer.work / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(tree)], check=True)
    sh(git("init", "-q"), cwd=tree, env=GIT_ENV)
    with recorded() as lines:
        wall = sh(git("add", "-A"), cwd=tree, env=GIT_ENV)
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
            wall, lines = traced_git_add(peer, tarball)
        finally:
            peer.teardown()
    print(f"{system} {' '.join(options)}: git add {wall:.3f} s")
    spent = request_times(lines)
    for op_name, times in sorted(spent.items(), key=lambda kv: -sum(kv[1]))[:10]:
        times.sort()
        print(
            f"  {op_name:12} n={len(times):5} mean={statistics.fmean(times):6.1f} "
            f"median={times[len(times) // 2]:6.1f} p90={times[int(len(times) * 0.9)]:7.1f} us"
        )


if __name__ == "__main__":
    main()
