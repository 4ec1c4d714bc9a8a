"""The native sealer's own AES-256-GCM (fs/_gcm_vaes.c) against OpenSSL.

Where the CPU has VAES and VPCLMULQDQ, ``_sealer`` seals and opens with
fs/_gcm_vaes.c (checked against OpenSSL once at import).  Here every record
it makes must be the one ``cryptography``'s AESGCM (OpenSSL) makes from the
same key, nonce and associated data, for every length class of a block, and
the other way round; a changed byte anywhere in a record must be refused
with its plaintext slot zeroed; and ``set_gcm`` switches between the two.
tests/fs/test_sealer.py and the frozen vectors of tests/fs/test_format.py
run on whichever the import chose.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from keyfence.fs import sealer
from keyfence.fs.format import BLOCK_NONCE_SIZE as NONCE_SIZE
from keyfence.fs.format import BLOCK_OVERHEAD, BLOCK_SIZE, RECORD_SIZE


def _cpu_has_vaes() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    return all(x in flags for x in ("avx2", "aes", "pclmulqdq", "vaes", "vpclmulqdq"))


def _vaes_module() -> ModuleType:
    native = sealer.NATIVE
    if native is None:
        pytest.skip(f"native sealer not available: {sealer.describe()}")
    if not _cpu_has_vaes():
        pytest.skip("this CPU has no VAES/VPCLMULQDQ: the sealer uses OpenSSL only")
    if os.environ.get("KEYFENCE_NO_VAES", "") not in ("", "0"):
        pytest.skip("KEYFENCE_NO_VAES set")
    # the CPU has it: the import must have chosen it (its self test passed)
    assert native.gcm() == "vaes", "VAES AES-GCM failed its self test against OpenSSL"
    return native


@contextlib.contextmanager
def _using_vaes() -> Iterator[ModuleType]:
    """The native sealer on fs/_gcm_vaes.c, as it was before afterwards."""
    native = _vaes_module()
    before = native.set_gcm("vaes")
    try:
        yield native
    finally:
        native.set_gcm(before)


@pytest.fixture
def vaes() -> Iterator[ModuleType]:
    with _using_vaes() as native:
        yield native


def _aad(file_id: bytes, index: int) -> bytes:
    return file_id + index.to_bytes(8, "big")


def _openssl_record(key: bytes, file_id: bytes, index: int, nonce: bytes, block: bytes) -> bytes:
    return nonce + AESGCM(key).encrypt(nonce, block, _aad(file_id, index))


EDGES = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 127, 128, 129, 255, 256, 257]
EDGES += [511, 512, 1000, 4064, 4080, 4095, BLOCK_SIZE]


@pytest.mark.parametrize("length", EDGES)
def test_every_length_class_matches_openssl(vaes: ModuleType, length: int) -> None:
    key, file_id, nonce = os.urandom(32), os.urandom(16), os.urandom(NONCE_SIZE)
    block = os.urandom(length)
    index = int.from_bytes(os.urandom(8), "big")
    out = bytearray(length + BLOCK_OVERHEAD)
    assert vaes.seal(key, file_id, nonce, index, [block], out) == len(out)
    assert bytes(out) == _openssl_record(key, file_id, index, nonce, block)
    plain = bytearray(length)
    assert vaes.open(key, file_id, index, bytes(out), plain) == -1
    assert plain == block


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    file_id=st.binary(min_size=16, max_size=16),
    index=st.integers(0, 2**64 - 1),
    nonce=st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
    block=st.binary(min_size=1, max_size=BLOCK_SIZE),
)
def test_records_match_openssl(
    key: bytes, file_id: bytes, index: int, nonce: bytes, block: bytes
) -> None:
    with _using_vaes() as native:  # hypothesis runs each example without fixtures
        out = bytearray(len(block) + BLOCK_OVERHEAD)
        native.seal(key, file_id, nonce, index, [block], out)
        expected = _openssl_record(key, file_id, index, nonce, block)
        assert bytes(out) == expected
        assert native.open_new(key, file_id, index, expected) == (-1, bytearray(block))


def test_a_batch_is_what_openssl_makes_and_opens(vaes: ModuleType) -> None:
    """Many records in one call, the index counting from ``first`` or
    given per block, opened back by the other implementation."""
    key, file_id = os.urandom(32), os.urandom(16)
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(40)] + [os.urandom(1234)]
    nonces = os.urandom(NONCE_SIZE * len(blocks))
    out = bytearray(len(blocks) * RECORD_SIZE)
    total = vaes.seal(key, file_id, nonces, 2**40, blocks, out)
    expected = b"".join(
        _openssl_record(key, file_id, 2**40 + k, nonces[12 * k : 12 * k + 12], b)
        for k, b in enumerate(blocks)
    )
    assert bytes(out[:total]) == expected
    scattered = [5, 9, 10, 2**64 - 1]
    out2 = bytearray(4 * RECORD_SIZE)
    vaes.seal(key, file_id, nonces[:48], scattered, blocks[:4], out2)
    assert bytes(out2) == b"".join(
        _openssl_record(key, file_id, i, nonces[12 * k : 12 * k + 12], blocks[k])
        for k, i in enumerate(scattered)
    )
    vaes.set_gcm("openssl")
    assert vaes.open_new(key, file_id, 2**40, expected) == (-1, bytearray(b"".join(blocks)))
    vaes.set_gcm("vaes")
    assert vaes.open_new(key, file_id, 2**40, expected) == (-1, bytearray(b"".join(blocks)))


@pytest.mark.parametrize("where", ["nonce", "first", "middle", "last", "tag", "index", "key"])
def test_a_changed_record_is_refused_and_its_slot_zeroed(vaes: ModuleType, where: str) -> None:
    key, file_id = os.urandom(32), os.urandom(16)
    blocks = [os.urandom(BLOCK_SIZE), os.urandom(BLOCK_SIZE), os.urandom(100)]
    out = bytearray(2 * RECORD_SIZE + 100 + BLOCK_OVERHEAD)
    vaes.seal(key, file_id, os.urandom(36), 7, blocks, out)
    first = 7
    second = RECORD_SIZE  # the second record is the one changed
    positions = {
        "nonce": second + 3,
        "first": second + NONCE_SIZE,
        "middle": second + NONCE_SIZE + 2000,
        "last": second + NONCE_SIZE + BLOCK_SIZE - 1,
        "tag": second + NONCE_SIZE + BLOCK_SIZE + 15,
    }
    if where in positions:
        out[positions[where]] ^= 0x80
    elif where == "index":
        first = 8
    else:
        key = bytes([key[0] ^ 1]) + key[1:]
    plain = bytearray(b"\xaa" * (2 * BLOCK_SIZE + 100))
    failed = vaes.open(key, file_id, first, bytes(out), plain)
    assert failed == (0 if where in ("index", "key") else 1)
    assert plain[failed * BLOCK_SIZE : (failed + 1) * BLOCK_SIZE] == bytes(BLOCK_SIZE)
    got, zeros = vaes.open_new(key, file_id, first, bytes(out))
    assert got == failed and zeros == bytearray(len(zeros))


def test_a_hole_reads_as_zeros(vaes: ModuleType) -> None:
    key, file_id = os.urandom(32), os.urandom(16)
    out = bytearray(3 * RECORD_SIZE)
    vaes.seal(key, file_id, os.urandom(36), 0, [os.urandom(BLOCK_SIZE)] * 3, out)
    out[RECORD_SIZE : 2 * RECORD_SIZE] = bytes(RECORD_SIZE)
    failed, plain = vaes.open_new(key, file_id, 0, bytes(out))
    assert failed == -1
    assert plain[BLOCK_SIZE : 2 * BLOCK_SIZE] == bytes(BLOCK_SIZE)


def test_set_gcm_switches_and_refuses_nonsense(vaes: ModuleType) -> None:
    assert vaes.gcm() == "vaes"
    assert vaes.set_gcm("openssl") == "vaes"
    assert vaes.gcm() == "openssl"
    assert vaes.set_gcm("vaes") == "openssl"
    for bad in ("aes", "", "VAES"):
        with pytest.raises(ValueError):
            vaes.set_gcm(bad)
    with pytest.raises(TypeError):
        vaes.set_gcm(b"vaes")
    assert vaes.gcm() == "vaes"


def test_environment_turns_it_off(vaes: ModuleType) -> None:
    code = "from keyfence.fs import _sealer; print(_sealer.gcm()); _sealer.set_gcm('vaes')"
    env = dict(os.environ, KEYFENCE_NO_VAES="1")
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.strip() == "openssl"
    assert "ValueError: no VAES AES-GCM" in run.stderr
    assert "vaes" in sealer.describe()
