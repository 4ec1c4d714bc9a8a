"""Worker and daemon logs name no file (issue 11, "need to know").

A user's mount on a real ``keyfence daemon --system`` (real uid, setpriv):
an encrypted directory and a file whose names carry a random marker are
made, written, locked while the file is open (a busy report), unlocked,
written again and locked in an emergency while open, unlocked; then the
file's first block is damaged in the backing store (the user owns it) and
read (an integrity error).  Each of these wrote the
plaintext path into the worker's log before the fix; now the logs name
inode numbers, the owner still gets the names in the reports, and the
marker is in neither the worker's log nor the daemon's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.mount_helpers import PASSPHRASE, SALT, Scene, scene, skip_without_facilities

pytestmark = skip_without_facilities()

USER = 61202
"""This test's uid (issue 11 hygiene tests: 61200-61209)."""


@pytest.fixture
def s() -> Iterator[Scene]:
    with scene() as made:
        pass_file = made.root / "pass"
        pass_file.write_text(PASSPHRASE)
        os.chmod(pass_file, 0o644)
        yield made


DAMAGE = (
    "import pathlib, sys; "
    "p = max((q for q in pathlib.Path(sys.argv[1]).rglob('*') if q.is_file()), "
    "key=lambda q: q.stat().st_size); "
    "b = bytearray(p.read_bytes()); b[100] ^= 1; p.write_bytes(b)"
)
"""Flip a byte of the first block of the biggest file in the backing store."""


def _logs(s: Scene) -> dict[str, bytes]:
    found = {"daemon": Path(s.daemon.log).read_bytes()}
    for path in (Path(s.daemon.socket).parent / "worker-logs").iterdir():
        found[path.name] = path.read_bytes()
    return found


def test_logs_hold_no_file_names(s: Scene) -> None:
    marker = "kfsecret" + os.urandom(6).hex()
    backing, mnt = s.directory("b", owner=USER), s.directory("m", owner=USER)
    done = s.keyfence(USER, "mount", "-o", "dirty_expire=600", str(backing), str(mnt))
    assert done.returncode == 0, done.stderr
    folder, file = mnt / f"{marker}-dir", mnt / f"{marker}-dir" / f"{marker}-file"
    session = s.run(
        USER,
        f"""
        kfctl new_session >/dev/null
        mkdir {folder}
        keyfence e4crypt add_key -S {SALT} {folder}
        head -c 100000 /dev/zero > {file}
        exec 3>>{file}
        kfctl clear @s
        exec 3>&-
        keyfence status
        keyfence unlock -S {SALT} {folder} < {s.root}/pass
        exec 3>>{file}
        head -c 300000 /dev/zero >&3
        keyfence lock --emergency {folder} || true
        exec 3>&-
        keyfence status
        keyfence unlock -S {SALT} {folder} < {s.root}/pass
        "$KF_PYTHON" -c "{DAMAGE}" {backing}
        cat {file} > /dev/null || echo READ-FAILED
        """,
        stdin=PASSPHRASE,
    )
    assert session.returncode == 0, session.stdout + session.stderr
    assert "READ-FAILED" in session.stdout and "Input/output error" in session.stderr
    # the owner is told which files, by name
    assert f"{marker}-file" in session.stderr, session.stdout + session.stderr
    logs = _logs(s)
    worker_logs = [text for name, text in logs.items() if name != "daemon"]
    assert worker_logs, logs.keys()
    joined = b"".join(worker_logs)
    assert b"still open" in joined and b"going away (invalidate, emergency)" in joined, joined
    for name, text in logs.items():
        assert marker.encode() not in text, f"{name}:\n{text.decode(errors='replace')}"
    assert s.keyfence(USER, "umount", str(mnt)).returncode == 0
    for name, text in _logs(s).items():
        assert marker.encode() not in text, f"{name}:\n{text.decode(errors='replace')}"
