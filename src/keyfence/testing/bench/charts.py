"""PNG charts of merged suite results (bench/suite.py), with matplotlib's Agg backend.

* one figure per benchmark and unit: a panel per group, a bar per system with
  its min-max range, on a log scale when the values span more than 100x;
* ``keys-scaling.png``: keyring ops/s against the number of keys, model and
  kernel, a panel per operation (rows with ``params: {"op", "keys"}``);
* ``fs-compare-lock.png``: time to remove a key against the MiB written, per
  system (groups named ``lock...<N>MiB``).

``render(merged, directory)`` returns ``[(title, path relative to the
directory's parent)]`` for the Markdown; chart names are stable so README can
link to them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PANELS_PER_FIGURE = 12
COLORS = {
    "keyfence": "#1f77b4",
    "gocryptfs": "#ff7f0e",
    "fscrypt": "#2ca02c",
    "disk": "#7f7f7f",
    "kernel": "#2ca02c",
    "kernel+gc": "#98df8a",
    "model": "#1f77b4",
    "client": "#1f77b4",
    "kfctl": "#1f77b4",
    "keyctl": "#ff7f0e",
    "aes": "#9467bd",
}
FALLBACK = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728", "#aec7e8", "#ffbb78")
SIZE_IN_GROUP = re.compile(r"[-_ ]?(\d+)\s*(MiB|GiB)", re.IGNORECASE)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("µ", "u").replace("/", "-per-")).strip(
        "-"
    )


def color(system: str, palette: dict[str, str]) -> str:
    if system in COLORS:
        return COLORS[system]
    if system not in palette:
        palette[system] = FALLBACK[len(palette) % len(FALLBACK)]
    return palette[system]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def group_panels(
    title: str, rows: Sequence[dict[str, Any]], path: Path, palette: dict[str, str]
) -> None:
    """A panel per group: horizontal bars (median) with min-max whiskers."""
    plt = _pyplot()
    groups = list(dict.fromkeys(r["group"] for r in rows))
    cols = 1 if len(groups) == 1 else 2 if len(groups) <= 4 else 3
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 0.6 + 2.0 * nrows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups, strict=False):
        mine = [r for r in rows if r["group"] == group]
        names = [r["system"] for r in mine]
        med = [r["median"] for r in mine]
        lo = [max(r["median"] - r["min"], 0) for r in mine]
        hi = [max(r["max"] - r["median"], 0) for r in mine]
        y = range(len(mine))
        ax.barh(
            y,
            med,
            xerr=[lo, hi],
            color=[color(n, palette) for n in names],
            capsize=3,
            error_kw={"elinewidth": 0.8},
        )
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        positive = [v for v in med if v > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_xscale("log")
        better = "higher is better" if mine[0]["higher_is_better"] else "lower is better"
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(f"{mine[0]['metric']} ({better})", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for yi, v, r in zip(y, med, mine, strict=True):
            ax.annotate(
                f"{v:,.3g}" if v < 1000 else f"{v:,.0f}",
                (max(v, r["max"]), yi),  # right of the whisker
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def key_scaling(rows: Sequence[dict[str, Any]], path: Path, palette: dict[str, str]) -> bool:
    """ops/s against keys in the keyring, a panel per operation; False if no rows."""
    scaled = [
        r
        for r in rows
        if isinstance(r.get("params"), dict)
        and "keys" in r["params"]
        and "op" in r["params"]
        and r["metric"] == "ops/s"
    ]
    if not scaled:
        return False
    plt = _pyplot()
    ops = list(dict.fromkeys(r["params"]["op"] for r in scaled))
    fig, axes = plt.subplots(1, len(ops), figsize=(3.6 * len(ops), 3.4), squeeze=False)
    for ax, op in zip(axes.flat, ops, strict=True):
        for system in dict.fromkeys(r["system"] for r in scaled):
            pts = sorted(
                (r["params"]["keys"], r["median"], r["min"], r["max"])
                for r in scaled
                if r["params"]["op"] == op and r["system"] == system
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(
                xs, ys, yerr=err, marker="o", capsize=3, label=system, color=color(system, palette)
            )
        ax.set_xscale("log")
        sizes = sorted({r["params"]["keys"] for r in scaled})
        ax.set_xticks(sizes, [f"{n // 1000:,}k" if n >= 1000 else str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(op.replace("_", " "), fontsize=10)
        ax.set_xlabel("keys in the keyring", fontsize=8)
        ax.set_ylabel("ops/s (higher is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=8)
    fig.suptitle("Keyring operations per second against keyring size: model vs kernel")
    fig.tight_layout()
    _save(fig, path)
    return True


def lock_curve(rows: Sequence[dict[str, Any]], path: Path, palette: dict[str, str]) -> bool:
    """Removal time against dirty MiB per system and lock group kind; False if none."""
    points: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    kinds: dict[str, None] = {}
    for r in rows:
        m = SIZE_IN_GROUP.search(r["group"])
        if not r["group"].lower().startswith("lock") or m is None:
            continue
        # "lock-1GiB-with-write" -> kind "lock-with-write", 1024 MiB
        kind = (r["group"][: m.start()] + r["group"][m.end() :]).strip("-_ ") or "lock"
        mib = int(m.group(1)) * (1024 if m.group(2).lower() == "gib" else 1)
        kinds[kind] = None
        points.setdefault((kind, r["system"]), []).append((mib, r["median"], r["min"], r["max"]))
    if not points:
        return False
    plt = _pyplot()
    cols = min(len(kinds), 3)
    nrows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(kinds) :]:
        ax.set_visible(False)
    unit = next(r["metric"] for r in rows if r["group"].lower().startswith("lock"))
    for ax, kind in zip(axes.flat, kinds, strict=False):
        for (k, system), pts in points.items():
            if k != kind:
                continue
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o",
                capsize=3,
                label=system,
                color=color(system, palette),
            )
        ax.set_xscale("log", base=2)
        sizes = sorted({p[0] for (k, _s), pts in points.items() if k == kind for p in pts})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        medians = [p[1] for (k, _s), pts in points.items() if k == kind for p in pts if p[1] > 0]
        if medians and max(medians) / min(medians) > 20:
            ax.set_yscale("log")  # fscrypt's minutes must not flatten the rest
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("MiB written, not yet on disk", fontsize=8)
        ax.set_ylabel(f"{unit} to remove the key (lower is better)", fontsize=8)
        ax.set_title(kind, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Lock: time to remove a key against dirty data (disk: plain sync)")
    fig.tight_layout()
    _save(fig, path)
    return True


def render(merged: dict[str, Any], directory: Path) -> list[tuple[str, str]]:
    """Every chart for ``merged``; [(title, "charts/<name>.png")]."""
    _pyplot()  # fail early (ImportError) if matplotlib is absent
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()  # charts of benchmarks no longer run must not linger
    palette: dict[str, str] = {}
    made: list[tuple[str, str]] = []
    benches: dict[str, list[dict[str, Any]]] = {}
    for row in merged["results"]:
        benches.setdefault(row["bench"], []).append(row)

    def add(title: str, name: str) -> None:
        made.append((title, f"{directory.name}/{name}"))

    for bench, rows in benches.items():
        if bench == "keys" and key_scaling(rows, directory / "keys-scaling.png", palette):
            add("Keyring ops/s against keyring size, model vs kernel", "keys-scaling.png")
            rows = [
                r
                for r in rows
                if not (isinstance(r.get("params"), dict) and r["metric"] == "ops/s")
            ]
        if lock_curve(rows, directory / f"{bench}-lock.png", palette):
            add("Lock: time to remove a key against dirty MiB", f"{bench}-lock.png")
            rows = [r for r in rows if not r["group"].lower().startswith("lock")]
        for metric in dict.fromkeys(r["metric"] for r in rows):
            mine = [r for r in rows if r["metric"] == metric]
            groups = list(dict.fromkeys(r["group"] for r in mine))
            for part in range(0, len(groups), PANELS_PER_FIGURE):
                chunk = set(groups[part : part + PANELS_PER_FIGURE])
                suffix = "" if part == 0 else f"-{part // PANELS_PER_FIGURE + 1}"
                name = f"{bench}-{slug(metric) or 'value'}{suffix}.png"
                title = f"{bench}: {metric}"
                group_panels(
                    title, [r for r in mine if r["group"] in chunk], directory / name, palette
                )
                add(title, name)
    return made
