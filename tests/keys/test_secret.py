"""SecretBuffer / SecretArena against real memory: zeroing, locking, DONTDUMP, reuse."""

from __future__ import annotations

import array
import copy
import ctypes
import gc
import os
import pickle
import random
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.keys import secret
from keyfence.keys.secret import MAX_CLASS_SIZE, SecretArena, SecretBuffer

# Distinctive, so finding it anywhere means a leak.
MARKER = b"Tr0ub4dor&3-CORRECT-HORSE-BATTERY-STAPLE-5e1f"
IS_ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _chunk(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


def _is_zero(addr: int, size: int) -> bool:
    return _chunk(addr, size) == bytes(size)


def _mapping_of(addr: int) -> tuple[int, int, list[str]] | None:
    """(start, end, perms + VmFlags) of the mapping in /proc/self/smaps containing addr."""
    current: tuple[int, int, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head, *rest = line.split()
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = (lo, hi, rest[0]) if lo <= addr < hi else None
            elif current is not None and head == "VmFlags:":
                return current[0], current[1], [current[2], *rest]
    return None


def _vm_locked_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def arena() -> Iterator[SecretArena]:
    a = SecretArena()
    yield a
    gc.collect()


# -- construction, round trip ---------------------------------------------------


def test_round_trip_reveal_and_view(arena: SecretArena) -> None:
    buf = arena.store(MARKER)
    assert len(buf) == len(MARKER)
    assert not buf.wiped
    assert buf.capacity == 64
    assert buf.reveal() == MARKER
    with buf.view() as v:
        assert v.readonly
        assert v.tobytes() == MARKER
        with pytest.raises(TypeError):
            v[0] = 0
        assert _chunk(buf.address, len(MARKER)) == MARKER
    with pytest.raises(ValueError):
        v.tobytes()  # released on exit


def test_store_accepts_bytearray_memoryview_and_copies(arena: SecretArena) -> None:
    source = bytearray(MARKER)
    buf = arena.store(source)
    source[:] = bytes(len(source))
    assert buf.reveal() == MARKER
    assert arena.store(memoryview(MARKER)[4:10]).reveal() == MARKER[4:10]
    words = array.array("I", [1, 2, 3])
    assert arena.store(memoryview(words)).reveal() == words.tobytes()
    assert arena.store(b"").reveal() == b""


def test_module_level_store_uses_default_arena() -> None:
    before = secret.default_arena().statistics().chunks_in_use
    buf = secret.store(MARKER)
    assert secret.default_arena().statistics().chunks_in_use == before + 1
    assert buf.reveal() == MARKER
    buf.wipe()
    assert secret.default_arena().statistics().chunks_in_use == before


def test_direct_construction_refused() -> None:
    with pytest.raises(TypeError):
        SecretBuffer()


def test_compare_is_by_content_eq_is_identity(arena: SecretArena) -> None:
    a = arena.store(MARKER)
    b = arena.store(MARKER)
    assert a.compare(MARKER)
    assert a.compare(bytearray(MARKER))
    assert not a.compare(MARKER[:-1] + b"X")
    assert not a.compare(MARKER[:-1])
    assert a != b
    assert a == a
    assert len({a, b}) == 2
    a.wipe()
    with pytest.raises(ValueError, match="secret was wiped"):
        a.compare(MARKER)


# -- wiping -------------------------------------------------------------------------


def test_wipe_zeroes_memory_in_place(arena: SecretArena) -> None:
    keeper = arena.store(b"keep the slab mapped")
    buf = arena.store(MARKER)
    addr, cap = buf.address, buf.capacity
    assert _chunk(addr, len(MARKER)) == MARKER
    buf.wipe()
    assert buf.wiped
    assert len(buf) == 0
    assert _is_zero(addr, cap)
    buf.wipe()  # idempotent
    assert arena.statistics().chunks_in_use == 1
    assert keeper.reveal() == b"keep the slab mapped"


def test_del_and_gc_zero_memory(arena: SecretArena) -> None:
    keeper = arena.store(b"keep the slab mapped")
    buf = arena.store(MARKER)
    addr, cap = buf.address, buf.capacity
    del buf
    gc.collect()
    assert _is_zero(addr, cap)
    # Only the cycle collector can free this one.
    cyc = arena.store(MARKER)
    addr, cap = cyc.address, cyc.capacity
    loop: list[object] = [cyc]
    loop.append(loop)
    del cyc, loop
    assert _chunk(addr, len(MARKER)) == MARKER
    gc.collect()
    assert _is_zero(addr, cap)
    assert arena.statistics().chunks_in_use == 1
    del keeper


def test_finaliser_while_lock_busy_zeroes_now_frees_later(arena: SecretArena) -> None:
    keeper = arena.store(b"keep")
    buf = arena.store(MARKER)
    addr, cap = buf.address, buf.capacity
    with arena._lock:  # as if another thread were inside the arena
        del buf
        gc.collect()
        assert _is_zero(addr, cap)
    stats = arena.statistics()
    assert stats.chunks_in_use == 1
    assert stats.bytes_in_use == keeper.capacity


def test_reveal_view_after_wipe_refuse(arena: SecretArena) -> None:
    buf = arena.store(MARKER)
    buf.wipe()
    with pytest.raises(ValueError, match=r"^secret was wiped$"):
        buf.reveal()
    with pytest.raises(ValueError, match=r"^secret was wiped$"), buf.view():
        pass


def test_wipe_during_view_zeroes_and_defers_reuse(arena: SecretArena) -> None:
    buf = arena.store(MARKER)
    addr = buf.address
    with buf.view() as v:
        buf.wipe()
        assert v.tobytes() == bytes(len(MARKER))
        # Still pinned: a new store must not land on this chunk.
        other = arena.store(b"other")
        assert other.address != addr
        assert arena.statistics().chunks_in_use == 2
    assert arena.statistics().chunks_in_use == 1
    assert arena.store(b"x" * 40).address == addr  # same 64-byte class


# -- no leaks through repr, exceptions, pickling ---------------------------------------


def _reveal_error(buf: SecretBuffer) -> BaseException:
    try:
        buf.reveal()
    except ValueError as exc:
        return exc
    raise AssertionError("reveal of a wiped secret succeeded")


def test_repr_str_and_tracebacks_never_show_payload(arena: SecretArena) -> None:
    buf = arena.store(MARKER)
    text = MARKER.decode()
    assert repr(buf) == f"<SecretBuffer {len(MARKER)} bytes>"
    assert str(buf) == repr(buf) == f"{buf}"
    assert text not in repr(buf) and text not in str(buf)

    # An error raised while a view is open, rendered with frame locals.
    def fail_inside_view() -> BaseException:
        try:
            with buf.view() as v:
                raise RuntimeError(f"failed on {buf!r} with {v!r}")
        except RuntimeError as exc:
            return exc
        raise AssertionError("unreachable")

    exc = fail_inside_view()
    rendered = "".join(
        traceback.TracebackException.from_exception(exc, capture_locals=True).format()
    )
    assert text not in rendered and repr(MARKER) not in rendered

    buf.wipe()
    assert repr(buf) == str(buf) == "<SecretBuffer wiped>"
    exc = _reveal_error(buf)
    assert str(exc) == "secret was wiped"
    rendered = "".join(
        traceback.TracebackException.from_exception(exc, capture_locals=True).format()
    )
    assert "secret was wiped" in rendered
    assert "<SecretBuffer wiped>" in rendered  # locals were rendered, safely
    assert text not in rendered and repr(MARKER) not in rendered


def test_pickling_and_copying_refused(arena: SecretArena) -> None:
    buf = arena.store(MARKER)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(buf, protocol=protocol)
    with pytest.raises(TypeError):
        copy.copy(buf)
    with pytest.raises(TypeError):
        copy.deepcopy(buf)
    with pytest.raises(TypeError):
        pickle.dumps(arena)


# -- locking and core-dump exclusion ----------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="mlock beyond RLIMIT_MEMLOCK needs root")
def test_slabs_are_locked_as_root() -> None:
    gc.collect()
    before = _vm_locked_kib()
    a = SecretArena()
    buf = a.store(MARKER)
    stats = a.statistics()
    assert stats.locked_bytes == stats.bytes_mapped > 0
    assert stats.unlocked_slabs == 0
    assert _vm_locked_kib() >= before + stats.locked_bytes // 1024
    found = _mapping_of(buf.address)
    assert found is not None and "lo" in found[2]


def test_slab_is_marked_dontdump(arena: SecretArena) -> None:
    small = arena.store(MARKER)
    big = arena.store(bytes(MAX_CLASS_SIZE + 1))
    for buf in (small, big):
        found = _mapping_of(buf.address)
        assert found is not None, "chunk address not in any mapping"
        assert "dd" in found[2], found
        assert found[2][0] == "rw-p", found  # private: a forked child cannot write it


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop privileges in the child")
def test_unlockable_slabs_are_recorded_not_fatal() -> None:
    result = _run_child(
        """
        import os, resource
        from keyfence.keys.secret import SecretArena
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        os.setgid(65534)
        os.setuid(65534)  # drops CAP_IPC_LOCK
        a = SecretArena()
        buf = a.store(b"payload")
        assert buf.reveal() == b"payload"
        s = a.statistics()
        print(s.slabs, s.locked_bytes, s.unlocked_slabs)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0", "1"]


def test_disable_core_dumps_in_child() -> None:
    result = _run_child(
        """
        import ctypes, resource
        from keyfence.keys.secret import disable_core_dumps
        disable_core_dumps()
        libc = ctypes.CDLL(None)
        print(resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(0, 0) 0"


def test_interpreter_shutdown_with_live_secrets_is_quiet() -> None:
    result = _run_child(
        """
        from keyfence.keys.secret import SecretArena, store
        kept = [store(b"x" * n) for n in (1, 100, 5000, 2_000_000)]
        arena = SecretArena()
        more = [arena.store(b"y" * 40) for _ in range(100)]
        loop = [arena.store(b"z"), store(b"w")]
        loop.append(loop)
        """
    )
    assert result.returncode == 0
    assert result.stderr == ""


# -- reuse, size classes, big payloads ----------------------------------------------------


def test_chunks_reused_without_old_payload(arena: SecretArena) -> None:
    keeper = arena.store(b"keep")
    buf = arena.store(MARKER)
    addr, cap = buf.address, buf.capacity
    buf.wipe()
    shorter = b"s" * 33  # same 64-byte class as MARKER (45 bytes)
    again = arena.store(shorter)
    assert again.address == addr
    assert again.capacity == cap
    assert _chunk(addr, cap) == shorter + bytes(cap - len(shorter))
    assert again.reveal() == shorter
    assert arena.statistics().chunks_in_use == 2
    del keeper


@pytest.mark.parametrize(
    ("length", "capacity"),
    [
        (0, 32),
        (1, 32),
        (32, 32),
        (33, 64),
        (4096, 4096),
        (32_767, 32_768),
        (MAX_CLASS_SIZE, MAX_CLASS_SIZE),
    ],
)
def test_size_classes(arena: SecretArena, length: int, capacity: int) -> None:
    payload = random.Random(length).randbytes(length)
    buf = arena.store(payload)
    assert buf.capacity == capacity
    assert len(buf) == length
    assert buf.reveal() == payload
    assert buf.compare(payload)


def test_big_payload_gets_own_mapping_and_is_wiped(arena: SecretArena) -> None:
    payload = MARKER * ((MAX_CLASS_SIZE + 1) // len(MARKER) + 1)
    payload = payload[: MAX_CLASS_SIZE + 1]
    before = arena.statistics()
    buf = arena.store(payload)
    after = arena.statistics()
    page = os.sysconf("SC_PAGE_SIZE")
    assert buf.capacity == MAX_CLASS_SIZE + page
    assert after.slabs == before.slabs + 1
    assert after.bytes_mapped == before.bytes_mapped + buf.capacity
    found = _mapping_of(buf.address)
    assert found is not None
    assert found[0] <= buf.address and buf.address + buf.capacity <= found[1]
    assert buf.reveal() == payload
    addr, cap = buf.address, buf.capacity
    with buf.view() as v:  # keeps the mapping alive so the zeroing can be checked
        buf.wipe()
        assert v.tobytes() == bytes(len(payload))
        assert _is_zero(addr, cap)
    assert arena.statistics() == before
    found = _mapping_of(addr)
    assert found is None or "dd" not in found[2]  # unmapped (or reused by someone else)


# -- scale and concurrency -------------------------------------------------------------------


def test_hundred_thousand_small_secrets(arena: SecretArena) -> None:
    n = 100_000
    payloads = [i.to_bytes(4, "little") * 8 for i in range(n)]
    bufs = [arena.store(p) for p in payloads]
    stats = arena.statistics()
    assert stats.chunks_in_use == n
    assert stats.bytes_in_use == 32 * n
    assert stats.bytes_mapped < 32 * n * 1.05 + 64 * 1024  # ~32 bytes mapped per secret
    assert len({b.address for b in bufs}) == n
    for i in range(0, n, 997):
        assert bufs[i].reveal() == payloads[i]
        assert bufs[i].compare(payloads[i])
    for b in bufs:
        b.wipe()
    assert all(b.wiped for b in bufs[::101])
    assert _is_zero(bufs[-1].address, 32)
    stats = arena.statistics()
    assert (stats.chunks_in_use, stats.bytes_in_use) == (0, 0)
    assert stats.slabs <= 1  # emptied slabs went back to the kernel


def test_concurrent_store_and_wipe_totals_consistent(arena: SecretArena) -> None:
    threads, rounds, keep = 8, 1500, 50
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []
    kept: list[list[SecretBuffer]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(rounds):
                payload = rng.randbytes(rng.randrange(1, 3000))
                buf = arena.store(payload)
                assert buf.reveal() == payload, (t, i)
                if i < keep:
                    kept[t].append(buf)
                elif rng.random() < 0.5:
                    buf.wipe()
                else:
                    del buf  # finaliser path
            barrier.wait()  # main thread checks totals here
            barrier.wait()
            for b in kept[t]:
                b.wipe()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that races show
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=60)
        stats = arena.statistics()
        live = [b for ks in kept for b in ks]
        assert stats.chunks_in_use == threads * keep
        assert stats.bytes_in_use == sum(b.capacity for b in live)
        assert len({b.address for b in live}) == len(live)
        barrier.wait(timeout=60)
    finally:
        for w in workers:
            w.join(timeout=60)
        sys.setswitchinterval(interval)
    assert not errors, errors
    stats = arena.statistics()
    assert (stats.chunks_in_use, stats.bytes_in_use) == (0, 0)
    assert stats.locked_bytes <= stats.bytes_mapped


def test_store_and_wipe_wait_for_the_arena_lock(arena: SecretArena) -> None:
    # Under the GIL the races above are rare; this shows the lock is really taken.
    buf = arena.store(MARKER)
    done: list[str] = []

    def do_wipe() -> None:
        buf.wipe()
        done.append("wiped")

    stored: list[SecretBuffer] = []

    def do_store() -> None:
        stored.append(arena.store(b"k"))
        done.append(repr(stored[0]))

    store_thread = threading.Thread(target=do_store)
    wipe_thread = threading.Thread(target=do_wipe)
    with arena._lock:
        store_thread.start()
        wipe_thread.start()
        store_thread.join(timeout=0.2)
        wipe_thread.join(timeout=0.2)
        assert done == []
        assert not buf.wiped
    store_thread.join(timeout=10)
    wipe_thread.join(timeout=10)
    assert sorted(done) == ["<SecretBuffer 1 bytes>", "wiped"]
    assert arena.statistics().chunks_in_use == 1
