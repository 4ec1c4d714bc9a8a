"""Directories whose GETATTR the C loop answers (src/keyfence/fs/fuse/dir_attrs.py).

First the table on its own: whose descriptors it holds and when it lets
them go, and that an offer from before a lock is refused.  Then a real
mount: a directory's attributes after creates in it come from the C loop
and say what the backing directory says; a lock takes every directory out
of the table, so a directory whose key went is asked every time (timeout
0) and answered by the handler; the kernel forgetting a directory takes it
out too.  tests/fs/test_fuse_native_loop.py drives the C side itself.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.fuse import protocol as fuse_proto
from keyfence.fs.fuse.dir_attrs import DirectoryAttributes
from keyfence.testing.mounting import Mount, fuse_available

from .test_mount import Enc
from .test_request_path import _requests


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_an_offer_holds_a_duplicate_that_a_withdrawal_closes(tmp_dir_fd: int) -> None:
    table = DirectoryAttributes()
    st = os.fstat(tmp_dir_fd)
    table.offer(5, tmp_dir_fd, st.st_ino, 1.25, generation=table.generation)
    fd, st_ino, seconds, ns, names = table.table[5]
    assert fd != tmp_dir_fd and os.path.samestat(os.fstat(fd), st)
    assert (st_ino, seconds, ns, names) == (st.st_ino, 1, 250_000_000, None)
    assert not os.get_inheritable(fd)
    table.withdraw(5)
    assert 5 not in table and not _is_open(fd)
    assert _is_open(tmp_dir_fd)  # the backing descriptor is the caller's
    table.withdraw(5)  # twice: nothing


def test_an_offer_made_before_a_clear_is_refused(tmp_dir_fd: int) -> None:
    table = DirectoryAttributes()
    before = table.generation
    table.offer(5, tmp_dir_fd, 1, 10.0, generation=before)
    kept = table.table[5][0]
    table.clear()  # a key was unbound meanwhile
    assert not table.table and not _is_open(kept)
    fds = _open_fds()
    table.offer(6, tmp_dir_fd, 1, 10.0, generation=before)
    assert 6 not in table and _open_fds() == fds  # its duplicate closed again
    table.offer(6, tmp_dir_fd, 1, 10.0, generation=table.generation)
    assert 6 in table
    table.clear()


def test_no_offer_without_a_timeout_nor_twice(tmp_dir_fd: int) -> None:
    table = DirectoryAttributes()
    table.offer(5, tmp_dir_fd, 1, 0.0, generation=table.generation)  # locked: asked every time
    assert 5 not in table
    table.offer(5, tmp_dir_fd, 1, 10.0, generation=table.generation)
    first = table.table[5]
    fds = _open_fds()
    table.offer(5, tmp_dir_fd, 1, 3.0, generation=table.generation)
    assert table.table[5] == first and _open_fds() == fds
    table.clear()


def test_the_oldest_entry_goes_when_the_table_is_full(tmp_dir_fd: int) -> None:
    table = DirectoryAttributes(max_entries=3)
    for nodeid in (1, 2, 3):
        table.offer(nodeid, tmp_dir_fd, 1, 10.0, generation=table.generation)
    oldest = table.table[1][0]
    table.offer(4, tmp_dir_fd, 1, 10.0, generation=table.generation)
    assert sorted(table.table) == [2, 3, 4] and not _is_open(oldest)
    table.clear()


def test_offers_and_clears_from_several_threads_leave_no_descriptor_behind(tmp_dir_fd: int) -> None:
    table = DirectoryAttributes(max_entries=50)
    fds = _open_fds()
    stop = threading.Event()

    def offering(base: int) -> None:
        i = 0
        while not stop.is_set():
            table.offer(base + i % 200, tmp_dir_fd, 1, 10.0, generation=table.generation)
            table.withdraw(base + (i * 7) % 200)
            i += 1

    def clearing() -> None:
        while not stop.is_set():
            table.clear()

    threads = [threading.Thread(target=offering, args=(b,)) for b in (0, 1000)]
    threads.append(threading.Thread(target=clearing))
    for t in threads:
        t.start()
    threading.Event().wait(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert len(table) <= 50
    for fd, *_ in table.table.values():
        assert _is_open(fd)
    table.clear()
    assert _open_fds() == fds


# ------------------------------------------------------------ a real mount

needs_fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--attr-timeout", "60")
    try:
        yield m
    finally:
        m.unmount_checked()


def _table(mount: Mount) -> dict[str, list[int] | int]:
    # the C loop adds what it answered to the session's count when it
    # returns, after spinning up to 200 µs for the next request: let it
    time.sleep(0.02)
    answer = mount.control("dir_attributes")
    assert answer is not None, "the worker does not run keyfence's own loop"
    return dict(answer)


def _backing_of(mount: Mount, path: Path) -> Path:
    """The backing entry of ``path``: the same inode number (fs/inodes.py)."""
    ino = os.lstat(path).st_ino
    for at, dirs, _files in os.walk(mount.backing):
        for name in dirs:
            if os.lstat(os.path.join(at, name)).st_ino == ino:
                return Path(at, name)
    raise AssertionError(f"no backing directory of {path}")


def _offered(mount: Mount, d: Path, *names: str) -> int:
    """Make ``names`` in ``d``, stat'ing ``d`` after each: the kernel asks
    for its attributes each time, the handler answers the first and offers
    it.  ``d``'s inode, checked to be in the table."""
    for name in names:
        (d / name).write_bytes(b"x")
        os.stat(d)
    ino = os.stat(d).st_ino
    assert ino in _table(mount)["entries"]
    return ino


def _same(st: os.stat_result, backing: os.stat_result) -> None:
    assert st.st_mode == backing.st_mode
    assert st.st_nlink == backing.st_nlink
    assert (st.st_uid, st.st_gid) == (backing.st_uid, backing.st_gid)
    assert st.st_size == backing.st_size
    assert st.st_mtime_ns == backing.st_mtime_ns
    assert st.st_ctime_ns == backing.st_ctime_ns


@needs_fuse
@pytest.mark.parametrize("where", ["plain", "enc"])
def test_a_directory_changed_by_creates_is_answered_in_c_as_the_backing_directory_says(
    mount: Mount, where: str
) -> None:
    """Each create makes the kernel ask for the directory's attributes
    again (default_permissions): the first answer is the handler's, which
    offers the directory; the others come from the table, and say what an
    lstat of the backing directory says."""
    top = Enc(mount).dir if where == "enc" else mount.mnt / "plain"
    if where == "plain":
        top.mkdir()
    backing = _backing_of(mount, top)
    os.stat(top)
    before = _table(mount)["served"]
    start = _requests(mount)
    for i in range(20):
        (top / f"f{i}").touch()  # no write: no GETXATTR, the other answer from a table
        _same(os.stat(top), os.lstat(backing))
    os.chmod(top, 0o750)  # a SETATTR: the kernel takes its answer, then asks again after a create
    (top / "after-chmod").touch()
    st = os.stat(top)
    _same(st, os.lstat(backing))
    assert st.st_mode & 0o777 == 0o750
    table = _table(mount)
    getattrs = _requests(mount)[fuse_proto.GETATTR] - start[fuse_proto.GETATTR]
    served = int(table["served"]) - int(before)
    assert getattrs >= 20 and served >= getattrs - 2, (getattrs, served)
    assert os.stat(top).st_ino in table["entries"]


@needs_fuse
def test_a_lock_takes_every_directory_out_and_its_handler_answers_with_no_timeout(
    mount: Mount,
) -> None:
    enc = Enc(mount)
    sub = enc.dir / "sub"
    sub.mkdir()
    ino = _offered(mount, sub, "f0", "f1", "f2")
    enc.lock(op="clear")
    table = _table(mount)
    assert table["entries"] == []
    served = table["served"]
    # locked: the kernel may keep the directory's attributes for no time,
    # so every stat asks, and the handler (not the table) answers
    names = os.listdir(enc.dir)  # the ciphertext name, locked
    assert len(names) == 1
    locked = enc.dir / names[0]
    start = _requests(mount)[fuse_proto.GETATTR]
    for _ in range(5):
        os.stat(locked)
    assert _requests(mount)[fuse_proto.GETATTR] - start >= 5
    table = _table(mount)
    assert table["served"] == served
    assert ino not in table["entries"]  # enc itself may be: its parent is not encrypted
    enc.unlock()
    _offered(mount, sub, "again", "again2")  # names are plaintext again


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root")
def test_a_directory_the_kernel_forgets_leaves_the_table(mount: Mount) -> None:
    top = mount.mnt / "d"
    top.mkdir()
    ino = _offered(mount, top, "f0", "f1", "f2")
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # dentries and inodes: the kernel sends FORGET
    deadline = 100
    while ino in _table(mount)["entries"] and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert ino not in _table(mount)["entries"]
    assert sorted(os.listdir(top)) == ["f0", "f1", "f2"]


@needs_fuse
def test_a_directory_moved_is_answered_by_its_handler_until_it_offers_it_again(
    mount: Mount,
) -> None:
    enc = Enc(mount)
    a, b = enc.dir / "a", enc.dir / "b"
    a.mkdir()
    b.mkdir()
    moving = a / "moving"
    moving.mkdir()
    ino = _offered(mount, moving, "f0", "f1", "f2")
    os.rename(moving, b / "moved")
    assert ino not in _table(mount)["entries"]
    moved = b / "moved"
    (moved / "g").write_bytes(b"x")
    _same(os.stat(moved), os.lstat(_backing_of(mount, moved)))


@needs_fuse
@pytest.mark.parametrize("where", ["plain", "enc"])
def test_the_capability_of_a_file_made_here_is_answered_from_the_table(
    mount: Mount, where: str
) -> None:
    """The kernel asks ``security.capability`` before the first write to
    each file; for a file the worker made, the C loop answers ENODATA."""
    top = Enc(mount).dir if where == "enc" else mount.mnt / "plain"
    if where == "plain":
        top.mkdir()
    before, start = _table(mount)["served"], _requests(mount)
    for i in range(10):
        (top / f"f{i}").write_bytes(b"contents %d" % i)
    asked = _requests(mount)[fuse_proto.GETXATTR] - start[fuse_proto.GETXATTR]
    assert asked == 10
    assert int(_table(mount)["served"]) - int(before) >= asked
    assert [(top / f"f{i}").read_bytes() for i in range(10)] == [
        b"contents %d" % i for i in range(10)
    ]
    with pytest.raises(OSError) as err:
        os.getxattr(top / "f0", "security.capability")
    assert err.value.errno == errno.ENODATA
