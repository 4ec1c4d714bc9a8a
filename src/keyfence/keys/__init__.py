"""The key retention model: keys, keyrings, permissions, quotas, expiry, gc.

No I/O, no sockets, thread-safe.  One concept per module, as the kernel's
security/keys/: :mod:`.key` (keys and states), :mod:`.key_type` (user, logon,
keyring), :mod:`.keyring` (contents, search, cycles), :mod:`.permission`,
:mod:`.process_keys` (callers and @t/@p/@s/@u/@us), :mod:`.quota`,
:mod:`.removal` (the one path by which keys go away), :mod:`.gc`,
:mod:`.secret` (payload memory) and :mod:`.keyctl` (the operations).
"""

from keyfence.keys.caller import Caller
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.key import Key, KeyState
from keyfence.keys.keyctl import KEYCTL_MOVE_EXCL, KeyService, ServiceStatistics
from keyfence.keys.process_keys import (
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING,
    KEY_SPEC_USER_SESSION_KEYRING,
    SPECIAL_NAMES,
)
from keyfence.keys.quota import QuotaLimits, QuotaUsage

__all__ = [
    "KEYCTL_MOVE_EXCL",
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_SPEC_USER_SESSION_KEYRING",
    "SPECIAL_NAMES",
    "Caller",
    "Key",
    "KeyService",
    "KeyState",
    "KeyfenceError",
    "QuotaLimits",
    "QuotaUsage",
    "ServiceStatistics",
]
