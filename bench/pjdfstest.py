#!/usr/bin/env python3
"""POSIX conformance (pjdfstest) of keyfence beside ext4 and gocryptfs.

Usage (root, from the repository root)::

    .venv/bin/python bench/pjdfstest.py [--systems ext4,keyfence-plain,keyfence-encrypted,gocryptfs]
        [--tap-dir DIR] [TESTS...]

Builds the vendored suite once (``keyfence.testing.pjdfstest``) and runs it
with ``prove -r`` on each system of ``keyfence.testing.posix_targets`` in
turn (all on /var/tmp's disk, every system on ext4's plan); prints per
system the figure (tests and files passed) and every failing test, and
which failures differ from ext4's.  ``TESTS``: ``chmod``, ``rename/00.t``
... (default: all, about 9 minutes per system).  ``--tap-dir`` keeps each
system's TAP output.  Exit status 0 even when tests fail (it measures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyfence.testing import pjdfstest, posix_targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*")
    parser.add_argument("--systems", default=",".join(posix_targets.SYSTEMS))
    parser.add_argument("--tap-dir", type=Path)
    args = parser.parse_args()
    why = pjdfstest.why_not_runnable()
    if why:
        print(why, file=sys.stderr)
        return 2
    results: dict[str, pjdfstest.Result] = {}
    with pjdfstest.built() as suite:
        for name in args.systems.split(","):
            if name == "gocryptfs" and posix_targets.why_no_gocryptfs():
                print(f"{name}: skipped ({posix_targets.why_no_gocryptfs()})")
                continue
            with posix_targets.SYSTEMS[name]() as target:
                result = pjdfstest.run(
                    target.directory,
                    args.tests,
                    suite=suite,
                    prefix=target.prefix,
                    env=target.env,
                )
            results[name] = result
            print(pjdfstest.report(name, result), flush=True)
            if args.tap_dir:
                args.tap_dir.mkdir(parents=True, exist_ok=True)
                (args.tap_dir / f"{name}.tap").write_text(result.tap)
    reference = results.get("ext4")
    if reference is not None:
        reference_failed = {o.key for o in reference.failed}
        print("\nfigures (same plan, ext4's):")
        for name, result in results.items():
            failed = {o.key for o in result.failed}
            print(
                f"  {name}: {result.figure()}; fails where ext4 passes: "
                f"{len(failed - reference_failed)}, passes where ext4 fails: "
                f"{len(reference_failed - failed)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
