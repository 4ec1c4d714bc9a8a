"""keyfence's real worker serving FUSE requests through io_uring, one queue
per CPU (src/keyfence/fs/fuse/ring.py, _ring.c), on a real mount: the kernel's
``fuse.enable_uring`` is set for each test and put back after it.

tests/fs/test_fuse_loop.py runs the loop's protocol corners this way too
(its ``uring`` cases); here the whole worker: keys looked up (a handler moved
to the trio thread), write-back and fsync (blocking calls waited for on a
queue thread), a key removal through the fence with dirty data, and every
request served by the queues.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.fuse import protocol
from keyfence.fs.fuse.ring import possible_cpus
from keyfence.testing.mounting import Mount, fuse_uring, fuse_uring_available, idle_class_threads

pytestmark = pytest.mark.skipif(
    fuse_uring_available() is not None, reason=str(fuse_uring_available())
)


def _fd_links(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` is (one closed meanwhile: left out)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return links


def _queues(m: Mount) -> dict[str, list[int]]:
    deadline = time.monotonic() + 30
    while (got := m.control("queues")) is None:
        assert time.monotonic() < deadline, "the worker took no io_uring queues"
        time.sleep(0.05)
    return got  # type: ignore[no-any-return]


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Mount]:
    with fuse_uring(True):
        m = Mount(tmp_path, "--fuse-loop=keyfence", "--dirty-expire", "60")
        try:
            _queues(m)
            yield m
        finally:
            m.unmount_checked()


def test_every_request_comes_through_a_queue_of_its_cpu(worker: Mount) -> None:
    assert worker.proc is not None
    rings = [link for link in _fd_links(worker.proc.pid) if link == "anon_inode:[io_uring]"]
    assert len(rings) == possible_cpus()
    d, _ = worker.encrypted_dir()
    before = _queues(worker)
    by_opcode = worker.control("requests")
    for i in range(200):
        (d / f"f{i}").write_bytes(b"%d" % i * 100)
    data = os.urandom(3 << 20)
    (d / "big").write_bytes(data)
    assert sorted(os.listdir(d)) == sorted([*(f"f{i}" for i in range(200)), "big"])
    assert all((d / f"f{i}").read_bytes() == b"%d" % i * 100 for i in range(200))
    assert (d / "big").read_bytes() == data
    os.rename(d / "f0", d / "renamed")
    os.symlink("renamed", d / "link")
    assert (d / "link").read_bytes() == b"0" * 100
    after = _queues(worker)
    served = sum(after["served"]) - sum(before["served"])
    creates = worker.control("requests")[protocol.CREATE] - by_opcode[protocol.CREATE]
    assert creates == 201
    assert served >= 201 * 4, (served, after)
    # the key's lookup (fs/binding.py) went to the trio thread and back
    assert sum(after["to_trio"]) >= 1, after


def test_fsync_waits_on_the_queue_thread(worker: Mount) -> None:
    before = _queues(worker)
    path = worker.mnt / "journal"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        for i in range(20):
            os.pwrite(fd, b"record %d\n" % i, i * 10)
            os.fsync(fd)
    finally:
        os.close(fd)
    after = _queues(worker)
    assert sum(after["direct_waits"]) - sum(before["direct_waits"]) >= 10, after
    assert path.read_bytes().startswith(b"record 0\n")


def test_a_key_removal_writes_back_dirty_data_first(worker: Mount) -> None:
    d, master = worker.encrypted_dir()
    data = os.urandom(2 << 20)
    fd = os.open(d / "dirty", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)  # dirty in the worker (--dirty-expire 60)
        worker.clear()  # the fence: written back under the key, then the key goes
    finally:
        os.close(fd)
    assert not (d / "dirty").exists()  # locked: the name is shown sealed
    worker.add_key(master)
    assert (d / "dirty").read_bytes() == data


def test_no_uring_keeps_a_mount_on_dev_fuse(tmp_path: Path) -> None:
    with fuse_uring(True):
        m = Mount(tmp_path, "--fuse-loop=keyfence", "--no-uring")
        try:
            (m.mnt / "f").write_bytes(b"x")
            assert (m.mnt / "f").read_bytes() == b"x"
            assert m.control("queues") is None
            assert m.proc is not None
            assert "anon_inode:[io_uring]" not in _fd_links(m.proc.pid)
        finally:
            m.unmount_checked()


def test_forgets_are_gathered_not_read_one_by_one(worker: Mount) -> None:
    """With the queues serving requests, /dev/fuse carries the forgets: the
    reader waits a moment once it is readable (session.FORGET_GATHER_S), so
    an ``rm -rf`` of 2,000 files sends them in batches rather than waking
    the trio thread (and taking the serving lock) for nearly each one
    (before: ~1,100 messages for 2,000 forgets)."""
    d = worker.mnt / "tree"
    d.mkdir()
    for i in range(2000):
        (d / f"f{i}").write_bytes(b"x")
    os.listdir(d)
    before = worker.control("requests")
    subprocess.run(["rm", "-rf", str(d)], check=True)
    deadline = time.monotonic() + 30
    while True:
        after = worker.control("requests")
        forgets = after[protocol.FORGET] - before[protocol.FORGET]
        batches = after[protocol.BATCH_FORGET] - before[protocol.BATCH_FORGET]
        if forgets + batches > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 0 < forgets + batches < 500, (forgets, batches)


@pytest.mark.skipif(possible_cpus() < 2, reason="one CPU: no neighbour to keep busy")
def test_a_neighbouring_cpu_is_kept_busy_only_while_requests_come(worker: Mount) -> None:
    """fs/fuse/_awake.c: one spinner per queue, at SCHED_IDLE, on the
    queue's neighbouring CPU; asleep (no CPU time) once the mount is idle."""
    assert worker.proc is not None
    for i in range(200):
        os.statvfs(worker.mnt)
        (worker.mnt / f"f{i}").write_bytes(b"x")
    spinners = idle_class_threads(worker.proc.pid)
    assert len(spinners) == possible_cpus(), spinners
    assert sorted(min(cpus) for _, cpus in spinners.values()) == list(range(possible_cpus()))
    assert all(len(cpus) == 1 for _, cpus in spinners.values())
    time.sleep(0.5)  # well past the 200 us spin
    before = idle_class_threads(worker.proc.pid)
    time.sleep(1.0)
    after = idle_class_threads(worker.proc.pid)
    assert {tid: t for tid, (t, _) in after.items()} == {tid: t for tid, (t, _) in before.items()}


def test_no_spinner_without_spin_us(tmp_path: Path) -> None:
    with fuse_uring(True):
        m = Mount(tmp_path, "--fuse-loop=keyfence", "--spin-us", "0")
        try:
            _queues(m)
            for _ in range(100):
                os.statvfs(m.mnt)
            assert m.proc is not None
            assert idle_class_threads(m.proc.pid) == {}
        finally:
            m.unmount_checked()
