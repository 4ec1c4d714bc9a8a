#!/usr/bin/env python3
"""Outside exercisers on keyfence beside ext4 and gocryptfs: xfstests' fsx
and stress-ng's file-system stressors, each checking its own data.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_exercisers.py --xfstests DIR [--ops N] [--seeds 1,2,3]
        [--stress-seconds S] [--systems ext4,keyfence-plain,keyfence-encrypted,gocryptfs]

* **fsx** (``ltp/fsx.c`` of an xfstests checkout at ``DIR``, built here
  with a small stand-in for xfstests' configured ``global.h``): random
  reads, writes, mapped reads and writes, truncates, fallocate and
  ``copy_file_range`` on one file, checked against a copy in memory after
  every read; each seed once as it is, once closing and reopening the
  file every 40 operations (root: with the kernel's caches dropped at
  each reopen).  Modes the file system refuses (punch, zero, collapse,
  insert, clone, dedupe) fsx finds and leaves out by itself.
* **stress-ng** (``apt-get install stress-ng``): each stressor of
  :data:`STRESSORS`, two workers with ``--verify``, for ``S`` seconds.

The systems are keyfence.testing.posix_targets' (a real daemon and mount
for keyfence; the encrypted directory's key added in a session that runs
the exerciser).  Prints one line per run and a table; exit status 1 when
any run on a keyfence system fails.  Nothing is timed: this is about
correctness, which no timing can show.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from keyfence.testing import posix_targets

STRESSORS = (
    "dir", "dentry", "rename", "xattr", "link", "symlink", "fallocate", "hdd", "seek",
    "lockf", "fcntl", "flock", "io", "sync-file", "readahead", "chmod", "chown", "utime",
    "getdent", "filename", "open", "mmap", "fstat", "copy-file", "dirdeep", "dirmany", "fsize",
)  # fmt: skip

_GLOBAL_H = """\
/* a stand-in for xfstests' configured global.h: what fsx.c needs */
#define _GNU_SOURCE
#include <sys/types.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <sys/param.h>
#include <fcntl.h>
#include <unistd.h>
#include <getopt.h>
#include <assert.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#define HAVE_ERR_H 1
#define HAVE_LINUX_FALLOC_H 1
#define HAVE_COPY_FILE_RANGE 1
static inline unsigned long long rounddown_64(unsigned long long x, unsigned int y)
{ return x / y * y; }
static inline unsigned long long roundup_64(unsigned long long x, unsigned int y)
{ return rounddown_64(x + y - 1, y); }
"""


def build_fsx(xfstests: Path, into: Path) -> Path:
    """fsx from ``xfstests``'s sources, built in ``into``."""
    source = xfstests / "ltp" / "fsx.c"
    if not source.is_file():
        raise SystemExit(f"{source}: not found (--xfstests takes an xfstests checkout)")
    (into / "global.h").write_text(_GLOBAL_H)
    binary = into / "fsx"
    command = [
        "cc", "-O2", "-w", f"-I{into}", f"-I{xfstests / 'src'}", f"-I{xfstests / 'include'}",
        "-o", str(binary), str(source),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise SystemExit(f"building fsx failed:\n{built.stderr[-2000:]}")
    return binary


def _run(
    argv: list[str], target: posix_targets.Target, cwd: Path, seconds: float
) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            [*target.prefix, *argv],
            cwd=cwd,
            env=target.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"no answer in {seconds:.0f} s"
    # the last line of what the exerciser said (the encrypted target's
    # prefix asks for the passphrase on stderr)
    tail = (done.stdout.strip() or done.stderr.strip()).splitlines()[-1:] or [""]
    return done.returncode == 0, tail[0]


def exercise(
    name: str, fsx: Path | None, args: argparse.Namespace, logs: Path
) -> dict[str, tuple[bool, str]]:
    """Every run on system ``name``: {run: (passed, last line)}."""
    out: dict[str, tuple[bool, str]] = {}
    with posix_targets.SYSTEMS[name]() as target:
        for seed in args.seeds if fsx is not None else ():
            for label, extra in (("", []), (" reopen", ["-c", "40"])):
                run = f"fsx seed {seed}{label}"
                file = target.directory / f"fsx-{seed}{label.strip()}"
                argv = [str(fsx), "-q", "-N", str(args.ops), "-S", str(seed), *extra]
                argv += ["-P", str(logs), str(file)]
                out[run] = _run(argv, target, target.directory, 1800)
                print(f"{name}: {run}: {out[run][1]}", flush=True)
        for stressor in STRESSORS if shutil.which("stress-ng") else ():
            work = target.directory / f"stress-{stressor}"
            work.mkdir()
            argv = ["stress-ng", f"--{stressor}", "2", "--timeout", str(args.stress_seconds)]
            argv += ["--verify", "--temp-path", str(work)]
            run = f"stress-ng --{stressor}"
            out[run] = _run(argv, target, work, args.stress_seconds + 120)
            print(f"{name}: {run}: {'ok' if out[run][0] else out[run][1]}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xfstests", type=Path, help="an xfstests checkout (fsx's sources)")
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--stress-seconds", type=int, default=8)
    parser.add_argument("--systems", default=",".join(posix_targets.SYSTEMS))
    args = parser.parse_args()
    failed = []
    with tempfile.TemporaryDirectory(prefix="kf-exercisers-") as tmp:
        fsx = build_fsx(args.xfstests, Path(tmp)) if args.xfstests else None
        table: dict[str, dict[str, tuple[bool, str]]] = {}
        for name in args.systems.split(","):
            if name == "gocryptfs" and posix_targets.why_no_gocryptfs():
                print(f"{name}: skipped ({posix_targets.why_no_gocryptfs()})")
                continue
            table[name] = exercise(name, fsx, args, Path(tmp))
    print()
    for name, runs in table.items():
        bad = [run for run, (ok, _) in runs.items() if not ok]
        print(f"{name}: {len(runs) - len(bad)} of {len(runs)} runs passed", *bad, sep="\n  ")
        if name.startswith("keyfence"):
            failed += bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
