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
   handler's process the authority (:meth:`Constructions.grant_locked`)
   and a session keyring of its own, ``_req.<serial>`` holding the
   authorisation key (:func:`keyfence.keys.upcall.grant`).
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
   is destroyed and the waiters wake; the requester that started the
   construction returns only when the handler has exited, so it sees what
   the handler did after instantiating (a timeout, permissions, links).
5. A process keeps the authority it holds after the key is done, *spent*
   (``cred->request_key_auth`` still names the dead authorisation key),
   until it exits or assumes another: a second instantiate, negate or
   reject by it then fails as the kernel's does (the destination looked up
   without the requester's keyrings, then EBUSY), not with EPERM.  The
   service forgets it with the process (:meth:`Constructions.processes_locked`
   are among the processes the daemon watches for exit).

Lock rule: every method here expects the service lock held (``_locked``).
Who waits for a construction waits on the service's condition for it to be
no longer :attr:`~Construction.pending`; :attr:`Construction.handler_gone`
is waited on without the lock.
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

    __slots__ = (
        "auth",
        "callout",
        "dest",
        "error",
        "handler_gone",
        "key",
        "outcome",
        "requester",
    )

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
        self.handler_gone = threading.Event()
        """Set when the handler has exited (or none could run): the requester
        that started the construction returns only then, as the kernel's
        call_sbin_request_key() waits for /sbin/request-key (UMH_WAIT_PROC)."""

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    def __repr__(self) -> str:
        return f"<Construction of key {self.key.serial} {self.outcome.value}>"


UpcallHook = Callable[[Construction], None]
"""Starts the handler for a construction and returns; raising OSError
means it could not be started (the requester gets that errno).  Once the
handler has exited, :func:`keyfence.keys.upcall.handler_ended` must be
called (the requester waits for it)."""


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

    def held_locked(self, lineage: Iterable[ProcessId]) -> Construction | None:
        """The construction a process acts for (``cred->request_key_auth``):
        its own assumed or granted authority, else its nearest ancestor's;
        pending or spent (step 5)."""
        for process in lineage:
            if process in self.assumed:
                return self.assumed[process]
            granted = self.granted.get(process)
            if granted is not None:
                return granted
        return None

    def authority_locked(self, lineage: Iterable[ProcessId]) -> Construction | None:
        """The pending construction a process acts for; None if what it
        holds is spent."""
        held = self.held_locked(lineage)
        return held if held is not None and held.pending else None

    def assume_locked(self, process: ProcessId, construction: Construction | None) -> None:
        self.assumed[process] = construction

    def finish_locked(self, construction: Construction, outcome: Outcome, error: int = 0) -> None:
        """Record the outcome; every authority over it is spent from now on
        (step 5).  The caller destroys the authorisation key and wakes the
        waiters."""
        construction.outcome = outcome
        construction.error = error
        if outcome is Outcome.INSTANTIATED:
            self.by_key.pop(construction.key, None)

    def processes_locked(self) -> set[ProcessId]:
        """Every process holding an authority (pending or spent) or having
        given one up: forgotten when it exits."""
        return {*self.granted, *self.assumed}

    def forget_process_locked(self, process: ProcessId) -> None:
        """``process`` exited: its credentials, and what they held, are gone."""
        self.granted.pop(process, None)
        self.assumed.pop(process, None)

    def forget_key_locked(self, key: Key) -> None:
        """A negative key was destroyed."""
        self.by_key.pop(key, None)
