"""What every benchmark script (bench/) shares: the source measured, the machine,
and the common result schema (bench/suite.py merges the reports).

A report is ``{"bench", "date", "git", "quick", "machine", "results", "errors"}``;
each result row is one (group, system) pair with its unit, direction, median,
min, max, every run, and ratios to other systems of the same group.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keyfence

SOURCE = Path(keyfence.__file__).resolve().parents[2]
"""The checkout whose keyfence is measured (the one imported: with
``PYTHONPATH`` at another checkout's ``src``, that checkout)."""

# Systems a ratio is taken against when present in the same group.
REFERENCE_SYSTEMS = ("gocryptfs", "disk", "kernel", "keyctl", "sync")


def git_describe() -> str:
    """The source measured: commit, and "-dirty" if the work tree differs."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(SOURCE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def today() -> str:
    """The UTC date, YYYY-MM-DD: the name results are filed under."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _distro() -> str | None:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        return None


def machine_info(path: str | Path = SOURCE) -> dict[str, Any]:
    """What a reader needs to compare figures across machines; ``path`` names the
    directory whose file system the benchmark writes to."""
    fs = _first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)])
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "os": _distro(),
        "python": platform.python_version(),
        "memory_bytes": _mem_total_bytes(),
        "filesystem": fs,
    }


def rotated(names: Sequence[str], run: int) -> list[str]:
    """The order of ``names`` in round ``run``: each leads in turn, so what
    a place in the order brings (the disk still writing back the one before,
    caches warm or cold) is shared out instead of falling on one system."""
    if not names:
        return []
    k = run % len(names)
    return [*names[k:], *names[:k]]


def ratio(this: float, that: float, higher_is_better: bool) -> float | None:
    """How many times better ``this`` is than ``that`` (>1: better): this/that for
    rates, that/this for times.  None when undefined."""
    if not higher_is_better:
        return that / this if this > 0 else None
    return this / that if that > 0 else None


def result(
    group: str,
    system: str,
    metric: str,
    runs: Iterable[float],
    *,
    higher_is_better: bool,
    **extra: Any,
) -> dict[str, Any]:
    """One result row: median, min and max of ``runs``; ``extra`` keys (say ``p99``
    or ``params``) are kept as they are."""
    values = [float(v) for v in runs]
    if not values:
        raise ValueError(f"{group}/{system}: no runs")
    row: dict[str, Any] = {
        "group": group,
        "system": system,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }
    row.update(extra)
    return row


def error(group: str, system: str, message: str) -> dict[str, str]:
    """One entry of a report's "errors": who could not be measured, and why."""
    return {"group": group, "system": system, "error": message}


def add_ratios(
    rows: Sequence[dict[str, Any]],
    system: str | None = None,
    references: Sequence[str] = REFERENCE_SYSTEMS,
) -> None:
    """Add to each row's "ratios" its ratio to every reference system of the same
    group (only rows of ``system`` if given).  Ratios a row already carries are
    kept; a row gets no ratio to itself."""
    medians: dict[tuple[str, str], float] = {(r["group"], r["system"]): r["median"] for r in rows}
    for row in rows:
        if system is not None and row["system"] != system:
            continue
        ratios = dict(row.get("ratios") or {})
        for ref in references:
            other = medians.get((row["group"], ref))
            if ref == row["system"] or other is None or ref in ratios:
                continue
            value = ratio(row["median"], other, row["higher_is_better"])
            if value is not None:
                ratios[ref] = value
        if ratios:
            row["ratios"] = ratios


def report(
    bench: str,
    *,
    quick: bool,
    results: Sequence[dict[str, Any]],
    errors: Sequence[dict[str, Any]] = (),
    machine_path: str | Path = SOURCE,
    **extra: Any,
) -> dict[str, Any]:
    """A whole report in the common schema; ratios are added where missing and
    ``extra`` keys (say "detail", the script's own figures) are kept."""
    rows = [dict(r) for r in results]
    add_ratios(rows)
    out: dict[str, Any] = {
        "bench": bench,
        "date": today(),
        "git": git_describe(),
        "quick": quick,
        "machine": machine_info(machine_path),
        "results": rows,
        "errors": list(errors),
    }
    out.update(extra)
    return out


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (the suite reads the file after the script exits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
