"""``open(O_CREAT)`` of a name that exists in the backing store but that the
kernel holds as a negative entry is checked against the file's modes
(red-team pass on the FUSE mount, finding 2; docs/security.md).

On a root mount (``allow_other``, ``default_permissions``) user B looks up
``shared/secret``: missing, so the kernel keeps a negative entry for the
attribute timeout.  Meanwhile user A's 0600 file ``secret`` appears in the
backing directory (written there directly; here: put back under its name).
B's ``open(O_CREAT | O_RDWR)`` then reaches the worker as FUSE_CREATE, and
the kernel, which believes the file was just made (``FMODE_CREATED``),
checks no permission on it.  The worker answered it by opening the existing
file with root's rights: B read and overwrote A's 0600 file.  It now makes
the file ``O_EXCL`` and, if the name is taken, answers ESTALE: the kernel
looks the name up again (``LOOKUP_REVAL``) and opens the file it finds as
any open, with the mode bits checked for the caller.

Checked failing before: B's open succeeded and read A's data, in the plain
and the encrypted directory alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.testing.mounting import Mount, fuse_available
from keyfence.testing.users import as_uid, environment, python_argv, why_no_other_uids

OWNER = 4612
"""User A: owns the private file."""
OTHER = 4613
"""User B: may not open it."""
PRIVATE = b"A's private data\n"
POLICY = "user.keyfence.policy"

_why = fuse_available() or why_no_other_uids()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

# Run as a test uid: print what open(path, flags) gives (errno, or what a
# read of the descriptor returns).
_OPEN = r"""
import os, sys
path, how = sys.argv[1:3]
flags = {"stat": None, "creat": os.O_CREAT | os.O_RDWR,
         "creat-trunc-ro": os.O_CREAT | os.O_RDONLY | os.O_TRUNC}[how]
try:
    if flags is None:
        os.stat(path)
        print("exists")
    else:
        fd = os.open(path, flags, 0o644)
        print("opened", repr(os.pread(fd, 100, 0)))
except OSError as err:
    print("errno", err.errno)
"""


def as_user(uid: int, path: Path, how: str) -> str:
    done = subprocess.run(
        as_uid(uid, python_argv("-c", _OPEN, str(path), how)),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def mount() -> Iterator[Mount]:
    top = Path(tempfile.mkdtemp(prefix="kffsc-"))
    os.chmod(top, 0o711)  # other uids reach the mount (pytest's tmp is 0700)
    m = Mount(top, "--dirty-expire", "60")  # a root worker: allow_other
    try:
        yield m
    finally:
        m.unmount_checked()
        shutil.rmtree(top, ignore_errors=True)


def shared_dir(mount: Mount, label: str, *, encrypted: bool) -> Path:
    shared = mount.mnt / label
    shared.mkdir()
    if encrypted:
        master = MasterKey(os.urandom(64))
        mount.add_key(master)
        os.setxattr(shared, POLICY, f"keyfence:{master.identifier}".encode())
    shared.chmod(0o1777)
    return shared


def private_file_behind_a_negative_entry(mount: Mount, shared: Path) -> Path:
    """A's 0600 ``secret`` in the backing store while the kernel holds the
    name as missing (the lookup was B's, so the entry is B's too)."""
    secret = shared / "secret"
    before = set(os.listdir(mount.backing / shared.name))
    secret.write_bytes(PRIVATE)
    os.chown(secret, OWNER, OWNER)
    secret.chmod(0o600)
    (disk,) = set(os.listdir(mount.backing / shared.name)) - before
    stash = mount.tmp / f"stash-{shared.name}"
    os.link(mount.backing / shared.name / disk, stash)
    secret.unlink()  # through the mount: the kernel forgets the entry
    assert as_user(OTHER, secret, "stat") == "errno 2"  # now a negative entry, 10 s
    os.rename(stash, mount.backing / shared.name / disk)  # behind the mount's back
    return secret


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_create_of_an_existing_name_checks_its_modes(mount: Mount, encrypted: bool) -> None:
    label = "enc" if encrypted else "plain"
    shared = shared_dir(mount, label, encrypted=encrypted)
    secret = private_file_behind_a_negative_entry(mount, shared)
    assert as_user(OTHER, secret, "creat") == "errno 13"
    assert as_user(OTHER, secret, "creat-trunc-ro") == "errno 13"
    assert secret.read_bytes() == PRIVATE
    # the owner's O_CREAT open of the same name opens the file that is there
    secret = private_file_behind_a_negative_entry(
        mount, shared_dir(mount, label + "2", encrypted=encrypted)
    )
    assert as_user(OWNER, secret, "creat") == f"opened {PRIVATE!r}"
    assert secret.read_bytes() == PRIVATE
    assert secret.stat().st_uid == OWNER
