"""Keys and ciphers of the encrypted overlay, version 1 (``docs/format.md``).

Only ``cryptography`` primitives: HKDF-SHA512 for every derived key,
AES-256-GCM for file contents (one record per 4 KiB block), AES-SIV
(AES-256-SIV, a 64-byte key) for names and symlink targets.

The mount worker keeps one :class:`FileCipher` per open file (it holds the
per-file key, and makes an ``AESGCM`` of it only when a path needs one) and
one :class:`DirectoryCipher` per directory it lists; a new file's key comes
from :meth:`MasterKey.new_file_cipher`, derived ahead.  Keys never appear
in a ``repr``, a ``str`` or an exception message.
"""

from __future__ import annotations

import errno
import hmac
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyfence.errors import KeyfenceError
from keyfence.fs import e4crypt_compat, sealer
from keyfence.fs.format import (
    BLOCK_NONCE_SIZE,
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    BLOCK_TAG_SIZE,
    DIR_NONCE_SIZE,
    ENCODED_NAME_MAX,
    FILE_ID_SIZE,
    INFO_CONTENTS,
    INFO_KEY_IDENTIFIER,
    INFO_NAMES,
    INFO_SYMLINKS,
    KEY_IDENTIFIER_SIZE,
    MASTER_KEY_SIZE,
    NAME_MAX,
    NAME_PADDINGS,
    RECORD_SIZE,
    SYMLINK_TARGET_MAX,
    FileHeader,
    FormatError,
    IntegrityError,
    KeyKind,
    KeyRef,
    Policy,
    b64url_decode,
    b64url_encode,
    check_long_name,
    is_long_name,
    long_name_for,
    padded_name_length,
    sidecar_name,
)
from keyfence.keys.secret import wipe_bytes

_names = sealer.NAMES

__all__ = [
    "DirectoryCipher",
    "EncryptedName",
    "FileCipher",
    "MasterKey",
    "NonceSource",
    "RecordBuffer",
    "derive_file_key",
    "derive_names_key",
    "derive_symlinks_key",
    "key_identifier",
    "urandom_nonce",
]

NonceSource = Callable[[int], bytes]
"""``source(n)`` returns ``n`` fresh random bytes (file ids, dir nonces,
block nonces).  Tests inject a fixed one; the default is
:func:`urandom_nonce`."""


# --- randomness ------------------------------------------------------------

_NONCE_BATCH = 341  # 12-byte nonces per os.urandom call (4092 bytes)
_nonces: Iterator[bytes] = iter(())


def _refill_nonces() -> Iterator[bytes]:
    global _nonces
    size = BLOCK_NONCE_SIZE
    buf = os.urandom(size * _NONCE_BATCH)
    _nonces = it = iter([buf[i : i + size] for i in range(0, len(buf), size)])
    return it


_forks = 0  # how many forks this process is from its ancestor: MasterKey spares


def _after_fork_in_child() -> None:
    global _nonces, _forks
    _nonces = iter(())
    _forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def urandom_nonce(n: int) -> bytes:
    """``n`` bytes from ``os.urandom``; 12-byte block nonces come in batches.

    A ``getrandom`` call costs a third of encrypting a 4 KiB block, so
    12-byte nonces are fetched 341 at a time and handed out by a list
    iterator: ``next()`` on it is one step under the GIL, so no nonce is
    ever handed out twice, whichever threads ask (two threads refilling at
    once each make their own batch).  A child made by ``os.fork`` drops the
    batch it inherited (``os.register_at_fork``), so parent and child never
    share a nonce.  Other sizes (file ids, directory nonces) go straight to
    ``os.urandom``.
    """
    if n != BLOCK_NONCE_SIZE:
        return os.urandom(n)
    try:
        return next(_nonces)
    except StopIteration:
        return next(_refill_nonces())


# --- key derivation --------------------------------------------------------

_SPARE_FILE_KEYS = 16  # new files' keys derived per batch (MasterKey.new_file_cipher)


def _hkdf(master: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=length, salt=salt, info=info).derive(master)


def _check_master(master: bytes) -> None:
    if not isinstance(master, bytes | bytearray) or len(master) != MASTER_KEY_SIZE:
        raise FormatError(f"a master key is {MASTER_KEY_SIZE} bytes")


def key_identifier(master: bytes) -> str:
    """32 hex digits: HKDF-SHA512(master, no salt, "keyfence\\0key-identifier")."""
    _check_master(master)
    return _hkdf(bytes(master), None, INFO_KEY_IDENTIFIER, KEY_IDENTIFIER_SIZE).hex()


def derive_file_key(master: bytes, file_id: bytes) -> bytes:
    """32-byte AES-256-GCM key of one file: HKDF-SHA512(master, file id, "contents")."""
    _check_master(master)
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError(f"a file id is {FILE_ID_SIZE} bytes")
    return _hkdf(bytes(master), bytes(file_id), INFO_CONTENTS, 32)


def derive_names_key(master: bytes, dir_nonce: bytes) -> bytes:
    """64-byte AES-256-SIV key of one directory's names."""
    _check_master(master)
    if len(dir_nonce) != DIR_NONCE_SIZE:
        raise FormatError(f"a directory nonce is {DIR_NONCE_SIZE} bytes")
    return _hkdf(bytes(master), bytes(dir_nonce), INFO_NAMES, 64)


def derive_symlinks_key(master: bytes, dir_nonce: bytes) -> bytes:
    """64-byte AES-256-SIV key of one directory's symlink targets."""
    _check_master(master)
    if len(dir_nonce) != DIR_NONCE_SIZE:
        raise FormatError(f"a directory nonce is {DIR_NONCE_SIZE} bytes")
    return _hkdf(bytes(master), bytes(dir_nonce), INFO_SYMLINKS, 64)


class MasterKey:
    """A 64-byte master key; ``repr`` shows only its identifier.

    Made from a keyring payload (``MasterKey(payload)``) or, for keys made
    the e4crypt way, :meth:`from_e4crypt`.
    """

    __slots__ = (
        "_descriptor",
        "_identifier",
        "_raw",
        "_spares",
        "_spares_fork",
        "_spares_lock",
        "_wiped",
    )

    def __init__(self, raw: bytes) -> None:
        _check_master(raw)
        self._raw = bytes(raw)
        self._identifier = key_identifier(self._raw)
        self._descriptor: str | None = None
        self._wiped = False
        # new files' (file id, file key) pairs, derived ahead (new_file_cipher)
        self._spares: list[tuple[bytes, bytes]] = []
        self._spares_fork = _forks
        self._spares_lock = threading.Lock()

    def wipe(self) -> None:
        """Zero the key bytes in place (a payload read from the key service
        is this very object, often its only copy), and the file keys derived
        ahead; unusable afterwards."""
        with self._spares_lock:
            self._wiped = True
            wipe_bytes(self._raw)
            self._drop_spares_locked()

    def _drop_spares_locked(self) -> None:
        for _file_id, file_key in self._spares:
            wipe_bytes(file_key)
        self._spares.clear()

    @property
    def wiped(self) -> bool:
        """Zeroed (:meth:`wipe`): every use is ENOKEY from now on."""
        return self._wiped

    def _usable(self) -> bytes:
        if self._wiped:
            raise KeyfenceError(errno.ENOKEY, "the key was wiped")
        return self._raw

    @classmethod
    def from_e4crypt(cls, passphrase: bytes, salt: bytes) -> MasterKey:
        """The key ``e4crypt add_key`` makes from this passphrase and salt."""
        return cls(e4crypt_compat.derive_key(passphrase, salt))

    @property
    def raw(self) -> bytes:
        """The key bytes (for the keyring payload; never log them)."""
        return self._usable()

    @property
    def identifier(self) -> str:
        return self._identifier

    @property
    def e4crypt_descriptor(self) -> str:
        if self._descriptor is None:
            self._descriptor = e4crypt_compat.descriptor(self._raw)
        return self._descriptor

    def key_ref(self, kind: KeyKind = KeyKind.IDENTIFIER) -> KeyRef:
        """How a policy names this key."""
        if kind is KeyKind.IDENTIFIER:
            return KeyRef(kind, bytes.fromhex(self._identifier))
        return KeyRef(kind, bytes.fromhex(self.e4crypt_descriptor))

    def matches(self, ref: KeyRef) -> bool:
        """Whether ``ref`` names this key."""
        return self.key_ref(ref.kind) == ref

    def file_cipher(
        self, file_id: bytes, *, nonce_source: NonceSource = urandom_nonce
    ) -> FileCipher:
        master = self._usable()
        return FileCipher(derive_file_key(master, file_id), file_id, nonce_source=nonce_source)

    def new_file_cipher(self, *, nonce_source: NonceSource = urandom_nonce) -> FileCipher:
        """The cipher of a new file: a fresh random file id and its key.

        Keys for new files are derived :data:`_SPARE_FILE_KEYS` at a time,
        from one ``os.urandom`` of their ids: one HKDF among a request's
        other work ran from cold caches at 15-30 us here, three times what
        one in a row of them costs (docs/performance.md, part 18).  The
        spares are wiped with the master key (:meth:`wipe`); they open
        nothing yet, no file has their ids.  A child made by ``os.fork``
        drops the spares it inherited, so parent and child never give two
        files one id.
        """
        with self._spares_lock:
            master = self._usable()
            if self._spares_fork != _forks:
                self._drop_spares_locked()
                self._spares_fork = _forks
            if not self._spares:
                ids = os.urandom(FILE_ID_SIZE * _SPARE_FILE_KEYS)
                for pos in range(0, len(ids), FILE_ID_SIZE):
                    file_id = ids[pos : pos + FILE_ID_SIZE]
                    self._spares.append((file_id, derive_file_key(master, file_id)))
            file_id, file_key = self._spares.pop()
        return FileCipher(file_key, file_id, nonce_source=nonce_source)

    def directory_cipher(self, dir_nonce: bytes, name_padding: int = 0) -> DirectoryCipher:
        return DirectoryCipher(self, dir_nonce, name_padding)

    def __repr__(self) -> str:
        return f"MasterKey(identifier={self._identifier})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._identifier)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("master keys are not pickled")


# --- contents --------------------------------------------------------------

_pack_aad = struct.Struct(">16sQ").pack
_ZEROS = memoryview(bytes(RECORD_SIZE))

Buffer = bytes | bytearray | memoryview


class RecordBuffer:
    """Room for ``count`` consecutive block records, with the views of each
    record's nonce and sealed part made once: reused for chunk after chunk
    of a write-back, slicing per record would cost a sixth of encrypting it.
    ``buffer`` is a new one, or one given (at least ``count`` records long).
    """

    __slots__ = ("bodies", "buffer", "count", "nonces")

    def __init__(self, count: int, buffer: memoryview | None = None) -> None:
        self.count = count
        self.buffer = memoryview(bytearray(count * RECORD_SIZE)) if buffer is None else buffer
        starts = range(0, count * RECORD_SIZE, RECORD_SIZE)
        view = self.buffer
        self.nonces = [view[s : s + BLOCK_NONCE_SIZE] for s in starts]
        self.bodies = [view[s + BLOCK_NONCE_SIZE : s + RECORD_SIZE] for s in starts]


class FileCipher:
    """Encrypts and decrypts the 4 KiB blocks of one file.

    Block ``i`` of a file with id ``F`` is stored as
    ``nonce(12) || AES-256-GCM(file key, nonce, plaintext, aad=F || u64be(i))``
    (ciphertext then 16-byte tag).  A record that fails (tampered, torn,
    truncated, moved to another index or file, wrong key) raises
    :class:`IntegrityError` naming the block; an all-zero record reads as a
    hole (zeros).
    """

    __slots__ = ("_aead", "_file_id", "_key", "_native", "_nonce")

    def __init__(
        self, file_key: bytes, file_id: bytes, *, nonce_source: NonceSource = urandom_nonce
    ) -> None:
        if len(file_key) != 32:
            raise FormatError("a file key is 32 bytes")
        if len(file_id) != FILE_ID_SIZE:
            raise FormatError(f"a file id is {FILE_ID_SIZE} bytes")
        self._key = bytes(file_key)
        # made at first use: the native sealer takes the key bytes, so most
        # files never need one (it cost a small file's write 5-10 us)
        self._aead: AESGCM | None = None
        self._file_id = bytes(file_id)
        self._nonce = nonce_source
        self._native = sealer.NATIVE  # batches: one call, GIL released (fs/sealer.py)

    def _gcm(self) -> AESGCM:
        """cryptography's AES-GCM under this file's key, made once; it holds
        the very key object (no copy), so :meth:`wipe` zeroes its key too."""
        aead = self._aead
        if aead is None:
            aead = self._aead = AESGCM(self._key)
        return aead

    @classmethod
    def for_header(
        cls, master: MasterKey, header: FileHeader, *, nonce_source: NonceSource = urandom_nonce
    ) -> FileCipher:
        return master.file_cipher(header.file_id, nonce_source=nonce_source)

    @property
    def file_id(self) -> bytes:
        return self._file_id

    def __repr__(self) -> str:
        return f"FileCipher(file_id={self._file_id.hex()})"

    def wipe(self) -> None:
        """Zero the file key in place (the ``AESGCM`` holds the same bytes);
        only for a cipher nothing uses any more (fs/wipe.py)."""
        wipe_bytes(self._key)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("file ciphers are not pickled")

    @staticmethod
    def _check_range(first_index: int, count: int) -> None:
        if first_index < 0 or first_index + count > 1 << 64:
            raise ValueError(f"block indexes {first_index}..+{count} out of range")

    def encrypt_block(self, index: int, plaintext: Buffer) -> bytes:
        """The record of block ``index`` (1..4096 plaintext bytes; a short
        block only as the file's last)."""
        if not 0 < len(plaintext) <= BLOCK_SIZE:
            raise ValueError(f"a block holds 1..{BLOCK_SIZE} bytes")
        nonce = self._nonce(BLOCK_NONCE_SIZE)
        if len(nonce) != BLOCK_NONCE_SIZE:
            raise ValueError("nonce source returned the wrong length")
        try:
            aad = _pack_aad(self._file_id, index)
        except struct.error:
            raise ValueError(f"block index {index} out of range") from None
        return nonce + self._gcm().encrypt(nonce, plaintext, aad)

    def decrypt_block(self, index: int, record: Buffer) -> bytes:
        """The plaintext of the record of block ``index``.

        Raises :class:`IntegrityError` (EIO) for a truncated, torn or
        tampered record, one written for another index or file, or one made
        under another key.  An all-zero record is a hole and reads as zeros.
        """
        n = len(record)
        if not BLOCK_OVERHEAD < n <= RECORD_SIZE:
            if n > RECORD_SIZE:
                raise ValueError(f"a block record is at most {RECORD_SIZE} bytes")
            raise IntegrityError(
                f"block {index} truncated ({n} bytes, a record is more than {BLOCK_OVERHEAD})",
                block=index,
            )
        try:
            aad = _pack_aad(self._file_id, index)
        except struct.error:
            raise ValueError(f"block index {index} out of range") from None
        view = memoryview(record)
        try:
            return self._gcm().decrypt(view[:BLOCK_NONCE_SIZE], view[BLOCK_NONCE_SIZE:], aad)
        except InvalidTag:
            if view == _ZEROS[:n]:
                return bytes(n - BLOCK_OVERHEAD)
            raise IntegrityError(
                f"block {index} failed authentication (tampered, torn, moved or wrong key)",
                block=index,
            ) from None

    def encrypt_blocks(self, first_index: int, plaintext: Buffer) -> bytearray:
        """Records of consecutive blocks from ``first_index``, back to back.

        ``plaintext`` is cut into 4 KiB blocks (only the last may be short);
        the result goes to :func:`~keyfence.fs.format.record_offset`
        ``(first_index)`` in one ``pwrite``.
        """
        data = memoryview(plaintext).cast("B")
        total = len(data)
        if total == 0:
            return bytearray()
        count = -(-total // BLOCK_SIZE)
        blocks = [data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] for i in range(count)]
        out = bytearray(total + count * BLOCK_OVERHEAD)
        self.encrypt_pages_into(first_index, blocks, memoryview(out))
        return out

    def encrypt_pages_into(
        self, first_index: int, blocks: Sequence[Buffer], out: memoryview | RecordBuffer
    ) -> int:
        """Encrypt separate block buffers (4 KiB each, only the last may be
        1..4096 bytes) as consecutive records from ``first_index`` into
        ``out``, back to back; returns the bytes of records written.

        The write-back path hands its dirty pages straight in (no copy of
        the plaintext into one buffer) and a reused :class:`RecordBuffer`
        (no new buffer, no slicing per record).  Nonces of the default
        source come from one ``os.urandom`` call per batch: the per-record
        cost here is Python's, not AES's.
        """
        count = len(blocks)
        if count == 0:
            return 0
        self._check_range(first_index, count)
        return self.encrypt_indexed_into(
            range(first_index, first_index + count), blocks, out, checked=True
        )

    def encrypt_indexed_into(
        self,
        indexes: Sequence[int],
        blocks: Sequence[Buffer],
        out: memoryview | RecordBuffer,
        *,
        checked: bool = False,
    ) -> int:
        """:meth:`encrypt_pages_into` for blocks that need not be adjacent:
        block ``blocks[k]`` (index ``indexes[k]``) is sealed into record slot
        ``k`` of ``out``.  A write-back of scattered pages (random writes)
        encrypts a whole batch of them in one call: one ``os.urandom`` and one
        loop instead of a call per page.  The records stay the format's
        records; only where they go on disk is the caller's business.
        """
        count = len(blocks)
        if count == 0:
            return 0
        if len(indexes) != count:
            raise ValueError("one index per block")
        if self._native is not None:
            size = BLOCK_NONCE_SIZE
            # one call for the batch (it checks indexes and block sizes too);
            # the same nonces as below, as one string
            if self._nonce is urandom_nonce:
                raw = os.urandom(size * count)
            else:
                raw = b"".join([self._nonce(size) for _ in range(count)])
                if len(raw) != size * count:
                    raise ValueError("nonce source returned the wrong length")
            target = out.buffer if isinstance(out, RecordBuffer) else out
            if isinstance(indexes, range) and indexes.step == 1:
                return int(
                    self._native.seal(self._key, self._file_id, raw, indexes.start, blocks, target)
                )
            return int(self._native.seal(self._key, self._file_id, raw, indexes, blocks, target))
        if not checked and (min(indexes) < 0 or max(indexes) >= 1 << 64):
            raise ValueError("block index out of range")
        for block in blocks[:-1]:
            if len(block) != BLOCK_SIZE:
                raise ValueError(f"only the last block may be shorter than {BLOCK_SIZE} bytes")
        last = len(blocks[-1])
        if not 0 < last <= BLOCK_SIZE:
            raise ValueError(f"a block holds 1..{BLOCK_SIZE} bytes")
        size = BLOCK_NONCE_SIZE
        records = out if isinstance(out, RecordBuffer) else RecordBuffer(count, out)
        if count > records.count:
            raise ValueError("output buffer too small")
        nonces: list[bytes]
        if self._nonce is urandom_nonce:
            raw = os.urandom(size * count)
            nonces = [raw[i : i + size] for i in range(0, size * count, size)]
        else:
            nonces = [self._nonce(size) for _ in range(count)]
            if any(len(n) != size for n in nonces):
                raise ValueError("nonce source returned the wrong length")
        bodies = records.bodies
        if last < BLOCK_SIZE:
            bodies = bodies[:count]
            bodies[-1] = bodies[-1][: last + BLOCK_TAG_SIZE]
        file_id, pack = self._file_id, _pack_aad
        aead = self._gcm()
        encrypt_into = getattr(aead, "encrypt_into", None)
        for nonce, slot, body, block, index in zip(
            nonces, records.nonces, bodies, blocks, indexes, strict=False
        ):
            slot[:] = nonce
            if encrypt_into is not None:
                encrypt_into(nonce, block, pack(file_id, index), body)
            else:  # pragma: no cover - cryptography without encrypt_into
                body[:] = aead.encrypt(nonce, block, pack(file_id, index))
        return (count - 1) * RECORD_SIZE + last + BLOCK_OVERHEAD

    def decrypt_blocks(self, first_index: int, records: Buffer) -> bytearray:
        """Plaintext of consecutive records read back to back from ``first_index``.

        Every record but the last is full (4124 bytes).  The first failing
        block raises :class:`IntegrityError` naming it; holes read as zeros.
        """
        data = memoryview(records).cast("B")
        total = len(data)
        if total == 0:
            return bytearray()
        count, rest = divmod(total, RECORD_SIZE)
        if rest:
            count += 1
            if rest <= BLOCK_OVERHEAD:
                index = first_index + count - 1
                raise IntegrityError(
                    f"block {index} truncated ({rest} bytes, a record is more than "
                    f"{BLOCK_OVERHEAD})",
                    block=index,
                )
        self._check_range(first_index, count)
        if self._native is not None:
            # a new buffer every byte of which it writes: no zeroing first
            # (that was 8 % of a cold sequential read's serving thread)
            failed, plain = self._native.open_new(self._key, self._file_id, first_index, data)
            if failed >= 0:
                index = first_index + failed
                raise IntegrityError(
                    f"block {index} failed authentication (tampered, torn, moved or wrong key)",
                    block=index,
                )
            return cast(bytearray, plain)
        out = bytearray(total - count * BLOCK_OVERHEAD)
        view = memoryview(out)
        file_id, pack = self._file_id, _pack_aad
        aead = self._gcm()
        decrypt_into = getattr(aead, "decrypt_into", None)
        pos = 0
        for i in range(count):
            start = i * RECORD_SIZE
            record = data[start : start + RECORD_SIZE]
            size = len(record) - BLOCK_OVERHEAD
            target = view[pos : pos + size]
            nonce, sealed = record[:BLOCK_NONCE_SIZE], record[BLOCK_NONCE_SIZE:]
            try:
                if decrypt_into is not None:
                    decrypt_into(nonce, sealed, pack(file_id, first_index + i), target)
                else:  # pragma: no cover - cryptography without decrypt_into
                    target[:] = aead.decrypt(nonce, sealed, pack(file_id, first_index + i))
            except InvalidTag:
                if record != _ZEROS[: len(record)]:
                    index = first_index + i
                    raise IntegrityError(
                        f"block {index} failed authentication (tampered, torn, moved or wrong key)",
                        block=index,
                    ) from None
                target[:] = _ZEROS[:size]
            pos += size
        return out


# --- names and symlink targets ---------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptedName:
    """An encrypted directory entry name.

    ``disk_name`` is the name in the backing directory; ``full`` the whole
    base64url encoding.  They differ only for a long name, whose sidecar
    (``sidecar_name``) holds ``full`` as ASCII (``sidecar_content``).
    """

    disk_name: str
    full: str

    @property
    def is_long(self) -> bool:
        return self.disk_name != self.full

    @property
    def sidecar_name(self) -> str | None:
        return sidecar_name(self.disk_name) if self.is_long else None

    @property
    def sidecar_content(self) -> bytes | None:
        return self.full.encode("ascii") if self.is_long else None


_DOT_NAMES = frozenset({b".", b".."})
_DOT_DISK_NAMES = frozenset({".", ".."})


def _valid_name(name: bytes) -> bool:
    return 0 < len(name) <= NAME_MAX and b"/" not in name and b"\x00" not in name


def _disk_text(name: str | bytes) -> str:
    if isinstance(name, str):
        return name
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("name is not an encrypted name (non-ASCII)") from None


class DirectoryCipher:
    """Encrypts the names and symlink targets of one encrypted directory.

    Names: AES-SIV under HKDF-SHA512(master, dir nonce, "keyfence\\0names"),
    associated data the dir nonce, base64url without padding; long encodings
    become ``kf.long.<hash>`` plus a sidecar.  With ``name_padding`` (the
    policy's, 4..32) a name is padded with NULs before encryption to
    :func:`~keyfence.fs.format.padded_name_length`, so its ciphertext tells
    only that length.  Symlink targets the same way under the
    "keyfence\\0symlinks" key, never shortened nor padded.
    """

    __slots__ = (
        "_dir_nonce",
        "_master",
        "_name_padding",
        "_names",
        "_names_key",
        "_symlinks",
        "_symlinks_key",
        "_wiped",
        "names_sealer",
    )

    def __init__(self, master: MasterKey, dir_nonce: bytes, name_padding: int = 0) -> None:
        if name_padding != 0 and name_padding not in NAME_PADDINGS:
            raise FormatError(f"name padding is 4, 8, 16 or 32, not {name_padding!r}")
        self._master = master
        self._names_key = derive_names_key(master.raw, dir_nonce)
        # cryptography's AES-SIV objects, and the symlinks key, are made at
        # first use: a directory that is only written to (tar, git) needs
        # neither with the C names, and they were half of its cipher's cost
        self._names: AESSIV | None = None
        self._symlinks_key: bytes | None = None
        self._symlinks: AESSIV | None = None
        self._wiped = False
        self._dir_nonce = bytes(dir_nonce)
        self._name_padding = name_padding
        self.names_sealer = (
            None if _names is None else _names.NameSealer(self._names_key, dir_nonce, name_padding)
        )
        """The same names' encoder in C (fs/_names.c), or None where it is not
        built: encrypt_name uses it, and the FUSE loop answers a LOOKUP of a
        missing name with it (fs/fuse/dir_attrs.py)."""

    def wipe(self) -> None:
        """Zero the derived keys in place; only for a cipher nothing uses
        any more (fs/wipe.py).  Nothing is derived or made from them after
        it: a later use is ENOKEY, never a name sealed under zeros."""
        self._wiped = True
        wipe_bytes(self._names_key)
        if self._symlinks_key is not None:
            wipe_bytes(self._symlinks_key)
        if self.names_sealer is not None:
            self.names_sealer.wipe()  # its key schedule: from now on it encodes nothing

    def _usable(self) -> None:
        if self._wiped:
            raise KeyfenceError(errno.ENOKEY, "the directory's cipher was wiped")

    def _names_siv(self) -> AESSIV:
        siv = self._names
        if siv is None:
            self._usable()
            siv = self._names = AESSIV(self._names_key)  # AESSIV keeps a copy of the key
        return siv

    def _symlinks_siv(self) -> AESSIV:
        siv = self._symlinks
        if siv is None:
            self._usable()
            key = self._symlinks_key
            if key is None:  # raises ENOKEY once the master key is wiped
                key = self._symlinks_key = derive_symlinks_key(self._master.raw, self._dir_nonce)
            siv = self._symlinks = AESSIV(key)
        return siv

    @classmethod
    def for_policy(cls, master: MasterKey, policy: Policy) -> DirectoryCipher:
        if not master.matches(policy.key):
            raise FormatError(f"policy names key {policy.key}, not this key")
        return cls(master, policy.dir_nonce, policy.name_padding)

    @property
    def dir_nonce(self) -> bytes:
        return self._dir_nonce

    @property
    def name_padding(self) -> int:
        return self._name_padding

    def __repr__(self) -> str:
        return f"DirectoryCipher(dir_nonce={self._dir_nonce.hex()}, padding={self._name_padding})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("directory ciphers are not pickled")

    def encrypt_name(self, name: bytes) -> EncryptedName:
        """The on-disk form of a plaintext entry name (``.``/``..`` unchanged).

        Raises :class:`FormatError` for a name with ``/`` or NUL or an empty
        one, ``ENAMETOOLONG`` beyond 255 bytes.
        """
        if name in _DOT_NAMES:
            text = name.decode("ascii")
            return EncryptedName(text, text)
        if len(name) > NAME_MAX:
            raise KeyfenceError(errno.ENAMETOOLONG)
        if not _valid_name(name):
            raise FormatError("a name is 1..255 bytes without '/' or NUL")
        full = None if self.names_sealer is None else self.names_sealer.encode_name(name)
        if full is None:  # not built, or wiped (AESSIV keeps its own copy of the key)
            padded = bytes(name).ljust(padded_name_length(len(name), self._name_padding), b"\x00")
            full = b64url_encode(self._names_siv().encrypt(padded, [self._dir_nonce]))
        if len(full) > ENCODED_NAME_MAX:
            return EncryptedName(long_name_for(full), full)
        return EncryptedName(full, full)

    def decrypt_name(self, disk_name: str | bytes, sidecar: bytes | None = None) -> bytes:
        """The plaintext name of a backing entry (``.``/``..`` unchanged).

        For a long name pass the content of its sidecar.  A name that is not
        an authentic encrypted name of this directory (corrupt, renamed from
        another directory, under another key) raises :class:`IntegrityError`.
        Hidden names (policy, sidecars) raise :class:`FormatError`: the mount
        never asks for them.
        """
        text = _disk_text(disk_name)
        if text in _DOT_DISK_NAMES:
            return text.encode("ascii")
        if is_long_name(text):
            if sidecar is None:
                raise FormatError("a long name needs the content of its sidecar")
            full = check_long_name(text, sidecar)
        elif "." in text:
            raise FormatError("a reserved name is not an encrypted name")
        elif len(text) > ENCODED_NAME_MAX:
            raise IntegrityError(f"name {text[:32]!r}... is too long to be an encrypted name")
        else:
            full = text
        try:
            sealed = b64url_decode(full)
        except FormatError:
            raise IntegrityError(f"name {text!r} is not an encrypted name") from None
        try:
            name = self._names_siv().decrypt(sealed, [self._dir_nonce])
        except (InvalidTag, ValueError):
            raise IntegrityError(f"name {text!r} failed authentication") from None
        if self._name_padding:
            # one padded form per name, so two entries never decrypt alike
            padded_len = len(name)
            name = name.rstrip(b"\x00")
            if padded_name_length(len(name), self._name_padding) != padded_len:
                raise IntegrityError(f"name {text!r} is not padded as its policy says")
        if not _valid_name(name) or name in _DOT_NAMES:
            raise IntegrityError(f"name {text!r} decrypts to an invalid name")
        return name

    def encrypt_symlink(self, target: bytes) -> str:
        """The on-disk target of a symlink (base64url, at most 4095 bytes)."""
        if len(target) > SYMLINK_TARGET_MAX:
            raise KeyfenceError(errno.ENAMETOOLONG)
        if not target or b"\x00" in target:
            raise FormatError("a symlink target is 1..3055 bytes without NUL")
        return b64url_encode(self._symlinks_siv().encrypt(bytes(target), [self._dir_nonce]))

    def decrypt_symlink(self, encoded: str | bytes) -> bytes:
        """The plaintext target; :class:`IntegrityError` if not authentic."""
        try:
            sealed = b64url_decode(encoded)
        except FormatError:
            raise IntegrityError("symlink target is not an encrypted target") from None
        try:
            target = self._symlinks_siv().decrypt(sealed, [self._dir_nonce])
        except (InvalidTag, ValueError):
            raise IntegrityError("symlink target failed authentication") from None
        if not target or b"\x00" in target:
            raise IntegrityError("symlink target decrypts to an invalid target")
        return target
