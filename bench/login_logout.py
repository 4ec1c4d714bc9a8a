#!/usr/bin/env python3
"""Logout through a real PAM login, with and without the fence.

Usage (root, from the repository root)::

    .venv/bin/python bench/login_logout.py [--quick] [--sizes 8,24,64] [--runs 3]
                                           [--json PATH]

Two real-login set-ups side by side (keyfence.testing.login, the set-up of
``keyfence demo --login``): a daemon with the fence and one without it
(keyfence.cli.demo_mount's switch, the only one), each with a mount holding
the encrypted home of an account with a password (``login1``, uid 61301;
``login2``, uid 61302; made for the run and removed after it), and the PAM
lines of docs/login.md in a service of our own.  One run, for each size N and each set-up:

1. log in through libpam (keyfence/cli/pam_login.py: auth unlocks the
   home with the password, open_session gives the login its ``@s``);
2. an "editor" started in the login (``setsid``: it outlives the shell, as
   a tmux server would) writes N MiB to a file in the home and keeps it
   open, never closing it (a close(2) would write it back): N MiB dirty,
   unless the mount's flusher wrote some back first (pages older than
   ``--dirty-expire``, 5 s; files while dirty memory is above half of
   ``--dirty-limit``, 64 MiB: docs/fs.md), so the bytes still dirty at
   logout are reported too (``keyfence pam``'s log line);
3. log out: the shell exits, ``close_session`` clears ``@s`` (through the
   fence, or, without it, wiping the key at once); timed as the PAM
   application waits for it, ``keyfence pam``'s start included;
4. the editor is killed; a fresh login counts the bytes of the file that
   read back intact (4 KiB blocks compared with what was written).

Next to them, in the same loop, the plain disk: write + fsync of N MiB to
the file system that holds the backing directories (system "disk": the
peer the ratios are taken against).  Runs are interleaved (size by size,
set-up by set-up, then the disk) and reported as medians.

``--quick``: 8 MiB, one run (seconds; CI).  Exit status 1 when a byte was
lost with the fence, or a fenced run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from keyfence.testing.login import (
    LoginSetup,
    close_session_seconds,
    editor_command,
    kill_editor,
    login_setup,
    why_no_login,
)

PASSWORD = "login-bench-password"
SYSTEMS = (("keyfence", True), ("no-fence", False))
ACCOUNTS = {"keyfence": ("login1", 61301), "no-fence": ("login2", 61302)}
"""One account per set-up (made for the run, removed after it)."""

CHECK = """
import os, sys
source, target = sys.argv[1:3]
intact = size = 0
with open(source, "rb") as f:
    want = f.read()
try:
    fd = os.open(target, os.O_RDONLY)
except OSError as err:
    print(f"0 0 {err.strerror}")
    sys.exit(0)
size = os.fstat(fd).st_size
for off in range(0, len(want), 4096):
    try:
        got = os.pread(fd, 4096, off)
    except OSError:
        continue
    if got == want[off : off + 4096]:
        intact += len(got)
os.close(fd)
os.unlink(target)
print(f"{intact} {size} ok")
"""
"""Counts the bytes that read back as written (then removes the file)."""


def say(text: str) -> None:
    print(text, flush=True)


def one_run(s: LoginSetup, source: Path, mib: int, tag: str) -> dict[str, float]:
    """Login, N MiB dirty in an open file, logout, fresh login: the figures."""
    target = s.home / f"edit-{tag}.bin"
    pidfile = s.user_tmp / f"editor-{tag}.pid"
    s.pam_log.write_text("")
    first = s.login(editor_command(source, target, pidfile))
    try:
        if first.returncode:
            raise RuntimeError(f"login failed ({first.returncode}): {first.stderr.strip()}")
        logout = close_session_seconds(first.stderr)
        log = s.pam_log_text()
        cleared = re.search(r"session keyring cleared \(\d+ keys\) in ([0-9.]+) s", log)
        dirty = re.search(r"logout: ([0-9,]+) bytes to write back", log)
        if logout is None or cleared is None or dirty is None:
            raise RuntimeError(f"no logout figures: {first.stderr.strip()} {log.strip()}")
    finally:
        kill_editor(pidfile)
    second = s.login(f"/usr/bin/python3 -c '{CHECK}' {source} {target}")
    words = second.stdout.split()
    if second.returncode or len(words) < 3:
        raise RuntimeError(f"fresh login failed: {second.stderr.strip()} {second.stdout.strip()}")
    return {
        "logout_s": logout,
        "clear_s": float(cleared.group(1)),
        "dirty_bytes": float(dirty.group(1).replace(",", "")),
        "intact_bytes": float(words[0]),
        "size_bytes": float(words[1]),
    }


def disk_run(directory: Path, data: bytes) -> float:
    """The peer: write + fsync the same bytes to the same file system."""
    path = directory / "disk-peer.bin"
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.monotonic() - start
    path.unlink()
    return took


def row(
    group: str, system: str, metric: str, runs: list[float], higher: bool, **extra: Any
) -> dict[str, Any]:
    """One row of the common result schema (bench/suite.py)."""
    out: dict[str, Any] = {
        "group": group,
        "system": system,
        "metric": metric,
        "higher_is_better": higher,
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "runs": runs,
    }
    out.update(extra)
    return out


def git_describe() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def report(
    quick: bool, results: list[dict[str, Any]], errors: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "bench": "login-logout",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "git": git_describe(),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "results": results,
        "errors": errors,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 MiB, one run")
    p.add_argument("--sizes", help="MiB written before logout, comma-separated (8,24,64)")
    p.add_argument("--runs", type=int, help="runs per size and set-up (3)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    sizes = [int(x) for x in (args.sizes or ("8" if args.quick else "8,24,64")).split(",")]
    runs = args.runs or (1 if args.quick else 3)
    errors: list[dict[str, Any]] = []
    why = why_no_login()
    if why:
        say(f"login-logout: skipped: {why}")
        errors.append({"group": "login-logout", "system": "keyfence", "error": why})
        if args.json:
            Path(args.json).write_text(json.dumps(report(args.quick, [], errors), indent=2))
        return 0
    figures: dict[tuple[int, str], list[dict[str, float]]] = {}
    disk: dict[int, list[float]] = {}
    with contextlib.ExitStack() as stack:
        setups = {
            system: stack.enter_context(
                login_setup(
                    ACCOUNTS[system][0],
                    PASSWORD,
                    uid=ACCOUNTS[system][1],
                    fenced=fenced,
                    service_prefix="login-bench",
                )
            )
            for system, fenced in SYSTEMS
        }
        sources = {}
        for mib in sizes:
            path = setups["keyfence"].root / f"source-{mib}.bin"
            path.write_bytes(os.urandom(mib << 20))
            path.chmod(0o644)
            sources[mib] = path
        for n in range(runs):
            for mib in sizes:
                for system, _fenced in SYSTEMS:
                    tag = f"{mib}-{n}"
                    try:
                        got = one_run(setups[system], sources[mib], mib, tag)
                    except (RuntimeError, subprocess.TimeoutExpired) as err:
                        say(f"{system} {mib} MiB run {n + 1}: FAILED: {err}")
                        errors.append(
                            {"group": f"login-logout-{mib}MiB", "system": system, "error": str(err)}
                        )
                        continue
                    figures.setdefault((mib, system), []).append(got)
                    say(
                        f"{system:9} {mib:3} MiB written, run {n + 1}: "
                        f"{int(got['dirty_bytes']):,} bytes dirty at logout; logout "
                        f"{got['logout_s']:.2f} s (clear @s {got['clear_s']:.2f} s); after a "
                        f"fresh login {int(got['intact_bytes']):,} of {mib << 20:,} bytes intact"
                    )
                took = disk_run(setups["keyfence"].root, sources[mib].read_bytes())
                disk.setdefault(mib, []).append(took)
                say(f"{'disk':9} {mib:3} MiB write + fsync, run {n + 1}: {took:.2f} s")
    results: list[dict[str, Any]] = []
    for mib in sizes:
        params = {"dirty_mib": mib}
        for system, _fenced in SYSTEMS:
            got = figures.get((mib, system))
            if not got:
                continue
            results.append(
                row(
                    f"login-logout-{mib}MiB",
                    system,
                    "s",
                    [g["logout_s"] for g in got],
                    False,
                    params=params,
                )
            )
            results.append(
                row(f"login-clear-{mib}MiB", system, "s", [g["clear_s"] for g in got], False)
            )
            results.append(
                row(
                    f"login-dirty-{mib}MiB",
                    system,
                    "bytes",
                    [g["dirty_bytes"] for g in got],
                    False,
                )
            )
            results.append(
                row(
                    f"login-intact-{mib}MiB",
                    system,
                    "bytes",
                    [g["intact_bytes"] for g in got],
                    True,
                    params={"written": mib << 20},
                )
            )
        if disk.get(mib):  # the peer of the whole logout and of the clear inside it
            results.append(row(f"login-logout-{mib}MiB", "disk", "s", disk[mib], False))
            results.append(row(f"login-clear-{mib}MiB", "disk", "s", disk[mib], False))
    # ratios to the plain disk (the suite adds them too; here for the script's own use)
    medians = {(r["group"], r["system"]): r["median"] for r in results}
    for r in results:
        peer = medians.get((r["group"], "disk"))
        if peer and r["system"] != "disk" and r["median"] > 0:
            r["ratios"] = {"disk": peer / r["median"]}
    say("\nmedians (N MiB written, left open, then logout):")
    for mib in sizes:
        line = [f"{mib:3} MiB:"]
        for system, _fenced in SYSTEMS:
            logout = medians.get((f"login-logout-{mib}MiB", system))
            dirty = medians.get((f"login-dirty-{mib}MiB", system))
            intact = medians.get((f"login-intact-{mib}MiB", system))
            if logout is not None and intact is not None and dirty is not None:
                line.append(
                    f"{system}: {int(dirty):,} dirty, logout {logout:.2f} s, "
                    f"{int(intact):,}/{mib << 20:,} intact;"
                )
        if (f"login-logout-{mib}MiB", "disk") in medians:
            line.append(f"disk write+fsync {medians[(f'login-logout-{mib}MiB', 'disk')]:.2f} s")
        say(" ".join(line))
    if args.json:
        Path(args.json).write_text(json.dumps(report(args.quick, results, errors), indent=2) + "\n")
    lost = any(
        g["intact_bytes"] < (mib << 20)
        for (mib, system), got in figures.items()
        if system == "keyfence"
        for g in got
    )
    failed = any(e["system"] == "keyfence" for e in errors)
    return 1 if lost or failed else 0


if __name__ == "__main__":
    sys.exit(main())
