#!/usr/bin/env python3
"""Client round trips and command start-up: keyfence beside the kernel.

    .venv/bin/python bench/client_bench.py [--quick] [--json PATH]

1. Operations per second through ``keyfence.client`` against a real daemon
   process (add, search hit, read), beside the same operations as raw
   syscalls to the kernel (src/keyfence/testing/kernel_keyctl.py, ctypes) in the same run.
2. Total read throughput with 1, 2 and 4 client processes, one connection
   each (it should grow with connections up to the core count: the daemon's
   loop answers reads without a thread hop, the clients run in parallel).
3. Wall time of one ``kfctl show @s`` beside Debian's ``keyctl show @s``,
   median of repeated runs (aim: kfctl under 40 ms).

Every figure is a median of repetitions from this one run; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keyfence.client import Client
from keyfence.testing.bench.results import report, result, write_json
from keyfence.testing.daemon import running_daemon

S = -3


def kernel_layer() -> Any:
    from keyfence.testing import kernel_keyctl

    return kernel_keyctl


def rate(fn: Any, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def one_round(api: Any, n: int, rep: int) -> dict[str, float]:
    ring = api.add_key("keyring", f"bench{rep}", None, S)
    keys: list[int] = []
    add = rate(lambda i: keys.append(api.add_key("user", f"k{i}", b"12345678", ring)), n)
    search = rate(lambda i: api.search(ring, "user", f"k{i}", 0), n)
    read = rate(lambda i: api.read(keys[i]), n)
    api.clear(ring)
    api.unlink(ring, S)
    return {"add": add, "search": search, "read": read}


def ops_per_second(api: Any, n: int, reps: int) -> dict[str, list[float]]:
    """ops/s of every round, per operation."""
    rounds = [one_round(api, n, rep) for rep in range(reps)]
    return {op: [r[op] for r in rounds] for op in rounds[0]}


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {op: statistics.median(values) for op, values in runs.items()}


KERNEL_CHILD = "--kernel-rates"


def kernel_rates(n: int, reps: int) -> dict[str, list[float]]:
    """In a child that joins a fresh session keyring: the machine's are untouched."""
    argv = [sys.executable, __file__, KERNEL_CHILD, str(n), str(reps)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def kernel_child_main(n: int, reps: int) -> int:
    """The child of :func:`kernel_rates`: its figures as JSON on stdout."""
    kernel = kernel_layer()
    kernel.join_session_keyring(None)
    print(json.dumps(ops_per_second(kernel, n, reps)))
    return 0


SCALING_CHILD = """
import sys, time
from keyfence.client import Client
c = Client.connect({sock!r}, autostart=False)
key = c.add_key("user", "scale", b"12345678", -3)
print("ready", flush=True)
sys.stdin.readline()
n, end = 0, time.perf_counter() + {seconds}
while time.perf_counter() < end:
    for _ in range(100):
        c.read(key)
    n += 100
print(n / {seconds}, flush=True)
"""


def scaling(sock: str, seconds: float, counts: tuple[int, ...] = (1, 2, 4)) -> dict[int, float]:
    """Total read ops/s with ``count`` client processes reading at once."""
    out = {}
    code = SCALING_CHILD.format(sock=sock, seconds=seconds)
    for count in counts:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for _ in range(count)
        ]
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:  # all start together
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        out[count] = sum(float(child.communicate()[0]) for child in children)
    return out


def wall_times(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    if sys.argv[1:2] == [KERNEL_CHILD]:
        return kernel_child_main(int(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    n, reps, runs = (500, 3, 5) if args.quick else (5000, 3, 30)
    figures: dict[str, Any] = {"n": n, "reps": reps}
    rounds: dict[str, dict[str, list[float]]] = {}
    with running_daemon("--system") as daemon:
        with Client.connect(daemon.socket, autostart=False) as client:
            client.get_keyring_id(S, True)
            rounds["client"] = ops_per_second(client, n, reps)
        figures["scaling"] = scaling(daemon.socket, 1.0 if args.quick else 5.0)
        rounds["kernel"] = kernel_rates(n, reps)
        figures["client"] = medians(rounds["client"])
        figures["kernel"] = medians(rounds["kernel"])
        kfctl = shutil.which("kfctl") or str(Path(sys.executable).parent / "kfctl")
        keyctl = shutil.which("keyctl")
        if os.path.exists(kfctl) and keyctl:
            env = daemon.env
            figures["kfctl_ms"] = wall_times([kfctl, "show", "@s"], runs, env)
            figures["keyctl_ms"] = wall_times([keyctl, "show", "@s"], runs, env)
    print(f"client round trips ({n} ops, median of {reps}), same run:\n")
    print("| op | client ops/s | kernel ops/s | kernel / client |")
    print("|---|---:|---:|---:|")
    for op in ("add", "search", "read"):
        c, k = figures["client"][op], figures["kernel"][op]
        print(f"| {op} | {c:,.0f} | {k:,.0f} | {k / c:.1f}x |")
    print(f"\ntotal read ops/s by client processes (cores: {os.cpu_count()}):")
    for count, total in figures["scaling"].items():
        print(f"  {count} connection(s): {total:,.0f}")
    if "kfctl_ms" in figures:
        kf = statistics.median(figures["kfctl_ms"])
        kc = statistics.median(figures["keyctl_ms"])
        print(
            f"\nwall time of one `show @s` (median of {runs}): kfctl {kf:.1f} ms, "
            f"keyctl {kc:.1f} ms, ratio {kf / kc:.1f}x"
        )
        print(f"aim kfctl < 40 ms: {'MET' if kf < 40 else 'MISSED'}")
    else:
        print("\nkfctl or keyctl not installed: start-up not measured")
    if args.json:
        figures["rounds"] = rounds
        write_json(
            args.json,
            report("client", quick=args.quick, results=schema_rows(figures), detail=figures),
        )
    return 0


def schema_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures as rows of the common schema (keyfence.testing.bench.results)."""
    rows = []
    for op in ("add", "search", "read"):
        for system in ("client", "kernel"):
            rows.append(
                result(
                    f"round trip: {op} ({figures['n']:,} keys)",
                    system,
                    "ops/s",
                    figures["rounds"][system][op],
                    higher_is_better=True,
                )
            )
    for count, total in figures["scaling"].items():
        rows.append(
            result(
                "total reads, concurrent connections",
                f"client x{count}",
                "ops/s",
                [total],
                higher_is_better=True,
            )
        )
    if "kfctl_ms" in figures:
        for system in ("kfctl", "keyctl"):
            rows.append(
                result(
                    "one `show @s` process",
                    system,
                    "ms",
                    figures[f"{system}_ms"],
                    higher_is_better=False,
                )
            )
    return rows


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        sys.exit(main())
