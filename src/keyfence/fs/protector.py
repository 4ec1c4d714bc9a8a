"""Protector records: what a directory keeps so that a passphrase opens it.

A directory encrypted by policy names its master key (``.keyfence-policy``,
``docs/format.md`` section 3).  The *protectors* file next to it,
``.keyfence-protectors``, says how a user gets that key back from
something they type, so they never have to remember anything else (a salt,
KDF parameters).  Two kinds of records, any number of each (section 3.1 of
``docs/format.md``):

1. **Passphrase salt** (e4crypt): the key *is* ``e4crypt add_key``'s key
   for the passphrase and this salt.  ``keyfence unlock`` and
   ``e4crypt add_key`` without ``-S`` use it; the descriptor still matches
   the real e4crypt given ``-S 0x<salt>``.
2. **Login protector** (fscrypt's model): the master key wrapped with
   AES-256-GCM under a key-encryption key derived from one user's login
   passphrase by scrypt.  Changing the password re-wraps the master key;
   no data is re-encrypted.

The file is not secret in the sense that the policy is not: a login
protector costs an attacker one scrypt per guess, which is why the mount
shows it only to the directory's owner and root.  Nothing here logs or
shows key bytes or passphrases.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyfence.fs.format import MASTER_KEY_SIZE, PROTECTORS_FILE_NAME, FormatError, KeyRef

__all__ = [
    "DEFAULT_SCRYPT",
    "PROTECTORS_FILE_NAME",
    "PROTECTORS_MAGIC",
    "LoginProtector",
    "ProtectorKind",
    "Protectors",
    "ScryptParams",
    "WrongPassphrase",
]

PROTECTORS_MAGIC = b"KFR1"
PROTECTORS_VERSION = 1
MAX_PROTECTORS_SIZE = 16384
"""A file with more is refused (a hostile backing directory could be big)."""

_HEADER = struct.Struct(">4sBBH")  # magic, version, reserved, record count
_RECORD = struct.Struct(">BBH")  # kind, reserved, body length
_LOGIN = struct.Struct(">IBBBB16s12s")  # uid, kdf, log2 n, r, p, salt, nonce
_WRAPPED_SIZE = MASTER_KEY_SIZE + 16
_LOGIN_AAD_PREFIX = b"keyfence\0login-protector"
KDF_SCRYPT = 1
MAX_SALT = 256


class ProtectorKind(enum.IntEnum):
    PASSPHRASE_SALT = 1
    LOGIN = 2


class WrongPassphrase(ValueError):
    """The passphrase does not open this protector (authentication failed)."""


class TooCostly(FormatError):
    """A login protector whose scrypt cost is above the login budget."""


LOGIN_MAX_MEMORY = 256 << 20
"""The most memory a login protector's scrypt may take (128 * N * r bytes)."""
LOGIN_MAX_WORK = 1 << 21
"""The most work (N * r * p) a login protector's scrypt may ask: 8 times the
default's, about a second here.  Root runs it at every login with the
parameters stored in a record the user may write, so the record must not
choose what root spends (tests/security/test_pam_protector_cost.py)."""


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt's cost: N = 2**log2_n, r, p (RFC 7914)."""

    log2_n: int = 15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        # bounded so a hostile record cannot ask for gigabytes or hours
        if not (10 <= self.log2_n <= 20 and 1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise FormatError("scrypt parameters out of range (N 2^10..2^20, r 1..32, p 1..16)")

    def within_login_budget(self) -> bool:
        """Whether root may run this KDF at a login (LOGIN_MAX_*)."""
        n = 1 << self.log2_n
        return 128 * n * self.r <= LOGIN_MAX_MEMORY and n * self.r * self.p <= LOGIN_MAX_WORK

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        """The 32-byte key-encryption key for ``passphrase``."""
        kdf = Scrypt(salt=salt, length=32, n=1 << self.log2_n, r=self.r, p=self.p)
        return kdf.derive(bytes(passphrase))


DEFAULT_SCRYPT = ScryptParams()
"""N = 2^15, r = 8, p = 1: 32 MiB and about 0.1 s per try on the test machine."""


@dataclass(frozen=True, slots=True)
class LoginProtector:
    """One user's login passphrase wrapping a directory's master key."""

    uid: int
    params: ScryptParams
    salt: bytes
    nonce: bytes
    wrapped: bytes = field(repr=False)

    def _aad(self, ref: KeyRef) -> bytes:
        p = self.params
        head = _LOGIN.pack(self.uid, KDF_SCRYPT, p.log2_n, p.r, p.p, self.salt, self.nonce)
        return _LOGIN_AAD_PREFIX + head + ref.description.encode()

    @classmethod
    def wrap(
        cls,
        uid: int,
        passphrase: bytes,
        master: bytes,
        ref: KeyRef,
        *,
        params: ScryptParams = DEFAULT_SCRYPT,
        salt: bytes | None = None,
        nonce: bytes | None = None,
    ) -> LoginProtector:
        """A new protector: ``master`` (the key ``ref`` names) under ``passphrase``."""
        if len(master) != MASTER_KEY_SIZE:
            raise FormatError(f"a master key is {MASTER_KEY_SIZE} bytes")
        if not 0 <= uid < 1 << 32:
            raise FormatError("uid out of range")
        _check_budget(params)
        salt = os.urandom(16) if salt is None else salt
        nonce = os.urandom(12) if nonce is None else nonce
        shell = cls(uid, params, salt, nonce, b"")
        kek = params.derive(passphrase, salt)
        wrapped = AESGCM(kek).encrypt(nonce, bytes(master), shell._aad(ref))
        return cls(uid, params, salt, nonce, wrapped)

    def unwrap(self, passphrase: bytes, ref: KeyRef, *, budget: bool = True) -> bytes:
        """The master key, or :class:`WrongPassphrase`; :class:`TooCostly`
        (before any work) if its cost is above the login budget.
        ``budget=False``: the user's own command pays, not root's login
        (``keyfence login passwd`` re-wrapping such a record)."""
        if budget:
            _check_budget(self.params)
        kek = self.params.derive(passphrase, self.salt)
        try:
            return AESGCM(kek).decrypt(self.nonce, self.wrapped, self._aad(ref))
        except InvalidTag:
            raise WrongPassphrase("the passphrase does not open this login protector") from None

    def body(self) -> bytes:
        p = self.params
        head = _LOGIN.pack(self.uid, KDF_SCRYPT, p.log2_n, p.r, p.p, self.salt, self.nonce)
        return head + self.wrapped

    @classmethod
    def from_body(cls, body: bytes) -> LoginProtector:
        if len(body) != _LOGIN.size + _WRAPPED_SIZE:
            raise FormatError("a login protector is 116 bytes")
        uid, kdf, log2_n, r, p, salt, nonce = _LOGIN.unpack_from(body)
        if kdf != KDF_SCRYPT:
            raise FormatError(f"unknown KDF {kdf}")
        return cls(uid, ScryptParams(log2_n, r, p), salt, nonce, bytes(body[_LOGIN.size :]))


def _check_budget(params: ScryptParams) -> None:
    if not params.within_login_budget():
        raise TooCostly(
            f"scrypt cost N=2^{params.log2_n} r={params.r} p={params.p} is above a login's "
            f"budget ({LOGIN_MAX_MEMORY >> 20} MiB, N*r*p <= 2^21): re-wrap it with "
            "keyfence login passwd"
        )


@dataclass(slots=True)
class Protectors:
    """The contents of a ``.keyfence-protectors`` file."""

    salts: list[bytes] = field(default_factory=list)
    logins: list[LoginProtector] = field(default_factory=list)

    def serialize(self) -> bytes:
        records = [(ProtectorKind.PASSPHRASE_SALT, s) for s in self.salts]
        records += [(ProtectorKind.LOGIN, p.body()) for p in self.logins]
        out = bytearray(_HEADER.pack(PROTECTORS_MAGIC, PROTECTORS_VERSION, 0, len(records)))
        for kind, body in records:
            out += _RECORD.pack(kind, 0, len(body)) + body
        if len(out) > MAX_PROTECTORS_SIZE:
            raise FormatError("too many protectors")
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> Protectors:
        """Refuses (FormatError) anything but a well-formed file; unknown
        record kinds are refused too, so nothing is silently dropped on a
        rewrite."""
        if len(data) > MAX_PROTECTORS_SIZE or len(data) < _HEADER.size:
            raise FormatError("not a protectors file (size)")
        magic, version, reserved, count = _HEADER.unpack_from(data)
        if magic != PROTECTORS_MAGIC or version != PROTECTORS_VERSION or reserved:
            raise FormatError("not a protectors file (magic or version)")
        out = cls()
        at = _HEADER.size
        for _ in range(count):
            if at + _RECORD.size > len(data):
                raise FormatError("protectors file truncated")
            kind, reserved, length = _RECORD.unpack_from(data, at)
            at += _RECORD.size
            body = data[at : at + length]
            at += length
            if reserved or len(body) != length:
                raise FormatError("protectors file truncated or malformed")
            if kind == ProtectorKind.PASSPHRASE_SALT:
                if length > MAX_SALT:
                    raise FormatError(f"salt longer than {MAX_SALT} bytes")
                out.salts.append(bytes(body))
            elif kind == ProtectorKind.LOGIN:
                out.logins.append(LoginProtector.from_body(body))
            else:
                raise FormatError(f"unknown protector kind {kind}")
        if at != len(data):
            raise FormatError("trailing bytes after the protectors")
        return out

    def login_for(self, uid: int) -> LoginProtector | None:
        for p in self.logins:
            if p.uid == uid:
                return p
        return None

    def with_login(self, protector: LoginProtector) -> Protectors:
        """A copy with ``protector`` replacing the same uid's, if any."""
        others = [p for p in self.logins if p.uid != protector.uid]
        return Protectors(list(self.salts), [*others, protector])

    def without_login(self, uid: int) -> Protectors:
        return Protectors(list(self.salts), [p for p in self.logins if p.uid != uid])

    def with_salt(self, salt: bytes) -> Protectors:
        if len(salt) > MAX_SALT:
            raise FormatError(f"salt longer than {MAX_SALT} bytes")
        if salt in self.salts:
            return Protectors(list(self.salts), list(self.logins))
        return Protectors([*self.salts, bytes(salt)], list(self.logins))
