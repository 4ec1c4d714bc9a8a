"""The on-disk format and crypto of the encrypted overlay (docs/format.md).

Frozen vectors (tests/fs/vectors/*.json) pin format version 1: a change that
breaks one of them breaks files already written.  The e4crypt tests compare
with Debian's real /usr/sbin/e4crypt inside a throw-away session keyring.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from keyfence.fs import e4crypt_compat as e4
from keyfence.fs import sealer
from keyfence.fs.crypto import (
    DirectoryCipher,
    FileCipher,
    MasterKey,
    derive_file_key,
    derive_names_key,
    derive_symlinks_key,
    key_identifier,
    urandom_nonce,
)
from keyfence.fs.format import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    FILE_HEADER_SIZE,
    POLICY_FILE_NAME,
    RECORD_SIZE,
    SYMLINK_TARGET_MAX,
    ContentsMode,
    FileHeader,
    FormatError,
    IntegrityError,
    KeyKind,
    KeyRef,
    NamesMode,
    Policy,
    b64url_decode,
    b64url_encode,
    backing_size,
    block_range,
    check_long_name,
    is_hidden_name,
    is_long_name,
    is_sidecar_name,
    long_name_for,
    plaintext_size,
    record_offset,
    record_size,
    sidecar_name,
)
from keyfence.testing.draws import drawn_in_threads, from_a_forked_child

VECTORS = Path(__file__).parent / "vectors"
MASTER = bytes(range(64))
OTHER_MASTER = bytes(range(1, 65))
FILE_ID = bytes(range(0xF0, 0x100))
DIR_NONCE = bytes(range(0xA0, 0xB0))


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def fixed_nonces(*nonces: bytes) -> Callable[[int], bytes]:
    it: Iterator[bytes] = iter(nonces)

    def source(n: int) -> bytes:
        value = next(it)
        assert len(value) == n
        return value

    return source


def counting_nonces() -> Callable[[int], bytes]:
    counter = iter(range(1, 1 << 60))

    def source(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    return source


@pytest.fixture(scope="module", autouse=True, params=["native", "python"])
def sealing_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here (the frozen vectors too) on both ways of sealing
    contents: the native batch sealer and Python (fs/sealer.py)."""
    if request.param == "native" and sealer.NATIVE is None:
        pytest.skip(f"native sealer not available: {sealer.describe()}")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(sealer, "NATIVE", None)
        yield request.param


@pytest.fixture
def master() -> MasterKey:
    return MasterKey(MASTER)


@pytest.fixture
def cipher(master: MasterKey) -> FileCipher:
    return master.file_cipher(FILE_ID)


@pytest.fixture
def directory(master: MasterKey) -> DirectoryCipher:
    return master.directory_cipher(DIR_NONCE)


def _hkdf(key: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=length, salt=salt, info=info).derive(key)


# --- frozen vectors ----------------------------------------------------------


def test_vectors_keys() -> None:
    v = load("keys.json")
    key = bytes.fromhex(v["master_key"])
    m = MasterKey(key)
    assert m.identifier == key_identifier(key) == v["key_identifier"]
    assert m.key_ref().description == v["keyring_description"]
    assert m.e4crypt_descriptor == v["e4crypt_descriptor_of_master"]
    fid, nonce = bytes.fromhex(v["file_id"]), bytes.fromhex(v["dir_nonce"])
    assert derive_file_key(key, fid).hex() == v["file_key"]
    assert derive_names_key(key, nonce).hex() == v["names_key"]
    assert derive_symlinks_key(key, nonce).hex() == v["symlinks_key"]


def test_vectors_e4crypt() -> None:
    for case in load("e4crypt.json")["cases"]:
        salt = e4.parse_salt(case["salt_argument"])
        assert salt == bytes.fromhex(case["salt"])
        key = e4.derive_key(case["passphrase"].encode(), bytes.fromhex(case["salt"]))
        assert key.hex() == case["key"]
        assert e4.descriptor(key) == case["descriptor"]
        assert e4.key_description(case["descriptor"]) == case["keyring_description"]
        assert MasterKey(key).identifier == case["key_identifier"]
        assert MasterKey.from_e4crypt(case["passphrase"].encode(), salt).raw == key


def test_vectors_contents() -> None:
    v = load("contents.json")
    m = MasterKey(bytes.fromhex(v["master_key"]))
    fid = bytes.fromhex(v["file_id"])
    assert FileHeader(fid).serialize().hex() == v["header"]
    blocks = v["blocks"]
    writer = m.file_cipher(
        fid, nonce_source=fixed_nonces(*(bytes.fromhex(b["nonce"]) for b in blocks))
    )
    reader = m.file_cipher(fid)
    for b in blocks:
        plain, record = bytes.fromhex(b["plaintext"]), bytes.fromhex(b["record"])
        assert writer.encrypt_block(b["index"], plain).hex() == b["record"]
        assert reader.decrypt_block(b["index"], record) == plain
    # the whole backing file reads back
    backing = bytes.fromhex(v["file"])
    header = FileHeader.parse(backing[:FILE_HEADER_SIZE])
    assert header.file_id == fid
    assert plaintext_size(len(backing)) == v["plaintext_size"]
    body = m.file_cipher(header.file_id).decrypt_blocks(0, backing[FILE_HEADER_SIZE:])
    assert bytes(body) == b"".join(bytes.fromhex(b["plaintext"]) for b in blocks)
    # and the batch call (the write-back's) makes the same records
    batch = m.file_cipher(
        fid, nonce_source=fixed_nonces(*(bytes.fromhex(b["nonce"]) for b in blocks))
    )
    records = batch.encrypt_blocks(0, b"".join(bytes.fromhex(b["plaintext"]) for b in blocks))
    assert bytes(records) == backing[FILE_HEADER_SIZE:]


def test_vectors_names() -> None:
    v = load("names.json")
    d = MasterKey(bytes.fromhex(v["master_key"])).directory_cipher(bytes.fromhex(v["dir_nonce"]))
    for entry in v["names"]:
        name = bytes.fromhex(entry["name"])
        enc = d.encrypt_name(name)
        assert enc.disk_name == entry["disk_name"] and not enc.is_long
        assert d.decrypt_name(entry["disk_name"]) == name
    for entry in v["long_names"]:
        name = bytes.fromhex(entry["name"])
        enc = d.encrypt_name(name)
        assert enc.disk_name == entry["disk_name"]
        assert enc.sidecar_name == entry["sidecar_name"]
        assert enc.full == entry["sidecar_content"]
        assert d.decrypt_name(entry["disk_name"], entry["sidecar_content"].encode()) == name


def test_vectors_symlinks() -> None:
    v = load("symlinks.json")
    d = MasterKey(bytes.fromhex(v["master_key"])).directory_cipher(bytes.fromhex(v["dir_nonce"]))
    for entry in v["targets"]:
        target = bytes.fromhex(entry["target"])
        assert d.encrypt_symlink(target) == entry["encoded"]
        assert d.decrypt_symlink(entry["encoded"]) == target


def test_vectors_policy() -> None:
    kinds = {"identifier": KeyKind.IDENTIFIER, "e4crypt-descriptor": KeyKind.E4CRYPT_DESCRIPTOR}
    for entry in load("policy.json")["records"]:
        policy = Policy(
            KeyRef(kinds[entry["key_kind"]], bytes.fromhex(entry["key"])),
            bytes.fromhex(entry["dir_nonce"]),
        )
        assert policy.serialize().hex() == entry["record"]
        parsed = Policy.parse(bytes.fromhex(entry["record"]))
        assert parsed == policy
        assert parsed.key.description == entry["keyring_description"]
        assert parsed.contents_mode.label == entry["contents"]
        assert parsed.names_mode.label == entry["names"]


def test_spec_rederived_from_primitives() -> None:
    """docs/format.md, step by step with cryptography's primitives only."""
    v = load("keys.json")
    assert _hkdf(MASTER, None, b"keyfence\x00key-identifier", 16).hex() == v["key_identifier"]
    file_key = _hkdf(MASTER, FILE_ID, b"keyfence\x00contents", 32)
    c = load("contents.json")["blocks"][1]
    nonce = bytes.fromhex(c["nonce"])
    aad = FILE_ID + (1).to_bytes(8, "big")
    sealed = AESGCM(file_key).encrypt(nonce, bytes.fromhex(c["plaintext"]), aad)
    assert (nonce + sealed).hex() == c["record"]
    names = AESSIV(_hkdf(MASTER, DIR_NONCE, b"keyfence\x00names", 64))
    n = load("names.json")["names"][0]
    ct = names.encrypt(bytes.fromhex(n["name"]), [DIR_NONCE])
    assert ct[:16] != ct[16:]  # tag first, then ciphertext
    assert base64.urlsafe_b64encode(ct).rstrip(b"=").decode() == n["disk_name"]
    long = load("names.json")["long_names"][0]
    digest = hashes.Hash(hashes.SHA256())
    digest.update(long["sidecar_content"].encode())
    expected = "kf.long." + base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode()
    assert expected == long["disk_name"]
    links = AESSIV(_hkdf(MASTER, DIR_NONCE, b"keyfence\x00symlinks", 64))
    s = load("symlinks.json")["targets"][0]
    sealed_target = links.encrypt(bytes.fromhex(s["target"]), [DIR_NONCE])
    assert base64.urlsafe_b64encode(sealed_target).rstrip(b"=").decode() == s["encoded"]


def test_generator_matches_vectors() -> None:
    from tests.fs.vectors import generate

    for name, content in generate.build().items():
        assert json.loads(json.dumps(content)) == load(name), name


# --- policy records ----------------------------------------------------------


def test_policy_round_trip_and_inheritance(master: MasterKey) -> None:
    for kind in KeyKind:
        policy = Policy(master.key_ref(kind), DIR_NONCE)
        data = policy.serialize()
        assert len(data) == 40
        assert Policy.parse(data) == policy
        child = policy.with_nonce(bytes(16))
        assert child.same_key_and_modes(policy) and child != policy
    other = Policy(MasterKey(OTHER_MASTER).key_ref(), DIR_NONCE)
    assert not other.same_key_and_modes(Policy(master.key_ref(), DIR_NONCE))


def test_policy_parse_rejects_bad_input(master: MasterKey) -> None:
    good = bytearray(Policy(master.key_ref(KeyKind.E4CRYPT_DESCRIPTOR), DIR_NONCE).serialize())

    def bad(data: bytes | bytearray, message: str) -> None:
        with pytest.raises(FormatError, match=message):
            Policy.parse(bytes(data))

    bad(good[:-1], "39 bytes")
    bad(good + b"\x00", "41 bytes")
    bad(b"", "0 bytes")
    for offset, value, message in [
        (0, ord("X"), "bad magic"),
        (4, 3, "unsupported policy version 3"),
        (4, 2, "a version 2 policy record is 44 bytes, not 40"),
        (5, 3, "unknown key reference kind 3"),
        (5, 0, "unknown key reference kind 0"),
        (6, 9, "unknown contents mode 9"),
        (7, 9, "unknown names mode 9"),
        (16, 1, "padding is not zero"),
    ]:
        broken = bytearray(good)
        broken[offset] = value
        bad(broken, message)
    assert issubclass(FormatError, ValueError)


def test_policy_and_key_ref_validation() -> None:
    with pytest.raises(FormatError):
        KeyRef(KeyKind.IDENTIFIER, bytes(8))
    with pytest.raises(FormatError):
        KeyRef(KeyKind.E4CRYPT_DESCRIPTOR, bytes(16))
    with pytest.raises(FormatError):
        Policy(KeyRef(KeyKind.IDENTIFIER, bytes(16)), bytes(15))
    with pytest.raises(FormatError):
        Policy(KeyRef(KeyKind.IDENTIFIER, bytes(16)), bytes(16), name_padding=2)
    ref = KeyRef.from_description("keyfence:" + "ab" * 16)
    assert ref.kind is KeyKind.IDENTIFIER and str(ref) == "keyfence:" + "ab" * 16
    assert KeyRef.from_description("ext4:0123456789abcdef").kind is KeyKind.E4CRYPT_DESCRIPTOR
    for text in ["ext4:0123456789ABCDEF", "ext4:0123", "keyfence:" + "ab" * 8, "user:x", ""]:
        with pytest.raises(FormatError):
            KeyRef.from_description(text)
    assert ContentsMode.AES_256_GCM_4K.label == "AES-256-GCM-4K"
    assert NamesMode.AES_SIV_B64URL.label == "AES-SIV-B64URL"


# --- file header and size arithmetic -----------------------------------------


def test_file_header() -> None:
    header = FileHeader(FILE_ID)
    data = header.serialize()
    assert len(data) == FILE_HEADER_SIZE and data[:4] == b"KFC1"
    assert FileHeader.parse(data + b"rest of file") == header
    with pytest.raises(IntegrityError) as info:
        FileHeader.parse(data[:10])
    assert info.value.errno == errno.EIO
    for offset, value, message in [(0, 0, "bad magic"), (5, 2, "version 2"), (7, 1, "reserved")]:
        broken = bytearray(data)
        broken[offset] = value
        with pytest.raises(FormatError, match=message):
            FileHeader.parse(bytes(broken))
    with pytest.raises(FormatError):
        FileHeader(bytes(15))


@given(st.integers(min_value=0, max_value=1 << 40))
def test_size_round_trip(size: int) -> None:
    on_disk = backing_size(size)
    assert plaintext_size(on_disk) == size
    if size:
        last = (size - 1) // BLOCK_SIZE
        assert on_disk == record_offset(last) + record_size(size - last * BLOCK_SIZE)


def test_size_arithmetic_edges() -> None:
    assert backing_size(0) == 0 and plaintext_size(0) == 0
    assert plaintext_size(FILE_HEADER_SIZE) == 0
    assert backing_size(1) == FILE_HEADER_SIZE + 1 + BLOCK_OVERHEAD
    assert backing_size(BLOCK_SIZE) == FILE_HEADER_SIZE + RECORD_SIZE
    assert backing_size(BLOCK_SIZE + 1) == FILE_HEADER_SIZE + RECORD_SIZE + 29
    assert record_offset(0) == 24 and record_offset(3) == 24 + 3 * 4124
    for size in range(1, FILE_HEADER_SIZE):
        with pytest.raises(IntegrityError):
            plaintext_size(size)
    for rest in range(1, BLOCK_OVERHEAD + 1):
        with pytest.raises(IntegrityError) as info:
            plaintext_size(FILE_HEADER_SIZE + 2 * RECORD_SIZE + rest)
        assert info.value.block == 2 and "block 2" in str(info.value)
    assert list(block_range(0, 0)) == []
    assert list(block_range(0, 1)) == [0]
    assert list(block_range(4095, 2)) == [0, 1]
    assert list(block_range(8192, 4096)) == [2]
    with pytest.raises(ValueError):
        record_size(0)
    with pytest.raises(ValueError):
        record_size(BLOCK_SIZE + 1)


# --- contents ------------------------------------------------------------------


def test_block_round_trips(cipher: FileCipher) -> None:
    for size in [1, 16, 100, BLOCK_SIZE - 1, BLOCK_SIZE]:
        plain = os.urandom(size)
        for index in [0, 1, 12345, (1 << 64) - 1]:
            record = cipher.encrypt_block(index, plain)
            assert len(record) == record_size(size)
            assert cipher.decrypt_block(index, record) == plain
            assert cipher.decrypt_block(index, bytearray(record)) == plain
            assert cipher.decrypt_block(index, memoryview(record)) == plain
    with pytest.raises(ValueError):
        cipher.encrypt_block(0, b"")
    with pytest.raises(ValueError):
        cipher.encrypt_block(0, bytes(BLOCK_SIZE + 1))
    with pytest.raises(ValueError):
        cipher.encrypt_block(-1, b"x")
    with pytest.raises(ValueError):
        cipher.encrypt_block(1 << 64, b"x")
    with pytest.raises(ValueError):
        cipher.decrypt_block(0, bytes(RECORD_SIZE + 1))
    for first in (-1, (1 << 64) - 1):
        with pytest.raises(ValueError):
            cipher.encrypt_blocks(first, bytes(BLOCK_SIZE + 1))
        with pytest.raises(ValueError):
            cipher.decrypt_blocks(first, bytes(RECORD_SIZE + 30))
    last = cipher.encrypt_blocks((1 << 64) - 1, b"end")
    assert bytes(cipher.decrypt_blocks((1 << 64) - 1, last)) == b"end"


def test_nonces_are_fresh(cipher: FileCipher) -> None:
    plain = b"same block"
    records = {cipher.encrypt_block(0, plain) for _ in range(1000)}
    assert len(records) == 1000
    assert len({r[:12] for r in records}) == 1000


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5 * BLOCK_SIZE + 7), st.integers(min_value=0, max_value=1 << 40))
def test_multi_block_matches_single_blocks(data: bytes, first: int) -> None:
    writer = MasterKey(MASTER).file_cipher(FILE_ID, nonce_source=counting_nonces())
    single = MasterKey(MASTER).file_cipher(FILE_ID, nonce_source=counting_nonces())
    records = writer.encrypt_blocks(first, data)
    chunks = [data[i : i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]
    expected = b"".join(single.encrypt_block(first + i, c) for i, c in enumerate(chunks))
    assert bytes(records) == expected
    assert len(records) == backing_size(len(data)) - (FILE_HEADER_SIZE if data else 0)
    assert bytes(writer.decrypt_blocks(first, records)) == data
    # and block by block
    out = b"".join(
        single.decrypt_block(first + i, records[i * RECORD_SIZE : (i + 1) * RECORD_SIZE])
        for i in range(len(chunks))
    )
    assert out == data


def test_holes_read_as_zeros(cipher: FileCipher) -> None:
    assert cipher.decrypt_block(7, bytes(RECORD_SIZE)) == bytes(BLOCK_SIZE)
    assert cipher.decrypt_block(7, bytes(BLOCK_OVERHEAD + 5)) == bytes(5)
    # a sparse file: record 1 never written (a hole), record 2 the last, short
    r0 = cipher.encrypt_block(0, b"a" * BLOCK_SIZE)
    r2 = cipher.encrypt_block(2, b"c" * 10)
    body = r0 + bytes(RECORD_SIZE) + r2
    assert plaintext_size(FILE_HEADER_SIZE + len(body)) == 2 * BLOCK_SIZE + 10
    assert bytes(cipher.decrypt_blocks(0, body)) == b"a" * 4096 + bytes(4096) + b"c" * 10
    # a zero nonce with anything else non-zero is not a hole
    almost = bytearray(RECORD_SIZE)
    almost[-1] = 1
    with pytest.raises(IntegrityError):
        cipher.decrypt_block(7, bytes(almost))


def _flip(data: bytes, position: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def test_tampering_is_detected(master: MasterKey, cipher: FileCipher) -> None:
    plain = os.urandom(BLOCK_SIZE)
    record = cipher.encrypt_block(5, plain)
    positions = {
        "nonce": range(0, 12),
        "ciphertext": [12, 13, 100, 2000, 12 + BLOCK_SIZE - 1],
        "tag": range(12 + BLOCK_SIZE, RECORD_SIZE),
    }
    for part, where in positions.items():
        for pos in where:
            for bit in (0, 7):
                with pytest.raises(IntegrityError) as info:
                    cipher.decrypt_block(5, _flip(record, pos, bit))
                assert info.value.errno == errno.EIO, part
                assert info.value.block == 5
                assert "block 5" in str(info.value)
    # moved to another index of the same file
    with pytest.raises(IntegrityError, match="block 6"):
        cipher.decrypt_block(6, record)
    # moved into another file (same master key, other file id)
    other = master.file_cipher(bytes(16))
    with pytest.raises(IntegrityError):
        other.decrypt_block(5, record)
    # a file key made with the right id but read as another id's file
    same_key_other_id = FileCipher(derive_file_key(MASTER, FILE_ID), bytes(16))
    with pytest.raises(IntegrityError):
        same_key_other_id.decrypt_block(5, record)
    # two records swapped within a file
    r0, r1 = cipher.encrypt_block(0, b"A" * BLOCK_SIZE), cipher.encrypt_block(1, b"B" * BLOCK_SIZE)
    with pytest.raises(IntegrityError) as info:
        cipher.decrypt_blocks(0, r1 + r0)
    assert info.value.block == 0
    # the failing block is named in multi-block reads
    with pytest.raises(IntegrityError) as info:
        cipher.decrypt_blocks(0, r0 + _flip(r1, 40))
    assert info.value.block == 1
    # a short last record that was cut (not a hole): the tag no longer fits
    short = cipher.encrypt_block(9, b"0123456789")
    with pytest.raises(IntegrityError):
        cipher.decrypt_block(9, short[:-1])
    with pytest.raises(IntegrityError):
        cipher.decrypt_block(9, short + b"\x00")


def test_truncated_and_torn_records(cipher: FileCipher) -> None:
    record = cipher.encrypt_block(3, os.urandom(BLOCK_SIZE))
    for length in range(0, BLOCK_OVERHEAD + 1):
        with pytest.raises(IntegrityError, match="block 3 truncated") as info:
            cipher.decrypt_block(3, record[:length])
        assert info.value.errno == errno.EIO and info.value.block == 3
    with pytest.raises(IntegrityError, match="block 3"):
        cipher.decrypt_block(3, record[: RECORD_SIZE - 1])
    with pytest.raises(IntegrityError, match="block 4 truncated"):
        cipher.decrypt_blocks(0, record * 4 + record[:20])
    # torn write: the new record reached the disk only up to a sector boundary
    newer = cipher.encrypt_block(3, os.urandom(BLOCK_SIZE))
    for cut in (512, 2048, 4096):
        torn = newer[:cut] + record[cut:]
        with pytest.raises(IntegrityError):
            cipher.decrypt_block(3, torn)
    # torn with zeros (the rest of the record never written, reads as zeros)
    with pytest.raises(IntegrityError):
        cipher.decrypt_block(3, newer[:2048] + bytes(RECORD_SIZE - 2048))


def test_wrong_key(cipher: FileCipher) -> None:
    record = cipher.encrypt_block(0, b"secret")
    wrong = MasterKey(OTHER_MASTER).file_cipher(FILE_ID)
    with pytest.raises(IntegrityError) as info:
        wrong.decrypt_block(0, record)
    assert info.value.errno == errno.EIO
    assert "wrong key" in str(info.value)
    err = info.value.for_file("dir/file.txt")
    assert "dir/file.txt" in str(err) and err.filename == "dir/file.txt"


def test_nonce_source_length_checked(master: MasterKey) -> None:
    bad = master.file_cipher(FILE_ID, nonce_source=lambda n: bytes(n + 1))
    with pytest.raises(ValueError):
        bad.encrypt_block(0, b"x")
    with pytest.raises(ValueError):
        bad.encrypt_blocks(0, b"x")


# --- names ---------------------------------------------------------------------


def test_name_round_trips(directory: DirectoryCipher) -> None:
    for name in [
        b"a",
        b"hello.txt",
        b".hidden",
        b"...",
        "\u00e9t\u00e9".encode(),
        b"\xff\xfe",
        b"x" * 255,
    ]:
        enc = directory.encrypt_name(name)
        assert directory.decrypt_name(enc.disk_name, enc.sidecar_content) == name
        assert directory.decrypt_name(enc.disk_name.encode(), enc.sidecar_content) == name
        assert len(enc.disk_name) <= 255
        assert not is_hidden_name(enc.disk_name)
    for dot in [b".", b".."]:
        enc = directory.encrypt_name(dot)
        assert enc.disk_name == dot.decode() and not enc.is_long
        assert directory.decrypt_name(dot.decode()) == dot


def test_names_are_deterministic_per_directory(master: MasterKey) -> None:
    a, b = master.directory_cipher(DIR_NONCE), master.directory_cipher(bytes(16))
    assert a.encrypt_name(b"x") == a.encrypt_name(b"x")
    assert a.encrypt_name(b"x") != b.encrypt_name(b"x")
    with pytest.raises(IntegrityError):
        b.decrypt_name(a.encrypt_name(b"x").disk_name)  # renamed across directories
    other = MasterKey(OTHER_MASTER).directory_cipher(DIR_NONCE)
    with pytest.raises(IntegrityError):
        other.decrypt_name(a.encrypt_name(b"x").disk_name)  # wrong key


def test_long_name_threshold(directory: DirectoryCipher) -> None:
    # 175 plaintext bytes + 16 tag = 191 bytes -> 255 base64url characters
    assert not directory.encrypt_name(b"n" * 175).is_long
    assert len(directory.encrypt_name(b"n" * 175).disk_name) == 255
    long = directory.encrypt_name(b"n" * 176)
    assert long.is_long and len(long.full) == 256
    assert is_long_name(long.disk_name) and len(long.disk_name) == 51
    assert long.sidecar_name == long.disk_name + ".name"
    assert is_sidecar_name(long.sidecar_name) and is_hidden_name(long.sidecar_name)
    assert not is_hidden_name(long.disk_name)
    assert long.disk_name == long_name_for(long.full)
    assert check_long_name(long.disk_name, long.full.encode()) == long.full


def test_long_name_sidecar_problems(directory: DirectoryCipher) -> None:
    a = directory.encrypt_name(b"a" * 200)
    b = directory.encrypt_name(b"b" * 200)
    assert a.sidecar_content is not None and b.sidecar_content is not None
    with pytest.raises(FormatError):
        directory.decrypt_name(a.disk_name)  # sidecar missing
    with pytest.raises(IntegrityError):
        directory.decrypt_name(a.disk_name, b.sidecar_content)  # sidecars swapped
    with pytest.raises(IntegrityError):
        directory.decrypt_name(a.disk_name, a.sidecar_content[:-1])  # truncated
    with pytest.raises(IntegrityError):
        directory.decrypt_name(a.disk_name, a.sidecar_content + b"\n")
    with pytest.raises(IntegrityError):
        directory.decrypt_name(a.disk_name, b"\xff" * 300)
    # a sidecar consistent with its hash but holding a short name is refused
    short = directory.encrypt_name(b"short").full
    with pytest.raises(IntegrityError):
        directory.decrypt_name(long_name_for(short), short.encode())
    # forged: hash matches, ciphertext altered -> authentication fails
    forged = a.full[:-2] + ("A" if a.full[-2] != "A" else "B") + a.full[-1]
    with pytest.raises(IntegrityError):
        directory.decrypt_name(long_name_for(forged), forged.encode())
    with pytest.raises(FormatError):
        sidecar_name("hello")


def test_corrupted_names(directory: DirectoryCipher) -> None:
    disk = directory.encrypt_name(b"important.doc").disk_name
    candidates = [
        disk[:-1],
        disk[:-4],
        disk[1:],
        ("B" if disk[0] == "A" else "A") + disk[1:],
        disk + "A",
        "A" * len(disk),
        "AA",
        "A",
        "not base64!",
        "\u00e9" + disk,
        disk.replace(disk[5], "+") if disk[5] != "+" else disk.replace(disk[5], "/"),
    ]
    for bad in candidates:
        with pytest.raises(IntegrityError) as info:
            directory.decrypt_name(bad)
        assert info.value.errno == errno.EIO
    with pytest.raises(IntegrityError):
        directory.decrypt_name(b"\xff\xfe")
    with pytest.raises(IntegrityError):
        directory.decrypt_name("A" * 256)  # longer than any short name
    # non-canonical base64url (unused low bits set) is refused
    canonical = b64url_encode(b"\x00")
    assert canonical == "AA"
    with pytest.raises(FormatError):
        b64url_decode("AB")
    for hidden in [POLICY_FILE_NAME, "kf.long.x", "a.b"]:
        with pytest.raises(FormatError):
            directory.decrypt_name(hidden)


def test_invalid_plaintext_names(directory: DirectoryCipher) -> None:
    for bad in [b"", b"a/b", b"a\x00b", b"/"]:
        with pytest.raises(FormatError):
            directory.encrypt_name(bad)
    with pytest.raises(OSError) as info:
        directory.encrypt_name(b"x" * 256)
    assert info.value.errno == errno.ENAMETOOLONG


def test_authentic_but_invalid_names_are_refused(master: MasterKey) -> None:
    siv = AESSIV(derive_names_key(MASTER, DIR_NONCE))
    d = master.directory_cipher(DIR_NONCE)
    for bad in [b"a/b", b".", b"..", b"a\x00"]:
        disk = b64url_encode(siv.encrypt(bad, [DIR_NONCE]))
        with pytest.raises(IntegrityError):
            d.decrypt_name(disk)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\x00" not in n))
def test_encrypted_names_never_collide_with_reserved_names(name: bytes) -> None:
    d = MasterKey(MASTER).directory_cipher(DIR_NONCE)
    enc = d.encrypt_name(name)
    if name in (b".", b".."):
        return
    assert "." not in enc.full and re.fullmatch(r"[A-Za-z0-9_-]+", enc.full)
    assert not is_hidden_name(enc.disk_name)
    assert enc.disk_name != POLICY_FILE_NAME
    assert enc.is_long == (len(enc.full) > 255)
    assert d.decrypt_name(enc.disk_name, enc.sidecar_content) == name


# --- symlinks ------------------------------------------------------------------


def test_symlink_targets(directory: DirectoryCipher, master: MasterKey) -> None:
    for target in [b"x", b"../a/b", b"/abs/path", "\u00fc".encode(), b"t" * SYMLINK_TARGET_MAX]:
        encoded = directory.encrypt_symlink(target)
        assert len(encoded) <= 4095 and re.fullmatch(r"[A-Za-z0-9_-]+", encoded)
        assert directory.decrypt_symlink(encoded) == target
        assert directory.decrypt_symlink(encoded.encode()) == target
    assert len(directory.encrypt_symlink(b"t" * SYMLINK_TARGET_MAX)) == 4095
    with pytest.raises(OSError) as info:
        directory.encrypt_symlink(b"t" * (SYMLINK_TARGET_MAX + 1))
    assert info.value.errno == errno.ENAMETOOLONG
    for bad in [b"", b"a\x00"]:
        with pytest.raises(FormatError):
            directory.encrypt_symlink(bad)
    encoded = directory.encrypt_symlink(b"target")
    for broken in [encoded[:-1], encoded[1:], "A" + encoded[1:], encoded + "A", "", "!!"]:
        with pytest.raises(IntegrityError):
            directory.decrypt_symlink(broken)
    # keys are separated: a name does not decrypt as a symlink target and back
    name = directory.encrypt_name(b"target").disk_name
    with pytest.raises(IntegrityError):
        directory.decrypt_symlink(name)
    with pytest.raises(IntegrityError):
        directory.decrypt_name(encoded)
    with pytest.raises(IntegrityError):
        master.directory_cipher(bytes(16)).decrypt_symlink(encoded)


# --- keys ------------------------------------------------------------------------


def test_master_key(master: MasterKey) -> None:
    assert master.raw == MASTER
    assert len(master.identifier) == 32
    assert master.key_ref().description == "keyfence:" + master.identifier
    desc = master.key_ref(KeyKind.E4CRYPT_DESCRIPTOR)
    assert desc.description == "ext4:" + e4.descriptor(MASTER)
    assert master.matches(desc) and master.matches(master.key_ref())
    assert not MasterKey(OTHER_MASTER).matches(desc)
    assert master == MasterKey(MASTER) and master != MasterKey(OTHER_MASTER)
    assert hash(master) == hash(MasterKey(MASTER))
    for bad in [b"", bytes(32), bytes(65)]:
        with pytest.raises(FormatError):
            MasterKey(bad)
    policy = Policy(master.key_ref(), DIR_NONCE)
    assert DirectoryCipher.for_policy(master, policy).dir_nonce == DIR_NONCE
    with pytest.raises(FormatError):
        DirectoryCipher.for_policy(MasterKey(OTHER_MASTER), policy)
    header = FileHeader(FILE_ID)
    assert FileCipher.for_header(master, header).file_id == FILE_ID


def test_no_key_material_leaks(master: MasterKey, cipher: FileCipher) -> None:
    secrets = [
        MASTER.hex(),
        derive_file_key(MASTER, FILE_ID).hex(),
        derive_names_key(MASTER, DIR_NONCE).hex(),
        derive_symlinks_key(MASTER, DIR_NONCE).hex(),
    ]
    d = master.directory_cipher(DIR_NONCE)
    texts = [repr(master), str(master), repr(cipher), repr(d)]
    errors: list[BaseException] = []
    actions: list[Callable[[], object]] = [
        lambda: cipher.decrypt_block(0, os.urandom(100)),
        lambda: cipher.decrypt_block(0, b"short"),
        lambda: d.decrypt_name("AAAAAAAAAAAAAAAAAAAAAAAA"),
        lambda: d.decrypt_symlink("AAAAAAAAAAAAAAAAAAAAAAAA"),
        lambda: MasterKey(MASTER[:-1]),
        lambda: DirectoryCipher.for_policy(
            MasterKey(OTHER_MASTER), Policy(master.key_ref(), DIR_NONCE)
        ),
    ]
    for action in actions:
        try:
            action()
        except Exception as err:
            errors.append(err)
    assert len(errors) == 6
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    for text in texts:
        for secret in secrets:
            assert secret not in text and secret[:16] not in text
    for obj in (master, cipher, d):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


# --- nonce source ----------------------------------------------------------------


def test_urandom_nonce_unique_across_threads() -> None:
    flat = drawn_in_threads(lambda: urandom_nonce(12), threads=8, each=3000)
    assert len(flat) == 24000 and len(set(flat)) == 24000
    assert all(len(n) == 12 for n in flat)
    assert len(urandom_nonce(16)) == 16 and urandom_nonce(16) != urandom_nonce(16)


def test_urandom_nonce_fork_safety() -> None:
    urandom_nonce(12)  # make sure a batch is in the pool before forking
    child_bytes = from_a_forked_child(lambda: b"".join(urandom_nonce(12) for _ in range(100)))
    child = {child_bytes[i : i + 12] for i in range(0, len(child_bytes), 12)}
    parent = {urandom_nonce(12) for _ in range(100)}
    assert len(child) == 100 and not child & parent


# --- e4crypt compatibility -------------------------------------------------------


def test_parse_salt_syntaxes() -> None:
    u = "12345678-1234-1234-1234-123456789abc"
    assert e4.parse_salt("s:hello") == b"hello"
    assert e4.parse_salt("s:") == b""
    assert e4.parse_salt("s:h\u00e9") == "h\u00e9".encode()
    assert e4.parse_salt("s:" + "a" * 255) == b"a" * 255
    assert e4.parse_salt("0x0102ff") == b"\x01\x02\xff"
    assert e4.parse_salt("0x") == b""
    assert e4.parse_salt("0x" + "ab" * 256) == b"\xab" * 256
    assert e4.parse_salt(u) == uuid.UUID(u).bytes
    assert e4.parse_salt(u.upper()) == uuid.UUID(u).bytes
    assert e4.parse_salt("/mnt/data") == e4.PathSalt("/mnt/data")
    assert e4.parse_salt("f:relative/dir") == e4.PathSalt("relative/dir")
    assert e4.parse_salt(b"s:raw\xff") == b"raw\xff"
    for bad in [
        "hello",
        "0xAB",
        "0xabc",
        "0xzz",
        "0x" + "ab" * 257,
        "s:" + "a" * 256,
        "{" + u + "}",
        u.replace("-", ""),
        "urn:uuid:" + u,
        "",
        "s:a\x00b",
    ]:
        with pytest.raises(e4.SaltError, match="Invalid salt"):
            e4.parse_salt(bad)
    assert issubclass(e4.SaltError, FormatError)
    assert e4.resolve_salt(b"abc") == b"abc"


def test_passphrase_from_input() -> None:
    assert e4.passphrase_from_input(b"pw\n") == b"pw"
    assert e4.passphrase_from_input(b"pw") == b"pw"
    assert e4.passphrase_from_input(b"pw\r\n") == b"pw\r"
    assert e4.passphrase_from_input(b"pw\nsecond line\n") == b"pw"
    assert e4.passphrase_from_input(b"pw\x00zz\n") == b"pw"
    assert e4.passphrase_from_input(b"\n") == b""
    assert e4.passphrase_from_input(b"a" * 1100 + b"\n") == b"a" * 1023
    with pytest.raises(ValueError):
        e4.passphrase_from_input(b"")


def test_derive_key_limits_and_payload() -> None:
    with pytest.raises(ValueError):
        e4.derive_key(b"a" * 1025, b"")
    with pytest.raises(ValueError):
        e4.derive_key(b"a\x00b", b"")
    with pytest.raises(e4.SaltError):
        e4.derive_key(b"pw", bytes(257))
    key = e4.derive_key(b"a" * 1024, bytes(256))
    assert len(key) == 64
    payload = e4.kernel_payload(key)
    assert len(payload) == 72
    assert e4.key_from_payload(payload) == key and e4.key_from_payload(key) == key
    with pytest.raises(FormatError):
        e4.key_from_payload(bytes(71))
    with pytest.raises(FormatError):
        e4.descriptor(bytes(32))


def test_fs_pwsalt_on_a_filesystem_without_it(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="EXT4_IOC_GET_ENCRYPTION_PWSALT"):
        e4.resolve_salt(e4.PathSalt(str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        e4.fs_pwsalt(str(tmp_path / "missing"))
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/x {tmp_path} ext4 rw 0 0\nproc /proc proc rw 0 0\nbad\n")
    assert e4.default_salts(str(mounts)) == []
    assert e4.default_salts(str(tmp_path / "no-such-table")) == []


def _real_e4crypt_reason() -> str | None:
    for tool in ("e4crypt", "keyctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: e2fsprogs, keyutils)"
    return None


E4CRYPT_REASON = _real_e4crypt_reason()

# In a fresh anonymous session keyring (keyctl session -): add the key, find
# the logon key it made, show its description and try to read its payload.
_E4CRYPT_SCRIPT = r"""
e4crypt add_key "$@" || exit 90
desc=$(keyctl rlist @s | tr ' ' '\n' | while read -r id; do
  keyctl rdescribe "$id"; echo; done | grep -o 'ext4:[0-9a-f]*' | head -n1)
echo "DESCRIPTION=$desc"
id=$(keyctl search @s logon "$desc") || exit 91
keyctl rdescribe "$id"; echo
if keyctl pipe "$id" >/dev/null 2>&1; then echo READABLE; else echo UNREADABLE; fi
"""


def run_real_e4crypt(passphrase: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["keyctl", "session", "-", "sh", "-c", _E4CRYPT_SCRIPT, "e4crypt-test", *args],
        input=passphrase,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


@pytest.mark.kernel
@pytest.mark.skipif(E4CRYPT_REASON is not None, reason=E4CRYPT_REASON or "")
@pytest.mark.parametrize(
    ("passphrase", "salt"),
    [
        (b"hunter2\n", "0x0102030405060708"),
        (b"correct horse battery staple\n", "s:keyfence"),
        (b"pw\n", "12345678-1234-1234-1234-123456789ABC"),
        (b"pw\n", "0x"),
        (b"\n", "s:"),
        (b"p\xc3\xa4ss w\xc3\xb6rd\r\n", "s:h\u00e9llo"),
        (b"pw\nsecond line\n", "0x" + "ab" * 256),
        (b"a" * 1100 + b"\n", "s:" + "z" * 255),
        (b"no newline", "s:x"),
    ],
)
def test_descriptor_matches_real_e4crypt(passphrase: bytes, salt: str) -> None:
    result = run_real_e4crypt(passphrase, "-S", salt)
    assert result.returncode == 0, result.stderr + result.stdout
    printed = re.search(r"Added key with descriptor \[([0-9a-f]{16})\]", result.stdout)
    assert printed is not None, result.stdout
    parsed = e4.parse_salt(salt)
    assert isinstance(parsed, bytes)
    key = e4.derive_key(e4.passphrase_from_input(passphrase), parsed)
    assert printed.group(1) == e4.descriptor(key)
    assert f"DESCRIPTION=ext4:{printed.group(1)}" in result.stdout
    assert "logon;0;0;" in result.stdout and f";ext4:{printed.group(1)}" in result.stdout
    # the kernel never shows a logon payload, so only descriptors can be compared
    assert "UNREADABLE" in result.stdout


@pytest.mark.kernel
@pytest.mark.skipif(E4CRYPT_REASON is not None, reason=E4CRYPT_REASON or "")
@pytest.mark.parametrize(
    "salt", ["hello", "0xAB", "0xabc", "s:" + "a" * 256, "{x}", "0x" + "a" * 514]
)
def test_invalid_salts_rejected_like_real_e4crypt(salt: str) -> None:
    result = run_real_e4crypt(b"pw\n", "-S", salt)
    assert result.returncode != 0
    assert f"Invalid salt: {salt}" in result.stderr + result.stdout
    with pytest.raises(e4.SaltError, match=re.escape(f"Invalid salt: {salt}")):
        e4.parse_salt(salt)


@pytest.mark.kernel
@pytest.mark.skipif(E4CRYPT_REASON is not None, reason=E4CRYPT_REASON or "")
def test_path_salt_matches_real_e4crypt_on_ext4(tmp_path: Path) -> None:
    """``-S f:PATH`` and ``-S /PATH``: the ext4 superblock's password salt."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    image, where = tmp_path / "fs.img", tmp_path / "mnt"
    where.mkdir()
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-O", "encrypt", str(image)], check=True, timeout=60)
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    try:
        for form in (f"f:{where}", str(where)):
            result = run_real_e4crypt(b"pw\n", "-v", "-S", form)
            assert result.returncode == 0, result.stderr + result.stdout
            shown = re.search(r"has pw salt ([0-9a-f-]{36})", result.stdout)
            printed = re.search(r"descriptor \[([0-9a-f]{16})\]", result.stdout)
            assert shown is not None and printed is not None, result.stdout
            salt = e4.resolve_salt(e4.parse_salt(form))
            assert salt == uuid.UUID(shown.group(1)).bytes
            assert e4.descriptor(e4.derive_key(b"pw", salt)) == printed.group(1)
        # the password salt is not the filesystem UUID
        blkid = subprocess.run(
            ["blkid", "-s", "UUID", "-o", "value", str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
        if blkid.returncode == 0 and blkid.stdout.strip():
            assert uuid.UUID(blkid.stdout.strip()).bytes != salt
        lines = f"/dev/loop {where} ext4 rw 0 0\n/dev/loop {where} ext4 rw 0 0\n"
        table = tmp_path / "mounts"
        table.write_text(lines)
        assert e4.default_salts(str(table)) == [salt]
    finally:
        subprocess.run(["umount", str(where)], check=False, timeout=60)
