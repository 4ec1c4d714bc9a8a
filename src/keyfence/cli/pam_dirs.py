"""The directories one ``keyfence pam`` step works on, each opened once.

``keyfence pam`` runs as root on paths a user may have listed
(``~/.config/keyfence/login.toml``) and may have made: symlinks anywhere
along them, swapped while the step runs, records crafted to cost root
memory and time.  So:

1. each listed directory is opened once, at the start of the step, and
   everything after goes through that descriptor (its policy, its
   protectors, the re-wrap's write, the status at logout): a name is never
   looked up twice, and a symlink swapped during a slow KDF changes nothing;
2. a directory the user listed must be the user's own (its owner), as one
   the user could set up with ``keyfence login add``;
3. it must be on a keyfence mount: on any other filesystem the policy and
   the protectors would be plain extended attributes anyone could invent;
4. the same directory listed twice (``/d``, ``/d/``, ``/d/.``, a symlink to
   it) counts once, by device and inode;
5. at most :data:`MAX_LOGIN_DIRS`: each costs a KDF at ``auth``, whose own
   cost fs/protector.py bounds (``LOGIN_MAX_*``).

Errors are log lines for the directory concerned; the others go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from keyfence.cli import dir_keys
from keyfence.cli.fs_commands import keyfence_devices
from keyfence.cli.login import listed_directories
from keyfence.cli.login_setup import LoginUser
from keyfence.fs.format import FormatError, KeyRef
from keyfence.fs.protector import LoginProtector

MAX_LOGIN_DIRS = 16

Log = Callable[..., None]


@dataclass(frozen=True, slots=True)
class LoginDir:
    """One listed directory, held open for the step."""

    path: str
    """As listed: for log lines only, never opened again."""
    fd: int
    ref: KeyRef


@contextlib.contextmanager
def opened_login_dirs(
    user: LoginUser, config_dir: str | None, log: Log
) -> Iterator[list[LoginDir]]:
    """The user's login directories, opened; closed when the step ends."""
    dirs: list[LoginDir] = []
    seen: set[tuple[int, int]] = set()
    devices = keyfence_devices()
    try:
        for path, users_own in listed_directories(user, config_dir):
            if len(dirs) == MAX_LOGIN_DIRS:
                log(
                    f"{user.name}: more than {MAX_LOGIN_DIRS} login directories listed; "
                    "the rest stay locked",
                    error=True,
                )
                break
            found = _open(path, user, users_own=users_own, seen=seen, devices=devices, log=log)
            if found is not None:
                dirs.append(found)
        yield dirs
    finally:
        for d in dirs:
            os.close(d.fd)


def _open(
    path: str,
    user: LoginUser,
    *,
    users_own: bool,
    seen: set[tuple[int, int]],
    devices: set[int],
    log: Log,
) -> LoginDir | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        log(f"{path!r}: cannot open it ({why(err)})", error=True)
        return None
    keep = False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen:
            return None
        if users_own and st.st_uid != user.uid:
            log(f"{path}: not {user.name}'s own directory; left locked", error=True)
            return None
        if st.st_dev not in devices:
            log(f"{path}: not on a keyfence mount (is it mounted?)", error=True)
            return None
        try:
            text = dir_keys.policy_of(fd)
            ref = KeyRef.from_description(text) if text is not None else None
        except (OSError, FormatError, UnicodeDecodeError) as err:
            log(f"{path}: cannot read its policy ({why(err)})", error=True)
            return None
        if ref is None:
            log(f"{path}: not an encrypted keyfence directory", error=True)
            return None
        seen.add((st.st_dev, st.st_ino))
        keep = True
        return LoginDir(path, fd, ref)
    finally:
        if not keep:
            os.close(fd)


@contextlib.contextmanager
def login_protector(d: LoginDir, user: LoginUser) -> Iterator[tuple[int, LoginProtector] | None]:
    """(descriptor of the directory holding ``d``'s protectors, the user's
    login protector there), or None.  Errors: OSError, KeyfenceError (a
    malformed record)."""
    where = dir_keys.protectors_fd(d.fd)
    if where is None:
        yield None
        return
    try:
        found = dir_keys.read_protectors(where).login_for(user.uid)
        yield (where, found) if found is not None else None
    finally:
        os.close(where)


def why(err: BaseException) -> str:
    """An error's text for a log line: the errno's for a plain OSError."""
    if type(err) is OSError and err.strerror:
        return err.strerror
    return str(err)
