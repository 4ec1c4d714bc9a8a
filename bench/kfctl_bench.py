#!/usr/bin/env python3
"""One command, one process: ``kfctl`` beside Debian's ``keyctl`` and the syscall.

    .venv/bin/python bench/kfctl_bench.py [--quick] [--json PATH]

For each command (``show @s``, ``add user <desc> <data> @s``, ``search @s user
<desc>``, ``print <key>``) the wall time of one whole invocation is timed N times
from Python (start, run, exit; output discarded) and the median taken:

* ``kfctl`` against a real keyfence daemon on a private socket, as installed
  (keyfence.cli.launcher): the compiled client served by a warm server
  (keyfence.cli.kfctl_warm, started here on a private socket as the first
  call would start one) -- and ``kfctl-cold``, the same command with
  ``KEYFENCE_KFCTL_WARM=0``: Python started for every call,
* ``keyctl`` (Debian's keyutils) against the kernel,
* ``kernel``: the same request as one in-process ctypes syscall (per call),

plus the floor under any command: ``/bin/true``, ``python -c pass`` (the
venv's interpreter, as pip's console script starts it) and ``python -IS -c
pass`` (as the launcher setup.sh installs starts kfctl: keyfence.cli.launcher).
This process first joins a fresh anonymous session keyring, which every
child inherits, so the machine's own keyrings are never touched; it is
cleared at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from keyfence.cli import kfctl_bundle, launcher  # noqa: E402
from keyfence.testing.bench.results import error, report, result, write_json  # noqa: E402
from keyfence.testing.daemon import running_daemon  # noqa: E402
from keyfence.testing.warm import running_warm_server  # noqa: E402

SESSION = -3
FULL_RUNS, QUICK_RUNS = 30, 5
SYSCALL_CALLS = 2_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kernel_layer() -> Any:
    from keyfence.testing import kernel_keyctl

    return kernel_keyctl


def wall_ms(
    argv_for_run: Callable[[int], list[str]], runs: int, env: dict[str, str]
) -> list[float]:
    """Wall time of each whole invocation (one warm-up first); a failing command is
    an error, not a figure."""
    times = []
    for run in range(-1, runs):
        argv = argv_for_run(run)
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[:200]}"
            )
        if run >= 0:
            times.append(elapsed)
    return times


def syscall_ms(call: Callable[[int], object], calls: int, rounds: int) -> list[float]:
    """ms per call of an in-process syscall, one value per round."""
    out = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            call(r * calls + i)
        out.append((time.perf_counter() - start) * 1000 / calls)
    return out


def run_id(output: bytes) -> int:
    return int(output.decode().split()[0])


def command_ids(tool: str, env: dict[str, str]) -> int:
    """A key to search for and print, made with the tool itself."""
    proc = subprocess.run(
        [tool, "add", "user", "bench.target", "payload1", "@s"],
        env=env,
        capture_output=True,
        check=True,
    )
    return run_id(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs, not {FULL_RUNS}")
    parser.add_argument("--json", help="write the common result schema here")
    args = parser.parse_args()
    runs = QUICK_RUNS if args.quick else FULL_RUNS
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    kernel = kernel_layer()
    kernel.join_session_keyring(None)  # children inherit it; the machine's stay untouched
    kfctl = shutil.which("kfctl") or str(Path(sys.executable).parent / "kfctl")
    keyctl = shutil.which("keyctl")
    tools: dict[str, str] = {}
    if os.access(kfctl, os.X_OK):
        tools["kfctl"] = kfctl
        with open(kfctl, "rb") as f:
            compiled = f.read(4) == b"\x7fELF"
        if compiled:
            tools["kfctl-cold"] = kfctl
        python_kfctl = launcher.python_launcher_path(kfctl) if compiled else kfctl
        if not kfctl_bundle.is_current(kfctl_bundle.bundle_path(python_kfctl)):
            # sources edited since the launcher was written: kfctl imports
            # module by module, 5-10 ms slower (not rewritten here: it may be
            # an installed tool of another tree)
            stale = "its bundle is stale or missing: python -m keyfence.cli.launcher PATH"
            errors.append(error("kfctl", "kfctl", f"{kfctl}: {stale}"))
            log(f"WARNING {kfctl}: {stale}")
    else:
        errors.append(error("kfctl", "kfctl", f"{kfctl} not found"))
    if keyctl:
        tools["keyctl"] = keyctl
    else:
        errors.append(error("keyctl", "keyctl", "keyctl not installed (apt: keyutils)"))

    def measure(group: str, system: str, fn: Callable[[], list[float]]) -> None:
        try:
            values = fn()
        except Exception as err:
            errors.append(error(group, system, f"{type(err).__name__}: {err}"))
            log(f"  {group} / {system}: FAILED {err}")
            return
        rows.append(result(group, system, "ms", values, higher_is_better=False))
        log(f"  {group} / {system}: median {statistics.median(values):.3f} ms")

    try:
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(running_daemon("--system"))
            envs = {
                "kfctl": daemon.env,
                "kfctl-cold": {**daemon.env, "KEYFENCE_KFCTL_WARM": "0"},
                "keyctl": dict(os.environ),
            }
            if "kfctl-cold" in tools:
                place = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kf-warm-")))
                warm = stack.enter_context(running_warm_server(place, command=kfctl))
                envs["kfctl"] = {**daemon.env, **warm.env}
            # keyfence's session keyring for us too (as the kernel's above):
            # every kfctl run below is our child and shares it
            from keyfence.client import Client

            with Client.connect(daemon.socket, autostart=False) as client:
                client.join_session_keyring(None)
            targets: dict[str, int] = {}
            for system, tool in tools.items():
                try:
                    targets[system] = command_ids(tool, envs[system])
                except (subprocess.CalledProcessError, ValueError, IndexError) as err:
                    errors.append(error("setup", system, f"cannot add a key: {err}"))
            kernel_target = kernel.add_key("user", "bench.ktarget", b"payload1", SESSION)
            # group: (argv of (tool, its own target key, run), the same request as a syscall)
            commands: dict[
                str, tuple[Callable[[str, int, int], list[str]], Callable[[int], object]]
            ] = {
                "show @s": (
                    lambda tool, _key, _run: [tool, "show", "@s"],
                    lambda _i: kernel.get_keyring_id(SESSION, False),
                ),
                "add user key @s": (
                    lambda tool, _key, run: [tool, "add", "user", f"bench.{run}", "payload1", "@s"],
                    lambda i: kernel.add_key("user", f"kbench.{i}", b"payload1", SESSION),
                ),
                "search @s user key": (
                    lambda tool, _key, _run: [tool, "search", "@s", "user", "bench.target"],
                    lambda _i: kernel.search(SESSION, "user", "bench.ktarget", 0),
                ),
                "print key": (
                    lambda tool, key, _run: [tool, "print", str(key)],
                    lambda _i: kernel.read(kernel_target),
                ),
            }
            for group, (argv, syscall) in commands.items():
                log(f"{group}:")
                for system, tool in tools.items():
                    if system not in targets:
                        continue
                    measure(
                        group,
                        system,
                        lambda a=argv, t=tool, s=system: wall_ms(  # type: ignore[misc]
                            lambda run: a(t, targets[s], run), runs, envs[s]
                        ),
                    )
                calls = SYSCALL_CALLS // (10 if args.quick else 1)
                measure(group, "kernel", lambda c=syscall, n=calls: syscall_ms(c, n, 3))  # type: ignore[misc]
            log("process start-up floor:")
            group = "start a process and exit"
            measure(group, "/bin/true", lambda: wall_ms(lambda _r: ["/bin/true"], runs, {}))
            measure(
                group,
                "python -c pass",
                lambda: wall_ms(lambda _r: [sys.executable, "-c", "pass"], runs, dict(os.environ)),
            )
            measure(
                group,
                "python -IS -c pass",
                lambda: wall_ms(
                    lambda _r: [sys.executable, "-IS", "-c", "pass"], runs, dict(os.environ)
                ),
            )
    finally:
        kernel.clear(SESSION)
    systems = ("kfctl", "kfctl-cold", "keyctl", "kernel")
    print("| command | " + " | ".join(systems) + " |")
    print("|---|---:|---:|---:|---:|")
    for group in dict.fromkeys(r["group"] for r in rows):
        cells = []
        for system in systems:
            row = next((r for r in rows if r["group"] == group and r["system"] == system), None)
            cells.append("-" if row is None else f"{row['median']:.3f} ms")
        print(f"| {group} | " + " | ".join(cells) + " |")
    if args.json:
        write_json(args.json, report("kfctl", quick=args.quick, results=rows, errors=errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
