"""Running keyfence code as other uids, for tests about who may do what.

The venv's interpreter may live where other uids cannot reach it (under
``/root``, mode 0700), so processes of other uids run ``/usr/bin/python3``
(same minor version, so the venv's compiled extensions load) with the
checkout's ``src`` and the venv's site-packages on ``PYTHONPATH``.

Users: :func:`ensure_user` makes a real account (``useradd``) with a
password, for PAM logins; tests pick names with their own prefix so that
concurrent test runs never share an account.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import keyfence

SYSTEM_PYTHON = "/usr/bin/python3"
"""The interpreter other uids run."""


def src_dir() -> Path:
    """The directory that holds the ``keyfence`` package."""
    return Path(keyfence.__file__).resolve().parents[1]


def pythonpath() -> str:
    paths = sysconfig.get_paths()
    return os.pathsep.join(dict.fromkeys([str(src_dir()), paths["purelib"], paths["platlib"]]))


def _readable_by_others(path: Path) -> bool:
    """Whether every directory from / down to ``path`` lets others search it."""
    for part in [path, *path.parents]:
        try:
            if not os.stat(part).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def why_no_other_uids() -> str | None:
    """Why processes of other uids cannot run keyfence here, or None."""
    if os.geteuid() != 0:
        return "not root: cannot run processes under other uids"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: cannot run processes under other uids"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing: other uids cannot run the venv's interpreter"
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if version != [str(v) for v in sys.version_info[:2]]:
        return f"{SYSTEM_PYTHON} is Python {'.'.join(version)}, not this venv's"
    for path in (src_dir(), Path(sysconfig.get_paths()["purelib"])):
        if not _readable_by_others(path):
            return f"{path} is not reachable by other uids (a parent directory lacks o+x)"
    return None


def environment(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a keyfence process of another uid."""
    env = dict(os.environ if base is None else base)
    env.pop("VIRTUAL_ENV", None)
    env.update(PYTHONPATH=pythonpath(), PYTHONDONTWRITEBYTECODE="1", HOME="/", **extra)
    return env


def as_uid(
    uid: int,
    argv: Sequence[str],
    *,
    gid: int | None = None,
    groups: Sequence[int] = (),
) -> list[str]:
    """``argv`` run by ``setpriv`` as ``uid`` (real and effective), gid
    ``gid`` (default: the same number), with only ``groups`` as
    supplementary groups."""
    group_option = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
    gid = uid if gid is None else gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", group_option, *argv]


@contextlib.contextmanager
def reachable_directory(prefix: str, mode: int = 0o755) -> Iterator[Path]:
    """A fresh directory other uids can reach (``mode``; pytest's tmp_path
    is 0700), removed with everything in it afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def python_argv(*args: str) -> list[str]:
    """The system interpreter with ``args`` (``-c CODE``, ``-m MODULE``...)."""
    return [SYSTEM_PYTHON, *args]


def kfctl_argv(*args: str) -> list[str]:
    return python_argv("-m", "keyfence.cli.kfctl", *args)


def keyfence_argv(*args: str) -> list[str]:
    return python_argv("-m", "keyfence.cli.main", *args)


def ensure_user(name: str, *, password: str | None = None, home: bool = True) -> pwd.struct_passwd:
    """A real account ``name`` (made with useradd if missing), its password
    set when given.  Root only."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--user-group", "--shell", "/bin/bash"]
        argv += ["--create-home"] if home else ["--no-create-home"]
        subprocess.run([*argv, name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    if password is not None:
        subprocess.run(
            ["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True
        )
    return entry


@contextlib.contextmanager
def temporary_user(name: str, *, password: str | None = None) -> Iterator[pwd.struct_passwd]:
    """:func:`ensure_user` (no home), removed afterwards if it was made here:
    a test leaves no account behind.  Root only."""
    try:
        pwd.getpwnam(name)
        made = False
    except KeyError:
        made = True
    entry = ensure_user(name, password=password, home=False)
    try:
        yield entry
    finally:
        if made:
            remove_user(name)


def remove_user(name: str) -> None:
    """Remove an account made by :func:`ensure_user`, with its home."""
    subprocess.run(["userdel", "--remove", "--force", name], check=False, capture_output=True)
