"""README's "Using it" works as written (issue 16).

The shell blocks marked ``<!-- using-it: ... -->`` in README.md are taken
verbatim and run, in order, as one ``sh -e`` script (one shell, so the
session keyring ``kfctl new_session`` gives it carries from the first
block to the second), with a fresh ``$HOME`` and a private daemon socket
(``$KEYFENCE_SOCKET`` in a temp directory, so nothing touches the machine's
own daemon).  Standard input holds the passphrase twice: ``e4crypt
add_key`` and ``unlock`` each read one line.  Afterwards the daemon the
README started is stopped (its pid from the socket's peer credentials).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from keyfence.testing import users, warm

README = Path(__file__).resolve().parent.parent.parent / "README.md"
MARKER = "<!-- using-it:"
PASSPHRASE = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE is not available here (/dev/fuse, fusermount3)",
)


def using_it_blocks(text: str) -> list[str]:
    """The ```sh blocks right after each marker, in order."""
    blocks = []
    for match in re.finditer(re.escape(MARKER) + r"[^\n]*-->\n```sh\n(.*?)```", text, re.S):
        blocks.append(match.group(1))
    return blocks


def test_the_readme_marks_its_blocks() -> None:
    text = README.read_text()
    blocks = using_it_blocks(text)
    assert len(blocks) == text.count(MARKER) == 2
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    assert all(block in section for block in blocks)
    assert "kfctl new_session" in blocks[0] and "keyfence mount" in blocks[1]


def daemon_pid(path: Path) -> int | None:
    """The pid of the daemon serving ``path``, from its lock file (the daemon
    writes its pid there again after ``--detach`` forks).  Not SO_PEERCRED:
    that names the process that called listen(), the parent that exited."""
    try:
        text = path.with_name(path.name + ".lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


USER_UID = 61601
"""The unprivileged user the README runs as too (this branch's uid range)."""


def wrappers(bin_dir: Path) -> None:
    """``keyfence`` and ``kfctl`` for another uid: the system interpreter
    with the checkout on PYTHONPATH (the venv's lives under /root)."""
    for name, module in (("keyfence", "keyfence.cli.main"), ("kfctl", "keyfence.cli.kfctl")):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec {users.SYSTEM_PYTHON} -m {module} "$@"\n')
        path.chmod(0o755)


def why_no_user_mounts() -> str | None:
    """Why a user's own daemon cannot mount here, or None."""
    if (mode := os.stat("/dev/fuse").st_mode & 0o777) & 0o006 != 0o006:
        # Debian's udev makes it 0666; the user's mount worker opens it
        return f"/dev/fuse is mode {mode:04o} here, not 0666: only root can mount FUSE"
    return users.why_no_other_uids()


@pytest.mark.parametrize("who", ["root", "user"])
def test_using_it_runs_verbatim(who: str) -> None:
    if who == "user" and (reason := why_no_user_mounts()) is not None:
        pytest.skip(reason)
    uid = 0 if who == "root" else USER_UID
    top = Path(tempfile.mkdtemp(prefix="kf-readme-"))  # not under pytest's 0700 root
    top.chmod(0o755)
    home, run, bin_dir = top / "home", top / "run", top / "bin"
    home.mkdir()
    run.mkdir(mode=0o700)
    bin_dir.mkdir()
    script = top / "using-it.sh"
    script.write_text("".join(using_it_blocks(README.read_text())))
    stdin = top / "passphrases"
    stdin.write_text(f"{PASSPHRASE}\n{PASSPHRASE}\n")
    sock = run / "sock"
    env = {
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "KEYFENCE_SOCKET": str(sock),
        "XDG_RUNTIME_DIR": str(run),
        "LC_ALL": "C.UTF-8",
    }
    argv = ["sh", "-e", str(script)]
    if uid:
        wrappers(bin_dir)
        env = users.environment(env, PATH=f"{bin_dir}:/usr/bin:/bin")
        env["HOME"] = str(home)
        for path in (home, run):
            os.chown(path, uid, uid)
        argv = users.as_uid(uid, argv)
    try:
        with stdin.open() as passphrases:
            done = subprocess.run(
                argv,
                stdin=passphrases,
                capture_output=True,
                text=True,
                env=env,
                cwd=home,
                timeout=300,
                start_new_session=True,  # no session keyring inherited from pytest
            )
        said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert done.returncode == 0, said
        assert "Traceback" not in done.stderr, said
        out = done.stdout.splitlines()
        # kfctl show @s lists the key the block added
        assert any(line.endswith("\\_ user: mykey") for line in out), said
        added = next(i for i, line in enumerate(out) if line.startswith("Added key with"))
        # after kfctl clear @s, ls shows ciphertext; after unlock, cat reads it
        listed = out[added + 1]
        assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", listed), said
        assert "test" in out[added + 2 :], said
        assert any("Unlocked: Yes" in line for line in out), said
        assert not os.path.ismount(home / "private")
        # on disk: notes (made in the plain root, so its own name is plain,
        # as with fscrypt) holds one ciphertext name, never my_file or test
        names = [p.name for p in (home / "ciphertext" / "notes").iterdir()]
        assert "my_file" not in names and len(names) == 3, names
        for path in (home / "ciphertext").rglob("*"):
            assert path.is_dir() or b"test\n" not in path.read_bytes()
    finally:
        subprocess.run(["fusermount3", "-uz", str(home / "private")], capture_output=True)
        pid = daemon_pid(sock)
        if pid is not None:
            stop(pid)
        # kfctl's warm server, which the block's kfctl started beside it
        warm.stop_servers_at(str(run / "keyfence" / "kfctl.sock"))
        shutil.rmtree(top, ignore_errors=True)
