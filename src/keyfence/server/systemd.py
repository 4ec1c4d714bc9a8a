"""The daemon under systemd: readiness (``sd_notify``) and socket activation.

Both are the documented protocols (sd_notify(3), sd_listen_fds(3)), spoken
directly so that keyfence needs no libsystemd binding:

* readiness: a datagram ``READY=1`` to ``$NOTIFY_SOCKET`` once the socket
  accepts connections (``Type=notify``); ``STOPPING=1`` on shutdown;
* activation: ``$LISTEN_PID`` names us and ``$LISTEN_FDS`` counts the
  sockets passed from fd 3 on (``keyfence.socket``); the daemon serves the
  first instead of binding its own.

Both variables are unset once read, so children (mount workers) never
mistake them for their own.
"""

from __future__ import annotations

import contextlib
import os
import socket

SD_LISTEN_FDS_START = 3

_notify_address = ""
"""``$NOTIFY_SOCKET``, taken out of the environment by :func:`take_notify_socket`."""


def take_notify_socket() -> None:
    """Keep ``$NOTIFY_SOCKET`` for :func:`notify` and remove it from the
    environment: children (mount workers) must not speak for us."""
    global _notify_address
    _notify_address = os.environ.pop("NOTIFY_SOCKET", "") or _notify_address


def notify(state: str) -> bool:
    """Tell the service manager ``state`` (``READY=1``...); False if none listens."""
    address = _notify_address or os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(state.encode(), address)
        return True
    return False


def listen_socket() -> socket.socket | None:
    """The listening Unix socket systemd passed us, or None.

    Only when ``$LISTEN_PID`` is our pid (the variables may be stale,
    inherited from a parent that was activated itself)."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"fd {SD_LISTEN_FDS_START} from systemd is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock
