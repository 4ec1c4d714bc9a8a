#!/usr/bin/env python3
"""keyfence side by side with gocryptfs, kernel ext4+fscrypt and the plain disk.

Usage (root, from the repository root)::

    .venv/bin/python bench/fs_compare.py [--quick] [--json PATH] [--runs 3]
        [--systems keyfence,gocryptfs,fscrypt,disk] [--only GROUP,...] [--scratch DIR]
        (also keyfence-pyfuse3, keyfence-ownloop: keyfence with a given FUSE loop;
        keyfence-nospin: its loop never spinning for the next request;
        keyfence-uring: requests through io_uring, fuse.enable_uring set while it mounts;
        gocryptfs-allow-other: gocryptfs shared with other users, default_permissions)

Every peer lives over the same disk (``--scratch``, default /var/tmp): keyfence
through its real daemon and mount worker with an e4crypt key in this run's
session keyring, gocryptfs, ext4+fscrypt v2 on a loop device backed by an
image file there, and a plain directory.  Groups (sizes are options):

* ``seq-write``: 1 GiB in 1 MiB writes, then fsync; MB/s.
* ``seq-read``: the same file with every cache cold (kernel caches dropped;
  keyfence and gocryptfs remounted, so their own caches are cold too); MB/s.
* ``small-files``: 5,000 files of 4 KiB (open, write, close), then syncfs of
  the mount and of the filesystem under it; files/s.  ``small-files-N-create``
  is the same runs' creating loop alone (the sync can dominate the first).
* ``rand-write``: 20,000 random 4 KiB writes into a 256 MiB file, then fsync; MB/s.
* ``lock``: write 64, 256, 1024 MiB (closed, not fsynced), then remove the key:
  ``kfctl clear @s``, FS_IOC_REMOVE_ENCRYPTION_KEY, gocryptfs unmount + sync,
  and ``syncfs`` on the disk; seconds, and each as a factor of the plain sync
  (``vs_sync``).  The data is read back and compared after the key is back.
  ``lock-N-with-write``: the write (and close) plus the removal, since
  keyfence encrypts and writes back at close where the kernel does it in
  the removal's sync.  ``lock-open``: the file stays open in a writer
  process during the removal (keyfence's worker then holds every byte as
  dirty plaintext, its worst case; fscrypt reports the file busy).
  ``lock-open-defaults``: the same with keyfence mounted as a user mounts
  it (64 MiB dirty limit, 5 s expiry), so the worker has sealed and stored
  most of the bytes before the removal, as the kernel's page cache holds
  the plain disk's.
* ``emergency``: 1 GiB dirty in keyfence, ``kfctl --emergency clear @s`` through the
  client library (the removal itself), through ``kfctl`` (a user's wall time),
  and until the mount reported what it dropped; ms, median and p99.
* ``aes``: ``cryptography``'s AES-256-GCM on 4 KiB and 1 MiB blocks, MB/s.

Runs interleave the systems (run 1 of every system, then run 2, ...) so a
noisy neighbour hurts all of them alike; ratios compare medians of one run.
A peer that fails is listed under "errors".  Every mount, loop device and
process is cleaned up, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keyfence.testing.bench.peers import (
    MIB,
    DiskPeer,
    FscryptPeer,
    GocryptfsAllowOtherPeer,
    GocryptfsPeer,
    KeyfenceNoSpinPeer,
    KeyfenceOwnLoopPeer,
    KeyfencePeer,
    KeyfencePyfuse3Peer,
    KeyfenceUringPeer,
    Peer,
    PeerError,
    kernel_cipher_driver,
)
from keyfence.testing.bench.process import (
    Interrupted,
    die_with_parent,
    lead_own_session,
    raise_interrupted,
)
from keyfence.testing.bench.quiet import wait_for_quiet_disks
from keyfence.testing.bench.results import error, ratio, report, result, rotated, write_json

SYSTEMS = ["keyfence", "gocryptfs", "fscrypt", "disk"]
VARIANTS = [
    "keyfence-pyfuse3",
    "keyfence-ownloop",
    "keyfence-nospin",
    "keyfence-uring",
    "gocryptfs-allow-other",
]
"""keyfence with a given FUSE loop, and gocryptfs shared with other users
(peers.py), for ``--systems``."""
BLOCK = 4096

Row = dict[str, Any]


# -- progress ----------------------------------------------------------------


START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", flush=True)


# -- workloads ---------------------------------------------------------------


def pattern(size: int, seed: int) -> Iterator[bytes]:
    """``size`` bytes of incompressible data in 1 MiB chunks, each MiB distinct."""
    base = random.Random(seed).randbytes(MIB)
    for i in range(0, size, MIB):
        n = min(MIB, size - i)
        yield (i.to_bytes(8, "little") + base[8:])[:n]


def write_file(path: Path, size: int, seed: int = 1, *, fsync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in pattern(size, seed):
            os.write(fd, chunk)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    os.sync()


def seq_write(peer: Peer, size: int) -> tuple[float, dict[str, float]]:
    path = peer.work / "seq.bin"
    remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.perf_counter()
        for chunk in pattern(size, 1):
            os.write(fd, chunk)
        wrote = time.perf_counter() - t
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    return size / took / 1e6, {"write_s": wrote, "fsync_s": took - wrote}


def seq_read(peer: Peer, size: int) -> float:
    path = peer.work / "seq.bin"
    if not path.exists() or path.stat().st_size != size:
        write_file(path, size)
    peer.cold()
    buf = bytearray(MIB)
    got = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            got += n
    took = time.perf_counter() - t
    if got != size:
        raise PeerError(f"read {got} bytes of {size}")
    return size / took / 1e6


def small_files(peer: Peer, count: int) -> tuple[float, dict[str, float]]:
    d = peer.work / "small"
    remove(d)
    d.mkdir()
    data = os.urandom(BLOCK)
    os.sync()
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    created = time.perf_counter() - t
    peer.sync()
    took = time.perf_counter() - t
    remove(d)
    return count / took, {"create_s": created, "sync_s": took - created}


def rand_write(peer: Peer, file_size: int, writes: int, seed: int) -> float:
    path = peer.work / "rand.bin"
    if not path.exists() or path.stat().st_size != file_size:
        write_file(path, file_size, seed=2)
    blocks = file_size // BLOCK
    rng = random.Random(seed)
    offsets = [rng.randrange(blocks) * BLOCK for _ in range(writes)]
    data = os.urandom(BLOCK)
    os.sync()
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return writes * BLOCK / (time.perf_counter() - t) / 1e6


def verify(path: Path, size: int, seed: int, *, every_mib: bool) -> bool:
    """``path`` holds what :func:`write_file` wrote: every MiB, or a sample
    (the first, the last and every 16th)."""
    if path.stat().st_size != size:
        return False
    last = (size - 1) // MIB
    with open(path, "rb", buffering=0) as f:
        for i, chunk in enumerate(pattern(size, seed)):
            sampled = every_mib or i % 16 == 0 or i == last
            if sampled and os.pread(f.fileno(), len(chunk), i * MIB) != chunk:
                return False
    return True


HOLD = "hold-open"


def hold_open_main(path: str, size: int, seed: int) -> int:
    """``fs_compare.py hold-open PATH SIZE SEED``: write, say "ready", keep the
    file open until standard input closes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in pattern(size, seed):
            os.write(fd, chunk)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.read()
    finally:
        with contextlib.suppress(OSError):  # the key may be gone
            os.close(fd)
    return 0


@contextlib.contextmanager
def held_open(path: Path, size: int, seed: int) -> Iterator[None]:
    """``size`` bytes written to ``path`` by another process of this session,
    which keeps the file open meanwhile.  Not by us: every process we fork
    would inherit the descriptor and close it at exec, and a FUSE
    filesystem is asked to flush on every close (keyfence writes back then),
    so a forked ``kfctl`` would flush the data before it removed the key."""
    holder = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), HOLD, str(path), str(size), str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        if holder.stdout.readline() != "ready\n":
            raise PeerError(f"the writer holding {path.name} failed ({holder.wait()})")
        yield
    finally:
        holder.stdin.close()
        holder.stdout.close()
        if holder.wait(600) != 0:
            raise PeerError(f"the writer holding {path.name} exited {holder.returncode}")


def lock(peer: Peer, size: int, *, hold_open: bool, run: int) -> tuple[float, dict[str, float]]:
    """Write ``size`` bytes (no fsync), remove the key, put it back, check
    every byte.  Seconds of the removal, and its parts."""
    path = peer.work / "lock.bin"
    remove(path)
    seed = 100 + run
    t = time.perf_counter()
    if hold_open:
        with held_open(path, size, seed):
            wrote = time.perf_counter() - t
            parts = peer.lock()
    else:
        write_file(path, size, seed, fsync=False)
        wrote = time.perf_counter() - t
        parts = peer.lock()
    peer.unlock()
    # keyfence's own data path is what this checks: every MiB of it
    every_mib = isinstance(peer, KeyfencePeer)
    if peer.encrypted and not verify(path, size, seed, every_mib=every_mib):
        raise PeerError(f"DATA LOST: {path.name} does not read back after lock and unlock")
    remove(path)
    parts["write"] = wrote
    return parts["total"], parts


def locker(size: int, *, hold_open: bool) -> Callable[[Peer, int], tuple[float, dict[str, float]]]:
    return lambda peer, run: lock(peer, size, hold_open=hold_open, run=run)


# -- keyfence's emergency removal --------------------------------------------


def emergency_rounds(
    peer: KeyfencePeer, size: int, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """``rounds`` removals of a key with ``size`` bytes dirty in the worker,
    alternating the client library and ``kfctl``: (client ms, reported ms, kfctl ms)."""
    from keyfence.client import Client

    client_ms: list[float] = []
    reported_ms: list[float] = []
    kfctl_ms: list[float] = []
    path = peer.work / "emergency.bin"
    with Client.connect(str(peer.socket), autostart=False) as client:

        def dropped() -> int:
            mounts: list[dict[str, Any]] = client._call("mounts")
            return sum(len(m.get("dropped") or ()) for m in mounts)

        for i in range(rounds * 2):
            via_kfctl = i % 2 == 1
            remove(path)
            before = dropped()
            with held_open(path, size, 7):
                if via_kfctl:
                    kfctl_ms.append(peer.emergency_kfctl() * 1e3)
                else:
                    t = time.perf_counter()
                    client.clear(-3, emergency=True)
                    client_ms.append((time.perf_counter() - t) * 1e3)
                    deadline = time.monotonic() + 10
                    while dropped() == before:
                        if time.monotonic() > deadline:
                            raise PeerError("the mount never reported what it dropped")
                        time.sleep(0.0005)
                    reported_ms.append((time.perf_counter() - t) * 1e3)
            peer.unlock()
            say(
                f"emergency round {i + 1}/{rounds * 2} ({'kfctl' if via_kfctl else 'client'}): "
                f"{(kfctl_ms if via_kfctl else client_ms)[-1]:.1f} ms"
            )
        remove(path)
    return client_ms, reported_ms, kfctl_ms


# -- the crypto limit --------------------------------------------------------


def aes_gcm(block: int, total: int, decrypt: bool) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    data = os.urandom(block)
    count = max(1, total // block)
    if decrypt:
        sealed = aead.encrypt(nonce, data, None)
        t = time.perf_counter()
        for _ in range(count):
            aead.decrypt(nonce, sealed, None)
    else:
        t = time.perf_counter()
        for _ in range(count):
            aead.encrypt(nonce, data, None)
    return count * block / (time.perf_counter() - t) / 1e6


# -- the run -----------------------------------------------------------------


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[98]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[Row] = []
        self.errors: list[Row] = []
        self.peers: dict[str, Peer] = {}
        self.fscrypt_aes_driver: str | None = None

    def error(self, group: str, system: str, err: BaseException) -> None:
        text = f"{type(err).__name__}: {err}" if not isinstance(err, PeerError) else str(err)
        self.errors.append(error(group, system, text))
        say(f"{group} {system}: FAILED: {text}")

    def wanted(self, group: str) -> bool:
        only = self.args.only
        return not only or any(group.startswith(g) for g in only)

    def measure(
        self,
        group: str,
        metric: str,
        higher_is_better: bool,
        one: Callable[[Peer, int], float | tuple[float, dict[str, float]]],
        systems: list[str] | None = None,
        **extra: object,
    ) -> dict[str, list[dict[str, float]]]:
        """``runs`` rounds of ``one(peer, run)`` over every system, interleaved;
        the parts of each system's runs."""
        if not self.wanted(group):
            return {}
        names = [s for s in (systems or self.args.systems) if s in self.peers]
        values: dict[str, list[float]] = {s: [] for s in names}
        parts: dict[str, list[dict[str, float]]] = {s: [] for s in names}
        failed: set[str] = set()
        for run in range(self.args.runs):
            for name in rotated(names, run):
                if name in failed:
                    continue
                wait_for_quiet_disks(spell=0.5)  # not the previous run's write-back
                try:
                    got = one(self.peers[name], run)
                except (OSError, PeerError, subprocess.SubprocessError) as err:
                    self.error(group, name, err)
                    failed.add(name)
                    values[name] = []
                    continue
                value, detail = got if isinstance(got, tuple) else (got, {})
                values[name].append(value)
                parts[name].append(detail)
                say(f"{group} {name} run {run + 1}/{self.args.runs}: {value:,.3f} {metric}")
        for name in names:
            if not values[name]:
                continue
            row = result(
                group, name, metric, values[name], higher_is_better=higher_is_better, **extra
            )
            if parts[name] and parts[name][0]:
                keys = parts[name][0].keys()
                row["parts_median"] = {
                    k: round(statistics.median(p[k] for p in parts[name]), 4) for k in keys
                }
            self.results.append(row)
        return {name: parts[name] for name in names if values[name]}

    def setup(self) -> None:
        a = self.args
        image = max(4 << 30, 3 * max(a.seq_bytes, a.lock_bytes[-1], a.rand_bytes))
        makers: dict[str, Callable[[], Peer]] = {
            "keyfence": lambda: KeyfencePeer(a.scratch_dir),
            "keyfence-pyfuse3": lambda: KeyfencePyfuse3Peer(a.scratch_dir),
            "keyfence-ownloop": lambda: KeyfenceOwnLoopPeer(a.scratch_dir),
            "keyfence-nospin": lambda: KeyfenceNoSpinPeer(a.scratch_dir),
            "keyfence-uring": lambda: KeyfenceUringPeer(a.scratch_dir),
            "gocryptfs": lambda: GocryptfsPeer(a.scratch_dir),
            "gocryptfs-allow-other": lambda: GocryptfsAllowOtherPeer(a.scratch_dir),
            "fscrypt": lambda: FscryptPeer(a.scratch_dir, image),
            "disk": lambda: DiskPeer(a.scratch_dir),
        }
        for name in a.systems:
            peer = makers[name]()
            self.peers[name] = peer
            try:
                peer.setup()
                say(f"{name}: ready at {peer.work}")
            except (OSError, PeerError, subprocess.SubprocessError) as err:
                self.error("setup", name, err)
                with contextlib.suppress(Exception):
                    peer.teardown()
                del self.peers[name]

    def teardown(self) -> None:
        fscrypt = self.peers.get("fscrypt")
        if isinstance(fscrypt, FscryptPeer):
            self.fscrypt_aes_driver = kernel_cipher_driver("xts(aes)")
        for name, peer in reversed(list(self.peers.items())):
            try:
                peer.teardown()
            except Exception as err:  # cleanup goes on for the others
                say(f"{name}: teardown failed: {err}")
        self.peers.clear()

    def run(self) -> None:
        a = self.args
        mib = a.seq_bytes // MIB
        self.measure(
            f"seq-write-{label(a.seq_bytes)}",
            "MB/s",
            True,
            lambda p, r: seq_write(p, a.seq_bytes),
            note=f"{mib} x 1 MiB write(), fsync, close",
        )
        self.measure(
            f"seq-read-{label(a.seq_bytes)}",
            "MB/s",
            True,
            lambda p, r: seq_read(p, a.seq_bytes),
            note="1 MiB reads; caches dropped, keyfence and gocryptfs remounted",
        )
        small = self.measure(
            f"small-files-{a.files}",
            "files/s",
            True,
            lambda p, r: small_files(p, a.files),
            note="open(O_CREAT), write 4 KiB, close each; then syncfs",
        )
        for name, runs in small.items():  # the creating loop on its own (issue 17)
            rates = [a.files / run["create_s"] for run in runs if run.get("create_s")]
            if rates:
                self.results.append(
                    result(
                        f"small-files-{a.files}-create",
                        name,
                        "files/s",
                        rates,
                        higher_is_better=True,
                        note="the same runs' creating loop alone, before the sync",
                    )
                )
        self.measure(
            f"rand-write-4KiB-{label(a.rand_bytes)}",
            "MB/s",
            True,
            lambda p, r: rand_write(p, a.rand_bytes, a.rand_writes, seed=r),
            note=f"{a.rand_writes} random aligned 4 KiB pwrite()s, then fsync",
        )
        for peer in self.peers.values():
            with contextlib.suppress(OSError, PeerError):
                remove(peer.work / "seq.bin")
                remove(peer.work / "rand.bin")
        self.lock_groups()
        self.emergency()
        self.aes()

    def keyfence_lock_options(self, size: int) -> list[str]:
        # all of it may stay dirty in the worker until the removal
        limit = max(2 * size, 256 * MIB)
        return [f"--dirty-limit={limit // MIB}M", "--dirty-expire=3600"]

    def lock_groups(self) -> None:
        a = self.args
        kf = self.peers.get("keyfence")
        wanted = [g for g in ("lock-", "lock-open-") if self.wanted(g)]
        if not wanted:
            return
        for size in a.lock_bytes:
            # as a user has it: the mount's own dirty limit (64 MiB), so
            # most of the GiB is ciphertext in the backing page cache
            self.measure(
                f"lock-open-defaults-{label(size)}",
                "s",
                False,
                locker(size, hold_open=True),
                systems=["keyfence", "disk"],
                note="as lock-open, keyfence with the mount's default dirty limit and expiry",
            )
        if isinstance(kf, KeyfencePeer):
            try:
                kf.remount(self.keyfence_lock_options(max([*a.lock_bytes, a.emergency_bytes])))
            except PeerError as err:
                self.error("lock", "keyfence", err)
        for size in a.lock_bytes:
            parts = self.measure(
                f"lock-{label(size)}",
                "s",
                False,
                locker(size, hold_open=False),
                note="write (closed, no fsync), then remove the key; data checked after",
            )
            # what a user waits for in all: writing (and closing) plus the removal
            for name, runs in parts.items():
                self.results.append(
                    result(
                        f"lock-{label(size)}-with-write",
                        name,
                        "s",
                        [p["write"] + p["total"] for p in runs],
                        higher_is_better=False,
                        note="the write (and close) plus the removal",
                    )
                )
        for size in a.lock_bytes:
            self.measure(
                f"lock-open-{label(size)}",
                "s",
                False,
                locker(size, hold_open=True),
                systems=["keyfence", "fscrypt", "disk"],
                note="as lock, with the file still open during the removal",
            )

    def emergency(self) -> None:
        a = self.args
        kf = self.peers.get("keyfence")
        group = f"emergency-clear-{label(a.emergency_bytes)}"
        if not self.wanted("emergency") or not isinstance(kf, KeyfencePeer):
            return
        try:
            kf.remount(self.keyfence_lock_options(a.emergency_bytes))
            client_ms, reported_ms, kfctl_ms = emergency_rounds(
                kf, a.emergency_bytes, a.emergency_rounds
            )
        except (OSError, PeerError, subprocess.SubprocessError) as err:
            self.error(group, "keyfence", err)
            return
        # The call's return and the mount's drop report are different events:
        # separate groups, so no table puts them in one column.
        size = label(a.emergency_bytes)
        for group, system, what, values in (
            (f"emergency-clear-{size}", "keyfence", "the removal call (client) returns", client_ms),
            (f"emergency-clear-{size}", "kfctl", "kfctl --emergency clear @s exits", kfctl_ms),
            (
                f"emergency-drop-report-{size}",
                "keyfence",
                "the mount reported its drops",
                reported_ms,
            ),
        ):
            self.results.append(
                result(
                    group, system, "ms", values, higher_is_better=False, p99=p99(values), note=what
                )
            )

    def aes(self) -> None:
        if not self.wanted("aes"):
            return
        a = self.args
        for block, decrypt in ((BLOCK, False), (BLOCK, True), (MIB, False)):
            group = f"aes-256-gcm-{label(block)}-{'decrypt' if decrypt else 'encrypt'}"
            runs = []
            for r in range(a.runs):
                runs.append(aes_gcm(block, a.aes_bytes, decrypt))
                say(f"{group} run {r + 1}/{a.runs}: {runs[-1]:,.0f} MB/s")
            self.results.append(
                result(
                    group, "aes", "MB/s", runs, higher_is_better=True, note="cryptography, one core"
                )
            )


def label(size: int) -> str:
    if size >= 1 << 30 and size % (1 << 30) == 0:
        return f"{size >> 30}GiB"
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB}MiB"
    return f"{size // 1024}KiB"


def finish_ratios(results: list[Row]) -> None:
    """keyfence against every peer (the common helper adds the rest against
    gocryptfs and the disk); lock rows also as a factor of the plain sync."""
    medians = {(r["group"], r["system"]): r for r in results}
    for row in results:
        if row["system"] != "keyfence":
            continue
        ratios = {}
        for peer in ("gocryptfs", "gocryptfs-allow-other", "fscrypt", "disk"):
            other = medians.get((row["group"], peer))
            if other is not None:
                value = ratio(row["median"], other["median"], row["higher_is_better"])
                if value is not None:
                    ratios[peer] = value
        if ratios:
            row["ratios"] = ratios
    for row in results:
        base = medians.get((row["group"], "disk"))
        if str(row["group"]).startswith("lock") and base is not None and base["median"] > 0:
            row["vs_sync"] = row["median"] / base["median"]


def table(results: list[Row], errors: list[Row]) -> str:
    lines = [
        f"{'group':<26} {'system':<10} {'median':>10} {'min':>10} {'max':>10} {'unit':<8} ratios",
        "-" * 100,
    ]
    for r in results:
        ratios = r.get("ratios") or {}
        text = " ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        if "vs_sync" in r:
            text = f"{r['vs_sync']:.2f}x disk's time; " + text
        if "p99" in r:
            text = f"p99 {r['p99']:.1f}; " + text
        lines.append(
            f"{r['group']:<26} {r['system']:<10} {r['median']:>10,.2f} {r['min']:>10,.2f} "
            f"{r['max']:>10,.2f} {r['metric']:<8} {text}"
        )
    lines.append("ratios: this system's median against that one's, > 1 means better")
    for e in errors:
        lines.append(f"ERROR {e['group']} {e['system']}: {e['error']}")
    return "\n".join(lines)


def params(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "runs": a.runs,
        "seq_bytes": a.seq_bytes,
        "files": a.files,
        "rand_file_bytes": a.rand_bytes,
        "rand_writes": a.rand_writes,
        "lock_bytes": a.lock_bytes,
        "emergency_bytes": a.emergency_bytes,
        "emergency_rounds": a.emergency_rounds,
        "aes_bytes": a.aes_bytes,
        "scratch": a.scratch,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few MiB: seconds, for CI")
    p.add_argument("--json", help="write the results (bench/results schema) here")
    p.add_argument("--runs", type=int, help="runs per measurement (3; quick: 1)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--only", default="", help="group name prefixes, comma separated")
    p.add_argument("--scratch", default="/var/tmp", help="a directory on the disk to compare on")
    p.add_argument("--seq-mib", type=int)
    p.add_argument("--files", type=int)
    p.add_argument("--rand-mib", type=int)
    p.add_argument("--rand-writes", type=int)
    p.add_argument("--lock-mib", help="comma separated sizes (64,256,1024)")
    p.add_argument("--emergency-mib", type=int)
    p.add_argument("--emergency-rounds", type=int, help="rounds per way of removing")
    p.add_argument("--aes-mib", type=int)
    a = p.parse_args(argv)
    quick = a.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    a.runs = pick(a.runs, 3, 1)
    a.seq_bytes = pick(a.seq_mib, 1024, 8) * MIB
    a.files = pick(a.files, 5000, 200)
    a.rand_bytes = pick(a.rand_mib, 256, 8) * MIB
    a.rand_writes = pick(a.rand_writes, 20000, 500)
    a.lock_bytes = [int(x) * MIB for x in pick(a.lock_mib, "64,256,1024", "4,16").split(",")]
    a.emergency_bytes = pick(a.emergency_mib, 1024, 16) * MIB
    a.emergency_rounds = pick(a.emergency_rounds, 10, 2)
    a.aes_bytes = pick(a.aes_mib, 256, 8) * MIB
    a.systems = [s for s in a.systems.split(",") if s]
    unknown = set(a.systems) - set(SYSTEMS) - set(VARIANTS)
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    a.only = [g for g in a.only.split(",") if g]
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [HOLD]:
        return hold_open_main(argv[1], int(argv[2]), int(argv[3]))
    args = parse_args(argv)
    status = lead_own_session(__file__, argv)
    if status is not None:
        return status
    die_with_parent()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupted)
    if os.geteuid() != 0:
        print("fs_compare: needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 2
    bench = Bench(args)
    say(f"fs-compare{' (quick)' if args.quick else ''}: {', '.join(args.systems)}, "
        f"{args.runs} run(s)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kf-fs-compare-", dir=args.scratch) as scratch:
        args.scratch_dir = Path(scratch)
        interrupted: Interrupted | None = None
        try:
            bench.setup()
            bench.run()
        except Interrupted as err:
            interrupted = err
            say(f"interrupted ({err}); cleaning up")
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
            bench.teardown()
    if interrupted is not None:
        return 130
    finish_ratios(bench.results)
    doc = report(
        "fs-compare",
        quick=args.quick,
        results=bench.results,
        errors=bench.errors,
        machine_path=args.scratch,
        params=params(args),
        fscrypt_aes_driver=bench.fscrypt_aes_driver,
    )
    print(table(doc["results"], doc["errors"]), flush=True)
    if doc["fscrypt_aes_driver"]:
        print(f"kernel fscrypt contents cipher: {doc['fscrypt_aes_driver']}")
    if args.json:
        write_json(args.json, doc)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
