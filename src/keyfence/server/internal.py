"""What the daemon's parts see of the daemon (its ``internal.h``).

:class:`~keyfence.server.daemon.Daemon` builds the loop, the connections and
the mount supervisor, and each of them calls back into it.  They see it
through :class:`DaemonParts` instead of importing daemon.py (which imports
them): the contract is written once, here, and the import graph has no
cycle.  Connections and mounts appear as ``Any`` where naming their class
would bring the cycle back; the modules that own them give the real types.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyfence.keys import KeyService
    from keyfence.keys.caller import Caller
    from keyfence.keys.fence import RemovalProgress
    from keyfence.server.identity import SessionRegistry
    from keyfence.server.lanes import Lanes
    from keyfence.server.limits import UidLimits


class LoopParts(Protocol):
    """The event loop, as a connection sees it."""

    def wake_for(self, conn: Any) -> None: ...


class MountParts(Protocol):
    """The mount supervisor, as connections and the op table see it."""

    def mount(self, caller: Caller, backing: str, mountpoint: str, options: list[str]) -> None: ...

    def umount(
        self,
        caller: Caller,
        mountpoint: str,
        *,
        timeout: float = 60.0,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None: ...

    def describe(self, caller: Caller | None = None) -> list[dict[str, Any]]: ...

    def find_key(self, mount: Any, pid: int, descriptions: list[str]) -> list[Any] | None: ...

    def watcher(self, mount: Any, serial: int) -> Caller | None: ...

    def report(self, mount: Any, event: str, detail: Any) -> None: ...


class DaemonParts(Protocol):
    """The daemon, as its loop, connections and mount supervisor see it."""

    @property
    def path(self) -> str: ...

    @property
    def private_uid(self) -> int | None: ...

    @property
    def service(self) -> KeyService: ...

    @property
    def sessions(self) -> SessionRegistry: ...

    @property
    def limits(self) -> UidLimits: ...

    @property
    def lanes(self) -> Lanes: ...

    @property
    def loop(self) -> LoopParts: ...

    @property
    def mounts(self) -> MountParts: ...

    def accept(self, sock: socket.socket) -> Any: ...

    def adopt(self, sock: socket.socket, caller: Caller, mount: Any) -> None: ...

    def forget(self, conn: Any) -> None: ...

    def begin_shutdown(self) -> None: ...
