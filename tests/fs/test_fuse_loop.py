"""keyfence's own FUSE loop (src/keyfence/fs/fuse/) against the kernel.

Two kinds of tests, both on real FUSE mounts:

* the real worker serving keyfence's handlers through the loop
  (``--fuse-loop=keyfence``): every operation, big writes, a lock;
* the loop (:class:`~keyfence.fs.fuse.session.Session`, in this process on
  a thread of its own) serving a small in-memory filesystem built for the
  protocol's corners: a read that waits until the test lets it go (interrupts,
  unmount with requests pending, other requests served meanwhile), a read that
  raises, lookup counting (FORGET and BATCH_FORGET), the largest write seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from keyfence.fs.crypto import MasterKey
from keyfence.fs.fuse import protocol
from keyfence.fs.fuse.handoff import on_trio_thread
from keyfence.fs.fuse.mount import mount_by_name
from keyfence.fs.fuse.session import Session, SessionOptions
from keyfence.fs.fuse.spin import START_NS
from keyfence.testing.mounting import (
    Mount,
    fuse_available,
    fuse_uring,
    fuse_uring_available,
    idle_class_threads,
    is_mounted,
)

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

WAIT = 60.0


def wait_for(what: str, ok: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------- a filesystem for the corners


class Node:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray()
        self.lookups = 0


class CornerFS(pyfuse3.Operations):
    """Flat, in memory.  ``slow`` reads wait for :attr:`gate` (on a worker
    thread, as keyfence's key lookups and write-backs do); ``boom`` reads
    raise; every lookup is counted until forgotten."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {1: Node(1, stat.S_IFDIR | 0o777)}
        self.names: dict[bytes, int] = {}
        self.gate = threading.Event()
        self.slow_readers = 0
        self.biggest_write = 0
        self.forgets = 0
        for name in (b"slow", b"boom"):
            self._new(name, stat.S_IFREG | 0o666).data[:] = b"data of " + name

    def _new(self, name: bytes, mode: int) -> Node:
        node = Node(max(self.nodes) + 1, mode)
        self.nodes[node.ino] = node
        self.names[name] = node.ino
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.ino)
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = 2 if node.ino == 1 else 1
        a.st_size = len(node.data)
        a.entry_timeout = a.attr_timeout = 60
        return a

    async def lookup(self, parent: Any, name: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        ino = self.names.get(bytes(name))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        self.nodes[ino].lookups += 1
        return self._attrs(self.nodes[ino])

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.nodes[ino].lookups -= n
            self.forgets += 1

    async def getattr(self, inode: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(self.nodes[inode])

    async def setattr(
        self, inode: Any, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        if fields.update_size:
            del node.data[attr.st_size :]
            node.data.extend(bytes(attr.st_size - len(node.data)))
        return self._attrs(node)

    async def create(
        self, parent: Any, name: Any, mode: Any, flags: Any, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(bytes(name), stat.S_IFREG | (mode & 0o7777))
        node.lookups += 1
        return pyfuse3.FileInfo(fh=node.ino), self._attrs(node)

    async def open(self, inode: Any, flags: Any, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=inode == self.names[b"slow"])

    async def read(self, fh: Any, off: int, size: int) -> bytes:
        if fh == self.names[b"slow"]:
            self.slow_readers += 1
            try:
                await on_trio_thread()  # a handler's contract (fs/fuse/handoff.py)
                await trio.to_thread.run_sync(self.gate.wait)
            finally:
                self.slow_readers -= 1
        if fh == self.names[b"boom"]:
            raise RuntimeError("a handler's bug")
        return bytes(self.nodes[fh].data[off : off + size])

    async def write(self, fh: Any, off: int, buf: Any) -> int:
        self.biggest_write = max(self.biggest_write, len(buf))
        data = self.nodes[fh].data
        if len(data) < off:
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        return len(buf)

    async def getxattr(self, inode: Any, name: Any, ctx: Any) -> bytes:
        raise FUSEError(errno.ENODATA)

    async def opendir(self, inode: Any, ctx: Any) -> Any:
        return inode

    async def readdir(self, fh: Any, start_id: int, token: Any, pid: int = 0) -> None:
        from keyfence.fs.fuse.kernel import readdir_reply

        names = sorted(self.names)
        for i in range(start_id, len(names)):
            node = self.nodes[self.names[names[i]]]
            if not readdir_reply(token, names[i], self._attrs(node), i + 1):
                return
            node.lookups += 1  # readdirplus entries count as lookups

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


class Served:
    def __init__(self, fs: CornerFS, mnt: Path, session: Session, thread: threading.Thread):
        self.fs = fs
        self.mnt = mnt
        self.session = session
        self.thread = thread
        self.error: list[BaseException] = []


def _unmount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture(
    params=[(0, True, False), (200, True, False), (0, False, False), (200, False, False),
            (0, True, True)],
    ids=["sleeping", "spinning", "sleeping-python", "spinning-python", "uring"],
)  # fmt: skip
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """The loop over CornerFS, once sleeping in epoll whenever the queue is
    empty and once spinning 200 us first, each with the common case served
    by fs/fuse/_loop.c and all in Python, and once taking requests through
    io_uring (one queue per CPU, fs/fuse/ring.py): every corner must hold
    every way."""
    spin_us, native, uring = request.param
    yield from _served(tmp_path, spin_us=spin_us, native=native, uring=uring)


def _served(tmp_path: Path, *, spin_us: int, native: bool, uring: bool) -> Iterator[Served]:
    """CornerFS mounted at ``tmp_path``/mnt, served with these options."""
    if native and not _native_built():
        pytest.fail("keyfence.fs.fuse._loop is not built (setup.py build_ext)")
    if uring and fuse_uring_available() is not None:
        pytest.skip(str(fuse_uring_available()))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = CornerFS()
    options = {"fsname=kfloop", "subtype=kfloop", "default_permissions", "nosuid", "nodev"}
    with fuse_uring(True) if uring else contextlib.nullcontext():
        fd = mount_by_name(str(mnt), options)
        session = Session(fs, fd, SessionOptions(spin_us=spin_us, native=native, uring=uring))
        yield from _serve(fs, mnt, fd, session, native=native, uring=uring)


def _serve(
    fs: CornerFS, mnt: Path, fd: int, session: Session, *, native: bool, uring: bool
) -> Iterator[Served]:
    out: list[BaseException] = []

    def run() -> None:
        try:
            trio.run(session.serve)
        except BaseException as err:  # reported by the test
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    s = Served(fs, mnt, session, thread)
    s.error = out
    try:
        wait_for("INIT", lambda: session.initialized)
        if uring:
            assert session.queues is not None, (
                "the kernel offered io_uring; the loop did not take it"
            )
        yield s
    finally:
        fs.gate.set()
        if is_mounted(mnt):
            _unmount(mnt)
        thread.join(WAIT)
        os.close(fd)
        assert not thread.is_alive(), "the loop did not end after the unmount"
        assert not out, out
        if uring:  # every corner makes requests the queues serve
            assert session.queues is not None
            assert sum(session.queues.statistics()["served"]) > 0
        elif native:  # every corner makes requests the common case serves
            assert session.served_natively > 0
        else:
            assert session.served_natively == 0


def _native_built() -> bool:
    try:
        from keyfence.fs.fuse import _loop  # noqa: F401
    except ImportError:
        return False
    return True


def reader(path: Path) -> subprocess.Popen[bytes]:
    """A process reading ``path`` with SIGUSR1 caught (an interruptible caller)."""
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "signal.siginterrupt(signal.SIGUSR1, False)\n"
        "sys.stdout.buffer.write(open(sys.argv[1], 'rb').read()); sys.stdout.flush()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)


# --------------------------------------------------------------------- tests


def test_a_suspended_handler_does_not_stop_other_requests(served: Served) -> None:
    child = reader(served.mnt / "slow")
    try:
        wait_for("the slow read", lambda: served.fs.slow_readers == 1)
        # the loop goes on while that handler waits on its thread
        assert sorted(os.listdir(served.mnt)) == ["boom", "slow"]
        (served.mnt / "new").write_bytes(b"hello")
        assert (served.mnt / "new").read_bytes() == b"hello"
        assert len(served.session.waiting) == 1
        served.fs.gate.set()
        out, _ = child.communicate(timeout=WAIT)
        assert out == b"data of slow"
        # the answer wakes the reader before the loop's thread takes the
        # request out of ``waiting`` (after its writev): wait for that
        wait_for("the handler's slot back", lambda: not served.session.waiting)
    finally:
        served.fs.gate.set()
        child.kill()
        child.communicate()


def test_interrupt_is_received_and_the_request_still_answered(served: Served) -> None:
    child = reader(served.mnt / "slow")
    try:
        wait_for("the slow read", lambda: served.fs.slow_readers == 1)
        os.kill(child.pid, signal.SIGUSR1)
        wait_for("FUSE_INTERRUPT", lambda: served.session.interrupts >= 1)
        assert child.poll() is None  # the caller waits for our answer
        served.fs.gate.set()
        out, _ = child.communicate(timeout=WAIT)
        assert child.returncode == 0
        assert out == b"data of slow"
        assert (served.mnt / "boom").stat().st_size == len(b"data of boom")
    finally:
        served.fs.gate.set()
        child.kill()
        child.communicate()


def test_a_killed_caller_leaves_the_loop_serving(served: Served) -> None:
    child = reader(served.mnt / "slow")
    wait_for("the slow read", lambda: served.fs.slow_readers == 1)
    child.kill()  # the kernel waits for our answer (the request was read)
    served.fs.gate.set()
    child.wait(timeout=WAIT)
    assert child.stdout is not None
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    wait_for("the handler's end", lambda: not served.session.waiting)
    assert os.listdir(served.mnt)


def test_a_handler_raising_answers_eio_and_the_loop_goes_on(served: Served) -> None:
    for _ in range(3):
        with pytest.raises(OSError) as caught:
            (served.mnt / "boom").read_bytes()
        assert caught.value.errno == errno.EIO
    assert (served.mnt / "new").exists() is False
    (served.mnt / "new").write_bytes(b"still serving")
    assert (served.mnt / "new").read_bytes() == b"still serving"


def test_unknown_requests_get_enosys_not_a_dead_loop(served: Served) -> None:
    fd = os.open(served.mnt / "boom", os.O_RDWR)
    try:
        # FALLOCATE: no handler (fallocate(2) itself: glibc's posix_fallocate
        # would write zeros instead)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        assert libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096)) == -1
        assert ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS)
    finally:
        os.close(fd)
    assert os.statvfs(served.mnt).f_namemax == 255


def test_unmount_while_a_request_is_pending(served: Served) -> None:
    child = reader(served.mnt / "slow")
    try:
        wait_for("the slow read", lambda: served.fs.slow_readers == 1)
        _unmount(served.mnt)  # lazy: the busy mount goes once the read ends
        assert not is_mounted(served.mnt)
        assert served.thread.is_alive()  # still serving the pending read
        served.fs.gate.set()
        out, _ = child.communicate(timeout=WAIT)
        assert out == b"data of slow"
        served.thread.join(WAIT)
        assert not served.thread.is_alive()
        assert served.session.unmounted
    finally:
        served.fs.gate.set()
        child.kill()
        child.communicate()


def test_abort_while_a_request_is_pending(served: Served) -> None:
    """The connection aborted (``/sys/fs/fuse/connections/N/abort``): the
    caller gets ENOTCONN at once; the loop ends once its handler is done,
    its late answer dropped."""
    dev = os.stat(served.mnt).st_dev
    child = reader(served.mnt / "slow")
    try:
        wait_for("the slow read", lambda: served.fs.slow_readers == 1)
        with open(f"/sys/fs/fuse/connections/{os.minor(dev)}/abort", "w") as f:
            f.write("1")
        child.wait(timeout=WAIT)
        assert child.returncode != 0
        served.fs.gate.set()
        served.thread.join(WAIT)
        assert not served.thread.is_alive()
        assert served.session.unmounted
    finally:
        served.fs.gate.set()
        child.kill()
        child.communicate()
        _unmount(served.mnt)


def test_abort_while_idle_ends_the_loop_quietly(served: Served) -> None:
    """The connection aborted while no request is pending: the next read of
    ``/dev/fuse`` says ECONNABORTED (Linux sets ``fc->aborted``; an unmount
    does too, so a loop ending at unmount can see it), and the loop ends as
    for ENODEV, with no error (the fixture checks ``served.error``)."""
    os.stat(served.mnt)  # served: the loop is past INIT and idle again
    dev = os.stat(served.mnt).st_dev
    with open(f"/sys/fs/fuse/connections/{os.minor(dev)}/abort", "w") as f:
        f.write("1")
    served.thread.join(WAIT)
    assert not served.thread.is_alive()
    assert served.session.unmounted
    _unmount(served.mnt)


@pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root")
def test_forget_accounting(served: Served) -> None:
    names = [f"f{i}" for i in range(200)]
    for name in names:
        (served.mnt / name).write_bytes(b"x")
    for name in names:
        os.stat(served.mnt / name)
    os.listdir(served.mnt)  # readdirplus: a lookup per entry
    assert sum(n.lookups for n in served.fs.nodes.values()) >= len(names)

    def all_forgotten() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # dentries and inodes: the kernel forgets them
        return all(n.lookups == 0 for ino, n in served.fs.nodes.items() if ino != 1)

    wait_for("every lookup forgotten", all_forgotten)
    assert all(n.lookups >= 0 for n in served.fs.nodes.values())
    assert served.fs.forgets >= len(names)


def test_big_writes_arrive_whole(served: Served) -> None:
    data = os.urandom(4 << 20)
    with open(served.mnt / "big", "wb", buffering=0) as f:
        assert f.write(data) == len(data)
    assert served.fs.biggest_write == protocol.MAX_WRITE  # max_pages 256: 1 MiB
    assert (served.mnt / "big").read_bytes() == data


def test_request_buffers_are_zeroed(served: Served) -> None:
    needle = b"PLAINTEXT-NEEDLE-" * 64
    (served.mnt / "secret").write_bytes(needle)
    assert (served.mnt / "secret").read_bytes() == needle
    assert served.session.buffers
    assert all(needle[:17] not in bytes(buf) for buf in served.session.buffers)
    if served.session.queues is not None:
        # the WRITE's data is zeroed when it is answered; the READ's answer
        # once the kernel has taken it (fs/fuse/_ring.c, submit_and_wipe),
        # not when the entry's next request comes (none comes here: the
        # file stays open, nothing else is asked)
        rings = [q.ring for q in served.session.queues.queues]
        fd = os.open(served.mnt / "secret", os.O_RDONLY)
        try:
            assert os.read(fd, len(needle)) == needle
            wait_for(
                "the answer zeroed in the io_uring entries",
                lambda: all(needle[:17] not in bytes(memoryview(ring)) for ring in rings),
                timeout=5,
            )
        finally:
            os.close(fd)


def test_spinning_catches_the_next_request_of_a_busy_client(served: Served) -> None:
    """statfs always reaches the filesystem: a client calling it in a loop
    sends its next request while a spinning reader still waits for it.
    (A process of its own: a thread of this one would wait for the GIL.)

    A spin catches nothing while the client waits for a CPU itself, as it
    does on a busy two-CPU machine (one busy loop beside it: no catch in
    300 calls 9 times in 10), so the client goes on until one is caught,
    for up to 60 s; not spinning, it makes 300 calls."""
    spinning = bool(served.session.options.spin_ns)
    calls = "while True" if spinning else "for _ in range(300)"
    code = f"import os, sys\n{calls}: os.statvfs(sys.argv[1])\n"
    client = subprocess.Popen([sys.executable, "-c", code, str(served.mnt)])
    try:
        if spinning:
            wait_for("a spin to catch a request", lambda: served.session.spins_caught)
        else:
            assert client.wait(WAIT) == 0
    finally:
        client.kill()
        client.wait()
    if spinning:
        assert served.session.spins_caught >= 1
    else:
        assert served.session.spins_caught == served.session.spins_missed == 0


@pytest.fixture(params=[True, False], ids=["native", "python"])
def served_long_spin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """The loop over CornerFS spinning at most 2 ms (``spin_us=2000``),
    through fs/fuse/_loop.c and all in Python.  A window whose most is far
    above what a client thinks lets a test see it grow on a busy machine:
    the idle time the loop measures includes its own wake-up, which there
    can take longer than the default 200 us by itself."""
    yield from _served(tmp_path, spin_us=2000, native=request.param, uring=False)


def test_the_spin_window_stays_within_its_bounds(served: Served) -> None:
    """Spinning, the window stays between its start and ``spin_us``; not
    spinning (sleeping, or io_uring whose queues spin on their own), it
    stays shut (how it follows a client: the test below)."""
    code = "import os, sys\nfor _ in range(200): os.statvfs(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(served.mnt)], check=True, timeout=WAIT)
    spin = served.session.spin
    if served.session.options.spin_ns:
        assert START_NS <= spin.ns <= spin.most_ns == 200_000
    else:
        assert spin.ns == spin.grown == spin.shrunk == 0


def test_the_spin_window_grows_and_shrinks_with_the_client(served_long_spin: Served) -> None:
    """A client that thinks ~300 us between calls comes back after a 50 us
    spin but within the most (2 ms): the window doubles until it catches
    it.  One that sleeps 10 ms between calls: after a few such pauses the
    window halves back to its start (fs/fuse/spin.py).

    Growing needs the client to come back within 2 ms as the loop measures
    it (wake-up included), which a busy machine can delay for a whole run
    of 200 calls, so the client goes on for up to 20 s.  Shrinking does not
    depend on the machine: a 10 ms sleep is always past 2 ms."""
    code = (
        "import os, sys, time\n"
        "pc = time.perf_counter_ns\n"
        "think, calls = int(sys.argv[2]), int(sys.argv[3])\n"
        "for _ in range(calls):\n"
        "    os.statvfs(sys.argv[1])\n"
        "    if think > 1_000_000: time.sleep(think / 1e9)\n"
        "    else:\n"
        "        d = pc() + think\n"
        "        while pc() < d: pass\n"
    )
    spin = served_long_spin.session.spin
    assert spin.most_ns == 2_000_000

    def client(think_ns: int, calls: int) -> None:
        mnt = str(served_long_spin.mnt)
        args = [sys.executable, "-c", code, mnt, str(think_ns), str(calls)]
        subprocess.run(args, check=True, timeout=WAIT)

    deadline = time.monotonic() + 20
    while spin.ns < 4 * START_NS and time.monotonic() < deadline:
        client(300_000, 200)
    assert spin.ns >= 4 * START_NS, (spin.ns, spin.grown, spin.shrunk)
    assert spin.grown >= 2
    shrunk = spin.shrunk
    client(10_000_000, 40)
    assert spin.ns == START_NS
    assert spin.shrunk >= shrunk + 2


def test_a_cpu_is_kept_awake_while_requests_come(served: Served) -> None:
    """fs/fuse/_awake.c on /dev/fuse: while the C loop spins (``spin_us``),
    one spinner at SCHED_IDLE on no CPU in particular keeps the caller's
    CPU from halting; it takes no CPU once the mount is idle and ends with
    the session.  No spinner when the loop does not spin, in Python, or
    under io_uring (its queues have their own, not with spin_us 0)."""
    s = served.session
    queues = s.queues
    assert s.transport == (f"io_uring, {len(queues.queues)} queues" if queues else "/dev/fuse")
    for i in range(300):
        os.statvfs(served.mnt)
        with contextlib.suppress(OSError):
            os.stat(served.mnt / f"missing{i}")
    spinners = idle_class_threads(os.getpid())
    wanted = s.options.native and s.options.spin_ns > 0 and s.queues is None
    if not wanted or len(os.sched_getaffinity(0)) < 2:
        assert spinners == {}
        return
    assert len(spinners) == 1, spinners
    ((_, cpus),) = spinners.values()
    assert cpus == os.sched_getaffinity(0)  # on any CPU this process may use
    time.sleep(0.5)  # well past the 200 us spin
    before = idle_class_threads(os.getpid())
    time.sleep(1.0)
    assert idle_class_threads(os.getpid()) == before
    _unmount(served.mnt)
    served.thread.join(WAIT)
    assert idle_class_threads(os.getpid()) == {}


# ------------------------------------------ the real worker through the loop


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--fuse-loop=keyfence", "--dirty-expire", "60")
    try:
        yield m
    finally:
        log = m.unmount_checked()
        assert "keyfence's FUSE loop, common case in C" in log, log


def test_worker_serves_keyfence_through_its_own_loop(worker: Mount) -> None:
    master = MasterKey(os.urandom(64))
    serial = worker.add_key(master)
    d = worker.mnt / "enc"
    d.mkdir()
    os.setxattr(d, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
    data = os.urandom(3 << 20) + b"tail"
    (d / "file").write_bytes(data)
    assert (d / "file").read_bytes() == data
    os.symlink("file", d / "link")
    assert os.readlink(d / "link") == "file"
    os.link(d / "file", d / "hard")
    os.rename(d / "hard", d / "moved")
    os.mkdir(d / "sub")
    os.mkfifo(d / "sub" / "fifo")
    assert sorted(os.listdir(d)) == ["file", "link", "moved", "sub"]
    os.truncate(d / "moved", 10)
    assert (d / "file").read_bytes() == data[:10]
    os.chmod(d / "file", 0o600)
    os.utime(d / "file", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(d / "file")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000
    os.setxattr(d / "file", "user.note", b"v")
    assert os.getxattr(d / "file", "user.note") == b"v"
    assert "user.note" in os.listxattr(d / "file")
    os.removexattr(d / "file", "user.note")
    fd = os.open(d / "file", os.O_RDWR)
    try:
        os.pwrite(fd, b"abc", 2)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert os.statvfs(worker.mnt).f_bsize > 0
    for name in ("link", "sub/fifo"):
        os.unlink(d / name)
    os.rmdir(d / "sub")
    # the lock: write-back, then the kernel's caches invalidated by our
    # NOTIFY_INVAL_ENTRY / NOTIFY_INVAL_INODE messages
    io = open(d / "moved", "rb")  # noqa: SIM115
    assert io.read() == data[:2] + b"abc" + data[5:10]
    worker.unlink_key(serial)
    try:
        with pytest.raises(OSError) as caught:
            os.pread(io.fileno(), 4096, 0)
        assert caught.value.errno == errno.ENOKEY
    finally:
        io.close()
    with pytest.raises(FileNotFoundError):
        os.stat(d / "moved")


# ------------------------------------- malformed requests (no kernel sends these)


class Piped:
    """A session whose "/dev/fuse" is a pipe: each answer is read back."""

    def __init__(self) -> None:
        self.r, w = os.pipe()
        os.set_blocking(self.r, False)
        self.session = Session(CornerFS(), w)
        self.session.initialized = True

    def ask(self, request: bytes) -> bytes | None:
        buf = bytearray(protocol.BUFFER_SIZE)
        buf[: len(request)] = request
        trio.run(self.session._request, buf, memoryview(buf), len(request))
        try:
            return os.read(self.r, 1 << 16)
        except BlockingIOError:
            return None

    def close(self) -> None:
        os.close(self.r)
        os.close(self.session.fd)


@pytest.fixture
def piped() -> Iterator[Piped]:
    p = Piped()
    try:
        yield p
    finally:
        p.close()


def _header(length: int, opcode: int, unique: int, nodeid: int = 1) -> bytes:
    return protocol.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, os.getpid(), 0, 0)


@pytest.mark.parametrize(
    ("opcode", "body"),
    [
        (protocol.LOOKUP, b"no-terminating-nul"),
        (protocol.LOOKUP, b""),
        (protocol.READ, b"\x01\x02"),
        (protocol.WRITE, protocol.WRITE_IN.pack(3, 0, 4096, 0, 0, 0, 0) + b"short"),
        (protocol.SYMLINK, b"only-one-name\0"),
        (protocol.SETXATTR, protocol.SETXATTR_IN.pack(99, 0) + b"user.x\0tiny"),
        (protocol.INIT, b"\x07"),
    ],
)
def test_malformed_bodies_are_answered_eio(piped: Piped, opcode: int, body: bytes) -> None:
    answer = piped.ask(_header(protocol.IN_HEADER.size + len(body), opcode, 77) + body)
    assert answer is not None
    assert protocol.OUT_HEADER.unpack(answer) == (protocol.OUT_HEADER.size, -errno.EIO, 77)


def test_malformed_forgets_are_dropped(piped: Piped) -> None:
    body = protocol.BATCH_FORGET_IN.pack(1000, 0)  # 1,000 announced, none there
    size = protocol.IN_HEADER.size + len(body)
    assert piped.ask(_header(size, protocol.BATCH_FORGET, 9) + body) is None
    assert piped.ask(_header(protocol.IN_HEADER.size, protocol.FORGET, 10)) is None
    assert piped.ask(_header(size + 8, protocol.FORGET, 11) + body) is None  # a lying length


def test_a_length_that_lies_is_eio(piped: Piped) -> None:
    answer = piped.ask(_header(999, protocol.GETATTR, 5) + protocol.GETATTR_IN.pack(0, 0, 0))
    assert answer is not None
    assert protocol.OUT_HEADER.unpack(answer) == (protocol.OUT_HEADER.size, -errno.EIO, 5)


def test_an_unknown_opcode_is_enosys(piped: Piped) -> None:
    answer = piped.ask(_header(protocol.IN_HEADER.size, 4242, 6))
    assert answer is not None
    assert protocol.OUT_HEADER.unpack(answer) == (protocol.OUT_HEADER.size, -errno.ENOSYS, 6)


def test_fsync_is_waited_for_directly(worker: Mount) -> None:
    """fs/fuse/blocking.py: a lone client's fsync is answered from the loop's
    direct wait, not through a trio round; the data is on the backing disk."""
    before = worker.control("blocking")
    assert before is not None
    path = worker.mnt / "journal"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        for i in range(20):
            os.pwrite(fd, b"record %d\n" % i, i * 10)
            os.fsync(fd)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    direct, through_trio = (a - b for a, b in zip(worker.control("blocking"), before, strict=True))
    assert direct + through_trio >= 40
    assert direct >= 10, (direct, through_trio)  # the fdatasyncs have nothing to write
    assert path.read_bytes().startswith(b"record 0\n")
