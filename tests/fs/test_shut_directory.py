"""fs/syscalls.py on a directory by its own descriptor and ``"."``, as a
user who shut it (``chmod 000``): what ext4 lets the owner do, the calls
do, without a lookup inside the directory (session 28's red-team pass on
user mounts, F2; tests/security/test_mount_requests.py has it through a
real user mount).  Run as another uid: root passes every permission check."""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from keyfence.testing.users import as_uid, environment, python_argv, why_no_other_uids

UID = 61121
"""A uid of this file's own (no account needed: setpriv takes numbers)."""

SCRIPT = textwrap.dedent(
    """
    import os, stat, sys
    from keyfence.fs import syscalls as sc
    d = os.path.join(sys.argv[1], "shut")
    os.mkdir(d)
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    os.chmod(d, 0)
    assert stat.S_IMODE(sc.stat_at(fd, ".").st_mode) == 0
    sc.utime_at(fd, ".", 10**9, 2 * 10**9)
    assert sc.stat_at(fd, ".").st_mtime_ns == 2 * 10**9
    sc.listxattr_at(fd, ".", stat.S_IFDIR)
    try:
        sc.getxattr_at(fd, ".", b"system.posix_acl_access", stat.S_IFDIR)
    except OSError as err:
        assert err.errno in (61, 95), err  # ENODATA (or no ACLs at all)
    sc.chown_at(fd, ".", os.getuid(), os.getgid())
    sc.chmod_at(fd, ".", 0o750)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    print("ok")
    """
)


def test_the_owner_reaches_its_shut_directory_by_descriptor(tmp_path: Path) -> None:
    why = why_no_other_uids()
    if why is not None:
        pytest.skip(why)
    top = Path(tempfile.mkdtemp(prefix="kf-shut-"))
    try:
        os.chown(top, UID, UID)
        r = subprocess.run(
            as_uid(UID, python_argv("-c", SCRIPT, str(top))),
            capture_output=True, text=True, timeout=60, env=environment(), check=False,
        )  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)
