#!/usr/bin/env python3
"""Every keyfence benchmark in one command, one process tree, one report.

Usage (root, from the repository root; ``make bench`` / ``make bench-quick``)::

    .venv/bin/python bench/suite.py [--quick] [--install-peers] [--readme]
        [--only NAME,...] [--skip NAME,...] [--out DIR] [--strict]
    .venv/bin/python bench/suite.py --render FILE.json [--readme]

Each benchmark script (``BENCHES``) runs as a child process,
``python bench/<script> [--quick] --json FILE``, and writes the common result
schema (keyfence.testing.bench.results): rows of (group, system, metric, median, min, max,
runs, ratios) and a list of errors.  Progress is shown while each runs (its
output, and a heartbeat when it is silent); its whole output goes to
``<out>/logs/``.  A script that is missing, fails, times out or writes no
results becomes an error row in the report: the suite goes on.

Written to ``--out`` (default bench/results; quick runs: bench/results/quick,
never committed):

* ``<date>.json``: every result merged, each row tagged with its benchmark,
  with git describe, machine information and the peers' versions,
* ``<date>.md`` and ``latest.md``: Markdown tables, per group each system's
  median, min, max and its ratios to the reference systems (gocryptfs, the
  plain disk, the kernel, keyctl; ratios are "times better", > 1 = better),
* ``charts/*.png``: matplotlib charts (keyfence.testing.bench.charts).

``--readme`` rewrites the part of README.md between ``<!-- bench:begin -->``
and ``<!-- bench:end -->`` with a summary and the charts; nothing else in
README is touched.  ``--install-peers`` installs what the peers need from apt
first, and the FUSE libraries bench/fuse_loops.py compares from pip
(idempotent; needs root).  ``--strict`` exits 1 if a benchmark script
crashed or timed out (CI: the suite must still work), not for a missing peer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyfence.testing.bench.results import add_ratios, git_describe, machine_info, today, write_json

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEARTBEAT_S = 30.0
# charts left out of README (they stay in latest.md): detail, not headline
NOT_IN_README = (
    "notify-",
    "keys-ms",
    "keys-b-per-key",
    "client-ms",
    "soak-removals",
    "soak-records-per-10s",
)


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    timeout_s: float  # full mode; quick runs get QUICK_TIMEOUT_S
    what: str


QUICK_TIMEOUT_S = 300.0
BENCHES = (
    Bench("keys", "keys_bench.py", 1800, "keyring model vs kernel syscalls, 1k-100k keys, memory"),
    Bench("notify", "notify_bench.py", 1200, "fences: what synchronous watchers cost a removal"),
    Bench("client", "client_bench.py", 900, "client round trips through the daemon vs the kernel"),
    Bench(
        "daemon-attack",
        "daemon_attack.py",
        1800,
        "root's latency while an unprivileged uid attacks or fans events out; wire fuzz",
    ),
    Bench("kfctl", "kfctl_bench.py", 900, "one kfctl process vs one keyctl process vs a syscall"),
    Bench("fs-compare", "fs_compare.py", 5400, "keyfence vs gocryptfs vs ext4+fscrypt vs disk"),
    Bench("fs-everyday", "fs_everyday.py", 3600, "tar, find, grep, git, rm, sqlite, fio vs peers"),
    Bench("fuse-loops", "fuse_loops.py", 900, "FUSE request loops' ceiling: pyfuse3 vs others"),
    Bench("fs-emergency", "fs_emergency.py", 1800, "emergency removal with dirty data"),
    Bench(
        "login-logout",
        "login_logout.py",
        1800,
        "logout through a real PAM login, N MiB dirty, with and without the fence",
    ),
    Bench("soak", "soak.py", 3600, "long run: throughput and memory over time"),
)

# command -> the Debian package that provides it: what the peers need.
PEER_PACKAGES = {
    "gocryptfs": "gocryptfs",
    "fscrypt": "fscrypt",
    "fio": "fio",
    "keyctl": "keyutils",
    "mkfs.ext4": "e2fsprogs",
    "fusermount3": "fuse3",
    "losetup": "util-linux",
    "git": "git",
}
# Python libraries bench/fuse_loops.py compares with pyfuse3 (optional: a loop
# whose library is missing is an error row): module -> pip requirement, and
# the Debian packages its build needs (llfuse compiles against libfuse 2).
PIP_PEERS = {"llfuse": "llfuse>=1.5", "mfusepy": "mfusepy>=3.1"}
PIP_BUILD_PACKAGES = {"llfuse": ("libfuse-dev", "pkg-config", "gcc")}
VERSION_ARGS = {
    "gocryptfs": ["--version"],
    "fscrypt": ["--version"],
    "fio": ["--version"],
    "keyctl": ["--version"],
    "mkfs.ext4": ["-V"],
    "fusermount3": ["-V"],
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


# ------------------------------------------------------------------- peers


def missing_peers() -> dict[str, str]:
    return {cmd: pkg for cmd, pkg in PEER_PACKAGES.items() if shutil.which(cmd) is None}


def install_peers() -> list[dict[str, Any]]:
    """apt-get install what is missing; errors for what is still missing after."""
    missing = missing_peers()
    if missing:
        packages = sorted(set(missing.values()))
        if os.geteuid() != 0:
            say(f"peers: need root to install {' '.join(packages)}")
        else:
            say(f"peers: apt-get install {' '.join(packages)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", *packages],
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
            )
    return [
        {"bench": "suite", "group": "peers", "system": cmd, "error": f"{cmd} missing (apt: {pkg})"}
        for cmd, pkg in missing_peers().items()
    ] + install_pip_peers()


def missing_pip_peers() -> list[str]:
    return [m for m in PIP_PEERS if importlib.util.find_spec(m) is None]


def install_pip_peers() -> list[dict[str, Any]]:
    """pip install the loops fuse_loops compares (and apt what llfuse's build
    needs); errors for what is still missing after."""
    missing = missing_pip_peers()
    if missing and os.geteuid() == 0:
        build = sorted({p for m in missing for p in PIP_BUILD_PACKAGES.get(m, ())})
        if build:
            say(f"peers: apt-get install {' '.join(build)} (to build {', '.join(missing)})")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", *build],
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
            )
        requirements = [PIP_PEERS[m] for m in missing]
        say(f"peers: pip install {' '.join(requirements)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", *requirements],
            check=False,
            stdout=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
    return [
        {"bench": "suite", "group": "peers", "system": m, "error": f"{m} missing (pip: {req})"}
        for m in missing_pip_peers()
        for req in [PIP_PEERS[m]]
    ]


def peer_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for cmd, args in VERSION_ARGS.items():
        path = shutil.which(cmd)
        if path is None:
            out[cmd] = None
            continue
        try:
            proc = subprocess.run(
                [path, *args], capture_output=True, text=True, timeout=10, check=False
            )
            text = (proc.stdout + proc.stderr).strip()
            out[cmd] = text.splitlines()[0] if text else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            out[cmd] = "unknown"
    return out


# ------------------------------------------------------------ running one


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """The child leads its own process group (start_new_session): end all of it.
    SIGTERM first, with time to unmount and detach what it set up."""
    for sig, grace in ((signal.SIGTERM, 90.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            say(f"  pid {proc.pid} still running {grace:g} s after signal {sig.name}")


def run_one(bench: Bench, index: int, total: int, quick: bool, out: Path) -> dict[str, Any]:
    """Run one script as a child, show its progress, return its report (or the
    reason it has none) as ``{"status", "seconds", "report", "error", ...}``."""
    tag = f"[{index}/{total} {bench.name}]"
    script = BENCH_DIR / bench.script
    record: dict[str, Any] = {"name": bench.name, "script": f"bench/{bench.script}"}
    if not script.exists():
        say(f"{tag} bench/{bench.script} does not exist: reported as an error")
        return record | {"status": "missing", "seconds": 0.0, "error": "script missing"}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    json_path = out / f".{bench.name}.json.part"
    json_path.unlink(missing_ok=True)
    log_path = logs / f"{bench.name}.log"
    argv = [sys.executable, "-u", str(script), *(["--quick"] if quick else []), "--json"]
    argv.append(str(json_path))
    timeout = QUICK_TIMEOUT_S if quick else bench.timeout_s
    say(f"{tag} {bench.what}: {' '.join(argv[2:])}")
    start = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        timed_out = False
        last_output = start
        exited_at = 0.0
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                now = time.monotonic()
                if line is None:
                    break
                if not line and proc.poll() is not None:
                    # exited, but something it left behind holds the pipe open
                    exited_at = exited_at or now
                    if now - exited_at > 5:
                        say(f"  {tag} exited, leaving processes behind: stopping them")
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
                        break
                if line:
                    log.write(line)
                    last_output = now
                    say(f"  {tag} {clock(now - start)} {line.rstrip()}")
                elif now - last_output > HEARTBEAT_S:
                    say(
                        f"  {tag} {clock(now - start)} (running; silent for "
                        f"{clock(now - last_output)})"
                    )
                    last_output = now
                if now - start > timeout and not timed_out:
                    timed_out = True
                    say(f"  {tag} timed out after {clock(timeout)}: stopping it")
                    _kill_tree(proc)
        except BaseException:
            _kill_tree(proc)
            raise
        finally:
            proc.wait()
            reader.join(10)
            if not reader.is_alive():  # closing under a blocked reader would hang
                proc.stdout.close()
    seconds = time.monotonic() - start
    record |= {"seconds": round(seconds, 1), "returncode": proc.returncode}
    record["log"] = str(log_path.relative_to(out))
    report: dict[str, Any] | None = None
    problem = None
    if json_path.exists():
        try:
            report = json.loads(json_path.read_text())
        except ValueError as err:
            problem = f"unreadable JSON: {err}"
        json_path.unlink()
    if timed_out:
        record |= {"status": "timeout", "error": f"timed out after {clock(timeout)}"}
    elif proc.returncode != 0:
        record |= {"status": "failed", "error": f"exited with status {proc.returncode}"}
    elif report is None:
        record |= {"status": "no-json", "error": problem or "wrote no results"}
    else:
        record["status"] = "ok"
    if report is not None:
        record["report"] = report
    say(
        f"{tag} {record['status']} in {clock(seconds)}"
        + (f": {record['error']}" if "error" in record else "")
    )
    return record


# ---------------------------------------------------------------- merging


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def clean_rows(
    name: str, report: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A script's rows, checked and tagged with the benchmark's name; a malformed
    row becomes an error instead of breaking the tables."""
    rows, errors = [], []
    for raw in report.get("results") or []:
        if not isinstance(raw, dict):
            errors.append({"bench": name, "group": "?", "system": "?", "error": "malformed row"})
            continue
        row = dict(raw)
        median = _number(row.get("median"))
        if median is None or not row.get("group") or not row.get("system"):
            errors.append(
                {
                    "bench": name,
                    "group": str(row.get("group", "?")),
                    "system": str(row.get("system", "?")),
                    "error": "row without group, system or median",
                }
            )
            continue
        row["group"], row["system"] = str(row["group"]), str(row["system"])
        row["median"] = median
        row["min"] = _number(row.get("min")) if _number(row.get("min")) is not None else median
        row["max"] = _number(row.get("max")) if _number(row.get("max")) is not None else median
        row.setdefault("runs", [median])
        row.setdefault("metric", "")
        row["higher_is_better"] = bool(row.get("higher_is_better", True))
        rows.append({"bench": name, **row})
    add_ratios(rows)
    for raw in report.get("errors") or []:
        entry = dict(raw) if isinstance(raw, dict) else {"error": str(raw)}
        errors.append(
            {
                "bench": name,
                "group": str(entry.get("group", "-")),
                "system": str(entry.get("system", "-")),
                "error": str(entry.get("error", entry)),
            }
        )
    return rows, errors


def merge(
    records: Sequence[dict[str, Any]],
    quick: bool,
    suite_errors: Iterable[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = list(suite_errors)
    benches = []
    for record in records:
        report = record.get("report")
        if report is not None:
            rows, errs = clean_rows(record["name"], report)
            results += rows
            errors += errs
            record = record | {
                "git": report.get("git"),
                "date": report.get("date"),
                "rows": len(rows),
            }
        if "error" in record:
            errors.append(
                {"bench": record["name"], "group": "-", "system": "-", "error": record["error"]}
            )
        benches.append({k: v for k, v in record.items() if k != "report"})
    return {
        "suite": "keyfence bench/suite.py",
        "date": today(),
        "git": git_describe(),
        "quick": quick,
        "machine": machine_info() | {"peers": peer_versions()},
        "seconds": round(time.time() - started, 1),
        "benches": benches,
        "results": results,
        "errors": errors,
    }


# --------------------------------------------------------------- Markdown


def fmt(value: float) -> str:
    a = abs(value)
    if value == int(value) and a < 1e15:
        return f"{int(value):,}"  # counts: 23, not 23.0
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3g}"


def fmt_ratio(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}x"
    if value >= 0.1:
        return f"{value:.2f}x"
    return f"1/{1 / value:,.0f}x" if value > 0 else "0x"  # 1/590x reads better than 0.0017x


def by_bench(merged: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {b["name"]: [] for b in merged["benches"]}
    for row in merged["results"]:
        out.setdefault(row["bench"], []).append(row)
    return out


def ratio_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    order = ("gocryptfs", "fscrypt", "disk", "sync", "kernel", "keyctl")
    seen: dict[str, None] = {}
    for row in rows:
        for ref in row.get("ratios") or {}:
            seen[ref] = None
    return sorted(seen, key=lambda r: (order.index(r) if r in order else len(order), r))


def bench_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    refs = ratio_columns(rows)
    lines = [
        "| group | system | unit | median | min | max | n | " + "".join(f"vs {r} | " for r in refs),
        "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(refs),
    ]
    for r in rows:
        ratios = r.get("ratios") or {}
        extra = f" (p99 {fmt(r['p99'])})" if _number(r.get("p99")) is not None else ""
        lines.append(
            f"| {r['group']} | {r['system']} | {r['metric']} | **{fmt(r['median'])}**{extra} | "
            f"{fmt(r['min'])} | {fmt(r['max'])} | {len(r.get('runs') or [])} | "
            + "".join(
                f"{fmt_ratio(ratios[ref]) if _number(ratios.get(ref)) is not None else ''} | "
                for ref in refs
            )
        )
    return lines


def pivot_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """group x system medians, one line per group: the compact view for README.
    Systems measured in more than one group get a column (six at most); the rest
    are listed in the group's "other" cell."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["system"]] = counts.get(r["system"], 0) + 1
    systems = [s for s in counts if counts[s] > 1 or len(groups) == 1][:6]
    first = systems[0] if systems else None
    refs = [s for s in ratio_columns(rows) if s in systems and s != first]
    cells = {(r["group"], r["system"]): r for r in rows}
    has_other = any(r["system"] not in systems for r in rows)
    lines = [
        "| group | unit | "
        + "".join(f"{s} | " for s in systems)
        + "".join(f"{first} vs {ref} | " for ref in refs)
        + ("other |" if has_other else ""),
        "|---|---|" + "---:|" * (len(systems) + len(refs)) + ("---|" if has_other else ""),
    ]
    for g in groups:
        unit = next(r["metric"] for r in rows if r["group"] == g)
        values = []
        for s in systems:
            row = cells.get((g, s))
            values.append("" if row is None else fmt(row["median"]))
        ratios = (cells.get((g, first)) or {}).get("ratios") or {} if first else {}
        other = ", ".join(
            f"{r['system']} {fmt(r['median'])}"
            for r in rows
            if r["group"] == g and r["system"] not in systems
        )
        lines.append(
            f"| {g} | {unit} | "
            + "".join(f"{v} | " for v in values)
            + "".join(f"{fmt_ratio(ratios[ref]) if ref in ratios else ''} | " for ref in refs)
            + (f"{other} |" if has_other else "")
        )
    return lines


def short_version(line: str | None) -> str:
    """'fscrypt version v0.3.3' -> '0.3.3'; the full line stays in the JSON."""
    if line is None:
        return "missing"
    m = re.search(r"\d+\.\d+(?:\.\d+)?", line)
    return m.group(0) if m else line


def header_lines(merged: dict[str, Any]) -> list[str]:
    m = merged["machine"]
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB RAM, " if m.get("memory_bytes") else ""
    return [
        f"{'Quick' if merged['quick'] else 'Full'} run of {merged['date']}, source "
        f"`{merged['git']}`, {clock(merged['seconds'])} (m:ss) in all.  Machine: "
        f"{m.get('cpus')} CPUs ({m.get('cpu') or m.get('arch')}), {mem}Linux {m.get('kernel')}, "
        f"{m.get('os') or ''}, Python {m.get('python')}, disk {m.get('filesystem') or '?'}.",
        "Peers: "
        + ", ".join(f"{k} {short_version(v)}" for k, v in (m.get("peers") or {}).items())
        + ".",
    ]


def markdown(merged: dict[str, Any], charts: Sequence[tuple[str, str]]) -> str:
    lines = [
        "# keyfence benchmarks",
        "",
        *header_lines(merged),
        "",
        "Written by `make bench` (bench/suite.py).  Each figure is the median over the runs "
        "(n), with min and max; every comparison is between systems measured in the same "
        "run.  **vs X** is how many times better than X this system's median is (> 1: "
        "better; for times that is X's time / this time).",
        "",
        "| benchmark | status | time (m:ss) | rows | what |",
        "|---|---|---:|---:|---|",
    ]
    whats = {b.name: b.what for b in BENCHES}
    for b in merged["benches"]:
        lines.append(
            f"| {b['name']} | {b['status']}{': ' + b['error'] if 'error' in b else ''} | "
            f"{clock(b.get('seconds', 0))} | {b.get('rows', 0)} | {whats.get(b['name'], '')} |"
        )
    for name, rows in by_bench(merged).items():
        if not rows:
            continue
        lines += ["", f"## {name}", ""]
        lines += bench_table(rows)
        mine = [(t, p) for t, p in charts if Path(p).name.startswith(f"{name}-")]
        for title, path in mine:
            lines += ["", f"![{title}]({path})"]
    if merged["errors"]:
        lines += ["", "## Errors (not measured)", "", "| benchmark | group | system | error |"]
        lines.append("|---|---|---|---|")
        for e in merged["errors"]:
            text = str(e["error"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e['bench']} | {e['group']} | {e['system']} | {text} |")
    other = [
        (t, p)
        for t, p in charts
        if not any(Path(p).name.startswith(f"{n}-") for n in by_bench(merged))
    ]
    if other:
        lines += ["", "## Charts", ""]
        lines += [f"![{t}]({p})\n" for t, p in other]
    return "\n".join(lines) + "\n"


def readme_block(merged: dict[str, Any], charts: Sequence[tuple[str, str]], latest: str) -> str:
    """The generated part of README's Performance section: compact tables and the
    headline charts (paths relative to README), with a link to the full report."""
    lines = [
        "_Generated by `make bench` (bench/suite.py); do not edit between the bench markers._",
        "",
        *header_lines(merged),
        f"Medians of the runs; the full tables (min, max, every ratio) are in "
        f"[{latest}]({latest}).  **X vs Y** = how many times better X is than Y (> 1: better).",
    ]
    for name, rows in by_bench(merged).items():
        if not rows:
            continue
        lines += ["", f"**{name}**", "", *pivot_table(rows)]
    not_run = [b for b in merged["benches"] if b["status"] != "ok"]
    if not_run:
        lines += [
            "",
            "Not measured in this run: "
            + "; ".join(f"{b['name']} ({b.get('error', b['status'])})" for b in not_run)
            + ".",
        ]
    for title, path in charts:
        lines += ["", f"![{title}]({path})"]
    return "\n".join(lines)


def rewrite_readme(block: str, readme: Path = README) -> bool:
    text = readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        say(f"README: no {BEGIN} ... {END} markers; not rewritten")
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return True


# ------------------------------------------------------------------- main


def render(merged: dict[str, Any], out: Path, readme: bool) -> Path:
    """Charts, Markdown (dated and latest), and README's block from merged results."""
    charts: list[tuple[str, str]] = []
    try:
        from keyfence.testing.bench import charts as chart_module

        charts = chart_module.render(merged, out / "charts")
    except Exception as err:  # charts are a view: the tables stand without them
        merged["errors"].append(
            {
                "bench": "suite",
                "group": "charts",
                "system": "-",
                "error": f"{type(err).__name__}: {err}",
            }
        )
        say(f"charts: FAILED {type(err).__name__}: {err}")
    md = markdown(merged, charts)
    dated = out / f"{merged['date']}.md"
    dated.write_text(md)
    (out / "latest.md").write_text(md)
    say(f"wrote {dated} and {out / 'latest.md'} ({len(charts)} charts in {out / 'charts'})")
    if readme:
        # README sits at the root: its links are relative to it
        rel = [(t, os.path.relpath(out / p, ROOT)) for t, p in charts]
        headline = [(t, p) for t, p in rel if not Path(p).name.startswith(NOT_IN_README)]
        latest = os.path.relpath(out / "latest.md", ROOT)
        if rewrite_readme(readme_block(merged, headline, latest)):
            say("rewrote README.md between the bench markers")
    return dated


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark in quick mode (CI)")
    p.add_argument("--out", type=Path, help="results directory")
    p.add_argument("--only", default="", help="benchmark names, comma separated")
    p.add_argument("--skip", default="", help="benchmark names, comma separated")
    p.add_argument("--install-peers", action="store_true", help="apt-get install missing peers")
    p.add_argument("--readme", action="store_true", help="rewrite README's bench block")
    p.add_argument("--strict", action="store_true", help="exit 1 if a benchmark crashed")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render a merged JSON")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    names = {b.name for b in BENCHES}
    args.only = [n for n in args.only.split(",") if n]
    args.skip = [n for n in args.skip.split(",") if n]
    unknown = set(args.only + args.skip) - names
    if unknown:
        p.error(
            f"unknown benchmarks: {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})"
        )
    if args.out is None:
        args.out = BENCH_DIR / "results" / ("quick" if args.quick else "")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for b in BENCHES:
            print(f"{b.name:<14} bench/{b.script:<18} {b.what}")
        return 0
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        merged = json.loads(args.render.read_text())
        render(merged, out, args.readme)
        return 0
    started = time.time()
    suite_errors = (
        install_peers()
        if args.install_peers
        else [
            {
                "bench": "suite",
                "group": "peers",
                "system": cmd,
                "error": f"{cmd} missing (apt: {pkg})",
            }
            for cmd, pkg in missing_peers().items()
        ]
        + [
            {"bench": "suite", "group": "peers", "system": m, "error": f"{m} missing (pip)"}
            for m in missing_pip_peers()
        ]
    )
    chosen = [
        b for b in BENCHES if (not args.only or b.name in args.only) and b.name not in args.skip
    ]
    say(f"suite: {len(chosen)} benchmarks{' (quick)' if args.quick else ''}, results in {out}")
    records = [run_one(b, i, len(chosen), args.quick, out) for i, b in enumerate(chosen, 1)]
    merged = merge(records, args.quick, suite_errors, started)
    render(merged, out, args.readme)
    path = out / f"{merged['date']}.json"
    write_json(path, merged)
    write_json(out / "latest.json", merged)
    say(f"wrote {path} and {out / 'latest.json'}")
    failed = [r["name"] for r in records if r["status"] in ("failed", "timeout", "no-json")]
    missing = [r["name"] for r in records if r["status"] == "missing"]
    say(
        f"suite: {len(merged['results'])} results, {len(merged['errors'])} errors"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; not present yet: {', '.join(missing)}" if missing else "")
    )
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
