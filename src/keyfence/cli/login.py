"""``keyfence login``: which directories the login passphrase unlocks.

fscrypt's model: a directory's master key is wrapped under a key derived
from the user's login passphrase (a *login protector*, kept with the
directory's policy, see keyfence.fs.protector), and ``keyfence pam``
unwraps it at login.  The list of such directories lives outside them,
since an encrypted home cannot hold the list that unlocks it:

* the system list ``/etc/keyfence/login/<user>.toml`` (root writes it:
  ``keyfence login add --user NAME DIR``; ``--config-dir`` or
  ``$KEYFENCE_LOGIN_DIR`` moves it, for tests);
* the user's own ``~/.config/keyfence/login.toml`` (``keyfence login add
  DIR`` by the user), read at login only if the home is readable then and
  the file is the user's and not writable by others.

Both are TOML with one key::

    directories = ["/home/alice", "/srv/alice-notes"]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pwd
import stat
import tomllib

from keyfence.cli import login_setup
from keyfence.cli.login_setup import LoginUser
from keyfence.errors import KeyfenceError
from keyfence.option_values import count_in

DEFAULT_SYSTEM_DIR = "/etc/keyfence/login"
USER_CONFIG = os.path.join(".config", "keyfence", "login.toml")
MAX_CONFIG_SIZE = 65536


def lookup_user(name: str) -> LoginUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise KeyfenceError(errno.ENOENT, f"no such user: {name!r}") from None
    return LoginUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def system_dir(option: str | None = None) -> str:
    return option or os.environ.get("KEYFENCE_LOGIN_DIR") or DEFAULT_SYSTEM_DIR


def system_config(user: LoginUser, config_dir: str | None = None) -> str:
    if not user.name or "/" in user.name or user.name.startswith("."):
        raise KeyfenceError(errno.EINVAL, f"unusable user name {user.name!r}")
    return os.path.join(system_dir(config_dir), f"{user.name}.toml")


def user_config(user: LoginUser) -> str:
    return os.path.join(user.home, USER_CONFIG)


def _read_config(path: str, owner: int) -> list[str]:
    """Directories listed in ``path``: owned by ``owner`` or root, not
    writable by others, a regular file reached without a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyfenceError(errno.EINVAL, f"{path}: not a regular file")
        if st.st_uid not in (owner, 0) or st.st_mode & 0o022:
            raise KeyfenceError(errno.EPERM, f"{path}: not owned by the user or writable by others")
        data = os.read(fd, MAX_CONFIG_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_SIZE:
        raise KeyfenceError(errno.EFBIG, f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise KeyfenceError(errno.EINVAL, f"{path}: {err}") from None
    dirs = doc.get("directories", [])
    if not isinstance(dirs, list) or not all(
        isinstance(d, str) and d.startswith("/") for d in dirs
    ):
        raise KeyfenceError(errno.EINVAL, f"{path}: directories must be a list of absolute paths")
    return list(dirs)


def login_directories(user: LoginUser, config_dir: str | None = None) -> list[str]:
    """The system list, then the user's own; duplicates once."""
    return [path for path, _ in listed_directories(user, config_dir)]


def listed_directories(user: LoginUser, config_dir: str | None = None) -> list[tuple[str, bool]]:
    """(path, listed by the user) for the system list, then the user's own;
    a path in both counts as the system's."""
    out = dict.fromkeys(_read_config(system_config(user, config_dir), 0), False)
    # an encrypted (locked) or unreadable home: only the system list
    with contextlib.suppress(OSError):
        for path in _read_config(user_config(user), user.uid):
            out.setdefault(path, True)
    return list(out.items())


def _write_config(path: str, dirs: list[str], owner: LoginUser | None) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755 if owner is None else 0o700, exist_ok=True)
    body = "# keyfence login: directories unlocked with the login passphrase\n"
    body += "directories = [\n" + "".join(f"  {_toml_string(d)},\n" for d in dirs) + "]\n"
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


# -- commands


def _kdf_cost(text: str) -> int:
    """log2 of scrypt's N (r = 8, p = 1), within a login's budget (fs/protector.py)."""
    try:
        return count_in(10, 18, "power of two")(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _target_user(args: argparse.Namespace) -> tuple[LoginUser, bool]:
    """(user, use the system list)."""
    if args.user is not None:
        if os.geteuid() != 0:
            raise KeyfenceError(errno.EPERM, "only root may set up another user (--user)")
        return lookup_user(args.user), True
    entry = pwd.getpwuid(os.getuid())
    return LoginUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir), False


def _config_path(user: LoginUser, system: bool, args: argparse.Namespace) -> str:
    return system_config(user, args.config_dir) if system else user_config(user)


def cmd_add(args: argparse.Namespace) -> int:
    """Give DIR a login protector and list it (a new empty DIR is encrypted
    with a new random key first, as ``fscrypt encrypt --source=pam_passphrase``)."""
    user, system = _target_user(args)
    path = os.path.abspath(args.dir)
    login_setup.add_login_protector(path, user, kdf_log2_n=args.kdf_cost)
    config = _config_path(user, system, args)
    dirs = _read_config(config, user.uid)
    if path not in dirs:
        _write_config(config, [*dirs, path], None if system else user)
    print(f"{path}: unlocked at {user.name}'s login (listed in {config})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from keyfence.cli import dir_keys

    user, system = _target_user(args)
    path = os.path.abspath(args.dir)
    config = _config_path(user, system, args)
    dirs = _read_config(config, user.uid)
    if path in dirs:
        _write_config(config, [d for d in dirs if d != path], None if system else user)
    where = dir_keys.protectors_dir(path)
    if where is not None:
        prot = dir_keys.read_protectors(where)
        if prot.login_for(user.uid) is not None:
            dir_keys.write_protectors(where, prot.without_login(user.uid))
    print(f"{path}: no longer unlocked at {user.name}'s login")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    user, system = _target_user(args)
    for d in (
        login_directories(user, args.config_dir)
        if not system
        else _read_config(system_config(user, args.config_dir), user.uid)
    ):
        print(d)
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    """Re-wrap DIR's key under a new login passphrase (old one asked)."""
    user, _system = _target_user(args)
    login_setup.change_passphrase(os.path.abspath(args.dir), user, kdf_log2_n=args.kdf_cost)
    print(f"{args.dir}: the new login passphrase opens it")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = sub.add_parser("login", help="directories the login passphrase unlocks (PAM)")
    lsub = login.add_subparsers(dest="login_command", required=True)
    for name, fn, helptext in (
        ("add", cmd_add, "protect DIR with the login passphrase and unlock it at login"),
        ("remove", cmd_remove, "stop unlocking DIR at login (drops the login protector)"),
        ("passwd", cmd_passwd, "re-wrap DIR's key under a new login passphrase"),
        ("list", cmd_list, "the directories unlocked at login"),
    ):
        p = lsub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("dir")
        p.add_argument("--user", help="(root) set up this user's login, in the system list")
        p.add_argument("--config-dir", help=f"system list directory (default {DEFAULT_SYSTEM_DIR})")
        p.add_argument("--kdf-cost", type=_kdf_cost, default=15, help=argparse.SUPPRESS)
        p.set_defaults(run=fn)
