"""Where the daemon's socket is (docs/design.md, "Processes"; docs/security.md).

1. ``$KEYFENCE_SOCKET`` (or a path a caller gives): *explicit*.  If no
   daemon answers there it is an error, never a daemon started in its
   place (a mistyped variable must not start a stray daemon); ``keyfence
   daemon`` starts one there when asked.
2. The system daemon's ``/run/keyfence/sock`` (``$KEYFENCE_SYSTEM_SOCKET``
   where it is elsewhere) when it exists, or when we are root: trusted only
   if the server is root.
3. Else a private per-user daemon at ``$XDG_RUNTIME_DIR/keyfence/sock``; the
   runtime directory must be ours, mode 0700 and not a symlink.  Without
   ``XDG_RUNTIME_DIR``: ``/run/user/UID`` when logind made it, else
   ``/tmp/keyfence-UID``, a directory the client creates with mode 0700 and
   refuses if anyone else made it first.

The client checks every server's peer credentials in any case
(:mod:`keyfence.socket_trust`).
"""

from __future__ import annotations

import errno
import posix  # not os: its import costs kfctl 1.7 ms (os.environ's ABCs)
import stat
import sys

from keyfence import socket_trust
from keyfence.errors import KeyfenceError

SYSTEM_SOCKET = "/run/keyfence/sock"

EXPLICIT = "explicit"
SYSTEM = "system"
USER = "user"


class SocketPlace:
    """A socket path, how it was chosen, and what may be trusted there."""

    __slots__ = ("kind", "path", "private_dir", "source")

    def __init__(self, path: str, kind: str, source: str, private_dir: str | None = None) -> None:
        self.path = path
        self.kind = kind
        """EXPLICIT, SYSTEM or USER."""
        self.source = source
        """Where the path came from, for messages ("$KEYFENCE_SOCKET")."""
        self.private_dir = private_dir
        """USER: the per-user directory to check (and create to autostart)."""

    @property
    def root_only(self) -> bool:
        """Only a root server may answer here (the system daemon)."""
        return self.kind == SYSTEM and posix.geteuid() != 0


def environment(name: str) -> str | None:
    """``os.environ.get(name)`` without importing os (1.7 ms of kfctl's
    start-up).  Once os is imported its environ is the truth (putenv, a
    test's monkeypatch); before that nothing can have changed the
    environment this process started with, which posix.environ holds."""
    os = sys.modules.get("os")
    if os is not None:
        value = os.environ.get(name)
        return None if value is None else str(value)
    raw = posix.environ.get(name.encode())
    if raw is None:
        return None
    return raw.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _mode(path: str) -> int | None:
    """st_mode of ``path`` (following symlinks), None if it cannot be
    stat'ed (os.path.exists without os)."""
    try:
        return posix.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` if it is an absolute path: the XDG base
    directory specification makes a relative one invalid, to be ignored
    (one would give a daemon per working directory)."""
    runtime = environment("XDG_RUNTIME_DIR")
    return runtime if runtime and runtime.startswith("/") else None


def locate(path: str | None = None) -> SocketPlace:
    """Where to find the daemon; KeyfenceError if ``$XDG_RUNTIME_DIR`` is
    not a directory we can trust."""
    if path:
        return SocketPlace(path, EXPLICIT, "the socket path given")
    env = environment("KEYFENCE_SOCKET")
    if env:
        return SocketPlace(env, EXPLICIT, "$KEYFENCE_SOCKET")
    system = environment("KEYFENCE_SYSTEM_SOCKET") or SYSTEM_SOCKET
    if _mode(system) is not None or posix.geteuid() == 0:
        return SocketPlace(system, SYSTEM, "the system daemon")
    runtime = _runtime_dir()
    if runtime:
        try:
            socket_trust.check_private_dir(runtime, "$XDG_RUNTIME_DIR")
        except FileNotFoundError:
            raise KeyfenceError(
                errno.ENOENT, f"$XDG_RUNTIME_DIR {runtime} does not exist"
            ) from None
    else:
        logind = f"/run/user/{posix.geteuid()}"
        mode = _mode(logind)
        if mode is not None and stat.S_ISDIR(mode):
            socket_trust.check_private_dir(logind, "runtime directory")
            runtime = logind
    if runtime:
        directory = runtime + ("keyfence" if runtime.endswith("/") else "/keyfence")
    else:
        directory = f"/tmp/keyfence-{posix.geteuid()}"
    return SocketPlace(directory + "/sock", USER, "the per-user daemon", private_dir=directory)


def warm_socket() -> str:
    """Where kfctl's warm server listens (keyfence.cli.kfctl_warm):
    ``$KEYFENCE_KFCTL_SOCKET``, else ``kfctl.sock`` in the per-user keyfence
    directory, for root too.  kfctl_client.c computes the same; it trusts
    what it finds there only after checking the server's credentials, so
    this does not check the directory (the server does, binding)."""
    env = environment("KEYFENCE_KFCTL_SOCKET")
    if env:
        return env
    runtime = _runtime_dir()
    if not runtime:
        logind = f"/run/user/{posix.geteuid()}"
        mode = _mode(logind)
        runtime = logind if mode is not None and stat.S_ISDIR(mode) else None
    if runtime:
        return runtime.rstrip("/") + "/keyfence/kfctl.sock"
    return f"/tmp/keyfence-{posix.geteuid()}/kfctl.sock"


def autostart_allowed() -> bool:
    return (environment("KEYFENCE_NO_AUTOSTART") or "") not in ("1", "yes", "true")
