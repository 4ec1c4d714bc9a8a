"""How a mount worker becomes its owner without ever being its owner's to open.

The worker is the only code outside the daemon that holds logon keys'
payloads (docs/security.md), so not even the mount's owner may read its
memory or ptrace it: it is non-dumpable.  The kernel checks that access
once, when ``/proc/PID/mem`` is opened or a ptrace attach made, and a
descriptor or an attach made while the process was open to its owner
outlives a later ``PR_SET_DUMPABLE`` 0.  A worker exec'd as its owner is
open to the owner (dumpable) from the exec until it hardens itself, after
the interpreter's start and its imports: time enough for a loop over
/proc to open it.

So a root daemon starts a user's worker as root, and the worker, first
thing in its ``main``:

1. hardens itself (:func:`harden`: not dumpable, no core file), while no
   one but root may open it;
2. takes the owner's identity from ``$KEYFENCE_WORKER_CREDENTIALS``
   (:func:`become_owner_from_environment`): supplementary groups, then
   all three gids, then all three uids, so that neither root's ids nor its
   capabilities remain, and checks that they took;
3. hardens itself again: a change of ids sets dumpability to the
   ``fs.suid_dumpable`` sysctl (0 by default, so it never was open).

What runs as root before step 2 is the interpreter's start and
keyfence's own modules, the code the root daemon itself runs; nothing the
user sent has been read yet.  A worker started as the daemon's own uid (a
per-user daemon, root's own mounts) has no variable and no change.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource

__all__ = ["CREDENTIALS_ENV", "become_owner_from_environment", "harden", "parse_credentials"]

CREDENTIALS_ENV = "KEYFENCE_WORKER_CREDENTIALS"
"""``UID:GID:G1,G2,...`` (the groups may be empty), set by the daemon
(server/mounts.py spells the same name and format)."""

PR_SET_DUMPABLE = 4
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the set*id calls


def harden() -> bool:
    """No core file, and not dumpable: neither the worker's own uid nor a
    crash can read its memory (keys, plaintext pages).  Whether prctl took."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def parse_credentials(spec: str) -> tuple[int, int, list[int]]:
    """``UID:GID:G1,G2,...`` as (uid, gid, groups); ValueError if it is not
    exactly that, or names root (root's workers need no change)."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"{CREDENTIALS_ENV} is not UID:GID:GROUPS")
    uid, gid = (_id(p) for p in parts[:2])
    groups = [_id(g) for g in parts[2].split(",")] if parts[2] else []
    if uid == 0:
        raise ValueError(f"{CREDENTIALS_ENV} names root")
    return uid, gid, groups


def _id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > _ID_MAX:
        raise ValueError(f"{CREDENTIALS_ENV}: {text!r} is not a user or group id")
    return int(text)


def become_owner_from_environment() -> bool:
    """Take the identity ``$KEYFENCE_WORKER_CREDENTIALS`` names, and forget
    the variable; whether there was one.  OSError if the ids did not take
    (EPERM: not started as root) or capabilities remain; ValueError if the
    variable is malformed.  Call it while the process has one thread."""
    spec = os.environ.pop(CREDENTIALS_ENV, None)
    if spec is None:
        return False
    uid, gid, groups = parse_credentials(spec)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if (
        os.getresuid() != (uid, uid, uid)
        or os.getresgid() != (gid, gid, gid)
        or sorted(set(os.getgroups())) != sorted(set(groups))
    ):
        raise OSError(errno.EPERM, "the mount owner's ids did not take")
    if _capabilities() != (0, 0):
        raise OSError(errno.EPERM, "capabilities remain after taking the owner's ids")
    return True


def _capabilities() -> tuple[int, int]:
    """This process's permitted and effective capability sets."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("CapPrm", "CapEff"):
                found[name] = int(value.strip(), 16)
    return found.get("CapPrm", -1), found.get("CapEff", -1)
