"""POSIX ACLs through a real mount, ext4 beside it as the oracle (fs/acl.py).

A root worker on a shared mount opens every file with root's rights, so
the kernel's check is the only one: before FUSE_POSIX_ACL it checked the
mode bits alone, and a user an ACL entry denied (``user:U:---`` on a 0644
file) read the file through the mount (docs/security.md, red-team finding
3).  Each test does the same to a file of the mount (plain and encrypted
directory) and to one of an ext4 directory beside it, as root and as
another uid (``setpriv``), and expects the same outcome and the same
``getfacl``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount, fuse_available
from keyfence.testing.users import as_uid, reachable_directory, why_no_other_uids

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

OTHER_UID = 61111
"""The user ACL entries name (no account needed: setpriv takes numbers)."""
THIRD_UID = 61112
SGID_GROUP = 61119
"""A group neither uid is in unless a test says so."""
POLICY = "user.keyfence.policy"


@pytest.fixture(scope="module")
def top() -> Iterator[Path]:
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (the acl package)")
    why = why_no_other_uids()
    if why is not None:
        pytest.skip(why)
    with reachable_directory("kf-acl-") as path:
        yield path


@pytest.fixture(scope="module")
def mount(top: Path) -> Iterator[Mount]:
    m = Mount(top, "--fuse-loop", "keyfence")
    try:
        os.chmod(m.mnt, 0o755)
        master = MasterKey(os.urandom(64))
        m.add_key(master)
        (m.mnt / "enc").mkdir(mode=0o755)
        os.setxattr(m.mnt / "enc", POLICY, f"keyfence:{master.identifier}".encode())
        (m.mnt / "plain").mkdir(mode=0o755)
        yield m
    finally:
        m.unmount_checked()


@pytest.fixture(params=["plain", "enc"])
def pair(request: pytest.FixtureRequest, mount: Mount, top: Path) -> Iterator[tuple[Path, Path]]:
    """(a fresh directory in the mount, a fresh one on ext4): 0755, root's."""
    name = f"{request.param}-{request.node.name}".replace("[", "-").replace("]", "")
    oracle = top / "ext4" / name
    oracle.mkdir(parents=True, mode=0o755)
    ours = mount.mnt / str(request.param) / name
    ours.mkdir(mode=0o755)
    yield ours, oracle


def setfacl(*args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["setfacl", *args]
    if uid is not None:
        argv = as_uid(uid, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def getfacl(path: Path) -> str:
    r = subprocess.run(
        ["getfacl", "-cp", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return r.stdout


def reads(uid: int, path: Path) -> bool:
    r = subprocess.run(
        as_uid(uid, ["cat", str(path)]), capture_output=True, timeout=60, check=False
    )
    return r.returncode == 0


def both(pair: tuple[Path, Path], name: str, mode: int, data: bytes = b"secret\n") -> list[Path]:
    paths = []
    for d in pair:
        path = d / name
        path.write_bytes(data)
        os.chmod(path, mode)
        paths.append(path)
    return paths


def test_an_entry_that_denies_holds_through_the_mount(pair: tuple[Path, Path]) -> None:
    ours, oracle = both(pair, "denied", 0o644)
    for path in (ours, oracle):
        assert setfacl("-m", f"u:{OTHER_UID}:---", str(path)).returncode == 0
    assert not reads(OTHER_UID, oracle)
    assert not reads(OTHER_UID, ours)  # read it before: mode bits only
    assert reads(THIRD_UID, ours) and reads(THIRD_UID, oracle)  # others: r--
    assert getfacl(ours) == getfacl(oracle)
    assert os.stat(ours).st_mode == os.stat(oracle).st_mode


def test_an_entry_that_grants_beyond_the_mode_holds(pair: tuple[Path, Path]) -> None:
    ours, oracle = both(pair, "granted", 0o600)
    assert not reads(OTHER_UID, ours)
    for path in (ours, oracle):
        assert setfacl("-m", f"u:{OTHER_UID}:r", str(path)).returncode == 0
    assert reads(OTHER_UID, oracle)
    assert reads(OTHER_UID, ours)
    assert not reads(THIRD_UID, ours)
    assert getfacl(ours) == getfacl(oracle)
    assert stat.S_IMODE(os.stat(ours).st_mode) == 0o640  # the mask shows as group


def test_chmod_narrows_the_mask_as_on_ext4(pair: tuple[Path, Path]) -> None:
    ours, oracle = both(pair, "masked", 0o644)
    for path in (ours, oracle):
        assert setfacl("-m", f"u:{OTHER_UID}:rw", str(path)).returncode == 0
    assert reads(OTHER_UID, ours)
    for path in (ours, oracle):
        # the mask becomes --x: the entry's rw- is masked away, while the
        # mode alone would let OTHER_UID read (other: r--).  (A mask of ---
        # would not do: the kernel then skips the ACL for the mode's bits.)
        os.chmod(path, 0o614)
    assert not reads(OTHER_UID, oracle)
    assert not reads(OTHER_UID, ours)  # the cached ACL went with the chmod
    assert reads(THIRD_UID, ours)
    assert getfacl(ours) == getfacl(oracle)


def test_removing_the_acl_gives_the_mode_back(pair: tuple[Path, Path]) -> None:
    ours, oracle = both(pair, "removed", 0o644)
    for path in (ours, oracle):
        assert setfacl("-m", f"u:{OTHER_UID}:---", str(path)).returncode == 0
        assert setfacl("-b", str(path)).returncode == 0
    assert reads(OTHER_UID, oracle)
    assert reads(OTHER_UID, ours)
    assert getfacl(ours) == getfacl(oracle)


DEFAULT_ACLS = [
    f"u::rwx,u:{OTHER_UID}:rwx,g::r-x,m::rwx,o::---",
    f"u::rw-,u:{OTHER_UID}:r--,g::---,m::r--,o::r--",
    "u::rwx,g::r-x,o::--x",  # no named entry, no mask
]


@pytest.mark.parametrize("default_acl", DEFAULT_ACLS)
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_entries_inherit_a_default_acl_as_on_ext4(
    pair: tuple[Path, Path], default_acl: str, umask: int
) -> None:
    made: dict[str, list[Path]] = {}
    for d in pair:
        sub = d / f"d{DEFAULT_ACLS.index(default_acl)}-{umask:o}"
        sub.mkdir(mode=0o755)
        assert setfacl("-d", "-m", default_acl, str(sub)).returncode == 0
        old = os.umask(umask)
        try:
            os.close(os.open(sub / "file", os.O_CREAT | os.O_WRONLY, 0o666))
            os.close(os.open(sub / "exec", os.O_CREAT | os.O_WRONLY, 0o777))
            os.mkdir(sub / "dir", 0o777)
            os.mkdir(sub / "private", 0o700)
            os.mkfifo(sub / "fifo", 0o666)
            os.mkdir(sub / "dir" / "nested", 0o775)  # inherits again, one level down
        finally:
            os.umask(old)
        made[str(d)] = [sub / n for n in ("file", "exec", "dir", "private", "fifo", "dir/nested")]
    ours, oracle = (made[str(d)] for d in pair)
    for a, b in zip(ours, oracle, strict=True):
        assert oct(os.lstat(a).st_mode) == oct(os.lstat(b).st_mode), a.name
        assert getfacl(a) == getfacl(b), a.name


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o000])
def test_the_umask_applies_where_there_is_no_default_acl(
    pair: tuple[Path, Path], umask: int
) -> None:
    modes = []
    for d in pair:
        old = os.umask(umask)
        try:
            os.close(os.open(d / f"f{umask:o}", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(d / f"d{umask:o}", 0o777)
        finally:
            os.umask(old)
        modes.append([os.stat(d / n).st_mode for n in (f"f{umask:o}", f"d{umask:o}")])
    assert modes[0] == modes[1]


def test_only_the_owner_may_set_an_acl(pair: tuple[Path, Path]) -> None:
    ours, oracle = both(pair, "notyours", 0o666)
    a = setfacl("-m", f"u:{OTHER_UID}:rw", str(ours), uid=THIRD_UID)
    b = setfacl("-m", f"u:{OTHER_UID}:rw", str(oracle), uid=THIRD_UID)
    assert a.returncode != 0 and b.returncode != 0
    assert "Operation not permitted" in a.stderr and "Operation not permitted" in b.stderr
    assert getfacl(ours) == getfacl(oracle)


def test_the_pyfuse3_loop_enforces_them_too(top: Path) -> None:
    # libfuse asks FUSE_POSIX_ACL for it (enable_acl) but not DONT_MASK:
    # under a default ACL its modes keep the umask too (docs/fs.md)
    m = Mount(top, "--fuse-loop", "pyfuse3", name="p3")
    try:
        os.chmod(m.mnt, 0o755)
        denied, granted = m.mnt / "denied", m.mnt / "granted"
        for path, mode, entry in ((denied, 0o644, "---"), (granted, 0o600, "r")):
            path.write_bytes(b"secret\n")
            os.chmod(path, mode)
            assert setfacl("-m", f"u:{OTHER_UID}:{entry}", str(path)).returncode == 0
        assert not reads(OTHER_UID, denied)
        assert reads(THIRD_UID, denied)
        assert reads(OTHER_UID, granted)
        assert not reads(THIRD_UID, granted)
        # libfuse gives no ACL_KILL_SGID: the worker asks whether the caller
        # is in the file's group itself (before: the bit stayed)
        assert _sgid_after_setfacl(m.mnt / "outside", member=False) == 0
        assert _sgid_after_setfacl(m.mnt / "member", member=True) == stat.S_ISGID
    finally:
        m.unmount_checked()


def _sgid_after_setfacl(path: Path, *, member: bool) -> int:
    """OTHER_UID owns ``path`` (group SGID_GROUP, 02750) and sets an ACL
    entry on it, as a member of that group or not; the bit left."""
    path.write_bytes(b"")
    os.chown(path, OTHER_UID, SGID_GROUP)
    os.chmod(path, 0o2750)
    argv = ["setfacl", "-m", "o::rx", str(path)]
    groups = (SGID_GROUP,) if member else ()
    r = subprocess.run(
        as_uid(OTHER_UID, argv, groups=groups), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return os.stat(path).st_mode & stat.S_ISGID


@pytest.mark.parametrize("member", [False, True])
def test_an_acl_set_by_its_owner_drops_set_group_id_unless_a_member(
    pair: tuple[Path, Path], member: bool
) -> None:
    ours, oracle = (d / f"sgid-{member}" for d in pair)
    kept = [_sgid_after_setfacl(path, member=member) for path in (ours, oracle)]
    assert kept[0] == kept[1] == (stat.S_ISGID if member else 0)
    assert oct(os.stat(ours).st_mode) == oct(os.stat(oracle).st_mode)
    assert getfacl(ours) == getfacl(oracle)


def test_a_directory_that_lost_set_group_id_to_an_acl_stops_passing_its_group(
    pair: tuple[Path, Path],
) -> None:
    groups = []
    for d in pair:
        sub = d / "shared"
        sub.mkdir()
        os.chown(sub, OTHER_UID, 0)
        os.chmod(sub, 0o2775)
        (sub / "before").write_bytes(b"")  # the mount now knows its group
        r = setfacl("-m", f"u:{THIRD_UID}:rwx", str(sub), uid=OTHER_UID)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            as_uid(THIRD_UID, ["touch", str(sub / "after")]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        groups.append((oct(os.stat(sub).st_mode), os.stat(sub / "after").st_gid))
    assert groups[0] == groups[1]
    assert groups[1][1] == THIRD_UID  # setpriv: gid = uid
