"""Callers and their special keyrings: @t, @p, @s, @u, @us.

The kernel hangs a thread, process and session keyring off each task's
credentials.  keyfence has no task to hang them on, so it keeps tables keyed
by who the caller is (docs/design.md, "Processes"; the caller itself is
keys/caller.py):

* @t by (pid, start time, tid); @p by (pid, start time), so a reused pid
  never inherits a dead process's keyring; with the program image they
  were made in (``Caller.image``), so that a process that has exec'd since
  loses them, as the kernel's exec drops them;
* @s by the caller's *session binding* (``Caller.session``): the daemon
  names it by the process itself, (pid, start time), and binds a process
  to the keyring its parent had at fork, as the kernel's credentials do
  (server/sessions.py follows the ancestry).  Many bindings may share one
  keyring; each holds an anchor, so the keyring ends when the last process
  holding it is gone.  A caller with no binding sees its user-session
  keyring, and gets a new anonymous ``_ses`` when it asks to create one
  (docs/keys.md, "Session keyrings");
* @u and @us by uid, created on first use and kept for good, as the
  kernel's are.

The tables *anchor* the keyrings they hold: a keyring anchored by a process
or session lives on with no links, and goes away through the fenced removal
path when its process exits or its last session binding goes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

from keyfence.constants import (  # the one copy of <keyutils.h>'s numbers (re-exported)
    KEY_SPEC_GROUP_KEYRING,
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_REQKEY_AUTH_KEY,
    KEY_SPEC_REQUESTOR_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING,
    KEY_SPEC_USER_SESSION_KEYRING,
)
from keyfence.keys.caller import Caller

__all__ = [
    "KEY_SPEC_GROUP_KEYRING",
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_REQKEY_AUTH_KEY",
    "KEY_SPEC_REQUESTOR_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_SPEC_USER_SESSION_KEYRING",
    "SPECIAL_NAMES",
    "Caller",
    "SpecialKeyrings",
    "boot_clock",
]

if TYPE_CHECKING:
    from keyfence.keys.key import Key


SPECIAL_NAMES = {
    "@t": KEY_SPEC_THREAD_KEYRING,
    "@p": KEY_SPEC_PROCESS_KEYRING,
    "@s": KEY_SPEC_SESSION_KEYRING,
    "@u": KEY_SPEC_USER_KEYRING,
    "@us": KEY_SPEC_USER_SESSION_KEYRING,
    "@g": KEY_SPEC_GROUP_KEYRING,
    "@a": KEY_SPEC_REQKEY_AUTH_KEY,
}


def boot_clock() -> float:
    """Seconds since boot (CLOCK_BOOTTIME): the clock of /proc's process
    start times, so a binding's time compares with a child's fork time."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class SpecialKeyrings:
    """The anchor tables.  Mutated only with the service lock held."""

    def __init__(self) -> None:
        self.threads: dict[tuple[int, int, int], Key] = {}
        self.processes: dict[tuple[int, int], Key] = {}
        self.sessions: dict[Hashable, Key] = {}
        """Session binding -> its keyring; each entry holds one anchor."""
        self.bound_at: dict[Hashable, float] = {}
        """Session binding -> when it got its keyring (boot_clock())."""
        self.users: dict[int, tuple[Key, Key]] = {}
        """uid -> (user keyring, user-session keyring)."""
        self.images: dict[tuple[int, int], bytes] = {}
        """Process -> the program image its @p and @t were made in, where known."""
        self.retired: dict[int, list[Key]] = {}
        """@p and @t keyrings an exec took from their process, by a token,
        until their fenced release applies (each keeps its anchor meanwhile)."""
        self._retire_ids = itertools.count(1)

    def thread_keyring(self, caller: Caller) -> Key | None:
        return self.threads.get(caller.thread)

    def process_keyring(self, caller: Caller) -> Key | None:
        return self.processes.get(caller.process)

    def session_keyring(self, caller: Caller) -> Key | None:
        if caller.session is None:
            return None
        return self.sessions.get(caller.session)

    def threads_of(self, pid: int, start_time: int) -> list[tuple[int, int, int]]:
        return [t for t in self.threads if t[0] == pid and t[1] == start_time]

    def made_in_locked(self, caller: Caller) -> None:
        """The caller's @p or @t was just made: remember its image."""
        if caller.image is not None:
            self.images.setdefault(caller.process, caller.image)

    def retire_locked(self, pid: int, start_time: int) -> int | None:
        """Take the process's @p and @t from it (an exec): none is found
        for it any more, and a new one is made on demand.  The token under
        which they wait for their release, or None if it had none."""
        self.images.pop((pid, start_time), None)
        rings = [self.threads.pop(t) for t in self.threads_of(pid, start_time)]
        process = self.processes.pop((pid, start_time), None)
        if process is not None:
            rings.append(process)
        if not rings:
            return None
        token = next(self._retire_ids)
        self.retired[token] = rings
        return token
