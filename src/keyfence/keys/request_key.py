"""request_key(2)'s upcall: constructing a key that was not found.

When request_key() is given callout info and finds nothing, the kernel
makes the key itself, *uninstantiated*, links it into the destination
keyring, and runs /sbin/request-key with an *authorisation key* that lets
that handler (and only it) instantiate, negate or reject the new key.
Everyone who asks for the key meanwhile waits for the outcome.  keyfence
does the same (security/keys/request_key.c, request_key_auth.c):

1. :class:`Construction` is the key under construction, its authorisation
   key (type ``.request_key_auth``, description the target serial in hex,
   payload the callout info: what ``keyctl read @a`` shows), the requester
   and the keyring the key was linked into (what ``%S``-style destinations
   in instantiate/reject resolve to).
2. The service calls an *upcall hook* (the daemon's: it runs the handler
   chosen by request-key.conf as the requesting user) and grants the
   handler's process the authority (:meth:`Constructions.grant_locked`).
   Without a hook, the construction fails at once as it does on a kernel
   whose /sbin/request-key cannot be run: the requester gets ENOENT and
   the key is negated.
3. A process holds the authority it was granted, or the one it assumed
   (KEYCTL_ASSUME_AUTHORITY), or one its ancestors hold -- children inherit
   credentials across fork, as they inherit ``cred->request_key_auth``.
4. The handler instantiates (the key becomes a normal, positive key) or
   negates/rejects it (a *negative* key: for ``timeout`` seconds a request
   or lookup of it fails with the given error); a handler that ends
   without doing either leaves the key negated with ENOKEY for
   :data:`KEY_NEGATIVE_TIMEOUT` seconds.  Either way the authorisation key
   is destroyed and the waiters wake.

Lock rule: every method here expects the service lock held (``_locked``);
:attr:`Construction.done` is waited on without it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING

from keyfence.keys.key_type import KeyType

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.key import Key

KEY_NEGATIVE_TIMEOUT = 60
"""Seconds a key stays negative when its handler gave no answer
(/proc/sys/kernel/keys/... key_negative_timeout)."""

AUTH_KEY_TYPE = KeyType(".request_key_auth", readable=True, updatable=False)
"""The authorisation key's type; its name starts with '.', so no caller can
add or request one (check_type_name refuses it with EPERM)."""

AUTH_KEY_PERM = 0x1B010000
"""POS_VIEW | POS_READ | POS_SEARCH | POS_LINK | USR_VIEW (request_key_auth_new)."""

_KERNEL_ONLY_ERRORS = frozenset({512, 513, 514, 516})
"""ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK."""

ProcessId = tuple[int, int]
"""(pid, start time): a process, never a recycled pid."""


class Outcome(Enum):
    PENDING = "pending"
    INSTANTIATED = "instantiated"
    NEGATIVE = "negative"


class Construction:
    """One key under construction (the kernel's request_key_auth payload)."""

    __slots__ = ("auth", "callout", "dest", "done", "error", "key", "outcome", "requester")

    def __init__(
        self, key: Key, auth: Key, callout: str, requester: Caller, dest: Key | None
    ) -> None:
        self.key = key
        self.auth = auth
        self.callout = callout
        self.requester = requester
        self.dest = dest
        self.outcome = Outcome.PENDING
        self.error = 0
        """The errno a negative key answers with."""
        self.done = threading.Event()

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    def __repr__(self) -> str:
        return f"<Construction of key {self.key.serial} {self.outcome.value}>"


UpcallHook = Callable[[Construction], None]
"""Starts the handler for a construction and returns; raising OSError
means it could not be started (the requester gets that errno)."""


def check_reject_error(error: int) -> None:
    """keyctl_reject_key(): a real, user-visible errno, else EINVAL."""
    from keyfence.keys.errors import fail

    if error <= 0 or error >= 4095 or error in _KERNEL_ONLY_ERRORS:  # MAX_ERRNO
        raise fail(errno.EINVAL, f"{error} is not an error a key can be rejected with")


class Constructions:
    """Keys under construction and the processes holding authority over them.

    Mutated only with the service lock held.
    """

    def __init__(self) -> None:
        self.by_key: dict[Key, Construction] = {}
        """Every key made by an upcall while it lives: pending or negative."""
        self.granted: dict[ProcessId, Construction] = {}
        """Handlers, given the authority when started."""
        self.assumed: dict[ProcessId, Construction | None] = {}
        """KEYCTL_ASSUME_AUTHORITY; None: given up explicitly."""

    def __bool__(self) -> bool:
        return bool(self.granted or self.assumed)

    def of_locked(self, key: Key) -> Construction | None:
        return self.by_key.get(key)

    def grant_locked(self, construction: Construction, process: ProcessId) -> None:
        if construction.pending:
            self.granted[process] = construction

    def authority_locked(self, lineage: Iterable[ProcessId]) -> Construction | None:
        """The pending construction a process acts for: its own assumed or
        granted authority, else its nearest ancestor's."""
        for process in lineage:
            if process in self.assumed:
                held = self.assumed[process]
                return held if held is not None and held.pending else None
            granted = self.granted.get(process)
            if granted is not None:
                return granted if granted.pending else None
        return None

    def assume_locked(self, process: ProcessId, construction: Construction | None) -> None:
        self.assumed[process] = construction

    def finish_locked(self, construction: Construction, outcome: Outcome, error: int = 0) -> None:
        """Record the outcome and forget every authority over it; the
        caller destroys the authorisation key and wakes the waiters."""
        construction.outcome = outcome
        construction.error = error
        if outcome is Outcome.INSTANTIATED:
            self.by_key.pop(construction.key, None)
        for table in (self.granted, self.assumed):
            for process in [p for p, c in table.items() if c is construction]:
                del table[process]

    def forget_key_locked(self, key: Key) -> None:
        """A negative key was destroyed."""
        self.by_key.pop(key, None)
