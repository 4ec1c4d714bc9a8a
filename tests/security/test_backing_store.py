"""What the worker finds in the backing store: deep trees and downgrades.

* Deep trees (issue 11): backing paths longer than PATH_MAX work as on
  ext4, since the worker reaches every entry by (directory descriptor,
  name) and never builds a path.
* Downgrade (issue 11, finding 5): an encrypted directory whose policy
  record was deleted offline is refused with EIO (and a log line), never
  served as plaintext, and nothing is ever stored in plaintext inside it.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount, fuse_available

POLICY = "user.keyfence.policy"
POLICY_RECORD = ".keyfence-policy"
OTHER = 4631
"""Another uid: the user who copies a record into its own directory."""

_why = fuse_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "--dirty-expire", "60")
    try:
        yield m
    finally:
        m.unmount_checked()


def encrypt(mount: Mount, name: str) -> MasterKey:
    master = MasterKey(os.urandom(64))
    mount.add_key(master)
    (mount.mnt / name).mkdir()
    os.setxattr(mount.mnt / name, POLICY, f"keyfence:{master.identifier}".encode())
    return master


def backing_depth(top: Path) -> tuple[int, int]:
    """(levels, bytes of the longest backing path) below ``top``, walked by
    descriptors (a path of that length cannot be opened)."""
    best = (0, 0)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    length, levels = len(os.fsencode(top)), 0
    while True:
        dirs = [
            e.name
            for e in os.scandir(fd)
            if stat.S_ISDIR(os.stat(e.name, dir_fd=fd, follow_symlinks=False).st_mode)
        ]
        best = max(best, (levels, length))
        if not dirs:
            os.close(fd)
            return best
        child = os.open(dirs[0], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
        length += 1 + len(os.fsencode(dirs[0]))
        levels += 1


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_deeper_than_path_max(mount: Mount, encrypted: bool) -> None:
    top = "deep"
    master = encrypt(mount, top) if encrypted else None
    if not encrypted:
        (mount.mnt / top).mkdir()
    # plain: 255-byte names; encrypted: names whose backing form is ~235 bytes
    # (160 bytes, a multiple of the default padding of 16: one more would be
    # padded to 176 and stored as a 51-byte long name, docs/format.md 3.2)
    name_len = 160 if encrypted else 255
    levels = 24
    fd = os.open(mount.mnt / top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(levels):
            name = f"{i:03d}".ljust(name_len, "d")
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        data = os.urandom(100_000)
        f = os.open("file", os.O_CREAT | os.O_RDWR, 0o600, dir_fd=fd)
        os.write(f, data)
        os.fsync(f)
        os.close(f)
        os.rename("file", "renamed", src_dir_fd=fd, dst_dir_fd=fd)
        os.chmod("renamed", 0o640, dir_fd=fd)
        os.symlink("target", "link", dir_fd=fd)
        assert sorted(os.listdir(fd)) == ["link", "renamed"]
        assert os.readlink("link", dir_fd=fd) == "target"
        assert stat.S_IMODE(os.stat("renamed", dir_fd=fd).st_mode) == 0o640
    finally:
        os.close(fd)
    levels_found, length = backing_depth(mount.backing / top)
    assert levels_found == levels
    assert length > 4096, length

    # after a remount every level is found again from the root
    mount.unmount()
    mount.start()
    if master is not None:
        mount.add_key(master)
    fd = os.open(mount.mnt / top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(levels):
            (name,) = os.listdir(fd)
            assert name == f"{i:03d}".ljust(name_len, "d")
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        f = os.open("renamed", os.O_RDONLY, dir_fd=fd)
        assert os.read(f, len(data) + 1) == data
        os.close(f)
        os.unlink("renamed", dir_fd=fd)
        os.unlink("link", dir_fd=fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


def _only_dir(path: Path) -> Path:
    (found,) = [p for p in path.iterdir() if p.is_dir()]
    return found


def test_deleted_policy_is_refused_not_plaintext(mount: Mount) -> None:
    master = encrypt(mount, "enc")
    (mount.mnt / "enc" / "sub").mkdir()
    (mount.mnt / "enc" / "sub" / "old").write_bytes(b"written encrypted\n")
    mount.unmount()

    # offline: the attacker deletes the subdirectory's policy record
    sub_backing = _only_dir(mount.backing / "enc")
    (sub_backing / POLICY_RECORD).unlink()
    before = sorted(p.name for p in sub_backing.iterdir())

    mount.start()
    mount.add_key(master)
    sub = mount.mnt / "enc" / "sub"
    assert os.listdir(mount.mnt / "enc") == ["sub"]  # its name still decrypts
    for attempt in (
        lambda: os.listdir(sub),
        lambda: (sub / "new").write_bytes(b"must never be stored in plaintext\n"),
        lambda: (sub / "newdir").mkdir(),
        lambda: os.symlink("x", sub / "newlink"),
        lambda: (sub / "old").read_bytes(),
        lambda: os.setxattr(sub, POLICY, f"keyfence:{master.identifier}".encode()),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EIO, attempt
    # nothing was stored in the downgraded directory
    assert sorted(p.name for p in sub_backing.iterdir()) == before
    assert not any(b"plaintext" in p.read_bytes() for p in sub_backing.iterdir() if p.is_file())
    assert "has no .keyfence-policy: refused" in mount.log()

    # locked (no key), it is refused too, under its encrypted name
    mount.clear()
    (name,) = os.listdir(mount.mnt / "enc")
    with pytest.raises(OSError) as caught:
        os.listdir(mount.mnt / "enc" / name)
    assert caught.value.errno == errno.EIO


def test_a_policy_record_copied_by_another_user_is_refused(mount: Mount) -> None:
    """A user who can write its own part of a shared backing store copies
    another user's policy record (a key reference is no secret) into a
    directory of its own, and beside it a copy of that user's ciphertext
    (from a backup, a snapshot): the mount must not decrypt it with the
    other user's key.  The worker writes records as itself and links them
    once, so a record of another uid is refused, read as EIO.  Before: the
    copy read as the victim's plaintext (a helper's attack on root's shared
    mount, 2026-12-07)."""
    encrypt(mount, "victim")
    secret = mount.mnt / "victim" / "secret"
    secret.write_bytes(b"the victim's secret\n")
    fd = os.open(secret, os.O_RDONLY)
    os.fsync(fd)  # its ciphertext on disk, as in any copy of the backing store
    os.close(fd)
    victim = mount.backing / "victim"
    (ciphertext,) = [p for p in victim.iterdir() if p.name != POLICY_RECORD]
    home = mount.backing / "attacker"
    forged = home / "forged"
    forged.mkdir(parents=True)
    shutil.copyfile(victim / POLICY_RECORD, forged / POLICY_RECORD)
    shutil.copyfile(ciphertext, forged / ciphertext.name)
    for path in (home, forged, forged / POLICY_RECORD, forged / ciphertext.name):
        os.chown(path, OTHER, OTHER)
    with pytest.raises(OSError) as caught:
        (mount.mnt / "attacker" / "forged" / "secret").read_bytes()
    assert caught.value.errno == errno.EIO
    assert "not written by this mount" in mount.log()
    assert secret.read_bytes() == b"the victim's secret\n"


def test_planted_plain_directory_is_refused(mount: Mount) -> None:
    """A directory made in the backing store (offline, or by a user who can
    write there) inside an encrypted one, named like an encrypted entry."""
    master = encrypt(mount, "enc")
    (mount.mnt / "enc" / "real").mkdir()
    mount.unmount()
    real = _only_dir(mount.backing / "enc")
    # the attacker replaces it with a policy-less directory of the same name
    (real / POLICY_RECORD).unlink()
    real.rmdir()
    real.mkdir()
    mount.start()
    mount.add_key(master)
    with pytest.raises(OSError) as caught:
        (mount.mnt / "enc" / "real" / "leak").write_bytes(b"plaintext")
    assert caught.value.errno == errno.EIO
    assert list(real.iterdir()) == []


def test_a_planted_non_ascii_name_in_a_locked_directory_is_skipped(mount: Mount) -> None:
    """Anyone who can write a backing directory could plant a name that is
    not ASCII in an encrypted one; listed locked, it made ``ops._list``
    raise UnicodeEncodeError (a traceback in the log, EIO for every
    reader) where the unlocked listing skips it.  Checked failing before:
    ``os.listdir`` of the locked directory was EIO."""
    encrypt(mount, "enc")
    (mount.mnt / "enc" / "real").write_bytes(b"x")
    (mount.backing / "enc" / "\u00e9-planted").write_bytes(b"planted")
    assert os.listdir(mount.mnt / "enc") == ["real"]
    mount.clear()
    (name,) = os.listdir(mount.mnt / "enc")
    assert name != "real" and name.isascii()


def test_planted_names_cost_one_log_line_and_are_not_tried_again(mount: Mount) -> None:
    """Names planted in an encrypted directory (random base64url) fail
    authentication and are left out of its listing.  Each cost a log line
    and, at every listing, a decryption: a user with 100,000 of them in a
    directory of its own on a shared mount held every user's requests
    1.3-1.5 s per listing and wrote 66 MB of log per three listings (a
    helper's attack, 2026-12-07; this test failed before: 200 lines).
    Now one line per listing that met new ones, and none after."""
    encrypt(mount, "enc")
    (mount.mnt / "enc" / "real").write_bytes(b"x")
    for _ in range(200):
        name = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        (mount.backing / "enc" / name).write_bytes(b"")
    assert os.listdir(mount.mnt / "enc") == ["real"]
    assert os.listdir(mount.mnt / "enc") == ["real"]
    lines = [x for x in mount.log().splitlines() if "failed authentication" in x]
    assert len(lines) == 1, lines[:3]
    assert "200 backing name(s) failed authentication" in lines[0]


@pytest.mark.parametrize("sidecar", ["mismatched", "missing", "fifo"])
def test_planted_long_names_are_not_tried_again_either(mount: Mount, sidecar: str) -> None:
    """As above with planted long names (``kf.long.<43>``, a sidecar that
    does not match, none, or a fifo): only short ones were remembered, so
    every listing opened and read each one's sidecar again.  A user with
    100,000 of them in a directory of its own on a shared mount held every
    user's requests 1.4-1.9 s per listing, at every listing (a helper's
    attack, s37 backing: /root/s37-findings/backing/stall_longnames.py;
    this test failed before: two lines).  Now 0.2 s after the first."""
    encrypt(mount, "enc")
    (mount.mnt / "enc" / "real").write_bytes(b"x")
    for _ in range(200):
        name = "kf.long." + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        (mount.backing / "enc" / name).write_bytes(b"")
        side = mount.backing / "enc" / f"{name}.name"
        if sidecar == "mismatched":
            side.write_bytes(b"A" * 300)
        elif sidecar == "fifo":
            os.mkfifo(side)
    assert os.listdir(mount.mnt / "enc") == ["real"]
    assert os.listdir(mount.mnt / "enc") == ["real"]
    lines = [x for x in mount.log().splitlines() if "failed authentication" in x]
    assert len(lines) == 1, lines[:3]
    assert "200 backing name(s) failed authentication" in lines[0]


def test_a_long_listing_lets_other_requests_through(mount: Mount) -> None:
    """A listing decoded every name of the directory in one go on the
    request loop: a directory of 100,000 names (real, or planted on a
    shared mount past the 100,000 failed names remembered) held every
    other request of every user for the 1-2 s of it (a helper's attack
    run, s37 backing: stall_longnames.py 250000 short).  Now other
    requests are served between chunks of 1,024 names: files created in
    another directory while 60,000 names are listed (before: at most the
    one already in flight)."""
    encrypt(mount, "enc")
    (mount.mnt / "enc" / "real").write_bytes(b"x")
    (mount.mnt / "other").mkdir()
    for i in range(60_000):
        name = base64.urlsafe_b64encode(i.to_bytes(4, "big") + os.urandom(28)).decode()
        os.close(os.open(mount.backing / "enc" / name.rstrip("="), os.O_CREAT | os.O_WRONLY))
    made = 0
    stop = threading.Event()

    def create() -> None:
        nonlocal made
        while not stop.is_set():
            os.close(os.open(mount.mnt / "other" / f"f{made}", os.O_CREAT | os.O_WRONLY))
            made += 1

    creator = threading.Thread(target=create)
    creator.start()
    try:
        while made < 10:  # the creator is going
            time.sleep(0.01)
        before = made
        assert os.listdir(mount.mnt / "enc") == ["real"]
        during = made - before
    finally:
        stop.set()
        creator.join()
    assert during >= 5, during


def test_a_file_cut_behind_the_mount_while_cached_reads_eio(mount: Mount) -> None:
    """The worker keeps a file it has read idle in its cache, with the
    sizes it knows; the backing file cut (inside its header) meanwhile read
    back as zeros, its missing records taken for holes not written yet,
    where a fresh mount says EIO.  Torn or tampered ciphertext is EIO, never
    plausible data (docs/fs.md, "Integrity").  Checked failing before: the
    read returned 16 zero bytes."""
    encrypt(mount, "enc")
    target = mount.mnt / "enc" / "f"
    target.write_bytes(b"secret line one\n")
    assert target.read_bytes() == b"secret line one\n"  # now idle in the cache
    (backing,) = [
        p for p in (mount.backing / "enc").iterdir() if not p.name.startswith(".keyfence")
    ]
    os.truncate(backing, 10)
    with pytest.raises(OSError) as caught:
        target.read_bytes()
    assert caught.value.errno == errno.EIO
