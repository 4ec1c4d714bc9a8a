"""fs_everyday's tree steps (bench/fs_everyday.py), shared with
bench/fuse_trace.py ``--day``: the tarball of the standard library and the
day that extracts, searches, commits and removes it on a peer."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sysconfig
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from keyfence.testing.bench.peers import Peer, PeerError

__all__ = ["GIT_ENV", "SMALL_TREE", "day", "git", "make_tarball", "sh", "touch_every_tenth"]

SMALL_TREE = ("email", "json", "asyncio", "concurrent")
"""``--tree small``: four packages, about 100 files."""
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def make_tarball(path: Path, small: bool, stdlib: Path | None = None) -> tuple[int, int]:
    """A tarball of the standard library (or four of its packages); (files, bytes).
    ``stdlib``: another interpreter's (``--stdlib``), else this one's."""
    stdlib = stdlib or Path(sysconfig.get_path("stdlib"))

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if name in ("__pycache__", "site-packages") or name.startswith("config-"):
            return None
        return info

    files = size = 0
    with tarfile.open(path, "w") as tar:
        for top in SMALL_TREE if small else sorted(os.listdir(stdlib)):
            tar.add(stdlib / top, arcname=f"stdlib/{top}", filter=keep)
        for member in tar.getmembers():
            if member.isfile():
                files += 1
                size += member.size
    return files, size


def sh(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run ``argv``; its wall time in seconds, or PeerError with its complaint."""
    t = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        check=False,
        timeout=1800,
    )
    took = time.perf_counter() - t
    # grep -c exits 1 when some file has no match: that is not a failure
    if done.returncode != 0 and not (argv[0] == "grep" and done.returncode == 1):
        lines = done.stderr.strip().splitlines()
        raise PeerError(f"{' '.join(argv[:3])}: {lines[-1] if lines else done.returncode}")
    return took


def git(*args: str) -> list[str]:
    return ["git", "-c", "safe.directory=*", "-c", "core.fsmonitor=false", *args]


def touch_every_tenth(tree: Path) -> int:
    n = 0
    for i, path in enumerate(sorted(p for p in tree.rglob("*.py") if ".git" not in p.parts)):
        if i % 10 == 0:
            with open(path, "a") as f:
                f.write("# touched by fs_everyday\n")
            n += 1
    return n


def _untraced(step: str) -> contextlib.AbstractContextManager[object]:
    del step
    return contextlib.nullcontext()


def day(
    peer: Peer,
    tarball: Path,
    around: Callable[[str], contextlib.AbstractContextManager[object]] = _untraced,
) -> dict[str, float]:
    """The tree steps, in order, on ``peer``: seconds per step.  ``around``
    wraps each step (bench/fuse_trace.py --day traces them)."""
    top = peer.work / "day"
    if top.exists():
        shutil.rmtree(top)
    top.mkdir()
    peer.sync()
    out: dict[str, float] = {}
    tree = top / "stdlib"
    with around("extract"):
        out["extract"] = sh(["tar", "-xf", str(tarball)], cwd=top)
    with around("find"):
        out["find"] = sh(["find", str(tree), "-type", "f"], cwd=top)
    with around("grep"):
        out["grep"] = sh(["grep", "-r", "-c", "import", str(tree)], cwd=top)
    with around("git-add-commit"):
        t = time.perf_counter()
        sh(git("init", "-q"), cwd=tree, env=GIT_ENV)
        sh(git("add", "-A"), cwd=tree, env=GIT_ENV)
        sh(git("commit", "-q", "-m", "tree"), cwd=tree, env=GIT_ENV)
        out["git-add-commit"] = time.perf_counter() - t
    touch_every_tenth(tree)
    with around("git-status"):
        out["git-status"] = sh(git("status", "--porcelain"), cwd=tree, env=GIT_ENV)
    with around("git-commit-a"):
        out["git-commit-a"] = sh(git("commit", "-q", "-a", "-m", "touched"), cwd=tree, env=GIT_ENV)
    with around("rm"):
        out["rm"] = sh(["rm", "-rf", str(top)], cwd=peer.work)
    peer.sync()
    return out
