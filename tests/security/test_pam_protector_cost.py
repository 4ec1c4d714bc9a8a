"""A user's own protector record must not set the scrypt cost root pays
(found by a red-team pass; fs/protector.py now bounds a login protector's
cost, LOGIN_MAX_*, and refuses a record above it before any work).

Before the fix:

``keyfence pam`` (root, run by pam_exec at every ``auth``) unwraps the
login protector found in each listed directory with the KDF parameters
*stored in that record*.  The user owns their directory and may write its
``user.keyfence.protectors`` (fs/xattrs.py), and ScryptParams accepts up to
N = 2^20, r = 32, p = 16: 128 * r * N = 4 GiB of memory and about 2,000
times the default's CPU (minutes) in a root process, per listed directory,
per login attempt.  ``su``'s own account with the right password (or an
ssh login) triggers it as often, and as many at once, as the user likes.

The test writes such a record on the user's own home (listed by root in the
system list), runs ``auth`` through the real PAM stack (pamtester) and
watches the root ``keyfence pam`` process: it must stay well under 1 GiB
and finish within a few seconds.  The process is killed as soon as it goes
over (its memory is allocated at the start of the KDF), so the test burns
little CPU.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from keyfence.testing.login import login_setup, why_no_login
from keyfence.testing.users import as_uid, environment, python_argv

pytestmark = pytest.mark.slow

USER = "rtuser1"
MEMORY_LIMIT_KIB = 1 << 20  # 1 GiB
TIME_LIMIT = 5.0

CRAFT = """
import os, sys
from keyfence.fs.protector import LoginProtector, Protectors, ScryptParams
home = sys.argv[1]
bad = LoginProtector(os.getuid(), ScryptParams(20, 32, 16), os.urandom(16), os.urandom(12),
                     os.urandom(80))
os.setxattr(home, "user.keyfence.protectors", Protectors([], [bad]).serialize())
print("written")
"""


def _children(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            out.append(int(entry))
    return out


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.skipif(why_no_login() is not None, reason=why_no_login() or "")
def test_user_protector_cannot_make_root_pam_spend_gigabytes_or_minutes() -> None:
    password = "rt-" + secrets.token_hex(8)
    with login_setup(USER, password, service_prefix="rt-pam") as s:
        uid = os.stat(s.home).st_uid
        crafted = subprocess.run(
            as_uid(uid, python_argv("-c", CRAFT, str(s.home))),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert crafted.returncode == 0, crafted.stderr  # the user may write it

        pam = subprocess.Popen(
            ["pamtester", "-v", s.service, s.user, "authenticate"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert pam.stdin is not None
        pam.stdin.write(password + "\n")
        pam.stdin.close()
        start = time.monotonic()
        peak, hook, over = 0, None, None
        try:
            while pam.poll() is None:
                if hook is None:
                    kids = _children(pam.pid)
                    hook = kids[0] if kids else None
                if hook is not None:
                    peak = max(peak, _hwm_kib(hook))
                elapsed = time.monotonic() - start
                if peak > MEMORY_LIMIT_KIB:
                    over = f"{peak >> 10} MiB peak after {elapsed:.1f} s"
                    break
                if elapsed > TIME_LIMIT:
                    over = f"still running after {elapsed:.1f} s ({peak >> 10} MiB peak)"
                    break
                time.sleep(0.05)
        finally:
            # pam_exec's child is in a session of its own: kill it by pid
            if hook is not None and pam.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(hook, 9)
            try:
                pam.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pam.kill()
                pam.wait()
        assert over is None, (
            f"root's keyfence pam auth with the user's own protector record: {over}; "
            f"log: {s.pam_log_text()[-400:]}"
        )
        assert "above a login's budget" in s.pam_log_text(), s.pam_log_text()[-400:]
