"""Which keys a mount holds, and how it hears that one is going away.

A directory's key is looked up the first time a request needs it, in the
keyrings of the process making the request (``KeySource.find`` with the
FUSE request's pid), as ext4 did.  A found key is *bound*: from then on the
directories under it are unlocked for every process that file permissions
allow, until the key goes away.  Each bound key has a synchronous watch
(``KeySource.watch``); its callback runs on a thread of the key source,
never on the trio thread, and calls :class:`KeyGoingListener.key_going` (flush,
evict, invalidate; docs/fs.md).  When the key has gone, the next request
simply looks again: another key with the same description in the
requester's keyrings unlocks the directories again.

A key going away whose *copy* (same description, hence same bytes) a
process with a file open under it still holds -- another login's
``@s`` -- does not lock anything: the binding moves to that copy
(:meth:`KeyBindings.move_to_copy`), as one logout must not lock a
directory under another login (docs/login.md).  Reads and writes carry no
caller, so without the move the other login's open files would fail with
ENOKEY until one of its processes happened to look the key up again.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from keyfence.errors import KeyfenceError
from keyfence.fs import e4crypt_compat
from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import FormatError, KeyKind, KeyRef
from keyfence.fs.fuse.handoff import on_trio_thread
from keyfence.fs.keysource import FoundKey, GoingAway, KeySource
from keyfence.keys.secret import wipe_bytes

__all__ = ["GOING_GRACE", "Binding", "KeyBindings", "KeyGoingListener"]

log = logging.getLogger("keyfence.fs.binding")

GOING_GRACE = 2.0
"""Seconds during which a key whose removal we were told about is not bound
again (its removal is applying); after that, a key that is still there (its
removal was aborted by another watcher) is found and bound again."""


@dataclass(eq=False)
class Binding:
    """A key the mount holds."""

    ref: KeyRef
    serial: int
    master: MasterKey = field(repr=False)
    bound_at: float = field(default_factory=time.monotonic)

    @property
    def description(self) -> str:
        return self.ref.description


class KeyGoingListener(Protocol):
    """What the bindings call when a bound key goes away (the mount)."""

    def key_going(self, binding: Binding, going: GoingAway) -> None: ...


class KeyBindings:
    """The bound keys of one mount: description -> :class:`Binding`.

    The table is read from any thread and changed under :attr:`lock`.
    """

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self.lock = threading.Lock()
        self._bound: dict[str, Binding] = {}
        self._watched: set[int] = set()
        self._going: dict[int, float] = {}
        self._finding: dict[str, trio.Lock] = {}
        self.user: KeyGoingListener | None = None
        self.unbound: Callable[[], None] | None = None
        """Called after a binding is dropped (on the thread that drops it):
        what cached "unlocked" elsewhere forgets it (fs/fuse/dir_attrs.py)."""
        self.clock: Callable[[], float] = time.monotonic

    # --------------------------------------------------------------- queries

    def get(self, ref: KeyRef) -> Binding | None:
        return self._bound.get(ref.description)

    def master(self, ref: KeyRef) -> MasterKey | None:
        binding = self._bound.get(ref.description)
        return None if binding is None else binding.master

    def bindings(self) -> list[Binding]:
        with self.lock:
            return list(self._bound.values())

    # ---------------------------------------------------------------- lookups

    async def unlock(self, ref: KeyRef, pid: int) -> MasterKey | None:
        """The master key for ``ref``: bound, or found in ``pid``'s keyrings.

        On the trio thread.  A key bound here may go away (and be wiped)
        before this task runs again, while the lookup's thread returns: it
        is then looked up once more, as the caller may hold another copy
        (or the same key, if that removal was aborted).  Without that, the
        request got ENOKEY from a key its caller had.  What is returned is
        not wiped: nothing on this thread can wipe it before the caller's
        next ``await`` (an emergency, on its own thread, still may).
        """
        for _attempt in range(2):
            binding = self._bound.get(ref.description)
            if binding is None:
                await on_trio_thread()  # a queue thread's handler moves here
                lock = self._finding.setdefault(ref.description, trio.Lock())
                async with lock:
                    binding = self._bound.get(ref.description)
                    if binding is None:
                        binding = await trio.to_thread.run_sync(self.find_and_bind, ref, pid)
            if binding is None:
                return None
            if not binding.master.wiped:
                return binding.master
        return None

    def find_and_bind(self, ref: KeyRef, pid: int) -> Binding | None:
        """Look ``ref`` up for ``pid``, check it, watch it, bind it.

        Blocking (the key source may be a socket): never call it on the
        trio thread.  Returns None when the key is not reachable.
        """
        looked_up = self._look_up(ref, pid)
        if looked_up is None:
            return None
        serial, master = looked_up
        with self.lock:
            going_since = self._going.get(serial)
            if going_since is not None and self.clock() - going_since < GOING_GRACE:
                master.wipe()
                return None  # its removal is applying
            self._going.pop(serial, None)
            current = self._bound.get(ref.description)
            if current is not None:
                master.wipe()  # found twice at once: one copy is enough
                return current
            binding = Binding(ref, serial, master)
            self._bound[ref.description] = binding
            need_watch = serial not in self._watched
            self._watched.add(serial)
        if need_watch:
            try:
                self.source.watch(serial, functools.partial(self._on_going, serial))
            except Exception as err:  # unwatched, the key must not be used
                log.warning("cannot watch key %d (%s): %s", serial, ref, err)
                self.unbind(binding)
                with self.lock:
                    self._watched.discard(serial)
                return None
        log.info("bound key %s (serial %d) for pid %d", ref, serial, pid)
        return binding

    def held_by(self, ref: KeyRef, pid: int) -> bool:
        """Whether ``pid``'s own keyrings reach ``ref``'s key (blocking, as
        :meth:`find_and_bind`; nothing is bound).  A key bound here was
        found for whoever asked first: setting a policy must not borrow it
        (fscrypt v2 refuses a policy whose key the caller has not added)."""
        looked_up = self._look_up(ref, pid)
        if looked_up is None:
            return False
        looked_up[1].wipe()
        return True

    def _look_up(self, ref: KeyRef, pid: int) -> tuple[int, MasterKey] | None:
        """``ref``'s key as ``pid``'s keyrings reach it, checked: (serial,
        master), or None when unreachable (blocking: the key source)."""
        try:
            found = self.source.find([ref.description], pid)
        except Exception as err:  # a broken channel must not break requests
            log.warning("looking up %s for pid %d failed: %s", ref, pid, err)
            return None
        if found is None:
            return None
        master = self._check(ref, found)
        return None if master is None else (found.serial, master)

    def move_to_copy(self, binding: Binding, pids: list[int]) -> int | None:
        """Rebind to another copy of ``binding``'s key that one of ``pids``
        holds (blocking: a thread of the key source, never the trio
        thread).  The serial moved to, or None: no live copy other than a
        key going away, the binding is no longer current, or the copy
        cannot be watched.

        The copy is found in that process's keyrings exactly as a request
        of its own would find it (the daemon checks the mount's owner), so
        the move grants nothing a request could not have; its bytes are the
        binding's (checked), so the ciphers and pages stay as they are.
        """
        for pid in dict.fromkeys(pids):  # each once, in order
            try:
                found = self.source.find([binding.description], pid)
            except Exception as err:  # a broken channel: lock as before
                log.warning("looking for a copy of %s for pid %d: %s", binding.ref, pid, err)
                return None
            if found is None:
                continue
            master = self._check(binding.ref, found)
            if master is None:
                continue
            try:
                same = hmac.compare_digest(master.raw, binding.master.raw)
            except KeyfenceError:  # the binding's own copy was wiped: too late
                same = False
            master.wipe()
            if not same:  # cannot happen for a matching key: be safe
                continue
            with self.lock:
                going_since = self._going.get(found.serial)
                if found.serial == binding.serial or (
                    going_since is not None and self.clock() - going_since < GOING_GRACE
                ):
                    continue  # going away as well
                if not self.is_current(binding):
                    return None
                old, binding.serial = binding.serial, found.serial
                need_watch = found.serial not in self._watched
                self._watched.add(found.serial)
            if need_watch:
                try:
                    self.source.watch(found.serial, functools.partial(self._on_going, found.serial))
                except Exception as err:
                    log.warning("cannot watch key %d (%s): %s", found.serial, binding.ref, err)
                    with self.lock:
                        binding.serial = old
                        self._watched.discard(found.serial)
                    continue
            log.info(
                "key %s (serial %d) is going away; the mount moves to its copy %d (pid %d)",
                binding.ref,
                old,
                found.serial,
                pid,
            )
            return found.serial
        return None

    @staticmethod
    def _check(ref: KeyRef, found: FoundKey) -> MasterKey | None:
        payload = found.payload
        try:
            if ref.kind is KeyKind.E4CRYPT_DESCRIPTOR:
                payload = e4crypt_compat.key_from_payload(payload)
                if payload is not found.payload:
                    wipe_bytes(found.payload)
            master = MasterKey(payload)
        except FormatError as err:
            wipe_bytes(payload)
            log.warning("key %d (%s) has an unusable payload: %s", found.serial, ref, err)
            return None
        if not master.matches(ref):
            master.wipe()
            log.warning("key %d is named %s but is another key; ignored", found.serial, ref)
            return None
        return master

    # ------------------------------------------------------------ going away

    def _on_going(self, serial: int, going: GoingAway) -> None:
        with self.lock:
            binding = next((b for b in self._bound.values() if b.serial == serial), None)
            self._going[serial] = self.clock()
            if going.emergency or binding is None:
                self._watched.discard(serial)
        if binding is None or self.user is None:
            return
        log.info(
            "key %s (serial %d) is going away (%s%s)",
            binding.ref,
            serial,
            going.op,
            ", emergency" if going.emergency else "",
        )
        self.user.key_going(binding, going)

    def is_current(self, binding: Binding) -> bool:
        return self._bound.get(binding.description) is binding

    def unbind(self, binding: Binding) -> bool:
        """Forget a binding (its key went away) and zero its key bytes in
        place; whether it was current.  Whatever still holds the binding's
        master gets ENOKEY from it (crypto.MasterKey.wipe)."""
        with self.lock:
            current = self._bound.get(binding.description) is binding
            if current:
                del self._bound[binding.description]
        if current:
            if self.unbound is not None:
                self.unbound()
            binding.master.wipe()
        return current

    def report(self, event: str, detail: dict[str, Any]) -> None:
        try:
            self.source.report(event, detail)
        except Exception as err:
            log.warning("could not report %s: %s", event, err)
