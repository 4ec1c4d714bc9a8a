"""An emergency wipe on real processes (issue #6, "Emergency").

`kfctl --emergency clear @s` with 128 MiB of dirty data under a random
64-byte logon key: it returns at once; afterwards the key's bytes are
nowhere in the daemon's or the mount worker's memory (searched through
/proc/PID/mem, where they were found just before); the mount reports
exactly which files and how many bytes it discarded; nothing of the
plaintext is readable through the mount.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.testing.memory import addresses_in_memory
from tests.fs.test_faults import (  # noqa: F401 - the daemon fixture
    BLOCK,
    Daemon,
    Session,
    check_file,
    daemon,
    mount,
    mounts,
    payload,
    run,
    session,
    start_writer,
    unmount_quietly,
    wait_for,
)


def add_logon_key(s: Session, directory: Path, key: bytes, tmp: Path) -> str:
    """Put ``key`` in the session's @s as ``logon keyfence:<id>`` and give
    ``directory`` (empty) that policy; the key's serial."""
    ref = f"keyfence:{MasterKey(key).identifier}"
    secret = tmp / "key"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    try:
        serial = s.ok(f"kfctl padd logon {ref} @s < {secret}").strip()
    finally:
        secret.unlink()
    s.ok(f"python3 -c \"import os; os.setxattr('{directory}', 'user.keyfence.policy', b'{ref}')\"")
    return serial


def open_files_of_writer(tmp: Path, directory: Path) -> dict[str, str]:
    """name -> /proc/PID/fd/N of the files under ``directory`` that the
    session's writer (tests/fs/test_faults.py WRITER) holds open."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp / "writer.py").encode() not in f.read():
                    continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                # the kernel says "(deleted)": the name was invalidated at the wipe
                target = os.readlink(f"/proc/{pid}/fd/{fd}").removesuffix(" (deleted)")
                if os.path.dirname(target) == str(directory):
                    out[os.path.basename(target)] = f"/proc/{pid}/fd/{fd}"
        except OSError:
            continue
    return out


def dropped_report(of: Daemon) -> dict[str, int] | None:
    """The files and bytes an emergency dropped, as ``keyfence status
    --json`` reports them (the text shows one line a file)."""
    listing = json.loads(run(of, "keyfence status --json").stdout)
    for listed in listing["mounts"]:
        for report in listed["dropped"]:
            return {str(k): int(v) for k, v in report["files"].items()}
    return None


def test_emergency_clear_wipes_at_once_and_reports_the_loss(
    daemon: Daemon,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    pid = mount(daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
    home = mnt / "home"
    home.mkdir()
    key = os.urandom(64)
    files = {"synced": 1 << 20, "a": 96 << 20, "b": (32 << 20) + 123}
    try:
        with session(daemon) as s:
            add_logon_key(s, home, key, tmp_path)
            start_writer(s, home, tmp_path, "em", files)
            assert daemon.process is not None
            # the control: the key is there to be found before
            assert addresses_in_memory(daemon.process.pid, key), "the search cannot find the key"
            assert addresses_in_memory(pid, key), "the search cannot find the worker's key"
            # `&&`: a kfctl that fails fails the step (not only the echo after it)
            wipe = "kfctl --emergency clear @s"
            out = s.ok(f"t=$(date +%s%N); {wipe} && echo $(( $(date +%s%N) - t ))")
            took = int(out.split()[-1]) / 1e9
            print(f"kfctl --emergency clear (a whole kfctl process) returned in {took:.3f} s")
            # not a speed figure (0.1-0.3 s here; a busy machine takes
            # longer to start kfctl alone): that nothing waited is shown by
            # the report below, the unsynced files dropped, not written back
            assert took < 10.0, took
            # the mount's account: exactly the unsynced files and their bytes
            wait_for("the mount's report", lambda: dropped_report(daemon) is not None, 10)
            assert dropped_report(daemon) == {"home/a": files["a"], "home/b": files["b"]}
            text = mounts(daemon)
            assert f"{mnt}: dropped in an emergency: home/a ({files['a']:,} bytes)" in text, text
            # the key's bytes are gone from both processes
            assert addresses_in_memory(daemon.process.pid, key) == []
            assert addresses_in_memory(pid, key) == []
            # nothing of the plaintext through the mount: names, contents
            names = os.listdir(home)
            assert not set(names) & set(files), names
            with pytest.raises(OSError) as err:
                (home / "a").read_bytes()
            assert err.value.errno in (errno.ENOENT, errno.ENOKEY)
            _code, out = s.do(f"cat {home}/a | head -c 16 | od -c")
            assert "No such file" in out, out
            # the inode the writer still has open: reopened through /proc, ENOKEY
            opened = open_files_of_writer(tmp_path, home)
            assert set(opened) == set(files), opened
            for name, proc_path in opened.items():
                with pytest.raises(OSError) as err:
                    fd = os.open(proc_path, os.O_RDONLY)
                    try:
                        os.read(fd, BLOCK)
                    finally:
                        os.close(fd)
                assert err.value.errno == errno.ENOKEY, (name, err.value)
        for path in backing.rglob("*"):
            assert path.name not in files
            if path.is_file():
                data = path.read_bytes()
                for name, size in files.items():
                    first = payload("em" + name, min(size, BLOCK))
                    assert first not in data
        # the key again: what was fsync'd reads back; what was dropped is gone
        with session(daemon) as s:
            ref = f"keyfence:{MasterKey(key).identifier}"
            secret = tmp_path / "key"
            secret.write_bytes(key)
            s.ok(f"kfctl padd logon {ref} @s < {secret}; rm {secret}; ls {home} >/dev/null")
            check_file(home / "synced", "em", files["synced"])
            for name in ("a", "b"):
                data = (home / name).read_bytes()
                assert data == payload("em" + name, files[name])[: len(data)]
    finally:
        unmount_quietly(mnt)
