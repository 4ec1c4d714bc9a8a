#!/usr/bin/env python3
"""How long an emergency wipe takes with a lot of dirty data (issue #6).

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_emergency.py [--dirty-mib 1024] [--rounds 7]
        [--quick] [--json PATH]

Real processes: a daemon (``keyfence daemon --system`` on a private
socket), a mount worker it spawns (dirty limit twice ``--dirty-mib``, no
expiry), and a login session (a process in a new POSIX session, so a fresh
``@s``) that, each round, adds a random 64-byte logon key to its ``@s``,
writes ``--dirty-mib`` MiB into an encrypted file it keeps open (all of it
dirty in the worker), and calls ``clear(@s, emergency=True)``:

* ``emergency-clear``: milliseconds until the call returns (the key is
  unusable and its payload wiped in the daemon);
* ``emergency-drop-report``: milliseconds until the daemon has the
  mount's report of the files and bytes it discarded (its pages zeroed and
  dropped).

Median, min, max and p99 (nearest rank) over the rounds; ``--quick``: 64 MiB,
one round.  JSON in the common schema (/work/notes/schema.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keyfence.testing.bench.results import report, result, write_json

KEY_SPEC_SESSION_KEYRING = -3
KEYFENCE = [sys.executable, "-m", "keyfence.cli.main"]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# ------------------------------------------------------- the session's side


def session_rounds(directory: str, dirty_mib: int, rounds: int) -> None:
    """Run in a new POSIX session: one JSON line per round on stdout."""
    from keyfence.client import Client
    from keyfence.fs.crypto import MasterKey

    key = os.urandom(64)
    ref = f"keyfence:{MasterKey(key).identifier}"
    chunk = os.urandom(1 << 20)
    with Client.connect(autostart=False) as client:
        for n in range(rounds):
            client.add_key("logon", ref, key, KEY_SPEC_SESSION_KEYRING)
            if n == 0:
                os.setxattr(directory, "user.keyfence.policy", ref.encode())
            start = time.perf_counter()
            fd = os.open(os.path.join(directory, f"dirty-{n}"), os.O_WRONLY | os.O_CREAT, 0o600)
            for _ in range(dirty_mib):
                os.write(fd, chunk)
            wrote = time.perf_counter() - start
            reports = sum(len(m["dropped"]) for m in client._call("mounts"))
            start = time.perf_counter()
            client.clear(KEY_SPEC_SESSION_KEYRING, emergency=True)
            cleared = time.perf_counter() - start
            while True:
                mounts = client._call("mounts")
                if sum(len(m["dropped"]) for m in mounts) > reports:
                    break
                time.sleep(0.0005)
            reported = time.perf_counter() - start
            dropped = mounts[0]["dropped"][-1]["files"]
            with contextlib.suppress(OSError):
                os.close(fd)  # its write-back fails: the key is gone
            line = {
                "clear_s": cleared,
                "report_s": reported,
                "write_s": wrote,
                "dropped": sum(dropped.values()),
            }
            print(json.dumps(line), flush=True)


# --------------------------------------------------------------- the bench


def run(dirty_mib: int, rounds: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kf-emergency-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        sock = os.path.join(tmp, "sock")
        env = dict(
            os.environ,
            KEYFENCE_SOCKET=sock,
            KEYFENCE_NO_AUTOSTART="1",
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        )
        backing, mnt = os.path.join(tmp, "backing"), os.path.join(tmp, "mnt")
        os.mkdir(backing)
        os.mkdir(mnt)
        with open(os.path.join(tmp, "daemon.log"), "wb") as log:
            daemon = subprocess.Popen(
                [*KEYFENCE, "daemon", "--socket", sock, "--system"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.01)
            options = [f"--dirty-limit={2 * dirty_mib + 64}M", "--dirty-expire=3600"]
            subprocess.run(
                [*KEYFENCE, "mount"] + [f"--option={o}" for o in options] + [backing, mnt],
                env=env,
                check=True,
            )
            try:
                enc = os.path.join(mnt, "enc")
                sizes = ["--dirty-mib", str(dirty_mib), "--rounds", str(rounds)]
                os.mkdir(enc)
                done = subprocess.run(
                    [sys.executable, __file__, "--session", enc, *sizes],
                    env=env,
                    capture_output=True,
                    text=True,
                    start_new_session=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"the session failed: {done.stderr.strip()[-2000:]}")
                return [json.loads(line) for line in done.stdout.splitlines() if line]
            finally:
                subprocess.run(
                    [*KEYFENCE, "umount", mnt],
                    env=env,
                    capture_output=True,
                    check=False,
                )
                subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, check=False)
        finally:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dirty-mib", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--quick", action="store_true", help="64 MiB, one round")
    p.add_argument("--json", help="write the report (common schema) here")
    p.add_argument("--session", help=argparse.SUPPRESS)
    args = p.parse_args()
    dirty_mib = args.dirty_mib or (64 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 7)
    if args.session:
        session_rounds(args.session, dirty_mib, rounds)
        return 0
    results, errors = [], []
    size = f"{dirty_mib // 1024}GiB" if dirty_mib % 1024 == 0 else f"{dirty_mib}MiB"
    try:
        lines = run(dirty_mib, rounds)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        errors.append(
            {"group": f"emergency-clear-{size}-dirty", "system": "keyfence", "error": str(err)}
        )
        lines = []
    for line in lines:
        if line["dropped"] != dirty_mib << 20:
            errors.append(
                {
                    "group": f"emergency-drop-report-{size}-dirty",
                    "system": "keyfence",
                    "error": f"{line['dropped']} bytes reported dropped, {dirty_mib << 20} dirty",
                }
            )
    if lines:
        clear = [line["clear_s"] * 1000 for line in lines]
        reported = [line["report_s"] * 1000 for line in lines]
        params = {"dirty_bytes": dirty_mib << 20, "rounds": len(lines)}
        results.append(
            result(
                f"emergency-clear-{size}-dirty",
                "keyfence",
                "ms",
                clear,
                higher_is_better=False,
                p99=p99(clear),
                params=params,
            )
        )
        results.append(
            result(
                f"emergency-drop-report-{size}-dirty",
                "keyfence",
                "ms",
                reported,
                higher_is_better=False,
                p99=p99(reported),
                params=params,
            )
        )
        for row in results:
            print(
                f"{row['group']}: median {row['median']:.2f} ms, p99 {row['p99']:.2f} ms "
                f"(min {row['min']:.2f}, max {row['max']:.2f}, {len(lines)} rounds)"
            )
    for e in errors:
        print(f"error: {e['group']}: {e['error']}", file=sys.stderr)
    data = report("fs-emergency", quick=args.quick, results=results, errors=errors)
    if args.json:
        write_json(args.json, data)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
