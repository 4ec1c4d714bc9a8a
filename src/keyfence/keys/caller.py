"""Who is asking: the caller of every key operation (a leaf: imports nothing).

Every module of keys/ that decides on a caller's behalf (permissions,
keyring search, removals, the special keyrings) sees it through this one
record, as the kernel's code sees a ``struct cred``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ParentProcess:
    """The caller's parent, as KEYCTL_SESSION_TO_PARENT needs it."""

    pid: int
    session: Hashable
    """The parent's session binding (the daemon: its (pid, start time))."""
    uids: tuple[int, int, int]
    """Real, effective and saved uid."""
    gids: tuple[int, int, int]
    threads: int


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: everything a permission or keyring decision needs.

    The daemon fills this from the socket's peer credentials and /proc,
    never from what a client says.  ``session`` names the caller's session
    binding (None: the caller has nothing to hang a session keyring on);
    ``parent``, the process a session_to_parent would change.
    """

    uid: int
    """The effective uid: who owns what the caller makes, whose rights count."""
    gid: int
    groups: frozenset[int] = field(default_factory=frozenset)
    pid: int = 0
    tid: int = 0
    """0 means the main thread (tid == pid)."""
    start_time: int = 0
    """The process's start time, so that a recycled pid is another process."""
    session: Hashable | None = None
    admin: bool | None = None
    """CAP_SYS_ADMIN; None means "uid 0 has it"."""
    parent: ParentProcess | None = None
    real_uid: int | None = None
    """The real uid, when it differs (a set-user-ID program): the kernel
    finds ``@u``/``@us`` by it (``cred->user``).  None: ``uid``."""
    image: bytes | None = field(default=None, compare=False, repr=False)
    """A digest of the program the process runs now (the daemon: of its
    ``/proc/PID/auxv``, which every exec makes anew); None if unknown.  An
    exec drops the process and thread keyrings (docs/keys.md, "exec")."""

    @property
    def is_admin(self) -> bool:
        return self.uid == 0 if self.admin is None else self.admin

    @property
    def user_keyrings_uid(self) -> int:
        """Whose ``@u`` and ``@us`` the caller has: its real uid's."""
        return self.uid if self.real_uid is None else self.real_uid

    @property
    def process(self) -> tuple[int, int]:
        return (self.pid, self.start_time)

    @property
    def thread(self) -> tuple[int, int, int]:
        return (self.pid, self.start_time, self.tid or self.pid)

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups
