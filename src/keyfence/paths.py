"""Where the daemon's socket is (DESIGN.md, "Processes").

``$KEYFENCE_SOCKET`` if set; else the system daemon's ``/run/keyfence/sock``
when it exists (it serves every user, as the kernel does) or when we are
root; else a private per-user daemon at ``$XDG_RUNTIME_DIR/keyfence/sock``
(``/tmp/keyfence-UID/sock`` without a runtime directory).
"""

from __future__ import annotations

import os

SYSTEM_SOCKET = "/run/keyfence/sock"


def default_socket() -> str:
    env = os.environ.get("KEYFENCE_SOCKET")
    if env:
        return env
    if os.path.exists(SYSTEM_SOCKET) or os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "keyfence", "sock")
    return f"/tmp/keyfence-{os.geteuid()}/sock"


def autostart_allowed() -> bool:
    return os.environ.get("KEYFENCE_NO_AUTOSTART", "") not in ("1", "yes", "true")
