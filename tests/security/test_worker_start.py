"""A mount worker's start-up, as its owner sees it.

The worker is the only code outside the daemon that holds logon keys'
payloads, and it is non-dumpable so that not even its owner can read its
memory or ptrace it (docs/security.md).  A process that was ever open to
its owner stays open to a descriptor (``/proc/PID/mem``) or a ptrace
attach made then: the kernel checks access once, at the open or the
attach.  So the worker must never be its owner's to open, not even before
it hardens itself.

Real uids (setpriv), a real ``keyfence daemon --system`` on a private
socket, real FUSE mounts.  The test failed on the code before the fix (a
worker exec'd as its owner was dumpable until ``harden()`` ran, after its
imports).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from keyfence.testing import users
from tests.security.mount_helpers import USER, Scene, is_mounted, scene, skip_without_facilities

pytestmark = skip_without_facilities()

# Opens /proc/PID/mem of every keyfence worker it sees, as fast as it can,
# until the flag file appears: how many workers it saw, how many it opened.
POLLER = r"""
import os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
seen, opened = set(), set()
mine = str(os.getpid())
worker = b"keyfence.fs." + b"worker"  # not this process's own command line
while time.monotonic() < deadline and not os.path.exists(sys.argv[2]):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in opened or pid == mine:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if worker not in f.read():
                    continue
        except OSError:
            continue
        seen.add(pid)
        try:
            os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        except OSError:
            continue
        opened.add(pid)
print(len(seen), len(opened))
"""


@pytest.fixture
def s() -> Iterator[Scene]:
    with scene() as made:
        yield made


def test_the_owner_never_gets_a_handle_on_a_starting_worker(s: Scene) -> None:
    backing, mnt = s.directory("b"), s.directory("m")
    for round in range(3):
        flag = s.root / f"mounted-{round}"
        poller = subprocess.Popen(
            users.as_uid(USER, [users.SYSTEM_PYTHON, "-c", POLLER, "120", str(flag)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            done = s.keyfence(USER, "mount", str(backing), str(mnt))
            assert done.returncode == 0, done.stderr
        finally:
            flag.touch()
            out, _ = poller.communicate(timeout=60)
        seen, opened = map(int, out.split())
        assert seen >= 1, "the poller never saw the worker: the test proves nothing"
        assert opened == 0, f"the owner opened /proc/PID/mem of {opened} starting worker(s)"
        assert s.keyfence(USER, "umount", str(mnt)).returncode == 0
        assert not is_mounted(mnt)
