#!/usr/bin/env python3
"""Keyring benchmark: the in-process model (keyfence.keys) against the real kernel.

Usage::

    .venv/bin/python bench/keys_bench.py [--quick] [--json PATH] [--profile]

For each keyring size (1k, 10k and 100k keys; ``--quick``: 1k and 10k with fewer
lookups) and each repetition, a fresh keyring linked into the session keyring is
filled with user keys ``k%06d`` holding 8-byte payloads (timed: *add*, per key), then
random existing descriptions are searched in it (*search hit*), random absent ones
(*search miss*, ENOKEY), random keys are read (*read*), and the keyring is cleared
(*clear*, per key and in total).  Lookups are sampled with a fixed seed, the same
samples for both sides.  Every figure is the median over the repetitions, with min
and max.

The kernel side runs in a child process (this script with ``--kernel-worker``) that
first joins a fresh anonymous session keyring, so the machine's own keyrings are never
touched; its keyrings are cleared and unlinked afterwards and the child waits for the
kernel's garbage collector to release the keys before the next repetition.  It makes
the syscalls through src/keyfence/testing/kernel_keyctl.py (ctypes), so both sides include the cost
of calling from Python; the "kernel floor" line shows what one ctypes keyctl() costs.
Note that kernel.py's read() makes two syscalls (ask the size, then fetch).

Memory per key of the model is measured on a separate fill: Python heap by
tracemalloc, plus the payload slabs of the secret arena (mlocked mmap, invisible to
tracemalloc), cross-checked with the RSS delta of an untraced fill.

``--profile`` runs cProfile over the model at the largest size and prints, per
operation, where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# bench/ is the script's directory
from keyfence.testing.bench.results import error, git_describe, result, write_json  # noqa: E402
from keyfence.testing.bench.results import report as common_report  # noqa: E402

FULL_SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)
FULL_REPS, QUICK_REPS = 3, 3  # few: every 100k-key kernel round leaks quota
FULL_LOOKUPS, QUICK_LOOKUPS = 20_000, 2_000
SEED = 0x5EED
WARMUP_KEYS = 300
AIM_OPS_PER_S = 50_000
AIM_GROWTH = 2.0
KEY_SPEC_SESSION_KEYRING = -3

OPS = ("add", "search_hit", "search_miss", "read", "clear")
LABELS = {
    "add": "add",
    "search_hit": "search hit",
    "search_miss": "search miss",
    "read": "read",
    "clear": "clear (per key)",
}
GROWTH_OPS = ("search_hit", "search_miss", "read")
AIM_OPS = ("add", "search_hit", "search_miss", "read")

now_ns = time.perf_counter_ns


def desc(i: int) -> str:
    return f"k{i:06d}"


def payload(i: int) -> bytes:
    return b"%08d" % i  # 8 bytes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------- backends


@dataclass
class Backend:
    """The calls a benchmark makes, bound so a timed loop makes one call per op.

    add(description, payload, ring) -> serial; search(ring, "user", description) ->
    serial; read(key) -> bytes; clear(ring); new_ring(name) -> serial of a keyring
    linked into @s; drop_ring(ring) unlinks it from @s; count() is how many keys
    the backend holds for us, counting keys awaiting its gc (kernel only); floor() is a
    near-null call (kernel only).
    """

    name: str
    add: Callable[[str, bytes, int], int]
    search: Callable[[int, str, str], int]
    read: Callable[[int], bytes]
    clear: Callable[[int], None]
    new_ring: Callable[[str], int]
    drop_ring: Callable[[int], None]
    count: Callable[[], int | None] | None = None
    floor: Callable[[int], object] | None = None


def model_backend() -> tuple[Backend, Any]:
    from keyfence.keys import Caller, KeyService

    caller = Caller(uid=0, gid=0, pid=os.getpid(), session="bench")
    svc = KeyService(run_gc_thread=False)
    svc.get_keyring_id(caller, KEY_SPEC_SESSION_KEYRING, True)
    backend = Backend(
        name="model",
        add=partial(svc.add_key, caller, "user"),
        search=partial(svc.search, caller),
        read=partial(svc.read, caller),
        clear=partial(svc.clear, caller),
        new_ring=lambda name: svc.add_key(caller, "keyring", name, None, KEY_SPEC_SESSION_KEYRING),
        drop_ring=lambda ring: svc.unlink(caller, ring, KEY_SPEC_SESSION_KEYRING),
    )
    return backend, svc


NEEDED = ("add_key", "search", "read", "clear", "unlink", "join_session_keyring", "get_keyring_id")


class FallbackKernel:
    """Minimal ctypes syscalls, used only if keyfence.testing.kernel_keyctl cannot be used."""

    _NUMBERS = {"x86_64": (248, 250), "aarch64": (217, 219), "arm64": (217, 219)}

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._add, self._ctl = self._NUMBERS[platform.machine()]

    def _call(self, *args: Any) -> int:
        ret = int(self._syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))
        if ret == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret

    def add_key(self, type: str, description: str, data: bytes | None, ring: int) -> int:
        return self._call(
            self._add,
            ctypes.c_char_p(type.encode()),
            ctypes.c_char_p(description.encode()),
            ctypes.c_char_p(data),
            0 if data is None else len(data),
            ring,
        )

    def search(self, ring: int, type: str, description: str, dest: int) -> int:
        return self._call(
            self._ctl,
            10,
            ring,
            ctypes.c_char_p(type.encode()),
            ctypes.c_char_p(description.encode()),
            dest,
        )

    def read(self, key: int) -> bytes:
        size = self._call(self._ctl, 11, key, ctypes.c_void_p(None), 0)
        buf = ctypes.create_string_buffer(max(size, 1))
        got = self._call(self._ctl, 11, key, buf, size)
        return buf.raw[: min(got, size)]

    def clear(self, ring: int) -> None:
        self._call(self._ctl, 7, ring)

    def unlink(self, key: int, ring: int) -> None:
        self._call(self._ctl, 9, key, ring)

    def join_session_keyring(self, name: str | None) -> int:
        return self._call(self._ctl, 1, ctypes.c_char_p(None if name is None else name.encode()))

    def get_keyring_id(self, key: int, create: bool) -> int:
        return self._call(self._ctl, 0, key, int(create))


def load_kernel_layer() -> tuple[Any, str]:
    """keyfence.testing.kernel_keyctl if it loads and has what we need, else the fallback."""
    try:
        from keyfence.testing import kernel_keyctl as module

        missing = [n for n in NEEDED if not callable(getattr(module, n, None))]
        if missing:
            raise ImportError(f"missing {', '.join(missing)}")
        return module, "src/keyfence/testing/kernel_keyctl.py"
    except Exception as err:
        return FallbackKernel(), f"bench fallback ctypes ({type(err).__name__}: {err})"


def key_users(uid: int = 0) -> tuple[int, int, int] | None:
    """(nkeys, qnbytes, maxbytes) of ``uid`` from /proc/key-users; nkeys includes keys
    that are unlinked but not yet freed by the kernel's gc."""
    try:
        with open("/proc/key-users") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == f"{uid}:":
                    qnbytes, maxbytes = fields[4].split("/")
                    return int(fields[2].split("/")[0]), int(qnbytes), int(maxbytes)
    except (OSError, IndexError, ValueError):
        return None
    return None


def key_count() -> int | None:
    users = key_users()
    return None if users is None else users[0]


def wait_key_count(target: int, timeout: float = 20.0) -> float | None:
    """Wait until root owns at most ``target`` keys (the kernel gc has freed what was
    dropped); seconds waited, polling every 0.2 ms, or None (timeout, or no
    /proc/key-users).  Other root processes on the machine can disturb the count."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        count = key_count()
        if count is None:
            return None
        if count <= target:
            return time.perf_counter() - start
        time.sleep(0.0002)
    return None


def quota_leak_estimate(sizes: Sequence[int], reps: int) -> int:
    """Bytes of root's key quota this kernel never gives back: struct key's 16-bit
    quotalen wraps every 65536 bytes, i.e. every 16384 links (4 bytes each) of a
    keyring (observed on 6.x: exactly 65536 * floor(4 n / 65536) per keyring)."""
    return reps * sum(65536 * (4 * n // 65536) for n in (*sizes, WARMUP_KEYS))


def kernel_backend(kernel: Any) -> Backend:
    return Backend(
        name="kernel",
        add=partial(kernel.add_key, "user"),
        search=partial(kernel.search, dest=0),
        read=kernel.read,
        clear=kernel.clear,
        new_ring=lambda name: kernel.add_key("keyring", name, None, KEY_SPEC_SESSION_KEYRING),
        drop_ring=lambda ring: kernel.unlink(ring, KEY_SPEC_SESSION_KEYRING),
        count=key_count,
        floor=partial(kernel.get_keyring_id, create=False),
    )


# ------------------------------------------------------------ measurement


class GcPauses:
    """Time spent in Python's cyclic garbage collector while active."""

    def __init__(self) -> None:
        self.total_ns = 0
        self._start = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = now_ns()
        else:
            self.total_ns += now_ns() - self._start

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def samples_for(n: int, rep: int, lookups: int) -> tuple[list[int], list[str]]:
    """Indices of existing keys to look up and absent descriptions, fixed per (n, rep)."""
    rng = random.Random(f"{SEED}:{n}:{rep}")
    hits = [rng.randrange(n) for _ in range(lookups)]
    misses = [desc(n + rng.randrange(n)) for _ in range(lookups)]
    return hits, misses


def one_round(
    b: Backend, n: int, rep: int, lookups: int, descs: Sequence[str], datas: Sequence[bytes]
) -> dict[str, Any]:
    """Fill a fresh keyring with n keys, look up, clear; ns per op for each operation."""
    hit_idx, misses = samples_for(n, rep, lookups)
    hits = [descs[i] for i in hit_idx]
    ring = b.new_ring(f"bench.{n}.{rep}")
    ids: list[int] = []
    append, add, search, read = ids.append, b.add, b.search, b.read
    out: dict[str, Any] = {}
    gc_ns: dict[str, int] = {}

    with GcPauses() as pauses:
        t0 = now_ns()
        for d, p in zip(descs, datas, strict=True):
            append(add(d, p, ring))
        out["add"] = (now_ns() - t0) / n
    gc_ns["add"] = pauses.total_ns

    keys = [ids[i] for i in hit_idx]
    # correctness, untimed
    if search(ring, "user", hits[0]) != keys[0] or read(keys[0]) != datas[hit_idx[0]]:
        raise RuntimeError(f"{b.name}: search/read returned the wrong key")

    with GcPauses() as pauses:
        t0 = now_ns()
        for d in hits:
            search(ring, "user", d)
        out["search_hit"] = (now_ns() - t0) / lookups
    gc_ns["search_hit"] = pauses.total_ns

    with GcPauses() as pauses:
        t0 = now_ns()
        for d in misses:
            try:
                search(ring, "user", d)
            except OSError as err:
                if err.errno != errno.ENOKEY:
                    raise
            else:
                raise RuntimeError(f"{b.name}: search for absent {d} succeeded")
        out["search_miss"] = (now_ns() - t0) / lookups
    gc_ns["search_miss"] = pauses.total_ns

    with GcPauses() as pauses:
        t0 = now_ns()
        for k in keys:
            read(k)
        out["read"] = (now_ns() - t0) / lookups
    gc_ns["read"] = pauses.total_ns

    before = b.count() if b.count is not None else None
    with GcPauses() as pauses:
        t0 = now_ns()
        b.clear(ring)
        total = now_ns() - t0
    gc_ns["clear"] = pauses.total_ns
    out["clear"] = total / n
    out["clear_total"] = total
    if before is not None:
        # The kernel's clear only detaches the keys; its gc frees them afterwards.
        waited = wait_key_count(before - n)
        if waited is not None:
            out["clear_until_freed"] = total + waited * 1e9
    if read(ring) != b"":
        raise RuntimeError(f"{b.name}: keyring not empty after clear")

    if b.floor is not None:
        floor = b.floor
        t0 = now_ns()
        for _ in range(lookups):
            floor(ring)
        out["floor"] = (now_ns() - t0) / lookups

    before = b.count() if b.count is not None else None
    b.drop_ring(ring)
    out["gc_ns"] = gc_ns
    if before is not None:
        wait_key_count(before - 1)  # start the next round with the gc idle
    return out


def summarize(values: Sequence[float], scale: float = 1e-3) -> dict[str, Any]:
    """ns values -> median/min/max in µs (scale 1e-3) or ms (1e-6)."""
    scaled = [v * scale for v in values]
    return {
        "median": statistics.median(scaled),
        "min": min(scaled),
        "max": max(scaled),
        "samples": scaled,
    }


def run_backend(b: Backend, sizes: Sequence[int], reps: int, lookups: int) -> dict[str, Any]:
    descs = [desc(i) for i in range(WARMUP_KEYS)]
    one_round(
        b, WARMUP_KEYS, -1, min(lookups, 2_000), descs, [payload(i) for i in range(WARMUP_KEYS)]
    )
    results: dict[str, Any] = {}
    for n in sizes:
        descs = [desc(i) for i in range(n)]
        datas = [payload(i) for i in range(n)]
        rounds = []
        for rep in range(reps):
            rounds.append(one_round(b, n, rep, lookups, descs, datas))
            log(
                f"  {b.name} {n:>7} keys rep {rep + 1}/{reps}: "
                + " ".join(f"{op}={rounds[-1][op] / 1e3:.2f}us" for op in OPS)
            )
        entry: dict[str, Any] = {}
        for op in OPS:
            s = summarize([r[op] for r in rounds])
            s["ops_per_s"] = 1e6 / s["median"]
            entry[op] = s
        entry["clear_total_ms"] = summarize([r["clear_total"] for r in rounds], 1e-6)
        if "floor" in rounds[0]:
            entry["floor"] = summarize([r["floor"] for r in rounds])
        entry["gc_pause_ms"] = {
            op: statistics.median(r["gc_ns"][op] for r in rounds) / 1e6 for op in OPS
        }
        if "clear_until_freed" in rounds[0]:
            entry["clear_until_freed_ms"] = summarize(
                [r["clear_until_freed"] for r in rounds], 1e-6
            )
        results[str(n)] = entry
    return results


# ----------------------------------------------------------- kernel child


def kernel_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: join a fresh anonymous session keyring, then measure."""
    kernel, layer = load_kernel_layer()
    session = kernel.join_session_keyring(None)
    if kernel.get_keyring_id(KEY_SPEC_SESSION_KEYRING, False) != session:
        raise RuntimeError("did not get the fresh session keyring")
    b = kernel_backend(kernel)
    try:
        results = run_backend(b, config["sizes"], config["reps"], config["lookups"])
    finally:
        # Anything a failed round left behind: empty @s (it holds only our rings).
        kernel.clear(KEY_SPEC_SESSION_KEYRING)
    return {"layer": layer, "session_keyring": session, "results": results}


def run_kernel_child(config: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--kernel-worker", json.dumps(config)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"kernel worker exited with {proc.returncode}"}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def run_kernel_side(config: dict[str, Any]) -> dict[str, Any]:
    """The kernel child, with a quota pre-flight check and a record of what leaked."""
    sizes, reps = config["sizes"], config["reps"]
    expected_leak = quota_leak_estimate(sizes, reps)
    peak = max(sizes) * (len(desc(0)) + 1 + len(payload(0)) + 4)  # key + its link
    before = key_users()
    if before is not None and before[2] - before[1] < peak + expected_leak:
        return {
            "error": f"root's kernel key quota has {before[2] - before[1]:,} bytes left, "
            f"the run needs {peak + expected_leak:,} (see /proc/key-users); kernel side skipped"
        }
    log("kernel (child process, fresh anonymous session keyring)")
    result = run_kernel_child(config)
    if before is not None:
        wait_key_count(before[0])  # the child's session keyring, freed after it exits
        after = key_users()
        if after is not None:
            result["root_quota"] = {
                "qnbytes_before": before[1],
                "qnbytes_after": after[1],
                "not_given_back": after[1] - before[1],
                "expected_leak": expected_leak,
                "maxbytes": after[2],
            }
    return result


# ------------------------------------------------------------- model memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_memory(n: int) -> dict[str, Any]:
    """Bytes per key of a keyring of n user keys: Python heap + secret arena, and RSS."""
    from keyfence.keys import secret

    arena = secret.default_arena()
    out: dict[str, Any] = {"keys": n}

    # 1. RSS delta of an untraced fill (includes the mlocked slabs, which are touched).
    b, svc = model_backend()
    ring = b.new_ring("mem.rss")
    gc.collect()
    rss0 = rss_bytes()
    for i in range(n):
        b.add(desc(i), payload(i), ring)
    gc.collect()
    out["rss_per_key"] = (rss_bytes() - rss0) / n
    b.clear(ring)
    b.drop_ring(ring)
    svc.close()
    del b, svc
    gc.collect()

    # 2. tracemalloc (live Python allocations) + arena accounting on a fresh service.
    b, svc = model_backend()
    ring = b.new_ring("mem.traced")
    gc.collect()
    a0 = arena.statistics()
    tracemalloc.start()
    t0 = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        b.add(desc(i), payload(i), ring)
    gc.collect()
    t1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    a1 = arena.statistics()
    out["python_heap_per_key"] = (t1 - t0) / n
    out["arena_mapped_per_key"] = (a1.bytes_mapped - a0.bytes_mapped) / n
    out["arena_in_use_per_key"] = (a1.bytes_in_use - a0.bytes_in_use) / n
    out["arena_slabs"] = a1.slabs - a0.slabs
    out["arena_locked_bytes"] = a1.locked_bytes - a0.locked_bytes
    out["total_per_key"] = out["python_heap_per_key"] + out["arena_mapped_per_key"]
    b.clear(ring)
    b.drop_ring(ring)
    svc.close()
    return out


# --------------------------------------------------------------- profiling


def top_functions(prof: Any, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Three views of one profile, as shares of the total profiled time: functions by
    own time, keyfence functions by cumulative time, and own time summed per module."""
    import pstats

    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = []
    modules: dict[str, float] = {}
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.items():
        module = Path(path).name if line else "built-ins"
        rows.append(
            {
                "function": f"{func} ({module}:{line})" if line else func,
                "module": module,
                "keyfence": "keyfence" in path,
                "calls": ncalls,
                "tottime_share": tottime / total,
                "cumtime_share": cumtime / total,
            }
        )
        modules[module] = modules.get(module, 0.0) + tottime / total
    by_self = sorted(rows, key=lambda r: r["tottime_share"], reverse=True)[:limit]
    by_cum = sorted(
        (r for r in rows if r["keyfence"]), key=lambda r: r["cumtime_share"], reverse=True
    )[:limit]
    by_module = [
        {"module": m, "tottime_share": v}
        for m, v in sorted(modules.items(), key=lambda kv: kv[1], reverse=True)
    ][:limit]
    return {"by_self": by_self, "by_cumulative": by_cum, "by_module": by_module}


def profile_model(n: int, lookups: int, limit: int = 14) -> dict[str, Any]:
    import cProfile

    b, svc = model_backend()
    hit_idx, misses = samples_for(n, 0, lookups)
    ring = b.new_ring("profile")
    profiles: dict[str, Any] = {}
    ids: list[int] = []

    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        ids.append(b.add(desc(i), payload(i), ring))
    prof.disable()
    profiles["add"] = top_functions(prof, limit)

    def run(name: str, body: Callable[[], None]) -> None:
        p = cProfile.Profile()
        p.enable()
        body()
        p.disable()
        profiles[name] = top_functions(p, limit)

    def hits() -> None:
        for i in hit_idx:
            b.search(ring, "user", desc(i))

    def miss() -> None:
        for d in misses:
            with contextlib.suppress(OSError):
                b.search(ring, "user", d)

    def reads() -> None:
        for i in hit_idx:
            b.read(ids[i])

    run("search_hit", hits)
    run("search_miss", miss)
    run("read", reads)
    run("clear", lambda: b.clear(ring))
    b.drop_ring(ring)
    svc.close()
    return profiles


# ------------------------------------------------------------------ report


def num(v: float) -> str:
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"


def fmt_us(s: dict[str, Any] | None) -> str:
    if s is None:
        return "n/a"
    return f"{num(s['median'])} ({num(s['min'])}-{num(s['max'])})"


def fmt_rate(s: dict[str, Any] | None) -> str:
    return "n/a" if s is None else f"{s['ops_per_s']:,.0f}"


def derive(report: dict[str, Any]) -> None:
    """Growth ratios, model/kernel ratios and the aims, from the raw results."""
    sizes = [str(n) for n in report["meta"]["sizes"]]
    small, large = sizes[0], sizes[-1]
    model = report["model"]
    kernel = report.get("kernel", {}).get("results")
    growth: dict[str, Any] = {"from": int(small), "to": int(large)}
    for side, res in (("model", model), ("kernel", kernel)):
        if res:
            growth[side] = {
                op: res[large][op]["median"] / res[small][op]["median"]
                for op in (*GROWTH_OPS, "add", "clear")
            }
    report["growth"] = growth
    if kernel:
        report["model_over_kernel"] = {
            n: {op: model[n][op]["median"] / kernel[n][op]["median"] for op in OPS}
            | {
                "clear_total": model[n]["clear_total_ms"]["median"]
                / kernel[n]["clear_total_ms"]["median"],
            }
            | (
                {
                    "clear_until_freed": model[n]["clear_total_ms"]["median"]
                    / kernel[n]["clear_until_freed_ms"]["median"]
                }
                if "clear_until_freed_ms" in kernel[n]
                else {}
            )
            for n in sizes
        }
    aims = []
    for op in AIM_OPS:
        rate = model[large][op]["ops_per_s"]
        aims.append(
            {
                "aim": f"model {LABELS[op]} at {int(large):,} keys >= {AIM_OPS_PER_S:,} ops/s",
                "value": rate,
                "met": rate >= AIM_OPS_PER_S,
            }
        )
    for op in GROWTH_OPS:
        g = growth["model"][op]
        aims.append(
            {
                "aim": f"model {LABELS[op]} growth {int(small):,} -> {int(large):,} <= "
                f"{AIM_GROWTH:g}x",
                "value": g,
                "met": g <= AIM_GROWTH,
            }
        )
    report["aims"] = aims


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    sizes = [str(n) for n in meta["sizes"]]
    model = report["model"]
    kinfo = report.get("kernel", {})
    kernel = kinfo.get("results")
    ratios = report.get("model_over_kernel", {})
    lines = [
        "# keyfence keyring benchmark: model vs kernel",
        "",
        f"{meta['mode']} run, {meta['reps']} repetitions, {meta['lookups']:,} sampled "
        f"lookups per repetition (seed {meta['seed']:#x}); Python {meta['python']}, "
        f"Linux {meta['kernel_release']} {meta['machine']}, {meta['cpus']} CPUs; "
        f"source {meta['git']}; took {meta['seconds']} s.",
        f"Kernel layer: {kinfo.get('layer', kinfo.get('error', 'n/a'))}.",
        "Times are µs per op, median (min-max) over repetitions; ops/s from the median.",
        "",
        "| op | keys | model µs/op | model ops/s | kernel µs/op | kernel ops/s | model/kernel |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in OPS:
        for n in sizes:
            k = kernel[n][op] if kernel else None
            r = ratios.get(n, {}).get(op)
            lines.append(
                f"| {LABELS[op]} | {int(n):,} | {fmt_us(model[n][op])} | "
                f"{fmt_rate(model[n][op])} | {fmt_us(k)} | {fmt_rate(k)} | "
                f"{'n/a' if r is None else f'{r:.1f}x'} |"
            )
    lines += [
        "",
        "| clear, whole keyring | model ms | kernel ms (syscall) | model/kernel "
        "| kernel ms (until gc freed the keys) | model/kernel |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        k = kernel[n]["clear_total_ms"] if kernel else None
        kf = kernel[n].get("clear_until_freed_ms") if kernel else None
        r = ratios.get(n, {}).get("clear_total")
        rf = ratios.get(n, {}).get("clear_until_freed")
        lines.append(
            f"| {int(n):,} keys | {fmt_us(model[n]['clear_total_ms'])} | {fmt_us(k)} | "
            f"{'n/a' if r is None else f'{r:,.1f}x'} | {fmt_us(kf)} | "
            f"{'n/a' if rf is None else f'{rf:.2f}x'} |"
        )
    if kernel:
        floor = ", ".join(f"{int(n):,} keys {kernel[n]['floor']['median']:.2f}" for n in sizes)
        lines += [
            "",
            "The kernel's KEYCTL_CLEAR only detaches the keys; its gc work item frees them "
            "afterwards (the last columns poll /proc/key-users every 0.2 ms until it has).",
            f"Kernel floor, one ctypes keyctl(GET_KEYRING_ID) (µs): {floor}.",
        ]
    quota = kinfo.get("root_quota")
    if quota:
        lines += [
            f"Root's kernel key byte quota not given back after the kernel run: "
            f"{quota['not_given_back']:,} B (expected {quota['expected_leak']:,} B: struct "
            f"key's 16-bit quotalen wraps every 16,384 links of one keyring; it stays "
            f"charged until reboot); now {quota['qnbytes_after']:,} of "
            f"{quota['maxbytes']:,} B in use.",
        ]
    g = report["growth"]
    lines += [
        "",
        f"| growth {g['from']:,} → {g['to']:,} keys | model | kernel |",
        "|---|---:|---:|",
    ]
    for op in (*GROWTH_OPS, "add", "clear"):
        kg = g.get("kernel", {}).get(op)
        lines.append(
            f"| {LABELS[op]} | {g['model'][op]:.2f}x | {'n/a' if kg is None else f'{kg:.2f}x'} |"
        )
    mem = report.get("memory")
    if mem:
        lines += [
            "",
            f"Model memory at {mem['keys']:,} keys: {mem['total_per_key']:.0f} B/key = "
            f"{mem['python_heap_per_key']:.0f} B Python heap (tracemalloc) + "
            f"{mem['arena_mapped_per_key']:.0f} B secret-arena slabs mapped "
            f"({mem['arena_in_use_per_key']:.0f} B/key of chunks in use, "
            f"{mem['arena_slabs']} slabs, {mem['arena_locked_bytes'] / 2**20:.1f} MiB mlocked); "
            f"RSS delta of an untraced fill: {mem['rss_per_key']:.0f} B/key.",
        ]
    large = sizes[-1]
    gcp = model[large]["gc_pause_ms"]
    lines += [
        f"Model Python cyclic-GC pauses at {int(large):,} keys (ms per repetition): "
        + ", ".join(f"{LABELS[op]} {gcp[op]:.1f}" for op in OPS)
        + ".",
        "",
        "Aims:",
        "",
    ]
    for aim in report["aims"]:
        value = aim["value"]
        shown = f"{value:,.0f} ops/s" if value > 100 else f"{value:.2f}x"
        lines.append(f"- {'MET' if aim['met'] else 'MISSED'}: {aim['aim']} (got {shown})")
    prof = report.get("profile")
    if prof:
        lines += [
            "",
            f"## cProfile of the model at {int(large):,} keys (shares of profiled time)",
        ]
        for op, views in prof.items():
            modules = ", ".join(
                f"{m['module']} {m['tottime_share']:.0%}" for m in views["by_module"][:8]
            )
            lines += [
                "",
                f"### {LABELS[op]}",
                "",
                f"Own time by module: {modules}.",
                "",
                "| keyfence function | calls | cumulative |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {r['function']} | {r['calls']:,} | {r['cumtime_share']:.1%} |"
                for r in views["by_cumulative"]
            ]
            lines += ["", "| function | calls | own time |", "|---|---:|---:|"]
            lines += [
                f"| {r['function']} | {r['calls']:,} | {r['tottime_share']:.1%} |"
                for r in views["by_self"]
            ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ common schema


def schema_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The figures as rows of the common schema (keyfence.testing.bench.results):
    ops/s per operation and keyring size, model beside kernel; whole-keyring
    clear in ms; memory per key."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    sides = {"model": report["model"]}
    kinfo = report.get("kernel", {})
    if kinfo.get("results"):
        sides["kernel"] = kinfo["results"]
    elif "kernel" in report:
        errors.append(error("keyring", "kernel", kinfo.get("error", "no kernel results")))
    for op in AIM_OPS:  # clear is per keyring, below
        for n in report["meta"]["sizes"]:
            for system, res in sides.items():
                rows.append(
                    result(
                        f"keyring {LABELS[op]}, {n:,} keys",
                        system,
                        "ops/s",
                        [1e6 / us for us in res[str(n)][op]["samples"]],
                        higher_is_better=True,
                        params={"op": op, "keys": n},
                    )
                )
    for n in report["meta"]["sizes"]:
        group = f"keyring clear, whole keyring of {n:,} keys"
        for system, res in sides.items():
            entry = res[str(n)]
            rows.append(
                result(
                    group,
                    system,
                    "ms",
                    entry["clear_total_ms"]["samples"],
                    higher_is_better=False,
                    params={"op": "clear_total", "keys": n},
                )
            )
            if system == "model" and "kernel" in sides:
                kernel = sides["kernel"][str(n)]
                rows[-1]["ratios"] = {
                    "kernel": kernel["clear_total_ms"]["median"] / rows[-1]["median"]
                } | (
                    {"kernel+gc": kernel["clear_until_freed_ms"]["median"] / rows[-1]["median"]}
                    if "clear_until_freed_ms" in kernel
                    else {}
                )
            if "clear_until_freed_ms" in entry:
                rows.append(
                    result(
                        group,
                        "kernel+gc",
                        "ms",
                        entry["clear_until_freed_ms"]["samples"],
                        higher_is_better=False,
                        params={"op": "clear_until_freed", "keys": n},
                    )
                )
    mem = report.get("memory")
    if mem:
        group = f"keyring memory per key, {mem['keys']:,} keys"
        rows.append(
            result(
                group,
                "model",
                "B/key",
                [mem["total_per_key"]],
                higher_is_better=False,
                note="Python heap (tracemalloc) + secret-arena slabs",
            )
        )
        rows.append(
            result(
                group,
                "model (RSS)",
                "B/key",
                [mem["rss_per_key"]],
                higher_is_better=False,
                note="RSS delta of an untraced fill",
            )
        )
    return rows, errors


# -------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k keys, fewer lookups")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the model at the largest size"
    )
    parser.add_argument("--reps", type=int, help="repetitions (at least 3)")
    parser.add_argument("--lookups", type=int, help="sampled lookups per repetition")
    parser.add_argument("--no-kernel", action="store_true", help="model only")
    parser.add_argument("--kernel-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.kernel_worker:
        print(json.dumps(kernel_worker(json.loads(args.kernel_worker))))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    reps = max(3, args.reps or (QUICK_REPS if args.quick else FULL_REPS))
    lookups = args.lookups or (QUICK_LOOKUPS if args.quick else FULL_LOOKUPS)
    config = {"sizes": list(sizes), "reps": reps, "lookups": lookups}
    started = time.time()

    report: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "sizes": list(sizes),
            "reps": reps,
            "lookups": lookups,
            "seed": SEED,
            "key": "user keys 'k%06d', 8-byte payloads, one keyring linked into @s",
            "units": "µs per op unless named otherwise; clear_total_ms in ms",
            "python": platform.python_version(),
            "kernel_release": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_describe(),
        }
    }
    log(f"model memory at {sizes[-1]:,} keys")
    report["memory"] = model_memory(sizes[-1])
    log("model")
    b, svc = model_backend()
    report["model"] = run_backend(b, sizes, reps, lookups)
    svc.close()
    if not args.no_kernel:
        report["kernel"] = run_kernel_side(config)
    if args.profile:
        log("profiling the model")
        report["profile"] = profile_model(sizes[-1], lookups)
    derive(report)
    report["meta"]["seconds"] = round(time.time() - started, 1)
    print(markdown(report), end="")
    if args.json:
        rows, errors = schema_rows(report)
        write_json(
            args.json,
            common_report("keys", quick=args.quick, results=rows, errors=errors, detail=report),
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
