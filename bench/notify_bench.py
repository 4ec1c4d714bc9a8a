#!/usr/bin/env python3
"""Notification and fence benchmark: what synchronous watchers cost a removal.

Usage::

    .venv/bin/python bench/notify_bench.py [--quick] [--json PATH] [--profile]

Everything runs in-process against keyfence.keys.KeyService (no gc thread), as
root, with user keys holding 8-byte payloads in keyrings linked into @s:

1. *clear of a full keyring* (10,000 keys; ``--quick``: 1,000): no watchers at all;
   one no-op synchronous watcher per key, all with the *same* callback object (one
   fence thread runs all the calls in order); one no-op synchronous watcher per key
   with a *distinct* callback each (one fence thread per key).  Per key, and the
   ratio to the unwatched clear.  "until delivered" adds the wait for the AFTER
   notifications on the dispatcher thread.
2. *fan-out*: ``revoke`` of one key with 100 synchronous watchers (distinct
   callbacks, so 100 fence threads), with 100 synchronous watchers sharing one
   callback, and with 100 asynchronous watchers (the call, and until the dispatcher
   delivered the 100 AFTER notifications); beside an unwatched key.
3. *emergency latency*: ``clear(..., emergency=True)`` of a keyring holding one key
   whose synchronous watcher would block forever in BEFORE (a threading.Event that is
   never set) -- emergency removals must not call it; its AFTER call returns at once so
   the dispatcher thread is never stuck.  Again with 1,000 keys in the keyring (one
   of them watched).  1,000 runs each (``--quick``: 100, and 100 keys).
4. *normal fenced latency*: ``clear`` of a keyring holding one key with one no-op
   synchronous watcher, beside the same keyring with an unwatched key; 1,000 runs.

Sections 1 and 2 report the median over repetitions with min and max; 3 and 4 the
median, p99 (nearest rank) and max over the runs.  Setup (adding keys and watches)
is never timed; the dispatcher is drained and the fence threads have ended before
each timed call.  Python's cyclic GC stays on; its pauses are reported.

``--profile`` runs cProfile over every thread (one profile per thread, installed
with threading.setprofile) for the clears of section 1 and the emergency clear of
the big keyring, and prints where the caller's time goes and what the fence threads
spend theirs on.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import math
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# bench/ is the script's directory
from keyfence.keys import KEY_SPEC_SESSION_KEYRING, Caller, KeyService  # noqa: E402
from keyfence.keys.notify import Notification, Phase  # noqa: E402
from keyfence.testing.bench.results import error, git_describe, result, write_json  # noqa: E402
from keyfence.testing.bench.results import report as common_report  # noqa: E402

FULL = {"clear_keys": 10_000, "clear_reps": 3, "fanout_reps": 50, "runs": 1_000, "big": 1_000}
QUICK = {"clear_keys": 1_000, "clear_reps": 3, "fanout_reps": 10, "runs": 100, "big": 100}
FANOUT = 100
AIM_EMERGENCY_P99_MS = 10.0
SETTLE_S = 5.0

now_ns = time.perf_counter_ns


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def payload(i: int) -> bytes:
    return b"%08d" % i  # 8 bytes


def noop(note: Notification) -> None:
    """The shared no-op watcher."""


def make_noop() -> Callable[[Notification], None]:
    """A distinct no-op callback (the fence groups calls by callback identity)."""

    def distinct_noop(note: Notification) -> None:
        pass

    return distinct_noop


class Blocker:
    """A synchronous watcher that would hold a removal forever: BEFORE blocks on an
    Event nobody sets; AFTER (dispatcher thread) only counts and returns at once."""

    def __init__(self) -> None:
        self.never = threading.Event()
        self.before = 0
        self.after = 0
        self.after_emergency = 0

    def __call__(self, note: Notification) -> None:
        if note.phase is Phase.BEFORE:
            self.before += 1
            self.never.wait()
        else:
            self.after += 1
            self.after_emergency += note.emergency


class GcPauses:
    """Collections of Python's cyclic GC while active: count, total and longest pause."""

    def __init__(self) -> None:
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        self._start = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = now_ns()
        else:
            pause = now_ns() - self._start
            self.count += 1
            self.total_ns += pause
            self.max_ns = max(self.max_ns, pause)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "total_ms": self.total_ns / 1e6, "max_ms": self.max_ns / 1e6}


class Bench:
    """One service and a caller whose session keyring holds the test keyrings."""

    def __init__(self) -> None:
        self.caller = Caller(uid=0, gid=0, pid=os.getpid(), session="notify-bench")
        self.svc = KeyService(run_gc_thread=False)
        self.svc.get_keyring_id(self.caller, KEY_SPEC_SESSION_KEYRING, True)
        self.base_threads = threading.active_count()

    def new_ring(self, name: str) -> int:
        return self.svc.add_key(self.caller, "keyring", name, None, KEY_SPEC_SESSION_KEYRING)

    def drop_ring(self, ring: int) -> None:
        self.svc.unlink(self.caller, ring, KEY_SPEC_SESSION_KEYRING)

    def fill(self, ring: int, n: int, prefix: str = "k") -> list[int]:
        add, caller = self.svc.add_key, self.caller
        return [add(caller, "user", f"{prefix}{i:06d}", payload(i), ring) for i in range(n)]

    def watch(self, key: int, callback: Callable[[Notification], None], *, sync: bool) -> Any:
        return self.svc.watch(self.caller, key, callback, sync=sync, name="bench")

    def settle(self) -> int:
        """Drain the dispatcher and wait for fence calls to end; busy threads left over.

        Idle fence workers stay for reuse (keyfence.keys.fence): they are not leftovers.
        """
        from keyfence.keys.fence import worker_statistics

        def busy() -> int:
            return threading.active_count() - worker_statistics().idle - self.base_threads

        self.svc.wait_for_notifications(SETTLE_S)
        deadline = time.monotonic() + SETTLE_S
        while busy() > 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        return busy()

    def close(self) -> None:
        self.svc.close()


# ------------------------------------------------------------ statistics


def summarize(ns: Sequence[float], *, samples: bool = False) -> dict[str, Any]:
    """ns -> seconds: median, min, max, and p99 (nearest rank)."""
    s = sorted(v / 1e9 for v in ns)
    out: dict[str, Any] = {
        "n": len(s),
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "p99": s[max(0, math.ceil(0.99 * len(s)) - 1)],
    }
    if samples:
        out["samples"] = s
    return out


# ------------------------------------------------- 1. clear of a full keyring

CLEAR_MODES = ("none", "shared", "distinct")


def clear_round(b: Bench, n: int, mode: str, rep: int) -> dict[str, float]:
    ring = b.new_ring(f"clear.{mode}.{rep}")
    ids = b.fill(ring, n)
    if mode == "shared":
        for k in ids:
            b.watch(k, noop, sync=True)
    elif mode == "distinct":
        for k in ids:
            b.watch(k, make_noop(), sync=True)
    b.settle()
    gc.collect()
    with GcPauses() as pauses:
        t0 = now_ns()
        b.svc.clear(b.caller, ring)
        t1 = now_ns()
        b.svc.wait_for_notifications()
        t2 = now_ns()
    if b.svc.list_keyring(b.caller, ring):
        raise RuntimeError("keyring not empty after clear")
    b.drop_ring(ring)
    left = b.settle()
    return {"clear": t1 - t0, "delivered": t2 - t0, "gc_ms": pauses.total_ns / 1e6, "left": left}


def bench_clear(b: Bench, n: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"keys": n}
    for mode in CLEAR_MODES:
        rounds = []
        for rep in range(reps):
            r = clear_round(b, n, mode, rep)
            rounds.append(r)
            log(
                f"  clear {n:,} keys, watchers={mode}, rep {rep + 1}/{reps}: "
                f"{r['clear'] / 1e6:.1f} ms"
            )
        out[mode] = {
            "per_key": summarize([r["clear"] / n for r in rounds], samples=True),
            "total": summarize([r["clear"] for r in rounds]),
            "until_delivered": summarize([r["delivered"] for r in rounds]),
            "gc_pause_ms": statistics.median(r["gc_ms"] for r in rounds),
            "threads_left": max(r["left"] for r in rounds),
        }
    base = out["none"]["per_key"]["median"]
    for mode in ("shared", "distinct"):
        out[mode]["ratio"] = out[mode]["per_key"]["median"] / base
    return out


# ------------------------------------------------------------- 2. fan-out

FANOUT_MODES = ("unwatched", "sync_distinct", "sync_shared", "async")


def bench_fanout(b: Bench, reps: int) -> dict[str, Any]:
    ring = b.new_ring("fanout")
    out: dict[str, Any] = {"watchers": FANOUT}
    for mode in FANOUT_MODES:
        calls, delivered, left = [], [], 0
        for rep in range(reps + 1):  # the first round warms up
            key = b.svc.add_key(b.caller, "user", f"fan.{mode}.{rep}", payload(rep), ring)
            watches = []
            if mode == "sync_distinct":
                watches = [b.watch(key, make_noop(), sync=True) for _ in range(FANOUT)]
            elif mode == "sync_shared":
                watches = [b.watch(key, noop, sync=True) for _ in range(FANOUT)]
            elif mode == "async":
                watches = [b.watch(key, make_noop(), sync=False) for _ in range(FANOUT)]
            b.settle()
            t0 = now_ns()
            b.svc.revoke(b.caller, key)
            t1 = now_ns()
            b.svc.wait_for_notifications()
            t2 = now_ns()
            for w in watches:
                w.remove()
            b.svc.unlink(b.caller, key, ring)  # the revoked key goes now, not after gc_delay
            left = max(left, b.settle())
            if rep:
                calls.append(t1 - t0)
                delivered.append(t2 - t0)
        out[mode] = {
            "revoke": summarize(calls, samples=True),
            "until_delivered": summarize(delivered),
            "threads_left": left,
        }
        log(f"  revoke, {mode}: {out[mode]['revoke']['median'] * 1e3:.3f} ms")
    b.drop_ring(ring)
    out["floor_1"] = thread_floor(1, reps)
    out[f"floor_{FANOUT}"] = thread_floor(FANOUT, reps)
    base = out["unwatched"]["revoke"]["median"]
    for mode in FANOUT_MODES[1:]:
        out[mode]["ratio"] = out[mode]["revoke"]["median"] / base
    return out


def slowest_gc(samples: Sequence[int], gc_in: Sequence[int]) -> dict[str, float]:
    """Of the slowest 1% of the timed calls: mean time and mean GC pause inside (s)."""
    k = max(1, len(samples) // 100)
    worst = sorted(zip(samples, gc_in, strict=True), reverse=True)[:k]
    return {
        "runs": k,
        "mean": sum(t for t, _ in worst) / k / 1e9,
        "mean_gc": sum(g for _, g in worst) / k / 1e9,
    }


def thread_floor(n: int, reps: int) -> dict[str, Any]:
    """Start and join n no-op threading.Threads: the floor under one fence thread each."""
    samples = []
    for _ in range(reps + 1):
        t0 = now_ns()
        threads = [threading.Thread(target=int, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        samples.append(now_ns() - t0)
    return summarize(samples[1:])


# ------------------------------------------------- 3./4. single-removal latency

LATENCY_CASES = (
    # name, keys in the keyring (None: the "big" size), watcher, emergency
    ("unwatched", 1, None, False),
    ("noop_sync", 1, "noop", False),
    ("emergency", 1, "blocker", True),
    ("unwatched_big", None, None, False),
    ("emergency_big", None, "blocker", True),
)


def latency_case(
    b: Bench, runs: int, keys: int, watcher: str | None, emergency: bool, blocker: Blocker
) -> dict[str, Any]:
    ring = b.new_ring(f"latency.{keys}.{watcher}.{emergency}")
    samples, gc_in = [], []
    gc.collect()
    with GcPauses() as pauses:
        for run in range(runs + 10):  # ten warm-up runs
            ids = b.fill(ring, keys)
            if watcher == "noop":
                b.watch(ids[-1], noop, sync=True)
            elif watcher == "blocker":
                b.watch(ids[-1], blocker, sync=True)
            b.svc.wait_for_notifications()
            g0 = pauses.total_ns
            t0 = now_ns()
            b.svc.clear(b.caller, ring, emergency=emergency)
            t1 = now_ns()
            if run >= 10:
                samples.append(t1 - t0)
                gc_in.append(pauses.total_ns - g0)
    b.drop_ring(ring)
    left = b.settle()
    out = summarize(samples, samples=True)
    out |= {
        "keys": keys,
        "gc": pauses.as_dict(),
        "runs_with_gc_in_call": sum(1 for g in gc_in if g),
        "net_of_gc": summarize([t - g for t, g in zip(samples, gc_in, strict=True)]),
        "gc_in_slowest_1pct": slowest_gc(samples, gc_in),
        "threads_left": left,
    }
    return out


def emergency_probe(b: Bench, blocker: Blocker) -> str | None:
    """One emergency clear on a helper thread: an error if it blocks or fails."""
    ring = b.new_ring("probe")
    (key,) = b.fill(ring, 1)
    b.watch(key, blocker, sync=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            b.svc.clear(b.caller, ring, emergency=True)
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=run, name="notify-bench-probe", daemon=True)
    t.start()
    t.join(SETTLE_S)
    if t.is_alive():
        return f"emergency clear still blocked after {SETTLE_S:g} s (BEFORE was called)"
    if errors:
        return f"emergency clear failed: {errors[0]!r}"
    b.svc.wait_for_notifications(SETTLE_S)
    if blocker.before or blocker.after != 1 or blocker.after_emergency != 1:
        return (
            f"probe saw {blocker.before} BEFORE, {blocker.after} AFTER "
            f"({blocker.after_emergency} marked emergency); wanted 0, 1 (1)"
        )
    b.drop_ring(ring)
    blocker.after = blocker.after_emergency = 0
    return None


def sanity(b: Bench) -> None:
    """Watchers see BEFORE then AFTER in a normal removal (untimed)."""
    seen: list[tuple[int, Phase]] = []
    ring = b.new_ring("sanity")
    ids = b.fill(ring, 3)
    for k in ids:
        b.watch(k, lambda note: seen.append((note.key, note.phase)), sync=True)
    b.svc.clear(b.caller, ring)
    b.settle()
    before = sorted(k for k, p in seen if p is Phase.BEFORE)
    after = sorted(k for k, p in seen if p is Phase.AFTER)
    if before != sorted(ids) or after != sorted(ids):
        raise RuntimeError(f"unexpected notifications: {seen}")
    b.drop_ring(ring)


def bench_latency(b: Bench, runs: int, big: int) -> dict[str, Any]:
    blocker = Blocker()
    out: dict[str, Any] = {"runs": runs, "big": big}
    problem = emergency_probe(b, blocker)
    out["probe"] = problem
    for name, keys, watcher, emergency in LATENCY_CASES:
        if emergency and problem:
            log(f"  {name}: skipped ({problem})")
            continue
        n = big if keys is None else keys
        out[name] = latency_case(b, runs, n, watcher, emergency, blocker)
        s = out[name]
        log(
            f"  {name} ({n:,} keys): median {s['median'] * 1e6:.0f} µs, "
            f"p99 {s['p99'] * 1e6:.0f} µs, max {s['max'] * 1e6:.0f} µs"
        )
    from keyfence.keys.fence import worker_statistics

    out["blocker"] = {
        "before_calls": blocker.before,
        "after_calls": blocker.after,
        "after_marked_emergency": blocker.after_emergency,
        # idle fence workers wait for reuse; only busy threads count
        "threads_blocked_before_release": threading.active_count()
        - worker_statistics().idle
        - b.base_threads,
    }
    blocker.never.set()  # release anything that did block, then count what is left
    out["blocker"]["threads_left_after_release"] = b.settle()
    return out


# --------------------------------------------------------------- profiling


class ThreadProfiles:
    """cProfile this thread while timed bodies run, and every thread they start."""

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.workers: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _hook(self, frame: Any, event: str, arg: Any) -> None:
        prof = cProfile.Profile()
        with self._lock:
            self.workers.append(prof)
        prof.enable()  # replaces this hook for the new thread

    def run(self, body: Callable[[], None]) -> None:
        threading.setprofile(self._hook)
        try:
            self.main.enable()
            body()
            self.main.disable()
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]


def top(stats: dict[Any, Any], limit: int) -> dict[str, Any]:
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = []
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.items():
        where = f"{Path(path).name}:{line}" if line else "built-in"
        rows.append(
            {
                "function": f"{func} ({where})",
                "calls": ncalls,
                "own": tottime / total,
                "cumulative": cumtime / total,
                "own_s": tottime,
                "ours": "keyfence" in path or "threading" in path,
            }
        )
    by_own = sorted(rows, key=lambda r: r["own"], reverse=True)[:limit]
    by_cum = sorted((r for r in rows if r["ours"]), key=lambda r: r["cumulative"], reverse=True)
    return {"total_s": total, "by_own": by_own, "by_cumulative": by_cum[:limit]}


def profile_case(
    b: Bench, label: str, prepare: Callable[[], Callable[[], None]], repeat: int, limit: int
) -> dict[str, Any]:
    """Profile ``repeat`` timed bodies; each is prepared (and settled) unprofiled."""
    profiles = ThreadProfiles()
    wall = 0
    for _ in range(repeat):
        body = prepare()
        b.settle()
        t0 = now_ns()
        profiles.run(body)
        wall += now_ns() - t0
    b.settle()
    out: dict[str, Any] = {
        "label": label,
        "repeat": repeat,
        "wall_s": wall / 1e9 / repeat,
        "threads": len(profiles.workers),
    }
    out["caller"] = top(pstats.Stats(profiles.main).stats, limit)  # type: ignore[attr-defined]
    if profiles.workers:
        combined = pstats.Stats(profiles.workers[0])
        for prof in profiles.workers[1:]:
            combined.add(prof)
        out["threads_view"] = top(combined.stats, limit)  # type: ignore[attr-defined]
    return out


def bench_profile(b: Bench, n: int, big: int, runs: int, limit: int = 12) -> list[dict[str, Any]]:
    def clear_full(mode: str) -> Callable[[], None]:
        ring = b.new_ring(f"profile.{mode}")
        for k in b.fill(ring, n):
            if mode != "none":
                b.watch(k, noop if mode == "shared" else make_noop(), sync=True)
        return lambda: b.svc.clear(b.caller, ring)

    def fanout(mode: str) -> Callable[[], None]:
        ring = b.new_ring(f"profile.fan.{mode}")
        (key,) = b.fill(ring, 1)
        for _ in range(FANOUT):
            b.watch(key, make_noop() if mode == "distinct" else noop, sync=True)
        return lambda: b.svc.revoke(b.caller, key)

    def single(emergency: bool, keys: int) -> Callable[[], None]:
        ring = b.new_ring(f"profile.single.{emergency}.{keys}")
        ids = b.fill(ring, keys)
        b.watch(ids[-1], Blocker() if emergency else noop, sync=True)
        return lambda: b.svc.clear(b.caller, ring, emergency=emergency)

    reps = max(1, runs // 10)
    cases: list[tuple[str, Callable[[], Callable[[], None]], int]] = [
        (f"clear {n:,} keys, no watchers", lambda: clear_full("none"), 1),
        (f"clear {n:,} keys, one shared sync callback", lambda: clear_full("shared"), 1),
        (f"clear {n:,} keys, a distinct sync callback per key", lambda: clear_full("distinct"), 1),
        (f"revoke, {FANOUT} sync watchers, distinct callbacks", lambda: fanout("distinct"), 10),
        (f"revoke, {FANOUT} sync watchers, one shared callback", lambda: fanout("shared"), 10),
        ("clear of 1 key with 1 no-op sync watcher", lambda: single(False, 1), reps),
        (f"emergency clear, {big:,} keys, blocking watcher", lambda: single(True, big), 10),
    ]
    out = []
    for label, prepare, repeat in cases:
        log(f"  profiling: {label} (x{repeat})")
        out.append(profile_case(b, label, prepare, repeat, limit))
    return out


# ------------------------------------------------------------------ report


def fmt_t(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def spread(s: dict[str, Any]) -> str:
    return f"{fmt_t(s['min'])} - {fmt_t(s['max'])}"


def derive(report: dict[str, Any]) -> None:
    lat = report["latency"]
    aims = []
    for name, label in (("emergency", "1 key"), ("emergency_big", f"{lat['big']:,} keys")):
        s = lat.get(name)
        p99 = None if s is None else s["p99"] * 1e3
        aims.append(
            {
                "aim": f"emergency clear ({label}, blocking watcher) p99 < "
                f"{AIM_EMERGENCY_P99_MS:g} ms",
                "value": p99,
                "met": p99 is not None and p99 < AIM_EMERGENCY_P99_MS,
            }
        )
    blk = lat["blocker"]
    aims.append(
        {
            "aim": "emergency removals never call BEFORE; AFTER marked emergency reaches "
            "the watcher; no fence thread left behind",
            "value": None,
            "met": lat["probe"] is None
            and blk["before_calls"] == 0
            and blk["after_calls"] == blk["after_marked_emergency"] > 0
            and blk["threads_blocked_before_release"] == 0,
        }
    )
    report["aims"] = aims


def markdown(report: dict[str, Any]) -> str:
    meta, clear, fan, lat = report["meta"], report["clear"], report["fanout"], report["latency"]
    n, big, runs = clear["keys"], lat["big"], lat["runs"]
    lines = [
        "# keyfence notification and fence benchmark",
        "",
        f"{meta['mode']} run; Python {meta['python']}, Linux {meta['kernel_release']} "
        f"{meta['machine']}, {meta['cpus']} CPUs; source {meta['git']}; took "
        f"{meta['seconds']} s.  Watchers are no-op unless said; sync = synchronous.",
        "Sections 1-2: median (min - max) over repetitions; 3-4: over "
        f"{runs:,} runs, with p99 (nearest rank).",
        "",
        "| # | measurement | median | min - max | p99 | vs baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def row(sec: str, what: str, s: dict[str, Any], ratio: float | None, p99: bool) -> None:
        lines.append(
            f"| {sec} | {what} | {fmt_t(s['median'])} | {spread(s)} | "
            f"{fmt_t(s['p99']) if p99 else '-'} | "
            f"{'baseline' if ratio is None else f'{ratio:.1f}x'} |"
        )

    labels = {
        "none": "no watchers",
        "shared": "1 sync watcher per key, one shared callback (1 fence thread)",
        "distinct": f"1 sync watcher per key, distinct callbacks ({n:,} fence threads)",
    }
    for mode in CLEAR_MODES:
        c = clear[mode]
        row("1", f"clear {n:,} keys, per key: {labels[mode]}", c["per_key"], c.get("ratio"), False)
    for mode in CLEAR_MODES:
        c = clear[mode]
        lines.append(
            f"| 1 | ↳ total, {mode}: clear / until AFTER delivered | {fmt_t(c['total']['median'])}"
            f" | {fmt_t(c['until_delivered']['median'])} | - | - |"
        )
    flabels = {
        "unwatched": "revoke 1 key, unwatched",
        "sync_distinct": f"revoke 1 key, {FANOUT} sync watchers, distinct callbacks "
        f"({FANOUT} threads)",
        "sync_shared": f"revoke 1 key, {FANOUT} sync watchers, one shared callback (1 thread)",
        "async": f"revoke 1 key, {FANOUT} async watchers (call returns)",
    }
    for mode in FANOUT_MODES:
        f = fan[mode]
        row("2", flabels[mode], f["revoke"], f.get("ratio"), False)
    a = fan["async"]["until_delivered"]
    lines.append(
        f"| 2 | ↳ {FANOUT} async watchers: until all {FANOUT} AFTER delivered | "
        f"{fmt_t(a['median'])} | {spread(a)} | - | - |"
    )
    for k in (FANOUT, 1):
        f = fan[f"floor_{k}"]
        lines.append(
            f"| 2 | floor: start and join {k} no-op threading.Thread{'s' if k > 1 else ''} | "
            f"{fmt_t(f['median'])} | {spread(f)} | - | - |"
        )
    llabels = {
        "unwatched": (4, "clear keyring of 1 unwatched key"),
        "noop_sync": (4, "clear keyring of 1 key, 1 no-op sync watcher (fenced)"),
        "emergency": (3, "emergency clear, 1 key, watcher blocking forever in BEFORE"),
        "unwatched_big": (3, f"clear keyring of {big:,} unwatched keys"),
        "emergency_big": (3, f"emergency clear, {big:,} keys, one with the blocking watcher"),
    }
    bases = {"noop_sync": "unwatched", "emergency": "unwatched", "emergency_big": "unwatched_big"}
    for name, (sec, label) in llabels.items():
        s = lat.get(name)
        if s is None:
            lines.append(f"| {sec} | {label} | skipped | - | - | - |")
            continue
        base = lat.get(bases.get(name, ""))
        ratio = None if base is None else s["median"] / base["median"]
        row(str(sec), label, s, ratio, True)

    blk = lat["blocker"]
    lines += [
        "",
        f"Blocking watcher: {blk['before_calls']} BEFORE calls, {blk['after_calls']} AFTER "
        f"({blk['after_marked_emergency']} marked emergency); threads blocked before "
        f"release: {blk['threads_blocked_before_release']}, left after: "
        f"{blk['threads_left_after_release']}.",
        "Python cyclic GC (collections run inside the timed calls too): "
        + "; ".join(
            f"{name}: {lat[name]['runs_with_gc_in_call']} of {runs:,} calls ran a collection, "
            f"longest pause {lat[name]['gc']['max_ms']:.2f} ms, p99 net of GC pauses "
            f"{fmt_t(lat[name]['net_of_gc']['p99'])}, slowest 1% average "
            f"{fmt_t(lat[name]['gc_in_slowest_1pct']['mean'])} of which GC "
            f"{fmt_t(lat[name]['gc_in_slowest_1pct']['mean_gc'])}"
            for name in llabels
            if name in lat
        )
        + ".",
        "",
        "Aims:",
        "",
    ]
    for aim in report["aims"]:
        got = "" if aim["value"] is None else f" (got {aim['value']:.2f} ms)"
        lines.append(f"- {'MET' if aim['met'] else 'MISSED'}: {aim['aim']}{got}")
    for case in report.get("profile", []):
        lines += [
            "",
            f"## cProfile: {case['label']}",
            "",
            f"{case['repeat']} run(s), {fmt_t(case['wall_s'])} wall each under the profiler, "
            f"{case['threads']} threads started in all; shares of the profiled time.",
        ]
        views = [("caller's thread", case["caller"])]
        if "threads_view" in case:
            views.append(("fence and other new threads, combined", case["threads_view"]))
        for title, view in views:
            lines += [
                "",
                f"{title}, {fmt_t(view['total_s'])} profiled:",
                "",
                "| function (keyfence/threading, by cumulative) | calls | cumulative |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {r['function']} | {r['calls']:,} | {r['cumulative']:.1%} |"
                for r in view["by_cumulative"]
            ]
            lines += ["", "| function (by own time) | calls | own |", "|---|---:|---:|"]
            lines += [
                f"| {r['function']} | {r['calls']:,} | {r['own']:.1%} |" for r in view["by_own"]
            ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ common schema

CLEAR_SYSTEMS = {
    "none": "no watchers",
    "shared": "sync watchers, one shared callback",
    "distinct": "sync watchers, distinct callbacks",
}
FANOUT_SYSTEMS = {
    "unwatched": "unwatched",
    "sync_distinct": f"{FANOUT} sync watchers, distinct callbacks",
    "sync_shared": f"{FANOUT} sync watchers, one shared callback",
    "async": f"{FANOUT} async watchers",
}
LATENCY_SYSTEMS = {
    "unwatched": "unwatched",
    "noop_sync": "1 sync watcher (fenced)",
    "emergency": "emergency, watcher blocked",
    "unwatched_big": "unwatched",
    "emergency_big": "emergency, watcher blocked",
}


def schema_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The figures as rows of the common schema (keyfence.testing.bench.results), in µs; every
    ratio is to the unwatched case of the same group (>1: faster than it)."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    def add(
        group: str, system: str, seconds: Sequence[float], base: str | None, **extra: Any
    ) -> None:
        rows.append(
            result(group, system, "µs", [v * 1e6 for v in seconds], higher_is_better=False, **extra)
        )
        if base is not None:
            other = next(r for r in rows if r["group"] == group and r["system"] == base)
            rows[-1]["ratios"] = {base: other["median"] / rows[-1]["median"]}

    clear = report["clear"]
    group = f"fence: clear {clear['keys']:,} keys, per key"
    for mode, system in CLEAR_SYSTEMS.items():
        base = None if mode == "none" else CLEAR_SYSTEMS["none"]
        add(group, system, clear[mode]["per_key"]["samples"], base)
    fan = report["fanout"]
    group = "fence: revoke 1 key"
    for mode, system in FANOUT_SYSTEMS.items():
        base = None if mode == "unwatched" else "unwatched"
        add(group, system, fan[mode]["revoke"]["samples"], base)
    lat = report["latency"]
    for name, system in LATENCY_SYSTEMS.items():
        big = name.endswith("_big")
        group = f"fence: clear a keyring of {lat['big'] if big else 1:,} key{'s' if big else ''}"
        s = lat.get(name)
        if s is None:
            errors.append(error(group, system, lat.get("probe") or "not measured"))
            continue
        base = None if name.startswith("unwatched") else "unwatched"
        add(group, system, s["samples"], base, p99=s["p99"] * 1e6)
    return rows, errors


# -------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a few seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile (all threads) the slow cases"
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.time()
    report: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "config": cfg,
            "fanout": FANOUT,
            "key": "user keys, 8-byte payloads, keyrings linked into @s, caller uid 0",
            "units": "seconds",
            "python": platform.python_version(),
            "kernel_release": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_describe(),
        }
    }
    b = Bench()
    try:
        sanity(b)
        log("1. clear of a full keyring")
        report["clear"] = bench_clear(b, cfg["clear_keys"], cfg["clear_reps"])
        log("2. fan-out")
        report["fanout"] = bench_fanout(b, cfg["fanout_reps"])
        log("3./4. single-removal latency")
        report["latency"] = bench_latency(b, cfg["runs"], cfg["big"])
        if args.profile:
            log("profiling")
            report["profile"] = bench_profile(b, cfg["clear_keys"], cfg["big"], cfg["runs"])
    finally:
        b.close()
    derive(report)
    report["meta"]["seconds"] = round(time.time() - started, 1)
    print(markdown(report), end="")
    if args.json:
        rows, errors = schema_rows(report)
        write_json(
            args.json,
            common_report("notify", quick=args.quick, results=rows, errors=errors, detail=report),
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
