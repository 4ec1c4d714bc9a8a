"""Which socket a client trusts, and which directory a daemon binds in.

A client hands the daemon passwords and master keys, so it speaks only to a
daemon no one else could have put in its way (ssh-agent and gpg-agent work
the same way):

1. A per-user daemon lives in a directory that is ours, mode 0700 (no
   group or other bits), and not a symlink.  The client checks it with
   lstat before connecting (the last component is never followed) and, when
   it starts a daemon, creates it with mode 0700 and checks it again before
   writing anything into it.  Someone else's directory, or ours left open,
   is refused with a message naming the path and what is wrong.
2. Right after ``connect()``, before a byte is sent, the server's
   ``SO_PEERCRED`` must show root or ourselves (the system daemon's socket:
   root only).  This is what makes every other check an optimisation: a
   socket planted anywhere by another uid is refused here.
3. A daemon binds only in a directory owned by itself or root that no one
   else may write (:func:`prepare_bind_dir`), so no one can replace its
   socket or hold its lock file.

Imported by every client at start-up: ``os`` and ``_socket`` only.
"""

from __future__ import annotations

import _socket
import errno
import posix  # not os: kfctl's start-up (os costs it 1.7 ms); os where it creates
import stat
import sys

from keyfence.errors import KeyfenceError


def _refuse(code: int, text: str) -> KeyfenceError:
    return KeyfenceError(code, text)


def uid_is_mapped(uid: int) -> bool:
    """Whether our user namespace maps ``uid`` to a real uid.

    In one that does not (``unshare -U`` with no map), every outside uid,
    ours included, shows as the overflow uid (65534): an owner or a
    ``SO_PEERCRED`` equal to ours then proves nothing, and another user's
    socket would pass for our own."""
    try:
        with open("/proc/self/uid_map", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return uid != 65534  # no /proc: only the overflow uid is suspect
    for line in lines:
        fields = line.split()
        if len(fields) == 3 and int(fields[0]) <= uid < int(fields[0]) + int(fields[2]):
            return True
    return False


def _unmapped(uid: int, what: str) -> KeyfenceError:
    return _refuse(
        errno.EACCES,
        f"refusing {what}: this user namespace does not map your uid (every other"
        f" user shows as uid {uid} here, as you do), so who made it cannot be told;"
        " map your uid (unshare --map-current-user) or run this outside the namespace",
    )


def check_private_dir(path: str, what: str = "keyfence socket directory") -> None:
    """``path`` is a directory of ours with mode 0700 (or stricter), not a
    symlink.  FileNotFoundError when it does not exist (the caller may then
    create it); KeyfenceError naming the path and the fault otherwise."""
    uid = posix.geteuid()
    st = posix.lstat(path)  # raises FileNotFoundError: nothing there yet
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(errno.ELOOP, f"refusing {what} {path}: it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(errno.ENOTDIR, f"refusing {what} {path}: it is not a directory")
    if st.st_uid == uid and not uid_is_mapped(uid):
        raise _unmapped(uid, f"{what} {path}")
    if st.st_uid != uid:
        raise _refuse(
            errno.EACCES,
            f"refusing {what} {path}: it belongs to uid {st.st_uid}, not to you"
            f" (uid {uid}); someone else may have made it",
        )
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise _refuse(
            errno.EACCES,
            f"refusing {what} {path}: its mode is {mode:04o}, others may use it;"
            f" it must be 0700 (chmod 700 {path})",
        )


def make_private_dir(path: str) -> None:
    """Create ``path`` (and missing parents) with mode 0700 if it does not
    exist, then check it as :func:`check_private_dir` does."""
    try:
        check_private_dir(path)
        return
    except FileNotFoundError:
        pass  # make it
    import os

    parent = os.path.dirname(path.rstrip("/"))
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:  # noqa: SIM105 - contextlib costs a client start-up time
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made meanwhile: the check below decides
    check_private_dir(path)


def prepare_bind_dir(directory: str, *, private: bool) -> None:
    """The directory a daemon binds its socket and lock file in.

    Created (mode 0700 for a private daemon, 0755 for the system one) when
    missing; then it must not be a symlink, must belong to us or root, and
    no group or other may write it (they could replace the socket or hold
    the lock file).  KeyfenceError naming the directory otherwise."""
    import os

    directory = directory or "."
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o700 if private else 0o755, exist_ok=True)
    st = os.lstat(directory)
    where = f"refusing to serve in {directory}"
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(errno.ELOOP, f"{where}: it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(errno.ENOTDIR, f"{where}: it is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise _refuse(errno.EACCES, f"{where}: it belongs to uid {st.st_uid}")
    if st.st_uid != 0 and not uid_is_mapped(st.st_uid):
        raise _unmapped(st.st_uid, where)
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise _refuse(
            errno.EACCES,
            f"{where}: its mode is {mode:04o}, others may write it; use a directory"
            " of your own (mode 0700 or 0755)",
        )


def peer_uid(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that listens on ``sock``'s other end."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid = int.from_bytes(raw[0:4], sys.byteorder, signed=True)
    uid = int.from_bytes(raw[4:8], sys.byteorder)
    return pid, uid


def check_server(sock: _socket.socket, path: str, *, root_only: bool = False) -> None:
    """Refuse (closing ``sock``) unless the server is root or ourselves.

    Call right after connect, before sending anything."""
    me = posix.geteuid()
    try:
        pid, uid = peer_uid(sock)
    except OSError as err:
        sock.close()
        raise _refuse(
            err.errno or errno.EPROTO, f"cannot tell who serves {path}: {err.strerror}"
        ) from None
    allowed = (0,) if root_only else (0, me)
    if uid in allowed:
        if uid == 0 or uid_is_mapped(uid):
            return
        sock.close()
        raise _unmapped(uid, f"the keyfence socket {path}")
    sock.close()
    if not uid_is_mapped(uid):
        # root (the system daemon) is not mapped in a user's own namespace:
        # it shows as the overflow uid, as every other unmapped user does
        raise _refuse(
            errno.EACCES,
            f"refusing the keyfence socket {path}: its server's uid is not mapped in this"
            f" user namespace (it shows as uid {uid}, as every unmapped user does), so"
            " root cannot be told from anyone else; run kfctl outside the namespace",
        )
    whom = "root" if root_only else f"you (uid {me}) or root"
    raise _refuse(
        errno.EACCES,
        f"refusing the keyfence socket {path}: its server runs as uid {uid} (pid {pid}),"
        f" not as {whom}; someone else may have put it there",
    )
