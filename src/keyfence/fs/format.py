"""Byte layouts of the encrypted overlay, version 1 (``docs/format.md``).

Everything here is pure data handling: the directory policy record, the file
header, the size arithmetic of block records, and the textual encodings of
encrypted names.  Nothing here touches a key; :mod:`keyfence.fs.crypto` does.

Two error types:

* :class:`FormatError` (a :class:`ValueError`): a record or argument is
  malformed (bad magic, unknown version, wrong length, a name that is not a
  name).
* :class:`IntegrityError` (an :class:`OSError` with ``errno`` ``EIO``):
  ciphertext on disk failed authentication or is truncated/torn.  It names the
  block (``.block``) and, when the caller knows it, the file (``.filename``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import errno
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from keyfence.errors import KeyfenceError

__all__ = [
    "BLOCK_NONCE_SIZE",
    "BLOCK_OVERHEAD",
    "BLOCK_SIZE",
    "BLOCK_TAG_SIZE",
    "DEFAULT_NAME_PADDING",
    "DIR_NONCE_SIZE",
    "E4CRYPT_DESCRIPTOR_SIZE",
    "ENCODED_NAME_MAX",
    "ENCODED_SYMLINK_MAX",
    "FILE_HEADER_SIZE",
    "FILE_ID_SIZE",
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "INFO_CONTENTS",
    "INFO_KEY_IDENTIFIER",
    "INFO_NAMES",
    "INFO_SYMLINKS",
    "KEY_IDENTIFIER_SIZE",
    "LONG_NAME_PREFIX",
    "LONG_NAME_SIDECAR_SUFFIX",
    "MASTER_KEY_SIZE",
    "NAME_MAX",
    "NAME_PADDINGS",
    "NAME_PADDING_MIN",
    "POLICY_FILE_NAME",
    "POLICY_MAGIC",
    "POLICY_PADDED_SIZE",
    "POLICY_SIZE",
    "POLICY_VERSION_PADDED",
    "PROTECTORS_FILE_NAME",
    "RECORD_SIZE",
    "SIV_TAG_SIZE",
    "SYMLINK_TARGET_MAX",
    "ContentsMode",
    "FileHeader",
    "FormatError",
    "IntegrityError",
    "KeyKind",
    "KeyRef",
    "NamesMode",
    "Policy",
    "b64url_decode",
    "b64url_encode",
    "backing_size",
    "block_range",
    "check_long_name",
    "is_hidden_name",
    "is_long_name",
    "is_sidecar_name",
    "long_name_for",
    "padded_name_length",
    "plaintext_size",
    "record_offset",
    "record_size",
    "sidecar_name",
]

FORMAT_VERSION = 1
"""Version of the file header, and of a policy record without name padding."""

# --- keys ------------------------------------------------------------------

MASTER_KEY_SIZE = 64
KEY_IDENTIFIER_SIZE = 16
E4CRYPT_DESCRIPTOR_SIZE = 8

INFO_KEY_IDENTIFIER = b"keyfence\x00key-identifier"
INFO_CONTENTS = b"keyfence\x00contents"
INFO_NAMES = b"keyfence\x00names"
INFO_SYMLINKS = b"keyfence\x00symlinks"

# --- contents --------------------------------------------------------------

FILE_MAGIC = b"KFC1"
FILE_ID_SIZE = 16
FILE_HEADER_SIZE = 24
"""magic(4) + version(u16 BE) + reserved(u16, zero) + file id(16)."""

BLOCK_SIZE = 4096
BLOCK_NONCE_SIZE = 12
BLOCK_TAG_SIZE = 16
BLOCK_OVERHEAD = BLOCK_NONCE_SIZE + BLOCK_TAG_SIZE
RECORD_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD
"""On-disk size of a full block record: nonce(12) + ciphertext(4096) + tag(16)."""

# --- names and symlinks ----------------------------------------------------

NAME_MAX = 255
"""Longest name, plaintext or on disk (bytes), as Linux's NAME_MAX."""

SIV_TAG_SIZE = 16
ENCODED_NAME_MAX = NAME_MAX
"""An encoded (base64url) name longer than this is stored as a long name."""

ENCODED_SYMLINK_MAX = 4095
"""Longest symlink target the backing filesystem takes (PATH_MAX - 1)."""

SYMLINK_TARGET_MAX = (ENCODED_SYMLINK_MAX * 3) // 4 - SIV_TAG_SIZE
"""Longest plaintext symlink target (3055 bytes) whose encoding still fits."""

POLICY_FILE_NAME = ".keyfence-policy"
PROTECTORS_FILE_NAME = ".keyfence-protectors"
"""Beside the policy: how a passphrase opens the key (:mod:`keyfence.fs.protector`)."""
LONG_NAME_PREFIX = "kf.long."
LONG_NAME_SIDECAR_SUFFIX = ".name"
TEMP_NAME_PREFIX = "kf.tmp."
"""Backing entries being made (an encrypted directory before its policy is
in, a protectors record before its rename) or set aside: never listed."""

DIR_NONCE_SIZE = 16
POLICY_MAGIC = b"KFP1"
POLICY_SIZE = 40
"""A version 1 record: names are not padded (every directory made before 3.2)."""
POLICY_VERSION_PADDED = 2
POLICY_PADDED_SIZE = 44
"""A version 2 record: version 1's 40 bytes, a flags byte, 3 reserved bytes."""

NAME_PADDINGS = (4, 8, 16, 32)
"""e4crypt's ``-p``: names are padded to a multiple of this before encryption."""
DEFAULT_NAME_PADDING = 16
NAME_PADDING_MIN = 16
"""No padded name is shorter (the kernel's FSCRYPT_FNAME_MIN_MSG_LEN)."""
_PAD_FLAGS_MASK = 0x03  # fscrypt's FSCRYPT_POLICY_FLAGS_PAD_MASK: flags = log2(padding / 4)


def padded_name_length(length: int, padding: int) -> int:
    """How long a name of ``length`` bytes is once padded, as the kernel's
    fscrypt_fname_encrypted_size(): at least 16, rounded up to a multiple of
    ``padding``, at most 255.  ``padding`` 0 means no padding (version 1)."""
    if padding == 0:
        return length
    rounded = -(-max(length, NAME_PADDING_MIN) // padding) * padding
    return min(rounded, NAME_MAX)


class FormatError(ValueError):
    """A record, name or argument does not follow the on-disk format."""


class IntegrityError(KeyfenceError):
    """Ciphertext failed authentication, or a record is truncated or torn.

    An :class:`OSError` with ``errno.EIO`` so the mount can hand it to the
    kernel as is.  ``block`` is the block number when a block record failed;
    ``filename`` (set with :meth:`for_file`) the file it belongs to.  The
    message never contains key material or plaintext.
    """

    def __init__(self, detail: str, *, block: int | None = None) -> None:
        super().__init__(errno.EIO, detail)
        self.block = block

    def for_file(self, filename: str | bytes) -> IntegrityError:
        """This error with ``filename`` set (for the log line and ``str()``)."""
        self.filename = filename
        return self


# --- base64url -------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """RFC 4648 section 5 base64url, without ``=`` padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Strict inverse of :func:`b64url_encode`.

    Only the canonical encoding is accepted (no padding, no other
    characters, unused trailing bits zero), so two different on-disk names
    can never decode to the same ciphertext.  Raises :class:`FormatError`.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("not base64url: non-ASCII bytes") from None
    if _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise FormatError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise FormatError("not base64url") from None
    if b64url_encode(data) != text:
        raise FormatError("not canonical base64url")
    return data


# --- long names and reserved names -----------------------------------------

_LONG_HASH_LEN = 43  # base64url of a 32-byte SHA-256, unpadded
_LONG_NAME = re.compile(r"kf\.long\.[A-Za-z0-9_-]{43}")
_SIDECAR = re.compile(r"kf\.long\.[A-Za-z0-9_-]{43}\.name")


def _as_str(name: str | bytes) -> str | None:
    if isinstance(name, str):
        return name
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        return None


def long_name_for(full: str) -> str:
    """The on-disk name standing for an encoded name longer than 255 bytes."""
    digest = hashlib.sha256(full.encode("ascii")).digest()
    return LONG_NAME_PREFIX + b64url_encode(digest)


def sidecar_name(disk_name: str) -> str:
    """Name of the file holding the full encoded name of a long name."""
    if not is_long_name(disk_name):
        raise FormatError("not a long name")
    return disk_name + LONG_NAME_SIDECAR_SUFFIX


def is_long_name(disk_name: str | bytes) -> bool:
    """``kf.long.<43 base64url characters>``."""
    text = _as_str(disk_name)
    return text is not None and _LONG_NAME.fullmatch(text) is not None


def is_sidecar_name(disk_name: str | bytes) -> bool:
    """``kf.long.<43 base64url characters>.name``."""
    text = _as_str(disk_name)
    return text is not None and _SIDECAR.fullmatch(text) is not None


def is_hidden_name(disk_name: str | bytes) -> bool:
    """Backing entries of an encrypted directory that the mount never lists.

    The policy record, the protectors file and long-name sidecars.  None of them can be an
    encrypted name: those are base64url (no ``.``) while every reserved name
    contains a ``.``.
    """
    text = _as_str(disk_name)
    return text is not None and (
        text in (POLICY_FILE_NAME, PROTECTORS_FILE_NAME) or is_sidecar_name(text)
    )


def check_long_name(disk_name: str | bytes, sidecar_content: bytes) -> str:
    """The full encoded name from a long name's sidecar, checked against its hash.

    Raises :class:`IntegrityError` when the sidecar does not belong to
    ``disk_name`` (swapped, truncated or edited) or holds a name that would
    not have been stored as a long name.
    """
    text = _as_str(disk_name)
    if text is None or not is_long_name(text):
        raise FormatError("not a long name")
    try:
        full = sidecar_content.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError(f"long name sidecar of {text} is corrupt") from None
    if (
        len(full) <= ENCODED_NAME_MAX
        or _B64URL.fullmatch(full) is None
        or long_name_for(full) != text
    ):
        raise IntegrityError(f"long name sidecar of {text} does not match the name")
    return full


# --- key references and policies -------------------------------------------


class KeyKind(enum.IntEnum):
    """How a policy names its master key."""

    IDENTIFIER = 1
    """16-byte HKDF identifier, keyring description ``keyfence:<32 hex>``."""
    E4CRYPT_DESCRIPTOR = 2
    """8-byte e4crypt descriptor, keyring description ``ext4:<16 hex>``."""


_KEY_REF_SIZES = {
    KeyKind.IDENTIFIER: KEY_IDENTIFIER_SIZE,
    KeyKind.E4CRYPT_DESCRIPTOR: E4CRYPT_DESCRIPTOR_SIZE,
}
_KEY_REF_PREFIXES = {KeyKind.IDENTIFIER: "keyfence:", KeyKind.E4CRYPT_DESCRIPTOR: "ext4:"}
_LOWER_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A reference to a master key: identifier or e4crypt descriptor."""

    kind: KeyKind
    value: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, KeyKind):
            raise FormatError(f"unknown key reference kind {self.kind!r}")
        size = _KEY_REF_SIZES[self.kind]
        if not isinstance(self.value, bytes) or len(self.value) != size:
            raise FormatError(f"a {self.kind.name.lower()} is {size} bytes")

    @property
    def hex(self) -> str:
        return self.value.hex()

    @property
    def description(self) -> str:
        """The keyring description the key is found under."""
        return _KEY_REF_PREFIXES[self.kind] + self.value.hex()

    @classmethod
    def from_description(cls, description: str) -> KeyRef:
        """Parse ``keyfence:<32 hex>`` or ``ext4:<16 hex>`` (lower-case hex)."""
        for kind, prefix in _KEY_REF_PREFIXES.items():
            if description.startswith(prefix):
                text = description[len(prefix) :]
                if len(text) == 2 * _KEY_REF_SIZES[kind] and _LOWER_HEX.fullmatch(text) is not None:
                    return cls(kind, bytes.fromhex(text))
                break
        raise FormatError(
            "a key description is keyfence:<32 lower-case hex digits> "
            "or ext4:<16 lower-case hex digits>"
        )

    def __str__(self) -> str:
        return self.description


class ContentsMode(enum.IntEnum):
    AES_256_GCM_4K = 1

    @property
    def label(self) -> str:
        return "AES-256-GCM-4K"


class NamesMode(enum.IntEnum):
    AES_SIV_B64URL = 1

    @property
    def label(self) -> str:
        return "AES-SIV-B64URL"


_POLICY = struct.Struct(">4sBBBB16s16s")
assert _POLICY.size == POLICY_SIZE
_POLICY_TAIL = struct.Struct(">B3s")  # version 2: flags, reserved
assert _POLICY.size + _POLICY_TAIL.size == POLICY_PADDED_SIZE


@dataclass(frozen=True, slots=True)
class Policy:
    """A directory's encryption policy, stored in its ``.keyfence-policy``.

    Every encrypted directory has its own record: the key reference, the
    modes and the name padding are inherited from the parent, the 16-byte
    ``dir_nonce`` is fresh.  ``name_padding`` is 4, 8, 16 or 32 (e4crypt's
    ``-p``; a version 2 record), or 0 for a directory made before padding
    existed (a version 1 record: names are encrypted at their exact length).
    """

    key: KeyRef
    dir_nonce: bytes
    contents_mode: ContentsMode = ContentsMode.AES_256_GCM_4K
    names_mode: NamesMode = NamesMode.AES_SIV_B64URL
    name_padding: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.key, KeyRef):
            raise FormatError("policy key must be a KeyRef")
        if not isinstance(self.dir_nonce, bytes) or len(self.dir_nonce) != DIR_NONCE_SIZE:
            raise FormatError(f"a directory nonce is {DIR_NONCE_SIZE} bytes")
        if not isinstance(self.contents_mode, ContentsMode):
            raise FormatError(f"unknown contents mode {self.contents_mode!r}")
        if not isinstance(self.names_mode, NamesMode):
            raise FormatError(f"unknown names mode {self.names_mode!r}")
        if self.name_padding != 0 and self.name_padding not in NAME_PADDINGS:
            raise FormatError(f"name padding is 4, 8, 16 or 32, not {self.name_padding!r}")

    @property
    def version(self) -> int:
        """The record's version: 1 without name padding, 2 with it."""
        return POLICY_VERSION_PADDED if self.name_padding else FORMAT_VERSION

    def serialize(self) -> bytes:
        """The 40-byte (version 1) or 44-byte (version 2) record (``docs/format.md``)."""
        head = _POLICY.pack(
            POLICY_MAGIC,
            self.version,
            self.key.kind,
            self.contents_mode,
            self.names_mode,
            self.key.value.ljust(16, b"\x00"),
            self.dir_nonce,
        )
        if not self.name_padding:
            return head
        flags = NAME_PADDINGS.index(self.name_padding)
        return head + _POLICY_TAIL.pack(flags, bytes(3))

    @classmethod
    def parse(cls, data: bytes) -> Policy:
        """Parse a record; anything malformed raises :class:`FormatError`."""
        if len(data) not in (POLICY_SIZE, POLICY_PADDED_SIZE):
            raise FormatError(
                f"policy record is {len(data)} bytes, expected {POLICY_SIZE}"
                f" or {POLICY_PADDED_SIZE}"
            )
        magic, version, kind, contents, names, ref, nonce = _POLICY.unpack_from(data)
        if magic != POLICY_MAGIC:
            raise FormatError("not a keyfence policy record (bad magic)")
        sizes = {FORMAT_VERSION: POLICY_SIZE, POLICY_VERSION_PADDED: POLICY_PADDED_SIZE}
        if version not in sizes:
            raise FormatError(f"unsupported policy version {version}")
        if len(data) != sizes[version]:
            raise FormatError(
                f"a version {version} policy record is {sizes[version]} bytes, not {len(data)}"
            )
        try:
            key_kind = KeyKind(kind)
        except ValueError:
            raise FormatError(f"unknown key reference kind {kind}") from None
        try:
            contents_mode = ContentsMode(contents)
        except ValueError:
            raise FormatError(f"unknown contents mode {contents}") from None
        try:
            names_mode = NamesMode(names)
        except ValueError:
            raise FormatError(f"unknown names mode {names}") from None
        size = _KEY_REF_SIZES[key_kind]
        if any(ref[size:]):
            raise FormatError("key reference padding is not zero")
        padding = 0
        if version == POLICY_VERSION_PADDED:
            flags, reserved = _POLICY_TAIL.unpack_from(data, POLICY_SIZE)
            if flags & ~_PAD_FLAGS_MASK:
                raise FormatError(f"unknown policy flags {flags:#04x}")
            if any(reserved):
                raise FormatError("policy reserved bytes are not zero")
            padding = NAME_PADDINGS[flags]
        return cls(KeyRef(key_kind, ref[:size]), nonce, contents_mode, names_mode, padding)

    def same_key_and_modes(self, other: Policy) -> bool:
        """Whether two policies differ at most in their directory nonce.

        Rename and link across directories are allowed only then (EXDEV
        otherwise, as fscrypt does: the padding is part of the policy).
        """
        return (
            self.key == other.key
            and self.contents_mode == other.contents_mode
            and self.names_mode == other.names_mode
            and self.name_padding == other.name_padding
        )

    def with_nonce(self, dir_nonce: bytes) -> Policy:
        """The policy a new subdirectory inherits, with its own nonce."""
        return Policy(self.key, dir_nonce, self.contents_mode, self.names_mode, self.name_padding)


# --- file header -----------------------------------------------------------

_HEADER = struct.Struct(">4sHH16s")
assert _HEADER.size == FILE_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The 24 bytes at the start of every non-empty encrypted file."""

    file_id: bytes
    version: int = FORMAT_VERSION

    MAGIC: ClassVar[bytes] = FILE_MAGIC

    def __post_init__(self) -> None:
        if not isinstance(self.file_id, bytes) or len(self.file_id) != FILE_ID_SIZE:
            raise FormatError(f"a file id is {FILE_ID_SIZE} bytes")
        if self.version != FORMAT_VERSION:
            raise FormatError(f"unsupported file format version {self.version}")

    def serialize(self) -> bytes:
        return _HEADER.pack(FILE_MAGIC, self.version, 0, self.file_id)

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        """Parse the first :data:`FILE_HEADER_SIZE` bytes of a backing file.

        A short header is a truncated file (:class:`IntegrityError`); a bad
        magic, version or reserved field is :class:`FormatError`.
        """
        if len(data) < FILE_HEADER_SIZE:
            raise IntegrityError(f"file header truncated ({len(data)} of {FILE_HEADER_SIZE} bytes)")
        magic, version, reserved, file_id = _HEADER.unpack_from(data)
        if magic != FILE_MAGIC:
            raise FormatError("not a keyfence encrypted file (bad magic)")
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported file format version {version}")
        if reserved != 0:
            raise FormatError("file header reserved field is not zero")
        return cls(bytes(file_id), version)


# --- size arithmetic -------------------------------------------------------


def record_offset(index: int) -> int:
    """Offset in the backing file of block record ``index``."""
    if index < 0:
        raise ValueError("block index must be >= 0")
    return FILE_HEADER_SIZE + index * RECORD_SIZE


def record_size(plaintext_len: int) -> int:
    """On-disk size of the record of a block holding ``plaintext_len`` bytes."""
    if not 0 < plaintext_len <= BLOCK_SIZE:
        raise ValueError(f"a block holds 1..{BLOCK_SIZE} bytes")
    return plaintext_len + BLOCK_OVERHEAD


def backing_size(size: int) -> int:
    """Backing file size for a plaintext size.

    An empty file has no header (0 bytes): truncating to zero drops the
    header, and the next write starts a new one with a fresh file id.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if size == 0:
        return 0
    full, rest = divmod(size, BLOCK_SIZE)
    return FILE_HEADER_SIZE + full * RECORD_SIZE + (rest + BLOCK_OVERHEAD if rest else 0)


def plaintext_size(size: int) -> int:
    """Plaintext size of a backing file of ``size`` bytes.

    0 and a bare header both mean empty.  A size that no sequence of records
    produces (a header cut short, or a last record no longer than
    nonce + tag) raises :class:`IntegrityError` naming the damaged block.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if size == 0:
        return 0
    if size < FILE_HEADER_SIZE:
        raise IntegrityError(f"file header truncated ({size} of {FILE_HEADER_SIZE} bytes)")
    full, rest = divmod(size - FILE_HEADER_SIZE, RECORD_SIZE)
    if 0 < rest <= BLOCK_OVERHEAD:
        raise IntegrityError(
            f"block {full} truncated ({rest} bytes, a record is more than {BLOCK_OVERHEAD})",
            block=full,
        )
    return full * BLOCK_SIZE + (rest - BLOCK_OVERHEAD if rest else 0)


def block_range(offset: int, length: int) -> range:
    """Indexes of the blocks a plaintext byte range touches."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if length == 0:
        return range(offset // BLOCK_SIZE, offset // BLOCK_SIZE)
    return range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)
