"""pjdfstest, the POSIX filesystem conformance suite, built and run here.

The suite is vendored in ``third_party/pjdfstest`` (BSD-2, upstream commit in
``UPSTREAM``).  :func:`build` compiles ``pjdfstest.c`` with the system ``cc``
into a temporary directory (the ``-D`` flags stand in for autotools'
``config.h`` on Linux/glibc) beside a copy of ``tests/``; :func:`run` runs
``prove -r -v`` there with the target directory as the working directory and
parses the TAP into one :class:`Outcome` per test.  It must run as root:
pjdfstest switches uids and gids itself.

Every system runs the same plan: the suite picks some tests by the
filesystem type ``df -T`` reports (``rename_ctime`` only on EXT4, UFS,
ZFS), so :func:`run` sets ``PJDFSTEST_FS`` (read by our ``conf``; default
``EXT4``, the backing filesystem) and a FUSE mount is held to ext4's plan.

``python -m keyfence.testing.pjdfstest DIR [TESTS...]`` runs it on one
directory and prints the figure and the failures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# what configure finds in glibc (configure.ac's AC_CHECK_FUNC list)
_LIBC_FUNCTIONS = [
    *("FACCESSAT", "FCHMODAT", "FCHOWNAT", "FSTATAT", "LINKAT", "MKDIRAT", "MKFIFOAT"),
    *("MKNODAT", "OPENAT", "POSIX_FALLOCATE", "READLINKAT", "RENAMEAT", "SYMLINKAT"),
    *("UNLINKAT", "UTIMENSAT"),
]
CFLAGS = [
    "-O2",
    "-D_GNU_SOURCE",
    "-DHAVE_SYS_SYSMACROS_H",
    *(f"-DHAVE_{name}" for name in _LIBC_FUNCTIONS),
    "-DHAVE_STRUCT_STAT_ST_ATIM",
    "-DHAVE_STRUCT_STAT_ST_CTIM",
    "-DHAVE_STRUCT_STAT_ST_MTIM",
]


def vendored_dir() -> Path:
    """``third_party/pjdfstest`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "third_party" / "pjdfstest"


def why_not_runnable() -> str | None:
    """Why the suite cannot run here, or None."""
    if os.geteuid() != 0:
        return "pjdfstest needs root (it switches uids itself)"
    if not (vendored_dir() / "pjdfstest.c").exists():
        return f"no vendored pjdfstest at {vendored_dir()}"
    for tool in ("cc", "prove", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install gcc perl openssl)"
    return None


@contextmanager
def built() -> Iterator[Path]:
    """A temporary directory holding the compiled ``pjdfstest`` and its
    ``tests/`` (misc.sh finds the binary in a parent of the test)."""
    with tempfile.TemporaryDirectory(prefix="pjdfstest-") as tmp:
        suite = Path(tmp)
        os.chmod(suite, 0o755)  # the tests run parts as other uids
        shutil.copytree(vendored_dir() / "tests", suite / "tests")
        (suite / "config.h").write_text("/* flags on the command line */\n")
        source = vendored_dir() / "pjdfstest.c"
        subprocess.run(
            ["cc", *CFLAGS, "-I", str(suite), "-o", str(suite / "pjdfstest"), str(source)],
            check=True,
            capture_output=True,
        )
        yield suite


@dataclass(frozen=True)
class Outcome:
    """One test: ``chmod/00.t:5``, whether it passed, what it printed."""

    file: str
    number: int
    passed: bool
    line: str

    @property
    def key(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass
class Result:
    outcomes: list[Outcome] = field(default_factory=list)
    files: int = 0
    failed_files: set[str] = field(default_factory=set)
    seconds: float = 0.0
    tap: str = ""

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.passed]

    def figure(self) -> str:
        return (
            f"{self.passed} of {len(self.outcomes)} tests pass "
            f"({self.files - len(self.failed_files)} of {self.files} files)"
        )


_FILE = re.compile(r"^(?:.*/)?tests/(\S+\.t) \.+ ?(.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)")
_TEST = re.compile(r"^(not ok|ok) (\d+)(.*)$")


def parse(tap: str) -> Result:
    """``prove -v`` output as outcomes.  A ``not ok ... # TODO`` counts as
    passed (as prove counts it); a planned test that never ran, failed."""
    result = Result()
    current: str | None = None
    plan = 0
    seen: dict[int, Outcome] = {}

    def close() -> None:
        if current is None:
            return
        result.files += 1
        for number in range(1, max(plan, max(seen, default=0)) + 1):
            outcome = seen.get(number) or Outcome(current, number, False, "not run")
            result.outcomes.append(outcome)
            if not outcome.passed:
                result.failed_files.add(current)

    for raw in tap.splitlines():
        header = _FILE.match(raw)
        if header:
            close()
            current, plan, seen = header.group(1), 0, {}
            raw = header.group(2)
        if current is None:
            continue
        if m := _PLAN.match(raw):
            plan = int(m.group(1))
        elif m := _TEST.match(raw):
            number = int(m.group(2))
            ok = m.group(1) == "ok" or "# TODO" in m.group(3)
            seen[number] = Outcome(current, number, ok, raw.strip())
    close()
    return result


def run(
    directory: Path,
    tests: Sequence[str] = (),
    *,
    suite: Path | None = None,
    fs: str = "EXT4",
    timeout: float = 3600,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run ``tests`` (paths under ``tests/``: ``chmod``, ``rename/00.t``;
    default all) in ``directory``, in a new POSIX session; ``prefix`` runs
    prove under a wrapper (:class:`Target`: a shell that holds a key)."""
    with contextlib.nullcontext(suite) if suite is not None else built() as where:
        targets = [str(where / "tests" / t) for t in tests] or [str(where / "tests")]
        started = time.monotonic()
        done = subprocess.run(
            [*prefix, "prove", "-r", "-v", "--timer", *targets],
            cwd=directory,
            env=dict(os.environ if env is None else env, PJDFSTEST_FS=fs),
            start_new_session=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = parse(done.stdout)
        result.seconds = time.monotonic() - started
        result.tap = done.stdout
        if result.files == 0:
            raise RuntimeError(f"prove ran nothing:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return result


def report(name: str, result: Result) -> str:
    lines = [f"{name}: {result.figure()}, {result.seconds:.0f} s"]
    lines += [f"  FAIL {o.key}: {o.line}" for o in result.failed]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("tests", nargs="*", help="chmod, rename/00.t ... (default: all)")
    parser.add_argument("--fs", default="EXT4", help="the plan to run (default EXT4)")
    args = parser.parse_args(argv)
    why = why_not_runnable()
    if why:
        print(why, file=sys.stderr)
        return 2
    result = run(args.directory, args.tests, fs=args.fs)
    print(report(str(args.directory), result))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
