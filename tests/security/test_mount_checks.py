"""The pieces of a checked mount request, in process: the option table,
per-thread credentials, the no-follow walk (issue 11, findings 2-4)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.errors import KeyfenceError
from keyfence.keys.caller import Caller
from keyfence.server.mount_options import parse_options
from keyfence.server.mount_request import as_caller, check_request, open_directory
from keyfence.testing.users import reachable_directory

USER = 4622


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path is 0700)."""
    with reachable_directory("kfmnt-") as path:
        yield path


@pytest.mark.parametrize(
    "items",
    [
        ["-o"],
        ["suid,dev"],
        ["dirty_limit=1M,suid"],
        ["fsname=x"],
        ["allow_other=1"],
        ["dirty_limit"],
        ["dirty_limit=0"],
        ["dirty_limit=4095"],
        ["dirty_limit=1.5K"],
        ["dirty_expire=-1"],
        ["max_tasks=1e9"],
        ["spin_us=1001"],
        ["spin_us=-1"],
        ["spin_us=1e3"],
        ["--no-such-flag"],
        ["dirty_limit=1M,-o"],
    ],
)
def test_anything_not_in_the_table_is_einval(items: list[str]) -> None:
    with pytest.raises(KeyfenceError) as err:
        parse_options(items)
    assert err.value.errno == errno.EINVAL
    assert "bad mount option" in str(err.value)


def test_the_table_and_the_older_spelling() -> None:
    opts = parse_options(["dirty_limit=256M,dirty_expire=10,allow_other", "nonempty"])
    assert (opts.dirty_limit, opts.dirty_expire, opts.allow_other, opts.nonempty) == (
        256 << 20,
        10.0,
        True,
        True,
    )
    assert opts.worker_args() == ["--dirty-limit=268435456", "--dirty-expire=10.0"]
    assert parse_options(["spin_us=0"]).worker_args() == ["--spin-us=0"]
    assert parse_options(["no_uring"]).worker_args() == ["--no-uring"]
    legacy = parse_options(["--dirty-limit=1G", "--dirty-expire", "3", "--writeback-cache"])
    assert legacy.worker_args() == [
        "--dirty-limit=1073741824",
        "--dirty-expire=3.0",
        "--writeback-cache",
    ]


def _fsuid() -> int:
    with open("/proc/thread-self/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[4])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid's credentials")
def test_caller_credentials_are_this_threads_only() -> None:
    caller = Caller(uid=USER, gid=USER)
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, int] = {}

    def borrow() -> None:
        with as_caller(caller):
            seen["inside"] = _fsuid()
            inside.set()
            release.wait(30)
        seen["after"] = _fsuid()

    t = threading.Thread(target=borrow)
    t.start()
    assert inside.wait(30)
    seen["other"] = _fsuid()  # this thread, meanwhile
    groups = os.getgroups()
    release.set()
    t.join(30)
    assert seen == {"inside": USER, "other": 0, "after": 0}
    assert os.getgroups() == groups


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid's credentials")
def test_the_walk_follows_no_symlink_and_uses_the_callers_rights(reachable: Path) -> None:
    real = reachable / "real"
    real.mkdir()
    (reachable / "link").symlink_to(real)
    with pytest.raises(KeyfenceError) as err:
        open_directory(str(reachable / "link"), "mount point")
    assert err.value.errno == errno.ELOOP
    with pytest.raises(KeyfenceError) as err:
        open_directory(str(reachable / "link" / "x"), "mount point")
    assert err.value.errno == errno.ELOOP
    with pytest.raises(KeyfenceError) as err:
        open_directory(str(reachable / "real" / ".." / "real"), "mount point")
    assert err.value.errno == errno.EINVAL
    closed = reachable / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inner").mkdir()
    os.chown(closed / "inner", USER, USER)
    with as_caller(Caller(uid=USER, gid=USER)), pytest.raises(KeyfenceError) as err:
        open_directory(str(closed / "inner"), "mount point")
    assert err.value.errno == errno.EACCES
    fd = open_directory(str(closed / "inner"), "mount point")  # root may
    os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid's credentials")
def test_check_request_refusals(reachable: Path) -> None:
    a, b = reachable / "a", reachable / "a" / "b"
    b.mkdir(parents=True)
    for d in (a, b):
        os.chown(d, USER, USER)
    user = Caller(uid=USER, gid=USER)
    for backing, mnt, code in [
        (a, a, errno.EINVAL),
        (a, b, errno.EINVAL),
        (b, a, errno.EINVAL),
        (a, reachable / "missing", errno.ENOENT),
        (reachable, b, errno.EPERM),
    ]:
        with pytest.raises(KeyfenceError) as err:
            check_request(user, str(backing), str(mnt), nonempty=True)
        assert err.value.errno == code, (backing, mnt, err.value)
    c = reachable / "c"
    c.mkdir()
    os.chown(c, USER, USER)
    (c / "file").write_text("x")
    with pytest.raises(KeyfenceError) as err:
        check_request(user, str(b), str(c), nonempty=False)
    assert err.value.errno == errno.ENOTEMPTY
    check_request(user, str(b), str(c), nonempty=True).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid's credentials")
def test_a_mount_point_the_user_cannot_write_is_refused(reachable: Path) -> None:
    """fusermount3's ``access(".", W_OK)`` as the user: a user's own
    directory made read-only (mode 0555, or ``chattr +i`` by root) is no
    mount point for the user; root's request is not checked so.  Before
    this check both were mounted over (the s37 mount-request helper)."""
    backing, point = reachable / "backing", reachable / "point"
    for d in (backing, point):
        d.mkdir()
        os.chown(d, USER, USER)
    user = Caller(uid=USER, gid=USER)
    check_request(user, str(backing), str(point), nonempty=False).close()
    point.chmod(0o555)
    with pytest.raises(KeyfenceError) as err:
        check_request(user, str(backing), str(point), nonempty=False)
    assert err.value.errno == errno.EACCES
    assert f"user has no write access to mountpoint {point}" in str(err.value)
    check_request(Caller(uid=0, gid=0), str(backing), str(point), nonempty=False).close()
    point.chmod(0o755)
    immutable = subprocess.run(["chattr", "+i", str(point)], capture_output=True, check=False)
    try:
        if immutable.returncode == 0:  # the filesystem of /tmp may not have the flag
            with pytest.raises(KeyfenceError) as err:
                check_request(user, str(backing), str(point), nonempty=False)
            assert err.value.errno == errno.EACCES
    finally:
        subprocess.run(["chattr", "-i", str(point)], capture_output=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid's credentials")
def test_a_directory_the_user_cannot_search_is_refused_by_name(reachable: Path) -> None:
    """A mount point or backing directory of mode 000 (the user's own):
    EACCES naming it, as fusermount3 refuses it.  Before, the walk up to
    ``/`` failed on its ``..`` with a bare "Permission denied" (the s37
    mount-request helper)."""
    backing, point = reachable / "backing", reachable / "point"
    for d in (backing, point):
        d.mkdir()
        os.chown(d, USER, USER)
    user = Caller(uid=USER, gid=USER)
    for d, what in ((point, "mount point"), (backing, "backing directory")):
        d.chmod(0)
        try:
            with pytest.raises(KeyfenceError) as err:
                check_request(user, str(backing), str(point), nonempty=False)
        finally:
            d.chmod(0o755)
        assert err.value.errno == errno.EACCES
        assert f"{what} {d}: Permission denied" in str(err.value)
