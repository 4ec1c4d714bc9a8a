"""What every benchmark script shares."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_describe() -> str:
    """The source measured: commit, and "-dirty" if the work tree differs."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


# -- the common result schema (/work/notes/schema.md); added for fs_compare, for every script


def result_row(
    group: str,
    system: str,
    metric: str,
    higher_is_better: bool,
    runs: list[float],
    **extra: object,
) -> dict[str, object]:
    """One result: median, min and max of ``runs`` (all of them kept)."""
    import statistics

    return {
        "group": group,
        "system": system,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "runs": list(runs),
        **extra,
    }


def add_ratios(results: list[dict[str, object]], subject: str, peers: list[str]) -> None:
    """Give every ``subject`` row ratios to the ``peers`` rows of its group,
    oriented so that > 1 means ``subject`` is better (this/that for rates,
    that/this for times)."""
    by_key = {(r["group"], r["system"]): r for r in results}
    for row in results:
        if row["system"] != subject:
            continue
        ratios: dict[str, float] = {}
        for peer in peers:
            other = by_key.get((row["group"], peer))
            if other is None:
                continue
            mine, theirs = float(row["median"]), float(other["median"])  # type: ignore[arg-type]
            num, den = (mine, theirs) if row["higher_is_better"] else (theirs, mine)
            if den > 0:
                ratios[peer] = round(num / den, 3)
        if ratios:
            row["ratios"] = ratios


def machine_info() -> dict[str, object]:
    """What the figures were measured on."""
    import os
    import platform

    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except (OSError, ValueError, IndexError):
        pass
    return info


def write_results(
    path: str | Path,
    bench: str,
    quick: bool,
    results: list[dict[str, object]],
    errors: list[dict[str, object]],
    **extra: object,
) -> None:
    """Write one benchmark's results in the common schema."""
    import datetime
    import json

    doc = {
        "bench": bench,
        "date": datetime.date.today().isoformat(),
        "git": git_describe(),
        "quick": quick,
        "machine": machine_info(),
        "results": results,
        "errors": errors,
        **extra,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
