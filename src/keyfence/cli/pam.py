"""``keyfence pam``: a login's keys, driven by ``pam_exec`` (docs/login.md).

pam_exec forks, calls ``setsid()`` and execs us with ``PAM_TYPE``,
``PAM_USER``, ``PAM_SERVICE`` ... in the environment, as the PAM
application's uid (root for login, su, sshd); with ``expose_authtok`` the
password is on standard input (no newline; we also cut at a NUL).  Our
parent is the PAM application, which is what makes ``session_to_parent``
the way to give the login its session keyring, as ``pam_keyinit force``
does in-process.

* ``auth``: for each directory in the user's login list, unwrap its master
  key with the password (the login protector) and keep it in root's
  *stash* keyring ``keyfence-login:<user>`` (a ``user`` key described
  ``keyfence-login:<ref>``: a description no mount looks up, so the stash
  unlocks nothing by itself).
* ``open_session``: join a new anonymous session keyring, hand it to the
  PAM application (``session_to_parent``: every process of the login
  inherits it), give it to the user (chown), and put a ``logon`` key for
  each stashed directory key into it: the directories are unlocked for the
  login's processes.
* ``close_session``: ``clear @s`` through the fence with a bounded wait:
  the mount writes back and encrypts everything written in the session
  before we return; anything still open is logged (fscrypt's "incompletely
  locked").  When the user's last session ends the stash is cleared too.
* ``password`` (chauthtok): re-wrap each stashed key under the new password
  (no data is re-encrypted).  Without a stash (the user is not logged in)
  the old protector stays and a log line says to run ``keyfence login
  passwd DIR``.  Linux-PAM 1.5.2's pam_exec gives this step no password;
  ``--rewrap-on-auth`` then re-wraps at a login while a session is open
  (docs/login.md).

Errors never fail the PAM stack (exit 0) unless ``--strict``; a password
is never logged or shown.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import sys
import syslog
import time
from collections.abc import Callable, Iterator

from keyfence.cli import dir_keys, pam_check
from keyfence.cli.login import lookup_user
from keyfence.cli.login_setup import LoginUser
from keyfence.cli.pam_dirs import LoginDir, login_protector, opened_login_dirs, why
from keyfence.cli.terminal import shown
from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.fs.format import FormatError
from keyfence.fs.protector import LoginProtector, WrongPassphrase

KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
STASH_PERM = 0x3F3F0000
"""Possessor and owner (root) only: no other uid even sees the stash."""
DEFAULT_STATE_DIR = "/run/keyfence/pam"
MAX_AUTHTOK = 8192
DEFAULT_CLOSE_TIMEOUT = 60.0
AUTH_STASH_SECONDS = 300
"""How long keys a password authentication stashed wait for a session."""
CLEAR_MARGIN = 10.0
"""Seconds past ``--timeout`` the logout waits for its clearing child."""


class _Log:
    def __init__(self, service: str) -> None:
        syslog.openlog("keyfence-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        self.service = service

    def __call__(self, message: str, *, error: bool = False) -> None:
        # paths and file names in it are a user's: one line, no escapes
        # (a newline in a listed directory's name forged a second line)
        message = shown(message)
        syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_NOTICE, message)
        print(f"keyfence pam: {message}", file=sys.stderr, flush=True)


def _read_authtok() -> bytes:
    data = sys.stdin.buffer.read(MAX_AUTHTOK)
    data = data.split(b"\x00", 1)[0]
    return data[:-1] if data.endswith(b"\n") else data


def _stash_name(user: LoginUser) -> str:
    return f"keyfence-login:{user.name}"


def _stash(client: Client, user: LoginUser, *, create: bool) -> int | None:
    """Root's stash keyring for ``user`` (in root's @u), made if asked."""
    try:
        return int(client.search(KEY_SPEC_USER_KEYRING, "keyring", _stash_name(user)))
    except KeyfenceError as err:
        if err.errno not in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED):
            raise
    if not create:
        return None
    ring = int(client.add_key("keyring", _stash_name(user), None, KEY_SPEC_USER_KEYRING))
    client.setperm(ring, STASH_PERM)
    return ring


def _stash_expires(client: Client, ring: int, seconds: int) -> None:
    """Set the stash's timeout, and each key's in it (0: none): an
    expired keyring keeps its keys until the collector reaps it (the
    kernel's gc delay, 5 minutes more), so the keys themselves must expire
    for the master keys to be wiped on time."""
    client.set_timeout(ring, seconds)
    for serial in client.list_keyring(ring):
        with contextlib.suppress(KeyfenceError):
            client.set_timeout(serial, seconds)


def _stashed_keys(client: Client, user: LoginUser) -> dict[str, bytes]:
    """{key reference description: master key} from the stash."""
    ring = _stash(client, user, create=False)
    if ring is None:
        return {}
    out = {}
    for serial in client.list_keyring(ring):
        with contextlib.suppress(KeyfenceError):
            desc = client.describe(serial).split(";", 4)[-1]
            if desc.startswith("keyfence-login:"):
                out[desc.removeprefix("keyfence-login:")] = client.read(serial)
    return out


# -- the four PAM operations


def do_auth(
    client: Client,
    user: LoginUser,
    config_dir: str | None,
    log: _Log,
    *,
    rewrap: bool,
    state_dir: str = DEFAULT_STATE_DIR,
    stash_seconds: int = AUTH_STASH_SECONDS,
) -> int:
    """Unwrap into the stash.  With ``rewrap`` (the line runs only after the
    password was verified), a password the protector does not know while
    the stash holds the key means the password was changed: re-wrap.

    The stash is for this PAM application's own session: it is stamped
    with the application (``auth.UID``), and while the user has no session
    open it expires after :data:`AUTH_STASH_SECONDS` -- an authentication
    that no session follows (an aborted ssh login, ``sudo``) must leave
    neither the key in root's keyring nor an unlock for a later session
    that did not give the password (an ssh key login)."""
    authtok = _read_authtok()
    stashed = _stashed_keys(client, user) if rewrap else {}
    unlocked = 0
    ring: int | None = None
    with opened_login_dirs(user, config_dir, log) as dirs:
        for d in dirs:
            try:
                master = _unwrap(d, user, authtok, stashed, log)
            except (OSError, FormatError) as err:
                log(f"{d.path}: {why(err)}", error=True)
                continue
            if master is None:
                continue
            ring = _stash(client, user, create=True)
            assert ring is not None
            serial = client.add_key("user", f"keyfence-login:{d.ref.description}", master, ring)
            client.setperm(serial, STASH_PERM)
            unlocked += 1
    if unlocked:
        log(f"{user.name}: {unlocked} director{'y' if unlocked == 1 else 'ies'} ready to unlock")
        _stamp_auth(state_dir, user)
        with _session_count(state_dir, user) as count:
            if ring is not None and count(0) == 0:
                _stash_expires(client, ring, stash_seconds)
    return 0


def _unwrap(
    d: LoginDir, user: LoginUser, authtok: bytes, stashed: dict[str, bytes], log: _Log
) -> bytes | None:
    """``d``'s master key opened with the password, or None (logged).
    Errors: OSError, FormatError (TooCostly: a record above the login's
    budget, refused before any work)."""
    with login_protector(d, user) as found:
        if found is None:
            log(f"{d.path}: no login protector for {user.name}", error=True)
            return None
        where, protector = found
        try:
            return protector.unwrap(authtok, d.ref)
        except WrongPassphrase:
            if d.ref.description in stashed and authtok:
                _rewrap(d, where, protector, user, authtok, stashed[d.ref.description], log)
            else:
                log(f"{d.path}: the login password does not open it (changed without keyfence?)")
            return None


def do_open_session(
    client: Client, user: LoginUser, config_dir: str | None, state_dir: str, log: _Log
) -> int:
    ring = client.join_session_keyring(None)
    try:
        client.session_to_parent()
    except KeyfenceError as err:
        log(
            f"{user.name}: could not give the login its session keyring "
            f"(session_to_parent: {err.strerror or err})",
            error=True,
        )
        return 1
    # the login's @s is the user's, as pam_keyinit makes it (after the
    # handover: session_to_parent wants the caller's own keyring)
    client.chown(ring, user.uid, user.gid)
    _remember_session(state_dir, ring)
    ours = _take_auth_stamp(state_dir, user)
    with _session_count(state_dir, user) as count:
        stash = _stash(client, user, create=False)
        if count(0) == 0 and not ours:
            # no session open and no password given to this application:
            # what an earlier authentication left is not this login's
            stashed: dict[str, bytes] = {}
            if stash is not None:
                client.invalidate(stash)
                log(f"{user.name}: a stash no session used was dropped")
        else:
            stashed = _stashed_keys(client, user)
            if stash is not None:
                _stash_expires(client, stash, 0)  # held by the sessions now
        count(+1)
    with opened_login_dirs(user, config_dir, log) as dirs:
        for d in dirs:
            master = stashed.get(d.ref.description)
            if master is None:
                continue  # not authenticated with the password (ssh key...): stays locked
            serial = client.add_key(
                "logon", d.ref.description, dir_keys.keyring_payload(d.ref, master), ring
            )
            client.chown(serial, user.uid, user.gid)
            log(f"{user.name}: {d.path} unlocked (key {serial} in session keyring {ring})")
    return 0


def do_close_session(
    client: Client,
    user: LoginUser,
    config_dir: str | None,
    state_dir: str,
    timeout: float,
    log: _Log,
) -> int:
    """clear @s through the fence; log what is still open.

    Only the keyring open_session gave this PAM application: if that step
    failed, @s is whatever the application had (an admin's, for ``su``),
    which is not ours to clear.
    """
    ours = _remembered_session(state_dir)
    current = client.get_keyring_id(KEY_SPEC_SESSION_KEYRING, False)
    if ours is None or ours != current:
        log(f"{user.name}: close_session: @s is not the one open_session made; left alone")
        return 1
    with opened_login_dirs(user, config_dir, log) as dirs:
        return _close_session(client, user, dirs, state_dir, timeout, log)


def _close_session(
    client: Client,
    user: LoginUser,
    dirs: list[LoginDir],
    state_dir: str,
    timeout: float,
    log: _Log,
) -> int:
    status = 0
    dirty = 0
    for d in dirs:
        with contextlib.suppress(OSError, ValueError, KeyfenceError):
            dirty += int(dir_keys.status_of(d.fd).get("dirty_bytes", 0))
    log(f"{user.name}: logout: {dirty:,} bytes to write back")
    start = time.monotonic()
    try:
        keys = client.list_keyring(KEY_SPEC_SESSION_KEYRING)
        _clear_as(user, timeout)
        log(
            f"{user.name}: session keyring cleared ({len(keys)} keys) in "
            f"{time.monotonic() - start:.2f} s; everything written is on disk"
        )
    except KeyfenceError as err:
        try:
            left = client.list_keyring(KEY_SPEC_SESSION_KEYRING)
        except KeyfenceError:
            left = keys
        if left:
            log(
                f"{user.name}: logout could not lock in {timeout:g} s, keys left in place: "
                f"{err.strerror or err}",
                error=True,
            )
            status = 1
        else:  # the clear went through; what failed came after it
            log(f"{user.name}: session keyring cleared ({len(keys)} keys); {err.strerror or err}")
    for d in dirs:
        with contextlib.suppress(OSError, ValueError, KeyfenceError):
            files = dir_keys.status_of(d.fd).get("busy_files") or []
            if files:
                still = ", ".join(map(str, files))
                log(f"{d.path}: incompletely locked, still open: {still}", error=True)
    with _session_count(state_dir, user) as count:
        if count(-1) <= 0:
            ring = _stash(client, user, create=False)
            if ring is not None:
                client.invalidate(ring)
    return status


def _clear_as(user: LoginUser, timeout: float) -> None:
    """``clear @s`` with the user's ids switched in, as pam_keyinit revokes
    the session keyring (``change_uid``): the removal is the user's own, so
    the user's own watchers (a mount of theirs, flushing) are waited for
    without bound -- for a removal of root's they would be foreign, as a
    user's watcher on something root removes must be (docs/security.md,
    "Who a synchronous watcher may hold up").  A child process switches;
    it inherits this process's ``@s`` and connects to the same daemon.
    KeyfenceError with the child's errno and words if it fails."""
    from keyfence import paths
    from keyfence.keys.secret import disable_core_dumps

    path = paths.locate(None).path
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code, text = 0, ""
        try:
            # nothing of root's goes over: not its daemon connection (the
            # user could ptrace this process where fs.suid_dumpable allows
            # it), not the descriptors of the user's directories
            os.closerange(3, write_end)
            os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
            os.setgroups(os.getgrouplist(user.name, user.gid))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            disable_core_dumps()
            with Client.connect(path, autostart=False, name="keyfence-pam") as mine:
                mine.clear(KEY_SPEC_SESSION_KEYRING, timeout=timeout)
        except KeyfenceError as err:
            code, text = err.errno or errno.EIO, str(err.strerror or err)
        except BaseException as err:  # reported, never raised in the child
            code, text = errno.EIO, f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError):
            os.write(write_end, f"{code}\0{text}".encode(errors="replace")[:4096])
        os._exit(0 if code == 0 else 1)
    os.close(write_end)
    # the child has the user's uid, so the user may stop it (SIGSTOP): the
    # wait is bounded, and then root ends it
    deadline = time.monotonic() + timeout + CLEAR_MARGIN
    report = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            report += chunk
        else:
            os.kill(child, signal.SIGKILL)
            report = f"{errno.ETIMEDOUT}\0the clearing process did not finish".encode()
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    code_text, _, text = report.decode(errors="replace").partition("\0")
    code = int(code_text) if code_text.isdigit() else errno.EIO
    if code:
        raise KeyfenceError(code, text or "the session keyring was not cleared")


def _rewrap(
    d: LoginDir,
    where: int,
    old: LoginProtector,
    user: LoginUser,
    new: bytes,
    master: bytes,
    log: _Log,
) -> None:
    """Re-wrap ``master`` under ``new`` in the record of directory
    descriptor ``where`` (read and written through it, not by name)."""
    new_protector = LoginProtector.wrap(user.uid, new, master, d.ref, params=old.params)
    prot = dir_keys.read_protectors(where)
    dir_keys.write_protectors(where, prot.with_login(new_protector))
    log(f"{d.path}: login protector re-wrapped for the new password")


def do_chauthtok(client: Client, user: LoginUser, config_dir: str | None, log: _Log) -> int:
    new = _read_authtok()
    if not new:
        # Linux-PAM before 1.6 exposes the token to auth only: nothing here
        log(
            f"{user.name}: chauthtok got no password from pam_exec (this Linux-PAM gives it "
            "to auth only); --rewrap-on-auth re-wraps at a login while a session is open, "
            "else run keyfence login passwd DIR",
            error=True,
        )
        return 1
    stashed = _stashed_keys(client, user)
    status = 0
    with opened_login_dirs(user, config_dir, log) as dirs:
        for d in dirs:
            try:
                status |= _rewrap_for_chauthtok(d, user, new, stashed.get(d.ref.description), log)
            except (OSError, FormatError) as err:
                log(f"{d.path}: not re-wrapped: {why(err)}", error=True)
                status = 1
    return status


def _rewrap_for_chauthtok(
    d: LoginDir, user: LoginUser, new: bytes, master: bytes | None, log: _Log
) -> int:
    with login_protector(d, user) as found:
        if found is None:
            return 0
        if master is None:
            log(
                f"{d.path}: not re-wrapped ({user.name} is not logged in with the password): "
                f"its login protector still opens with the old one; run keyfence login passwd",
                error=True,
            )
            return 1
        _rewrap(d, found[0], found[1], user, new, master, log)
    return 0


def _alive(key: str) -> bool:
    """Whether the process named ``pid.start`` (:func:`_process_key`) still runs."""
    pid, _, start = key.partition(".")
    return pid.isdigit() and start not in ("", "0") and _process_key(int(pid))[0] == key


def _parent_key() -> str:
    """Our parent (the PAM application), named by pid and start time."""
    return _process_key(os.getppid())[0]


def _process_key(pid: int) -> tuple[str, int]:
    """(``pid.start``, its parent's pid) of a process; start 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return f"{pid}.{fields[19].decode()}", int(fields[1])
    except (OSError, ValueError, IndexError):
        return f"{pid}.0", 0


def _put_state(state_dir: str, name: str, text: str) -> None:
    """Write ``name`` in the state directory (0600, never through a link)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _take_state(state_dir: str, name: str) -> str | None:
    """Read ``name`` from the state directory and forget it (None: none)."""
    path = os.path.join(state_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 128).decode(errors="replace")
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


def _stamp_auth(state_dir: str, user: LoginUser) -> None:
    """This PAM application gave the user's password (auth.UID): it, and
    its parent -- sshd authenticates in a child of the connection's
    process, which then opens the session."""
    application, above = _process_key(os.getppid())
    _put_state(state_dir, f"auth.{user.uid}", f"{application} {_process_key(above)[0]}")


def _take_auth_stamp(state_dir: str, user: LoginUser) -> bool:
    """Whether this PAM application gave the password (the stamp is used up)."""
    return _parent_key() in (_take_state(state_dir, f"auth.{user.uid}") or "").split()


def _remember_session(state_dir: str, ring: int) -> None:
    _put_state(state_dir, f"session.{_parent_key()}", str(ring))


def _remembered_session(state_dir: str) -> int | None:
    """The keyring open_session made for our parent (forgotten once read)."""
    text = _take_state(state_dir, f"session.{_parent_key()}")
    return int(text) if text is not None and text.isdigit() else None


@contextlib.contextmanager
def _session_count(state_dir: str, user: LoginUser) -> Iterator[Callable[[int], int]]:
    """The user's number of open sessions, under a lock (pam_fscrypt's count).

    Counted as the PAM applications that opened them (``pid.start``, one a
    line; ``count(+1)`` adds ours, ``count(-1)`` removes it), and one that
    is gone no longer counts: a login program killed before its
    close_session (SIGKILL, a crash) left a bare number at 1 for ever, so
    the stash was never dropped and every later login without a password
    (an ssh key) unlocked the directories."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, f"{user.uid}.count")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        def count(delta: int) -> int:
            text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
            mine = _parent_key()
            live = [k for k in dict.fromkeys(text.split()) if k != mine and _alive(k)]
            if delta > 0 or (delta == 0 and mine in text.split() and _alive(mine)):
                live.append(mine)
            os.ftruncate(fd, 0)
            os.pwrite(fd, "".join(f"{k}\n" for k in live).encode(), 0)
            return len(live)

        yield count
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    pam_type = args.type or os.environ.get("PAM_TYPE", "")
    service = os.environ.get("PAM_SERVICE", "?")
    if service == pam_check.SERVICE:
        return 0  # `keyfence login add` checking a password (pam_check.py): no login
    log = _Log(service)
    if args.socket:
        os.environ["KEYFENCE_SOCKET"] = args.socket
    try:
        user = lookup_user(os.environ.get("PAM_USER", ""))
        with Client.connect(autostart=False, name="keyfence-pam") as client:
            if pam_type == "auth":
                status = do_auth(
                    client,
                    user,
                    args.config_dir,
                    log,
                    rewrap=args.rewrap_on_auth,
                    state_dir=args.state_dir,
                    stash_seconds=args.stash_seconds,
                )
            elif pam_type == "open_session":
                status = do_open_session(client, user, args.config_dir, args.state_dir, log)
            elif pam_type == "close_session":
                status = do_close_session(
                    client, user, args.config_dir, args.state_dir, args.timeout, log
                )
            elif pam_type in ("password", "chauthtok"):
                status = do_chauthtok(client, user, args.config_dir, log)
            else:
                status = 0  # account: nothing to do
    except (KeyfenceError, OSError, FormatError, ValueError) as err:
        text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        log(f"{pam_type}: {text}", error=True)
        if args.debug:
            import traceback

            traceback.print_exc(file=sys.stderr)
        status = 1
    return status if args.strict else 0


def _stash_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds, 1 to 86400: {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pam = sub.add_parser("pam", help="PAM hook for pam_exec (auth, open/close_session, password)")
    pam.add_argument(
        "type",
        nargs="?",
        choices=("auth", "open_session", "close_session", "password", "chauthtok", "account"),
        help="what to do (default: $PAM_TYPE, as pam_exec sets it)",
    )
    pam.add_argument("--socket", help="the daemon's socket (default: as keyfence.paths says)")
    pam.add_argument("--config-dir", help="system login lists (default /etc/keyfence/login)")
    pam.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="session counts (root only)")
    pam.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CLOSE_TIMEOUT,
        help="longest wait at logout for write-back, in seconds (keys stay after it)",
    )
    pam.add_argument(
        "--stash-seconds",
        type=_stash_seconds,
        metavar="1..86400",
        default=AUTH_STASH_SECONDS,
        help="how long auth's stash lives while the user has no session open "
        f"(default {AUTH_STASH_SECONDS})",
    )
    pam.add_argument("--debug", action="store_true", help="tracebacks on standard error")
    pam.add_argument(
        "--rewrap-on-auth",
        action="store_true",
        help="auth re-wraps a login protector the verified password does not open while "
        "another session holds its key (the line must run only after pam_unix succeeded)",
    )
    pam.add_argument(
        "--strict", action="store_true", help="fail the PAM stack on errors (default: never)"
    )
    pam.set_defaults(run=run)
