"""Master keys made from passphrases exactly as ``e4crypt add_key`` makes them.

Facts established against Debian's ``/usr/sbin/e4crypt`` (e2fsprogs 1.47.0)
and written down in ``docs/format.md``:

* The key is **not** PBKDF2-HMAC-SHA512, despite e4crypt's function name.
  With ``S`` the salt zero-padded to 256 bytes and ``P`` the passphrase::

      T1 = SHA-512(S || P);  Ti = SHA-512(T(i-1) || P)  for i = 2..65535
      key = T1 xor T2 xor ... xor T65535            (64 bytes)

  65535 (``0xFFFF``) rounds, not 65536.
* The descriptor is the first 8 bytes of SHA-512(SHA-512(key)), as 16
  lower-case hex digits; the key goes into the keyring as a ``logon`` key
  ``ext4:<descriptor>`` whose payload is ``struct ext4_encryption_key``
  (mode, 64 raw bytes, size), see :func:`kernel_payload`.
* The passphrase is the first line read (at most 1023 bytes, cut at a NUL,
  the newline dropped, a ``\\r`` kept), see :func:`passphrase_from_input`.
* Salts (``-S``): ``s:TEXT`` (at most 255 bytes), ``0xHEX`` (lower-case
  hex digits only, even count, at most 256 bytes, may be empty), a UUID in
  its 36-character form (either case, 16 bytes), or a path (``f:PATH`` or
  anything starting with ``/``) meaning the ext4 filesystem's password salt
  read with ``EXT4_IOC_GET_ENCRYPTION_PWSALT``.  Plain text without ``s:``
  is rejected ("Invalid salt").
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from keyfence.fs.format import E4CRYPT_DESCRIPTOR_SIZE, MASTER_KEY_SIZE, FormatError

__all__ = [
    "E4CRYPT_ITERATIONS",
    "EXT4_IOC_GET_ENCRYPTION_PWSALT",
    "KEY_DESCRIPTION_PREFIX",
    "MAX_LINE_PASSPHRASE",
    "MAX_PASSPHRASE_SIZE",
    "MAX_SALT_SIZE",
    "MAX_TEXT_SALT",
    "PathSalt",
    "SaltError",
    "default_salts",
    "derive_key",
    "descriptor",
    "fs_pwsalt",
    "kernel_payload",
    "key_description",
    "key_from_payload",
    "parse_salt",
    "passphrase_from_input",
    "resolve_salt",
]

E4CRYPT_ITERATIONS = 0xFFFF
MAX_PASSPHRASE_SIZE = 1024
MAX_LINE_PASSPHRASE = MAX_PASSPHRASE_SIZE - 1
"""e4crypt reads the passphrase with ``fgets`` into 1024 bytes."""
MAX_SALT_SIZE = 256
MAX_TEXT_SALT = MAX_SALT_SIZE - 1
KEY_DESCRIPTION_PREFIX = "ext4:"

EXT4_IOC_GET_ENCRYPTION_PWSALT = (1 << 30) | (16 << 16) | (ord("f") << 8) | 20
"""``_IOW('f', 20, __u8[16])``: the filesystem's password salt."""

_EXT4_MODE_AES_256_XTS = 1
_PAYLOAD = struct.Struct("=I64sI")
"""``struct ext4_encryption_key``: u32 mode, raw[64], u32 size (host order)."""

_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


class SaltError(FormatError):
    """A ``-S`` argument e4crypt would reject ("Invalid salt: ...")."""


@dataclass(frozen=True, slots=True)
class PathSalt:
    """A salt given as a path: the password salt of the ext4 filesystem there."""

    path: str


def _sha512(*parts: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA512())
    for part in parts:
        digest.update(part)
    return digest.finalize()


def derive_key(passphrase: bytes, salt: bytes) -> bytes:
    """The 64-byte key ``e4crypt add_key`` derives (see the module doc).

    ``passphrase`` as e4crypt would use it (see :func:`passphrase_from_input`):
    at most 1024 bytes, no NUL.  ``salt`` at most 256 bytes.
    """
    if len(passphrase) > MAX_PASSPHRASE_SIZE:
        raise ValueError(f"passphrase longer than {MAX_PASSPHRASE_SIZE} bytes")
    if b"\x00" in passphrase:
        raise ValueError("passphrase contains NUL (e4crypt stops at the first)")
    if len(salt) > MAX_SALT_SIZE:
        raise SaltError(f"salt longer than {MAX_SALT_SIZE} bytes")
    passphrase = bytes(passphrase)
    block = _sha512(bytes(salt).ljust(MAX_SALT_SIZE, b"\x00"), passphrase)
    acc = int.from_bytes(block, "little")
    SHA512 = hashes.SHA512
    Hash = hashes.Hash
    for _ in range(E4CRYPT_ITERATIONS - 1):
        h = Hash(SHA512())
        h.update(block)
        h.update(passphrase)
        block = h.finalize()
        acc ^= int.from_bytes(block, "little")
    return acc.to_bytes(MASTER_KEY_SIZE, "little")


def descriptor(key: bytes) -> str:
    """16 hex digits: the first 8 bytes of SHA-512(SHA-512(key))."""
    if len(key) != MASTER_KEY_SIZE:
        raise FormatError(f"an e4crypt key is {MASTER_KEY_SIZE} bytes")
    return _sha512(_sha512(bytes(key)))[:E4CRYPT_DESCRIPTOR_SIZE].hex()


def key_description(desc: str) -> str:
    """``ext4:<descriptor>``, the description of the ``logon`` key."""
    return KEY_DESCRIPTION_PREFIX + desc


def kernel_payload(key: bytes) -> bytes:
    """The 72-byte payload e4crypt adds: mode 1 (AES-256-XTS), key, size 64."""
    if len(key) != MASTER_KEY_SIZE:
        raise FormatError(f"an e4crypt key is {MASTER_KEY_SIZE} bytes")
    return _PAYLOAD.pack(_EXT4_MODE_AES_256_XTS, bytes(key), MASTER_KEY_SIZE)


def key_from_payload(payload: bytes) -> bytes:
    """The 64-byte key from an ``ext4:`` payload (72-byte struct or bare key)."""
    if len(payload) == MASTER_KEY_SIZE:
        return bytes(payload)
    if len(payload) == _PAYLOAD.size:
        _mode, raw, size = _PAYLOAD.unpack(payload)
        if size == MASTER_KEY_SIZE:
            return bytes(raw)
    raise FormatError("not an ext4 key payload (64 raw bytes or a 72-byte ext4_encryption_key)")


def passphrase_from_input(data: bytes) -> bytes:
    """The passphrase e4crypt takes from what it reads on standard input.

    The first line only, at most 1023 bytes, cut at the first NUL, the
    trailing newline removed (a ``\\r`` stays).  Empty input is an error
    (e4crypt: "Aborting."); an empty line is the empty passphrase.
    """
    if not data:
        raise ValueError("no passphrase given (end of input)")
    line = data.split(b"\n", 1)[0][:MAX_LINE_PASSPHRASE]
    return line.split(b"\x00", 1)[0]


def parse_salt(text: str | bytes) -> bytes | PathSalt:
    """Parse an ``e4crypt add_key -S`` argument, with e4crypt's rules.

    Returns the salt bytes, or :class:`PathSalt` for ``f:PATH`` / ``/PATH``
    (resolve with :func:`resolve_salt`).  Raises :class:`SaltError` with
    e4crypt's message for anything e4crypt rejects.
    """
    raw = os.fsencode(text)
    shown = os.fsdecode(raw)
    if b"\x00" in raw:  # cannot come from a command line
        raise SaltError(f"Invalid salt: {shown!r}")
    if raw.startswith(b"s:"):
        salt = raw[2:]
        if len(salt) > MAX_TEXT_SALT:
            raise SaltError(f"Invalid salt: {shown}")
        return salt
    if raw.startswith(b"/"):
        return PathSalt(shown)
    if raw.startswith(b"f:"):
        return PathSalt(os.fsdecode(raw[2:]))
    if raw.startswith(b"0x"):
        digits = raw[2:].decode("latin-1")
        if len(digits) > 2 * MAX_SALT_SIZE or _LOWER_HEX.fullmatch(digits) is None:
            raise SaltError(f"Invalid salt: {shown}")
        return bytes.fromhex(digits)
    if _UUID.fullmatch(raw.decode("latin-1")) is not None:
        return uuid.UUID(raw.decode("ascii")).bytes
    raise SaltError(f"Invalid salt: {shown}")


def fs_pwsalt(path: str) -> bytes:
    """The 16-byte password salt of the ext4 filesystem holding ``path``.

    ``EXT4_IOC_GET_ENCRYPTION_PWSALT``, as e4crypt does: the kernel keeps a
    random salt in the superblock (``s_encrypt_pw_salt``, not the filesystem
    UUID) and creates and writes it on first use.  Filesystems without the
    ext4 ``encrypt`` feature (and every non-ext4 one) raise an
    :class:`OSError` (``EOPNOTSUPP`` / ``ENOTTY``).
    """
    # the client's own path, with the user's rights: links are the user's to
    # follow (as e4crypt does), resolved here once and opened without following
    target = os.path.realpath(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except NotADirectoryError:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        buf = bytearray(16)
        fcntl.ioctl(fd, EXT4_IOC_GET_ENCRYPTION_PWSALT, buf, True)
    except OSError as err:
        code = err.errno or errno.EIO
        raise OSError(code, f"EXT4_IOC_GET_ENCRYPTION_PWSALT: {os.strerror(code)}", path) from None
    finally:
        os.close(fd)
    return bytes(buf)


def resolve_salt(salt: bytes | PathSalt) -> bytes:
    """Salt bytes for a parsed ``-S`` value (a path asks the filesystem)."""
    if isinstance(salt, PathSalt):
        return fs_pwsalt(salt.path)
    return salt


def default_salts(mounts: str = "/proc/self/mounts") -> list[bytes]:
    """The salts e4crypt uses without ``-S``: every mounted ext4 filesystem's.

    Filesystems that are unreadable or refuse the ioctl are skipped, as
    e4crypt does; duplicates removed, mount order kept.  Note that asking
    writes a fresh salt into the superblock of every ext4 filesystem with
    the ``encrypt`` feature that had none yet.
    """
    salts: list[bytes] = []
    try:
        with open(mounts, encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError:
        return salts
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[2] != "ext4":
            continue
        where = _unescape_mount_path(fields[1])
        if not os.access(where, os.R_OK):
            continue
        try:
            salt = fs_pwsalt(where)
        except OSError:
            continue
        if salt not in salts:
            salts.append(salt)
    return salts


def _unescape_mount_path(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space, ...) of a mounts table."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
