#!/usr/bin/env python3
"""Soak: the chaos test (keyfence.testing.chaos) for a duration, with and without the fence.

Usage (root, from the repository root)::

    .venv/bin/python bench/soak.py [--duration SECONDS] [--quick] [--json PATH]
                                   [--no-fence-seconds S] [--seed N]

A real daemon, two mounts, sessions of writer processes appending verifiable
records under several keys while every removal path (clear, unlink, move,
revoke, invalidate, expiry, session end, process keyring owners exiting,
``keyfence lock``) runs at random and the keys are re-added; at the end a
fresh mount checks every record whose write() returned success.  Reports
records written, verified and lost, removals per path, acknowledged records
per 10 s, and the daemon's and workers' memory over time.  Then the same
chaos with the fence off (the demo's switch) for ``--no-fence-seconds``, to
show what the fence saves: there records are lost.

``--quick``: 10 s with the fence, 8 s without.  Default: 300 s and 60 s.
Exit status 1 when a record was lost with the fence on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import keyfence.testing.bench.results as bench_results
from keyfence.testing.chaos import ChaosConfig, ChaosResult, run_chaos


def rows(result: ChaosResult, system: str) -> list[dict[str, Any]]:
    """Result rows for one run (one value each: a soak is one long run)."""
    params = {"seconds": round(result.elapsed, 1), "seed": result.seed}
    out = [
        bench_results.result(
            "soak-records-written",
            system,
            "records",
            [result.records_written],
            higher_is_better=True,
            params=params,
        ),
        bench_results.result(
            "soak-records-verified",
            system,
            "records",
            [result.records_verified],
            higher_is_better=True,
        ),
        bench_results.result(
            "soak-records-lost", system, "records", [result.records_lost], higher_is_better=False
        ),
        bench_results.result(
            "soak-removals",
            system,
            "removals",
            [sum(result.removals.values())],
            higher_is_better=True,
            per_path=result.removals,
        ),
    ]
    if result.acked_per_window:
        out.append(
            bench_results.result(
                "soak-acked-records-per-10s",
                system,
                "records/10s",
                result.acked_per_window,
                higher_is_better=True,
            )
        )
    for name in ("daemon_rss_mib", "workers_rss_mib"):
        values = [s[name] for s in result.samples if s[name]]
        if values:
            out.append(
                bench_results.result(
                    f"soak-{name.replace('_mib', '').replace('_', '-')}",
                    system,
                    "MiB",
                    values,
                    higher_is_better=False,
                    first=values[0],
                    last=values[-1],
                )
            )
    return out


def summary(result: ChaosResult) -> dict[str, Any]:
    keep = [
        "fenced",
        "seed",
        "elapsed",
        "records_written",
        "records_verified",
        "records_lost",
        "garbled_bytes",
        "partial_bytes",
        "short_writes",
        "failed_writes",
        "writer_errors",
        "unclear_errors",
        "removals",
        "readds",
        "sessions_started",
        "action_failures",
        "lost_examples",
        "dropped_reports",
        "read_errors",
    ]
    data = result.to_json()
    return {k: data[k] for k in keep}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, help="seconds of chaos with the fence (300)")
    p.add_argument("--no-fence-seconds", type=float, help="seconds without it (60; 0: skip)")
    p.add_argument("--quick", action="store_true", help="10 s + 8 s, for CI")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    duration = args.duration or (10.0 if args.quick else 300.0)
    unfenced = args.no_fence_seconds
    if unfenced is None:
        unfenced = 8.0 if args.quick else 60.0
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    detail: dict[str, Any] = {}
    lost_with_fence = 0
    runs = [("keyfence", True, duration)]
    if unfenced > 0:
        runs.append(("no-fence", False, unfenced))
    for system, fenced, seconds in runs:
        config = ChaosConfig(
            duration=seconds, fenced=fenced, seed=args.seed, sample_every=max(1.0, seconds / 60)
        )
        print(f"soak: {system}, {seconds:.0f} s", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="kf-soak-", dir="/tmp") as tmp:
                result = run_chaos(config, Path(tmp), log=sys.stderr if not args.quick else None)
        except Exception as err:  # a peer failing is reported, not a crash
            errors.append(bench_results.error("soak", system, f"{type(err).__name__}: {err}"))
            continue
        results.extend(rows(result, system))
        detail[system] = summary(result)
        if fenced:
            lost_with_fence = result.records_lost + result.garbled_bytes
        print(
            f"soak: {system}: {result.records_written} records written, "
            f"{result.records_verified} verified, {result.records_lost} lost, "
            f"{result.garbled_bytes} bytes garbled; removals {result.removals}",
            file=sys.stderr,
            flush=True,
        )
    report = bench_results.report(
        "soak", quick=args.quick, results=results, errors=errors, detail=detail
    )
    if args.json:
        bench_results.write_json(args.json, report)
    else:
        print(json.dumps(report, indent=2))
    return 1 if lost_with_fence or any(e["system"] == "keyfence" for e in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
