"""keyfence lock / unlock / status DIR and e4crypt add_key through a real mount.

Salts stored with the policy (no -S needed after the first time), lock
finding the key through the mount's binding whatever the caller's @s,
fscrypt's status wording and exit codes, the busy report clearing when the
files close.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from keyfence.testing.daemon import DaemonProcess
from tests.fs.test_daemon_mount import (
    BIN,
    PASSPHRASE,
    add_key_elsewhere,
    mounted,
    session_sh,
    start_login,
    unlock_script,
)

__all__ = ["mounted"]


def _with_protectors(mounted: tuple[DaemonProcess, Path, Path], name: str) -> tuple[Path, Path]:
    """A directory ``name`` of the mount that ``e4crypt add_key`` encrypted
    (its salt stored): it, and its protectors record in the backing store."""
    daemon, backing, mnt = mounted
    home = mnt / name
    home.mkdir()
    made = session_sh(daemon, f"keyfence e4crypt add_key {home} >/dev/null", stdin=PASSPHRASE)
    assert made.returncode == 0, made.stderr
    return home, backing / name / ".keyfence-protectors"


def login_env(daemon: DaemonProcess) -> dict[str, str]:
    return dict(daemon.env, PATH=f"{BIN}:{os.environ['PATH']}")


def test_add_key_without_salt_stores_one_and_unlock_needs_none(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    daemon, backing, mnt = mounted
    home = mnt / "notes"
    home.mkdir()
    made = session_sh(
        daemon,
        f"keyfence e4crypt add_key {home} && echo hi > {home}/f && kfctl clear @s",
        stdin=PASSPHRASE,
    )
    assert made.returncode == 0, made.stderr
    desc = made.stdout.split("[")[1].split("]")[0]
    status = session_sh(daemon, f"keyfence status {home}")
    assert "Unlocked: No" in status.stdout, status.stdout
    salt_hex = status.stdout.split("e4crypt salt 0x")[1].split(")")[0]
    assert len(salt_hex) == 32
    # the stored salt is an ordinary e4crypt salt: -S 0x<salt> gives the same descriptor
    same = session_sh(daemon, f"keyfence e4crypt add_key -S 0x{salt_hex}", stdin=PASSPHRASE)
    assert f"[{desc}]" in same.stdout, same.stdout + same.stderr
    # the protectors file is hidden from the mount and the name never leaks
    assert (backing / "notes" / ".keyfence-protectors").is_file()
    again = session_sh(daemon, f"keyfence unlock {home} && cat {home}/f", stdin=PASSPHRASE)
    assert again.returncode == 0, again.stderr
    assert again.stdout.endswith("hi\n")
    listing = session_sh(
        daemon, f"keyfence unlock {home} >/dev/null; ls -A {home}", stdin=PASSPHRASE
    )
    assert listing.stdout.split() == ["f"]


def test_the_protectors_record_is_the_owners_alone_in_the_backing_store(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """A login protector costs one scrypt per guess, so it is shown to the
    directory's owner and root only (docs/format.md 3.1) -- through the
    mount.  In the backing store it was written 0644: anyone who could
    search the backing directory read it and guessed the password offline
    (a helper's attack, 2026-12-07; failed before).  Now 0600, and an old
    0644 one is made 0600 when it is next read."""
    daemon, _backing, _mnt = mounted
    home, record = _with_protectors(mounted, "guarded")
    assert record.stat().st_mode & 0o777 == 0o600
    record.chmod(0o644)  # as written before
    status = session_sh(daemon, f"keyfence status {home}")
    assert "e4crypt salt 0x" in status.stdout, status.stdout + status.stderr
    assert record.stat().st_mode & 0o777 == 0o600


def test_unlock_without_stored_salt_says_so(mounted: tuple[DaemonProcess, Path, Path]) -> None:
    daemon, backing, mnt = mounted
    home = mnt / "old"
    home.mkdir()
    made = session_sh(daemon, f"keyfence e4crypt add_key -S s:x {home}", stdin=PASSPHRASE)
    assert made.returncode == 0, made.stderr
    # made before salts were stored: drop the record to play an old directory
    (backing / "old" / ".keyfence-protectors").unlink()
    done = session_sh(daemon, f"keyfence unlock {home}", stdin=PASSPHRASE)
    assert done.returncode == 2
    assert "no salt stored with the policy" in done.stderr
    ok = session_sh(daemon, f"keyfence unlock -S s:x {home}", stdin=PASSPHRASE)
    assert ok.returncode == 0, ok.stderr


def test_lock_from_another_session_finds_the_key(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """fscrypt's lock: whoever's keyrings hold the key (here: a login's @s
    that the locking process does not share); exit 1 when already locked."""
    daemon, _backing, mnt = mounted
    home = mnt / "h"
    home.mkdir()
    # a long-lived "login" holding the key in its own session keyring
    login = subprocess.Popen(
        [
            "sh",
            "-ec",
            "kfctl new_session >/dev/null; "
            f"echo '{PASSPHRASE.strip()}' | keyfence e4crypt add_key {home} >/dev/null; "
            f"dd if=/dev/urandom of={home}/data bs=1M count=4 status=none; "
            "echo ready; exec sleep 600",
        ],
        env=login_env(daemon),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert login.stdin is not None and login.stdout is not None
        assert login.stdout.readline() == "ready\n"
        status = session_sh(daemon, f"keyfence status {home}")
        assert "Unlocked: Yes" in status.stdout, status.stdout
        lock = session_sh(daemon, f"keyfence lock {home}")
        assert lock.returncode == 0, lock.stderr
        assert f"{home}: locked" in lock.stdout
        status = session_sh(daemon, f"keyfence status {home}")
        assert "Unlocked: No" in status.stdout
        again = session_sh(daemon, f"keyfence lock {home}")
        assert again.returncode == 1
        assert "already locked" in again.stderr
    finally:
        login.kill()
        login.communicate()


def test_incompletely_locked_until_the_file_closes(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    daemon, _backing, mnt = mounted
    home = mnt / "busy"
    home.mkdir()
    made = add_key_elsewhere(daemon, home)
    assert made.returncode == 0, made.stderr
    holder = start_login(
        daemon,
        home,
        f"exec 3>{home}/open.txt; echo x >&3; "
        "echo ready; read _; exec 3>&-; echo closed; exec sleep 600",
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        lock = session_sh(daemon, f"keyfence lock {home}")
        assert lock.returncode == 1, lock.stdout + lock.stderr
        assert "incompletely locked" in lock.stderr
        assert "open.txt" in lock.stderr
        status = session_sh(daemon, f"keyfence status {home}")
        assert "Unlocked: Partially (incompletely locked)" in status.stdout, status.stdout
        assert "open.txt" in status.stdout
        assert "open.txt" in session_sh(daemon, "keyfence status").stdout
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        deadline = time.monotonic() + 30
        while True:
            status = session_sh(daemon, f"keyfence status {home}")
            if "Unlocked: No" in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.1)
        assert "open.txt" not in status.stdout
        # the daemon's report (keyfence status without a directory) clears too
        listing = session_sh(daemon, "keyfence status")
        assert "open.txt" not in listing.stdout, listing.stdout
    finally:
        holder.kill()
        holder.communicate()


def test_a_hostile_protectors_file_is_a_clear_error(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    daemon, _backing, _mnt = mounted
    home, record = _with_protectors(mounted, "h")
    for hostile in (b"KFR1\x01\x00\x00\x05garbage", b"x" * 100_000):
        record.write_bytes(hostile)
        done = session_sh(daemon, f"keyfence unlock {home}", stdin=PASSPHRASE)
        assert done.returncode == 1, done.stdout
        assert "Input/output error" in done.stderr and "Traceback" not in done.stderr
    record.unlink()
    record.symlink_to("/etc/shadow")
    done = session_sh(daemon, f"keyfence unlock {home}", stdin=PASSPHRASE)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "root:" not in done.stdout + done.stderr


def test_lock_right_after_add_key_removes_the_unused_key(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """A key added but not yet used by the mount (no access since) is still
    the directory's key: lock removes it (before, lock said "already
    locked", exited 1 and left the key to unlock the directory at the next
    access; the chaos test caught it)."""
    daemon, _backing, mnt = mounted
    home = mnt / "fresh"
    home.mkdir()
    made = session_sh(
        daemon, f"keyfence e4crypt add_key -S s:fresh {home} && kfctl clear @s", stdin=PASSPHRASE
    )
    assert made.returncode == 0, made.stderr
    # the same key back in a session's @s as a script would add it (kfctl
    # padd), without touching the directory: the mount has not bound it
    readd = (
        "import sys; from keyfence.fs import e4crypt_compat as e4; "
        "k = e4.derive_key(sys.stdin.buffer.read().strip(), b'fresh'); "
        "sys.stdout.buffer.write(e4.kernel_payload(k))"
    )
    desc = made.stdout.split("[")[1].split("]")[0]
    done = session_sh(
        daemon,
        f"""
        kfctl new_session >/dev/null
        {sys.executable} -c "{readd}" | kfctl padd logon ext4:{desc} @s >/dev/null
        keyfence lock {home} && echo lock=0 || echo "lock=$?"
        keyfence lock {home} && echo again=0 || echo "again=$?"
        ls -A {home} | wc -l; keyfence status {home}
        """,
        stdin=PASSPHRASE,
    )
    assert f"{home}: locked" in done.stdout, done.stdout + done.stderr
    assert "lock=0" in done.stdout and "again=1" in done.stdout
    assert "already locked" in done.stderr
    assert "Unlocked: No" in done.stdout


def test_lock_of_an_incompletely_locked_directory_removes_a_new_unused_key(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """Incompletely locked (a file still open) and then the key added again
    without touching the directory (the mount has not bound it): lock must
    remove that key too, not just repeat "incompletely locked" and leave
    the key to unlock the directory at the next access (before, the
    still-open report returned first; the chaos test's lock path met it)."""
    daemon, _backing, mnt = mounted
    home = mnt / "busy"
    home.mkdir()
    holder = (
        "import os, sys, time; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600); "
        "os.write(fd, b'x'); open(sys.argv[2], 'w').close(); time.sleep(60)"
    )
    readd = (
        "import sys; from keyfence.fs import e4crypt_compat as e4; "
        "k = e4.derive_key(sys.stdin.buffer.read().strip(), b'busy'); "
        "sys.stdout.buffer.write(e4.kernel_payload(k))"
    )
    ready = mnt.parent / "holder-ready"
    done = session_sh(
        daemon,
        f"""
        desc=$(keyfence e4crypt add_key -S s:busy {home} | sed 's/.*\\[//; s/\\].*//')
        {sys.executable} -c "{holder}" {home}/open.log {ready} &
        holder=$!
        while [ ! -e {ready} ]; do sleep 0.05; done
        keyfence lock {home} && echo first=0 || echo "first=$?"
        printf '%s' '{PASSPHRASE.strip()}' | {sys.executable} -c "{readd}" \\
            | kfctl padd logon ext4:$desc @s >/dev/null
        keyfence lock {home} && echo second=0 || echo "second=$?"
        kfctl search @s logon ext4:$desc >/dev/null 2>&1 && echo key=present || echo key=gone
        ls {home} | grep -c open.log || true
        kill $holder
        """,
        stdin=PASSPHRASE,
    )
    out = done.stdout
    assert "first=1" in out and "second=1" in out, out + done.stderr
    assert "was incompletely locked" in done.stderr
    assert "key=gone" in out, out + done.stderr


# writes, waits for a line on stdin, writes again through the same
# descriptor, closes: a writer that never looks its key up again
WRITER = (
    "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600); "
    'os.write(fd, b"first\\n"); print("ready", flush=True); sys.stdin.readline(); '
    'os.write(fd, b"second\\n"); os.close(fd); print("closed", flush=True)'
)


def test_one_logout_does_not_lock_a_file_another_login_has_open(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """Two logins, each with its own copy of the key (as two ssh logins
    unlocking the same home get).  The mount is bound to the first's; the
    second's writer has a file open.  The first logs out (clear @s): the
    mount moves to the second's copy (docs/login.md), and the writer's
    next write and its close succeed with every byte kept.  Before, the
    removal locked the directory under the second login: the write failed
    with ENOKEY (reads and writes carry no caller to look the key up)."""
    daemon, _backing, mnt = mounted
    home = mnt / "shared"
    home.mkdir()
    assert add_key_elsewhere(daemon, home).returncode == 0

    def tell(process: subprocess.Popen[str], expect: str) -> None:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline() == expect, process.communicate()

    first = start_login(
        daemon,
        home,
        f"ls {home} >/dev/null; echo up; read _; kfctl clear @s; echo cleared; exec sleep 600",
    )
    second = None
    try:
        assert first.stdout is not None and first.stdout.readline() == "up\n", first.communicate()
        second = start_login(daemon, home, f"exec {sys.executable} -c '{WRITER}' {home}/notes")
        assert second.stdout is not None and second.stdout.readline() == "ready\n"
        tell(first, "cleared\n")
        tell(second, "closed\n")
        _out, err = second.communicate(timeout=60)
        assert err.strip().endswith("(echo disabled):"), err  # no ENOKEY
        deadline = time.monotonic() + 30  # the second login's end is seen at a lifetime check
        while (
            "Unlocked: No" not in (status := session_sh(daemon, f"keyfence status {home}")).stdout
        ):
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.1)
        check = session_sh(daemon, f"{unlock_script(home)}; cat {home}/notes")
        assert check.stdout == "first\nsecond\n", check.stderr
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.communicate()


def test_lock_takes_every_logins_copy_even_with_a_file_open(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """``keyfence lock`` is the user's own lock (fscrypt's): it locks the
    directory under every login of theirs.  With the move to another
    login's copy (above), the lock follows the mount from copy to copy and
    ends incompletely locked because of the open file, never unlocked."""
    daemon, _backing, mnt = mounted
    home = mnt / "both"
    home.mkdir()
    assert add_key_elsewhere(daemon, home).returncode == 0
    first = start_login(daemon, home, f"ls {home} >/dev/null; echo up; exec sleep 600")
    second = start_login(daemon, home, f"exec {sys.executable} -c '{WRITER}' {home}/notes")
    try:
        assert first.stdout is not None and first.stdout.readline() == "up\n"
        assert second.stdout is not None and second.stdout.readline() == "ready\n"
        lock = session_sh(daemon, f"keyfence lock {home}")
        assert lock.returncode == 1, lock.stdout + lock.stderr
        assert "incompletely locked" in lock.stderr and "notes" in lock.stderr
        status = session_sh(daemon, f"keyfence status {home}")
        assert "Unlocked: Partially (incompletely locked)" in status.stdout, status.stdout
        check = session_sh(daemon, f"{unlock_script(home)}; cat {home}/notes")
        assert check.stdout == "first\n", check.stderr  # written back before the lock
    finally:
        for process in (first, second):
            process.kill()
            process.communicate()
