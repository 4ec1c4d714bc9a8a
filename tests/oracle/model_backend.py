"""The model behind the same Backend protocol as the kernel worker.

One :class:`ModelWorld` is one KeyService (one "machine"); each
:class:`ModelBackend` in it is one process of it, with its own credentials
and POSIX session, as each KernelBackend is one worker process.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Sequence

from keyfence.keys import Caller, KeyService
from keyfence.keys.caller import ParentProcess
from keyfence.keys.errors import fail

_pids = itertools.count(50_000)


class ModelClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


class ModelWorld:
    def __init__(self) -> None:
        self.clock = ModelClock()
        self.service = KeyService(clock=self.clock, run_gc_thread=False)

    def sleep(self, seconds: float) -> None:
        self.clock.now += seconds
        self.service.gc.collect()

    def close(self) -> None:
        self.service.close()


class ModelBackend:
    """Mirrors KernelBackend's arguments: ``session`` "anon" (join a fresh
    anonymous session keyring), "none", or a name to join; ``admin`` False
    models root inside a user namespace (no CAP_SYS_ADMIN over keys)."""

    def __init__(
        self,
        world: ModelWorld,
        uid: int = 0,
        gid: int | None = None,
        groups: Sequence[int] = (),
        *,
        session: str = "anon",
        admin: bool | None = None,
    ) -> None:
        self.world = world
        self.svc = world.service
        pid = next(_pids)
        self.caller = Caller(
            uid=uid,
            gid=uid if gid is None else gid,
            groups=frozenset(groups),
            pid=pid,
            session=("model-session", pid),
            admin=admin,
            # the worker serves from a child of its own stub process (worker.py)
            parent=ParentProcess(
                pid=pid + 1_000_000,
                session=("model-stub", pid),
                uids=(uid, uid, uid),
                gids=(uid if gid is None else gid,) * 3,
                threads=1,
            ),
        )
        if session == "anon":
            self.svc.join_session_keyring(self.caller)
        elif session != "none":
            self.svc.join_session_keyring(self.caller, session)

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)

    def add_key(
        self, type: str, description: str | None, payload: bytes | None, keyring: int
    ) -> int:
        return self.svc.add_key(self.caller, type, description, payload, keyring)

    def request_key(
        self, type: str, description: str | None, callout_info: str | None, dest_keyring: int
    ) -> int:
        if description is None:
            raise fail(errno.EFAULT)
        return self.svc.request_key(self.caller, type, description, callout_info, dest_keyring)

    def get_keyring_id(self, id: int, create: bool) -> int:
        return self.svc.get_keyring_id(self.caller, id, create)

    def join_session_keyring(self, name: str | None) -> int:
        return self.svc.join_session_keyring(self.caller, name)

    def update(self, id: int, payload: bytes | None) -> None:
        self.svc.update(self.caller, id, payload)

    def revoke(self, id: int) -> None:
        self.svc.revoke(self.caller, id)

    def chown(self, id: int, uid: int, gid: int) -> None:
        self.svc.chown(self.caller, id, _signed(uid), _signed(gid))

    def setperm(self, id: int, perm: int) -> None:
        self.svc.setperm(self.caller, id, perm & 0xFFFFFFFF)

    def describe(self, id: int) -> str:
        return self.svc.describe(self.caller, id)

    def clear(self, id: int) -> None:
        self.svc.clear(self.caller, id)

    def link(self, id: int, ring: int) -> None:
        self.svc.link(self.caller, id, ring)

    def unlink(self, id: int, ring: int) -> None:
        self.svc.unlink(self.caller, id, ring)

    def search(self, ring: int, type: str, desc: str | None, dest: int) -> int:
        if desc is None:
            raise fail(errno.EFAULT)
        return self.svc.search(self.caller, ring, type, desc, dest)

    def read(self, id: int) -> bytes:
        return self.svc.read(self.caller, id)

    def instantiate(self, id: int, payload: bytes | None, ring: int) -> None:
        self.svc.instantiate(self.caller, id, payload, ring)

    def reject(self, id: int, timeout: int, error: int, ring: int) -> None:
        self.svc.reject(self.caller, id, timeout & 0xFFFFFFFF, error & 0xFFFFFFFF, ring)

    def assume_authority(self, id: int) -> int:
        return self.svc.assume_authority(self.caller, id)

    def set_timeout(self, id: int, seconds: int) -> None:
        self.svc.set_timeout(self.caller, id, seconds)

    def invalidate(self, id: int) -> None:
        self.svc.invalidate(self.caller, id)

    def move(self, id: int, from_ring: int, to_ring: int, flags: int) -> None:
        self.svc.move(self.caller, id, from_ring, to_ring, flags)

    def get_security(self, id: int) -> str:
        return self.svc.get_security(self.caller, id)

    def set_reqkey_keyring(self, n: int) -> int:
        raise fail(errno.EOPNOTSUPP, "not modelled")

    def session_to_parent(self) -> None:
        self.svc.session_to_parent(self.caller)

    def restrict_keyring(self, ring: int, type: str | None, restriction: str | None) -> None:
        raise fail(errno.EOPNOTSUPP, "not modelled")

    def capabilities(self) -> bytes:
        raise fail(errno.EOPNOTSUPP, "not modelled")


def _signed(value: int) -> int:
    """keyctl(2) takes uid_t/gid_t: 0xffffffff means -1 (leave alone)."""
    return -1 if value in (-1, 0xFFFFFFFF) else value
