"""``user.keyfence.status`` must not tell any reader the plaintext paths of
another user's still-open files after that user's key went.

On a shared root mount (``allow_other``, ``default_permissions``) user A
has an encrypted directory ``a`` (mode 0755) with a private subdirectory
``a/private`` (0700) and a file in it held open by a process that outlives
the lock (a tmux server, a nohup job).  A locks (``kfctl clear @s``, what
logout does): "incompletely locked".  User B may read ``a`` (its mode says
so) but not ``a/private``; while it was unlocked B could never learn the
names inside ``a/private``, and after the lock ``a``'s own names are
ciphertext.  Yet ``getxattr(a, "user.keyfence.status")`` (fs/xattrs.py
``status``: answered to anyone the kernel lets read the inode) lists
``busy_files``: the mount-relative plaintext paths, ``a/private/<name>``.
(Found by a red-team pass; the list is now for the directory's owner and
root, who still see it.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.testing.users import temporary_user
from tests.security.mount_helpers import (
    PASSPHRASE,
    SALT,
    Scene,
    scene,
    skip_without_facilities,
)

pytestmark = [skip_without_facilities(), pytest.mark.slow]

SECRET = "merger-with-initech-draft.txt"


@pytest.fixture
def s() -> Iterator[Scene]:
    with scene() as sc:
        yield sc


def test_status_xattr_does_not_name_another_users_open_files(s: Scene) -> None:
    with temporary_user("rtuser4") as owner, temporary_user("rtuser5") as other:
        a_uid, b_uid = owner.pw_uid, other.pw_uid
        backing, mnt = s.directory("rb", owner=0), s.directory("rm", owner=0)
        assert s.keyfence(0, "mount", str(backing), str(mnt)).returncode == 0
        top = mnt / "a"
        top.mkdir()
        os.chown(top, a_uid, a_uid)
        top.chmod(0o755)
        pidfile = s.root / "holder.pid"
        holder = (
            "import os, time\n"
            f"fd = os.open('{top}/private/{SECRET}', os.O_WRONLY | os.O_CREAT, 0o600)\n"
            "os.write(fd, b'draft')\n"
            f"open('{pidfile}.tmp', 'w').write(str(os.getpid())); "
            f"os.rename('{pidfile}.tmp', '{pidfile}')\n"
            "time.sleep(600)\n"
        )
        (s.root / "holder.py").write_text(holder)
        pidfile_dir = s.root
        os.chmod(pidfile_dir, 0o777)  # the holder (uid A) writes its pid there
        try:
            made = s.run(
                a_uid,
                f"""
                kfctl new_session >/dev/null
                keyfence e4crypt add_key -S {SALT} {top}
                mkdir {top}/private
                chmod 700 {top}/private
                setsid python3 {s.root}/holder.py </dev/null >/dev/null 2>&1 &
                for _ in $(seq 400); do [ -s {pidfile} ] && break; sleep 0.05; done
                kfctl clear @s
                """,
                stdin=PASSPHRASE,
            )
            assert made.returncode == 0, made.stdout + made.stderr
            assert pidfile.exists(), made.stderr

            seen = s.run(
                b_uid,
                f"""
                ls {top}
                python3 -c "import os; print(os.getxattr('{top}', 'user.keyfence.status').decode())"
                """,
            )
            assert "private" not in seen.stdout.split(), seen.stdout  # locked: ciphertext names
            assert '"incompletely locked"' in seen.stdout, seen.stdout + seen.stderr
            assert SECRET not in seen.stdout, (
                f"uid {b_uid} (no access to {top}/private) read the plaintext path of "
                f"uid {a_uid}'s open file from the status xattr: {seen.stdout.strip()}"
            )
            read_status = f"import os; print(os.getxattr('{top}', 'user.keyfence.status').decode())"
            mine = s.run(a_uid, f'python3 -c "{read_status}"')
            assert f"a/private/{SECRET}" in mine.stdout, mine.stdout + mine.stderr
        finally:
            os.chmod(pidfile_dir, 0o755)
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            Path(f"{pidfile}.tmp").unlink(missing_ok=True)
            s.keyfence(0, "umount", str(mnt))
