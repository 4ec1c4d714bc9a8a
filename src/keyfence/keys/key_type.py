"""Key types: what a description and a payload must look like.

Mirrors the kernel's ``user``, ``logon`` and ``keyring`` types
(security/keys/user_defined.c, keyring.c): the type decides whether a
payload can be read back, whether the key can be updated in place, and the
limits of its description and payload.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from keyfence.keys.errors import fail
from keyfence.keys.text import as_bytes

USER_PAYLOAD_MAX = 32767
"""user and logon payloads are 1..32,767 bytes (user_preparse)."""

ADD_KEY_PAYLOAD_MAX = 1024 * 1024 - 1
"""add_key(2) refuses larger payloads before the type sees them."""

UPDATE_PAYLOAD_MAX = 4096
"""keyctl(KEYCTL_UPDATE) copies at most a page."""

TYPE_NAME_MAX = 32
"""Type names are copied into 32 bytes with their NUL (key_get_type_from_user)."""

CALLOUT_MAX = 4095
"""request_key(2)'s callout info: strndup_user() into a page."""

DESCRIPTION_MAX = 4095
"""Descriptions are strndup_user()'d into KEY_MAX_DESC_SIZE (4096) bytes."""


@dataclass(frozen=True, slots=True)
class KeyType:
    """A key type; instances are singletons compared by identity."""

    name: str
    readable: bool
    """The payload can be read with KEYCTL_READ (``logon`` cannot)."""
    updatable: bool
    """add_key on an existing key updates it in place; KEYCTL_UPDATE works."""
    is_keyring: bool = False
    def_datalen: int = 0
    """Bytes charged to quota before any payload (the kernel's def_datalen)."""

    def vet_description(self, description: str) -> None:
        """Raise EINVAL for a description this type refuses."""
        if self.name == "logon":
            colon = description.find(":")
            # logon keys need a "service:rest" description
            if colon <= 0:
                raise fail(errno.EINVAL, "logon key description must be 'service:name'")

    def preparse(self, payload: bytes | None) -> bytes:
        """Validate ``payload`` for a new key or an update; return it."""
        data = payload or b""
        if self.is_keyring:
            if data:
                raise fail(errno.EINVAL, "a keyring takes no payload")
            return b""
        if not 0 < len(data) <= USER_PAYLOAD_MAX:
            raise fail(errno.EINVAL, f"{self.name} payload must be 1 to {USER_PAYLOAD_MAX} bytes")
        return data


USER = KeyType("user", readable=True, updatable=True)
LOGON = KeyType("logon", readable=False, updatable=True)
KEYRING = KeyType("keyring", readable=True, updatable=False, is_keyring=True)

TYPES: dict[str, KeyType] = {t.name: t for t in (USER, LOGON, KEYRING)}


def check_type_name(name: str) -> None:
    """EINVAL for an empty type name, EPERM for the kernel's internal ones."""
    if not name or len(as_bytes(name)) >= TYPE_NAME_MAX:
        raise fail(errno.EINVAL, "a key type name is 1 to 31 bytes")
    if name.startswith("."):
        raise fail(errno.EPERM, "types starting with '.' are internal")


def lookup_type(name: str, *, missing: int = errno.ENODEV) -> KeyType:
    """The registered type called ``name``; ``missing`` errno otherwise.

    add_key(2) reports an unknown type as ENODEV, request/search as ENOKEY;
    an empty or internal ('.') name is refused before any lookup.
    """
    check_type_name(name)
    try:
        return TYPES[name]
    except KeyError:
        raise fail(missing, f"unknown key type {name!r}") from None
