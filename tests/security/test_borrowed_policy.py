"""A user may not give a directory of its own another user's key.

On root's shared mount the worker binds a key for whoever asks first and
serves it to every request of its policy (permissions govern, as fscrypt
v2 once a key is added).  Setting a policy looked no further: user B,
without the key, set user A's key reference (no secret: it is in A's 0644
policy record) as the policy of B's own empty directory while A's key was
bound, and the worker wrote the record itself (so "Who wrote it",
docs/format.md 3, held).  B then put a copy of A's ciphertext (a leaked
backup: actor 1) under a name made in that directory and read A's
plaintext through the mount (a helper's attack, s37 backing:
/root/s37-findings/backing/borrowed_policy.py).  fscrypt v2 refuses such a
policy (ENOKEY: the key was not added by the caller, who lacks
CAP_FOWNER); so does keyfence now, root excepted.

Checked failing before: B's setxattr succeeded and B read A's plaintext.
"""

from __future__ import annotations

import errno
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

OWNER = 4641
"""User A: its key, its encrypted directory."""
OTHER = 4642
"""User B: without A's key."""
POLICY = "user.keyfence.policy"
SECRET = b"A's plaintext\n"

_why = fuse_available() or why_no_other_uids()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

# Run as B in a session of its own (no keys): set the policy on its
# directory; if that works, put the ciphertext copy under a name made there
# and print what the mount reads.
_BORROW = r"""
import os, sys, time
mnt_dir, back_dir, ref, copy = sys.argv[1:5]
try:
    os.setxattr(mnt_dir, "user.keyfence.policy", ref.encode())
except OSError as err:
    print("errno", err.errno)
    sys.exit(0)
open(os.path.join(mnt_dir, "f"), "wb").close()
(disk,) = [n for n in os.listdir(back_dir) if not n.startswith(".")]
with open(copy, "rb") as src, open(os.path.join(back_dir, "new"), "wb") as dst:
    dst.write(src.read())
os.rename(os.path.join(back_dir, "new"), os.path.join(back_dir, disk))
with open(os.path.join(mnt_dir, "f"), "rb") as f:
    print("read", repr(f.read()))
"""


@pytest.fixture
def mount() -> Iterator[Mount]:
    top = Path(tempfile.mkdtemp(prefix="kffsb-"))
    os.chmod(top, 0o711)  # other uids reach the mount (pytest's tmp is 0700)
    m = Mount(top, "--dirty-expire", "60", "--attr-timeout", "0")  # a root worker: allow_other
    try:
        yield m
    finally:
        m.unmount_checked()
        shutil.rmtree(top, ignore_errors=True)


def test_a_user_cannot_set_a_policy_of_a_key_bound_for_another(mount: Mount) -> None:
    master = MasterKey(os.urandom(64))
    mount.add_key(master)
    ref = f"keyfence:{master.identifier}"
    a = mount.mnt / "a"
    a.mkdir()
    os.setxattr(a, POLICY, ref.encode())  # A's directory: the key is bound now
    (a / "secret").write_bytes(SECRET)
    (disk,) = [n for n in os.listdir(mount.backing / "a") if not n.startswith(".")]
    copy = mount.tmp / "leaked"
    shutil.copyfile(mount.backing / "a" / disk, copy)
    copy.chmod(0o644)
    for path in (a, a / "secret"):
        os.chown(path, OWNER, OWNER)
    a.chmod(0o700)
    b = mount.mnt / "b"
    b.mkdir()
    os.chown(b, OTHER, OTHER)
    mine = b / "mine"
    mine.mkdir()
    os.chown(mine, OTHER, OTHER)
    args = [str(mine), str(mount.backing / "b" / "mine"), ref, str(copy)]
    done = subprocess.run(
        as_uid(OTHER, ["setsid", "--wait", *python_argv("-c", _BORROW, *args)]),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"errno {errno.ENOKEY}"
    assert not os.path.exists(mount.backing / "b" / "mine" / ".keyfence-policy")
    # the owner of a key may still give it to a new directory
    (a / "more").mkdir()
    assert (a / "secret").read_bytes() == SECRET
