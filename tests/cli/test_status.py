"""``keyfence status`` through a real daemon, mount worker and login sessions.

The table of mounts (dirty bytes, keys, encrypted directories from the
worker's reports; files left open by an incomplete lock by name, not the
report's field names), ``status MOUNT``, ``status DIR`` in fscrypt's words
and exit codes, ``--json`` for each (docs/cli.md), a dead mount shown once
with why, a stopped mount gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyfence.testing.daemon import DaemonProcess, running_daemon
from tests.fs.test_daemon_mount import add_key_elsewhere, session_sh, start_login
from tests.fs.test_daemon_mount import pytestmark as needs_fuse

pytestmark = needs_fuse


@pytest.fixture
def slow_flush_mount(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    """A mount whose dirty pages stay dirty (no expiry for ten minutes)."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    with running_daemon("--system") as daemon:
        done = session_sh(daemon, f"keyfence mount -o dirty_expire=600 {backing} {mnt}")
        assert done.returncode == 0, done.stderr
        try:
            yield daemon, mnt
        finally:
            session_sh(daemon, f"keyfence umount {mnt} || true")
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


def status_json(daemon: DaemonProcess, *args: str) -> tuple[int, dict[str, Any]]:
    done = session_sh(daemon, "keyfence status --json " + " ".join(args))
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def wait_until(what: str, predicate: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def output_with(daemon: DaemonProcess, command: str, needle: str) -> str:
    """``command``'s output, once it contains ``needle`` (the worker reports
    at most every 0.5 s, a dead worker is seen when the daemon reaps it)."""

    def attempt() -> str | None:
        out = session_sh(daemon, command).stdout
        return out if needle in out else None

    return str(wait_until(f"{needle!r} in {command}", attempt))


# writes without closing or dup'ing the descriptor (a close, even of a
# copy, is a FUSE flush: the file would be written back)
HOLD = (
    "import os, sys, time; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600); "
    'os.write(fd, os.urandom(int(sys.argv[2]))); print("ready", flush=True); '
    'sys.stdin.readline(); os.close(fd); print("closed", flush=True); time.sleep(600)'
)


class Holder:
    """A login session that unlocks DIR, writes SIZE bytes to DIR/open.txt
    and keeps the file open (dirty: nothing closes it) until told."""

    def __init__(
        self, daemon: DaemonProcess, home: Path, size: int, name: str = "open.txt"
    ) -> None:
        """``name``: a shell word for the file's name in DIR."""
        self.process = start_login(
            daemon, home, f"exec {sys.executable} -c '{HOLD}' \"{home}/\"{name} {size}"
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line != "ready\n":
            self.process.kill()
            raise AssertionError(f"the holder did not start: {self.process.communicate()}")

    def close_file(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "closed\n"

    def end(self) -> None:
        self.process.kill()
        self.process.communicate()


def test_the_mount_table_shows_dirty_bytes_keys_and_open_files_by_name(
    slow_flush_mount: tuple[DaemonProcess, Path],
) -> None:
    """Before: ``keyfence status`` printed the worker's busy report field by
    field (``incompletely locked: files: [...]``, ``... mount: /m``,
    ``... serial: N``) and had no dirty bytes, keys or directories at all."""
    daemon, mnt = slow_flush_mount
    home = mnt / "home"
    home.mkdir()
    made = add_key_elsewhere(daemon, home)
    assert made.returncode == 0, made.stderr
    holder = Holder(daemon, home, 3 << 20)
    try:
        # the worker reports at most every 0.5 s
        table = output_with(daemon, "keyfence status", "3.0 MiB")
        header, row = table.splitlines()[2:4]
        assert header.split() == [
            "MOUNTPOINT",
            "BACKING",
            "STATE",
            "DIRTY",
            "KEYS",
            "ENCRYPTED",
            "DIRS",
        ]
        assert row.split() == [
            str(mnt),
            str(mnt.parent / "backing"),
            "mounted",
            "3.0",
            "MiB",
            "1",
            "1",
        ]
        code, listing = status_json(daemon)
        assert code == 0 and listing["version"] == 1
        (mount,) = listing["mounts"]
        assert mount["dirty_bytes"] == 3 << 20
        (key,) = mount["keys"]
        assert key["key"].startswith("ext4:") and key["open_files"] == 1
        assert key["dirty_bytes"] == 3 << 20
        assert mount["encrypted_dirs"] == [{"path": "/home", "key": key["key"], "unlocked": True}]

        lock = session_sh(daemon, f"keyfence lock {home}")
        assert lock.returncode == 1 and "incompletely locked" in lock.stderr, lock.stderr
        out = session_sh(daemon, "keyfence status").stdout
        assert f"{mnt}: incompletely locked, still open: home/open.txt" in out, out
        for field in ("files:", "mount:", "serial:", "key:", "[", "{"):
            assert field not in out, out
        assert "mounted, incompletely locked" in out
        # the worker's figures reach the daemon up to 0.5 s after the lock
        listing = wait_until(
            "the key gone from the mount's figures",
            lambda: (got := status_json(daemon)[1])["mounts"][0]["keys"] == [] and got,
        )
        assert listing["mounts"][0]["busy_files"] == ["home/open.txt"]
        assert listing["mounts"][0]["dirty_bytes"] == 0  # written back by the lock

        holder.close_file()
        wait_until(
            "the report to clear", lambda: not status_json(daemon)[1]["mounts"][0]["busy_files"]
        )
        assert "open.txt" not in session_sh(daemon, "keyfence status").stdout
    finally:
        holder.end()


def test_status_of_a_mount_and_of_a_directory(
    slow_flush_mount: tuple[DaemonProcess, Path],
) -> None:
    daemon, mnt = slow_flush_mount
    home, plain = mnt / "home", mnt / "plain"
    home.mkdir()
    plain.mkdir()
    made = add_key_elsewhere(daemon, home)
    assert made.returncode == 0, made.stderr
    holder = Holder(daemon, home, 1 << 20)
    try:
        wait_until(  # the key binds first; its dirty bytes may come a report later
            "the key and its dirty MiB in the mount's report",
            lambda: status_json(daemon)[1]["mounts"][0]["dirty_bytes"] == 1 << 20,
        )
        done = session_sh(daemon, f"keyfence status {mnt}")
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert out.startswith(f'keyfence mount "{mnt}": mounted\n'), out
        assert "Keys:     1" in out and "Dirty:    1.0 MiB (1,048,576 bytes)" in out, out
        assert "ENCRYPTED DIRECTORY" in out and "/home" in out
        assert "\nRequests: through /dev/fuse\n" in out or "through io_uring, " in out, out
        code, one = status_json(daemon, str(mnt))
        assert code == 0 and one["mount"]["mountpoint"] == str(mnt)

        done = session_sh(daemon, f"keyfence status {home}")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f'"{home}" is encrypted with keyfence.'
        assert lines[2].startswith("Policy:   ext4:")
        assert lines[3] == (
            "Options:  contents:AES-256-GCM-4K filenames:AES-SIV-B64URL policy_version:1"
        ) or lines[3].startswith("Options:  padding:")
        assert "Unlocked: Yes" in lines and "Open:     1 file" in lines
        code, info = status_json(daemon, str(home))
        assert code == 0
        assert info["unlocked"] == "Yes" and info["state"] == "unlocked"
        assert info["policy"].startswith("ext4:") and info["open_files"] == 1
        assert info["options"]["contents"] == "AES-256-GCM-4K"
        assert info["protectors"][0]["kind"] == "e4crypt passphrase"

        # fscrypt: not encrypted, not on a mount -> exit 1 with its words
        done = session_sh(daemon, f"keyfence status {plain}")
        assert done.returncode == 1
        assert done.stderr == f'keyfence status: file or directory "{plain}" is not encrypted\n'
        code, info = status_json(daemon, str(plain))
        assert code == 1 and info["encrypted"] is False
        done = session_sh(daemon, "keyfence status /tmp")
        assert done.returncode == 1 and "not on a keyfence mount" in done.stderr
        done = session_sh(daemon, f"keyfence status {mnt}/missing")
        assert done.returncode == 1 and "No such file or directory" in done.stderr
        assert "Traceback" not in done.stderr
        done = session_sh(daemon, "keyfence status ''")
        assert (done.returncode, done.stderr) == (
            1,
            "keyfence status: : No such file or directory\n",
        )
        odd = os.fsdecode(os.fsencode(plain) + b"/\xff")  # a name that is not UTF-8
        os.mkdir(odd)
        done = session_sh(daemon, "keyfence status \"$(printf '%s/\\377' " + str(plain) + ')"')
        assert done.returncode == 1, done.stderr
        assert (
            done.stderr == f'keyfence status: file or directory "{plain}/\\xff" is not encrypted\n'
        )
    finally:
        holder.end()


def test_a_dead_mount_is_shown_once_and_a_stopped_one_not_at_all(tmp_path: Path) -> None:
    with running_daemon("--system") as daemon:
        mounts = []
        for name in ("a", "b"):
            backing, mnt = tmp_path / f"backing-{name}", tmp_path / f"mnt-{name}"
            backing.mkdir()
            mnt.mkdir()
            done = session_sh(daemon, f"keyfence mount {backing} {mnt}")
            assert done.returncode == 0, done.stderr
            mounts.append(mnt)
        dead, stopped = mounts
        try:
            listing = status_json(daemon)[1]["mounts"]
            pid = next(m["pid"] for m in listing if m["mountpoint"] == str(dead))
            os.kill(pid, 9)
            done = session_sh(daemon, f"keyfence umount {stopped}")
            assert done.returncode == 0, done.stderr
            out = output_with(daemon, "keyfence status", "dead")
            assert f"{dead}: dead: worker exited with status -9 (log: " in out, out
            assert str(stopped) not in out, out
            # shown once: the next listing has neither
            assert session_sh(daemon, "keyfence status").stdout == "No keyfence mounts.\n"
            assert status_json(daemon)[1] == {"version": 1, "mounts": []}
            # and the mount point can be mounted again
            done = session_sh(daemon, f"keyfence mount {tmp_path / 'backing-a'} {dead}")
            assert done.returncode == 0, done.stderr
            session_sh(daemon, f"keyfence umount {dead}")
        finally:
            for mnt in mounts:
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


def test_names_a_user_chose_reach_the_terminal_escaped(
    slow_flush_mount: tuple[DaemonProcess, Path],
) -> None:
    """A user's file names (and their worker's reports) are shown to root
    by ``keyfence status``: an escape sequence in an encrypted directory's
    name must not reach the terminal as one (it could retitle the window,
    or worse on some terminals)."""
    daemon, mnt = slow_flush_mount
    evil = mnt / "ev\x1b]0;owned\x07il\x1b[2J"
    evil.mkdir()
    made = add_key_elsewhere(daemon, evil)
    assert made.returncode == 0, made.stderr
    out = output_with(daemon, f"keyfence status {mnt}", "owned")
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "/ev\\x1b]0;owned\\x07il\\x1b[2J" in out, out
    code, one = status_json(daemon, str(mnt))  # JSON keeps the name, escaped by JSON
    assert code == 0
    assert any(d["path"] == "/" + evil.name for d in one["mount"]["encrypted_dirs"])


def test_lock_names_files_still_open_escaped(
    slow_flush_mount: tuple[DaemonProcess, Path],
) -> None:
    """``keyfence lock`` lists the files still open: names their owner
    chose, escaped for the terminal of whoever locks (root may)."""
    daemon, mnt = slow_flush_mount
    home = mnt / "home"
    home.mkdir()
    made = add_key_elsewhere(daemon, home)
    assert made.returncode == 0, made.stderr
    holder = Holder(daemon, home, 4096, name="\"$(printf 'ev\\033[2Jil')\"")
    try:
        lock = session_sh(daemon, f"keyfence lock {home}")
        assert lock.returncode == 1 and "incompletely locked" in lock.stderr, lock.stderr
        assert "\x1b" not in lock.stderr, repr(lock.stderr)
        assert "  home/ev\\x1b[2Jil\n" in lock.stderr, lock.stderr
    finally:
        holder.end()
