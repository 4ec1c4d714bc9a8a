"""The native entry names (src/keyfence/fs/_names.c) against fs/crypto.py's.

``NameSealer.encode_name`` must give exactly what cryptography's AES-SIV
and fs/format.py's padding and base64url give (the frozen vectors in
tests/fs/test_format.py pass through it too), refuse what is not one name,
and encode nothing once wiped.
"""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

# built by setup.py (build_ext): not built is a failure here, not a skip
from keyfence.fs import _names
from keyfence.fs.crypto import DirectoryCipher, MasterKey
from keyfence.fs.format import NAME_PADDINGS, b64url_encode, padded_name_length


def _reference(key: bytes, nonce: bytes, padding: int, name: bytes) -> str:
    padded = name.ljust(padded_name_length(len(name), padding), b"\0")
    return b64url_encode(AESSIV(key).encrypt(padded, [nonce]))


@pytest.mark.parametrize("padding", [0, *NAME_PADDINGS])
def test_every_length_encodes_as_aes_siv_padded_and_base64url(padding: int) -> None:
    rng = random.Random(padding)
    key, nonce = rng.randbytes(64), rng.randbytes(16)
    sealer = _names.NameSealer(key, nonce, padding)
    for length in range(1, 256):
        name = bytes(rng.choice(b"abc\x01\x7f\x80\xff.-_ ") for _ in range(length))
        if name in (b".", b".."):  # those are refused (below)
            name = b"a" + name[1:]
        assert sealer.encode_name(name) == _reference(key, nonce, padding, name), length
        assert sealer.encode_name(bytearray(name)) == _reference(key, nonce, padding, name)


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"x" * 256, b"x" * 4096])
def test_what_is_not_one_name_is_refused(name: bytes) -> None:
    assert _names.NameSealer(os.urandom(64), os.urandom(16), 16).encode_name(name) is None


def test_a_wiped_sealer_encodes_nothing() -> None:
    sealer = _names.NameSealer(os.urandom(64), os.urandom(16), 16)
    assert sealer.encode_name(b"name") is not None
    sealer.wipe()
    assert sealer.encode_name(b"name") is None
    sealer.wipe()  # twice: nothing


@pytest.mark.parametrize(
    ("key", "nonce", "padding", "error"),
    [
        (bytes(32), bytes(16), 16, ValueError),
        (bytes(65), bytes(16), 16, ValueError),
        (bytes(64), bytes(12), 16, ValueError),
        (bytes(64), bytes(16), 3, ValueError),
        (bytes(64), bytes(16), 64, ValueError),
        ("key", bytes(16), 16, TypeError),
        (bytes(64), bytes(16), "16", TypeError),
    ],
)
def test_arguments_are_checked(key: object, nonce: object, padding: object, error: type) -> None:
    with pytest.raises(error):
        _names.NameSealer(key, nonce, padding)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _names.NameSealer(bytes(64), bytes(16), 16).encode_name("text")  # type: ignore[arg-type]


def test_its_repr_shows_no_key_and_no_nonce() -> None:
    key, nonce = b"\xab" * 64, b"\xcd" * 16
    text = repr(_names.NameSealer(key, nonce, 8))
    assert text == "<NameSealer padding=8>"


def test_a_directory_cipher_uses_it_and_wipes_it() -> None:
    cipher = DirectoryCipher(MasterKey(os.urandom(64)), os.urandom(16), 16)
    sealer = cipher.names_sealer
    assert isinstance(sealer, _names.NameSealer)
    enc = cipher.encrypt_name(b"some name")
    assert sealer.encode_name(b"some name") == enc.full
    assert cipher.decrypt_name(enc.disk_name) == b"some name"
    long = cipher.encrypt_name(b"l" * 200)
    assert long.is_long and sealer.encode_name(b"l" * 200) == long.full
    cipher.wipe()
    assert sealer.encode_name(b"some name") is None
