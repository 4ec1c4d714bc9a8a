"""Protector records (docs/format.md 3.1) against their frozen vector, re-derived
from cryptography's primitives as the document says; hostile records refused."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyfence.fs.format import FormatError, KeyRef, is_hidden_name
from keyfence.fs.protector import (
    PROTECTORS_FILE_NAME,
    LoginProtector,
    Protectors,
    ScryptParams,
    TooCostly,
    WrongPassphrase,
)

VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "protectors.json").read_text()
)
REF = KeyRef.from_description(VECTOR["keyring_description"])
MASTER = bytes.fromhex(VECTOR["master_key"])
LOGIN = VECTOR["login"]
PASSPHRASE = LOGIN["passphrase"].encode()


def test_the_vector_parses_and_opens() -> None:
    data = bytes.fromhex(VECTOR["file"])
    prot = Protectors.parse(data)
    assert prot.salts == [bytes.fromhex(VECTOR["e4crypt_salt"])]
    login = prot.login_for(LOGIN["uid"])
    assert login is not None
    assert login.unwrap(PASSPHRASE, REF) == MASTER
    assert prot.serialize() == data


def test_the_vector_from_primitives() -> None:
    """What docs/format.md 3.1 says, step by step."""
    salt, nonce = bytes.fromhex(LOGIN["salt"]), bytes.fromhex(LOGIN["nonce"])
    n, r, p = 1 << LOGIN["scrypt_log2_n"], LOGIN["scrypt_r"], LOGIN["scrypt_p"]
    kek = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(PASSPHRASE)
    assert kek.hex() == LOGIN["kek"]
    head = struct.pack(">IBBBB16s12s", LOGIN["uid"], 1, LOGIN["scrypt_log2_n"], r, p, salt, nonce)
    aad = b"keyfence\0login-protector" + head + VECTOR["keyring_description"].encode()
    wrapped = AESGCM(kek).encrypt(nonce, MASTER, aad)
    assert wrapped.hex() == LOGIN["wrapped"]
    e4salt = bytes.fromhex(VECTOR["e4crypt_salt"])
    file = (
        b"KFR1" + bytes([1, 0]) + struct.pack(">H", 2)
        + bytes([1, 0]) + struct.pack(">H", len(e4salt)) + e4salt
        + bytes([2, 0]) + struct.pack(">H", len(head) + len(wrapped)) + head + wrapped
    )  # fmt: skip
    assert file.hex() == VECTOR["file"]


def test_wrong_passphrase_and_other_key_fail() -> None:
    login = Protectors.parse(bytes.fromhex(VECTOR["file"])).logins[0]
    with pytest.raises(WrongPassphrase):
        login.unwrap(b"wrong", REF)
    other = KeyRef.from_description("keyfence:" + "00" * 16)
    with pytest.raises(WrongPassphrase):
        login.unwrap(PASSPHRASE, other)  # bound to the key it wraps


def test_rewrap_keeps_the_key_and_replaces_the_users_record() -> None:
    params = ScryptParams(10, 8, 1)
    prot = Protectors.parse(bytes.fromhex(VECTOR["file"]))
    new = LoginProtector.wrap(LOGIN["uid"], b"new pass", MASTER, REF, params=params)
    again = Protectors.parse(prot.with_login(new).serialize())
    assert len(again.logins) == 1 and again.salts == prot.salts
    assert again.logins[0].unwrap(b"new pass", REF) == MASTER
    with pytest.raises(WrongPassphrase):
        again.logins[0].unwrap(PASSPHRASE, REF)
    assert not Protectors.parse(again.without_login(LOGIN["uid"]).serialize()).logins


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],  # truncated
        lambda d: d + b"\0",  # trailing bytes
        lambda d: b"KFR2" + d[4:],  # magic
        lambda d: d[:4] + b"\x02" + d[5:],  # version
        lambda d: d[:6] + b"\x00\x03" + d[8:],  # more records than present
        lambda d: d[:8] + b"\x09" + d[9:],  # unknown kind
        lambda d: b"",
        lambda d: d[:8] + b"\x01\x00\xff\xff" + d[12:],  # oversize body length
    ],
)
def test_malformed_files_are_refused(mutate: Any) -> None:
    with pytest.raises(FormatError):
        Protectors.parse(mutate(bytes.fromhex(VECTOR["file"])))


def test_hostile_kdf_parameters_are_refused() -> None:
    body = bytearray(Protectors.parse(bytes.fromhex(VECTOR["file"])).logins[0].body())
    body[5] = 30  # N = 2^30: gigabytes
    with pytest.raises(FormatError):
        LoginProtector.from_body(bytes(body))


@pytest.mark.parametrize(
    ("log2_n", "r", "p"),
    [(20, 32, 16), (19, 8, 1), (18, 16, 1), (18, 8, 2), (15, 8, 16)],
)
def test_a_login_record_above_the_budget_is_refused_before_any_work(
    log2_n: int, r: int, p: int
) -> None:
    # within the format's range, so it parses; root must still not run it
    # at a login (tests/security/test_pam_protector_cost.py)
    params = ScryptParams(log2_n, r, p)
    costly = LoginProtector(1000, params, b"s" * 16, b"n" * 12, b"w" * 48)
    assert not params.within_login_budget()
    with pytest.raises(TooCostly, match="above a login's budget"):
        costly.unwrap(PASSPHRASE, REF)  # at once: 4 GiB of scrypt would take minutes
    with pytest.raises(TooCostly):
        LoginProtector.wrap(1000, PASSPHRASE, MASTER, REF, params=params)


def test_the_users_own_command_may_open_a_record_above_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # keyfence login passwd re-wraps such a record: the user pays, not a login
    cheap = ScryptParams(10, 8, 1)
    record = LoginProtector.wrap(1000, PASSPHRASE, MASTER, REF, params=cheap)
    monkeypatch.setattr("keyfence.fs.protector.LOGIN_MAX_WORK", 1 << 12)
    with pytest.raises(TooCostly):
        record.unwrap(PASSPHRASE, REF)
    assert record.unwrap(PASSPHRASE, REF, budget=False) == MASTER


def test_the_largest_login_cost_keyfence_login_writes_is_within_the_budget() -> None:
    assert ScryptParams(18, 8, 1).within_login_budget()  # --kdf-cost 18
    assert ScryptParams().within_login_budget()


def test_no_secret_in_repr_and_the_file_is_hidden() -> None:
    login = Protectors.parse(bytes.fromhex(VECTOR["file"])).logins[0]
    assert LOGIN["wrapped"] not in repr(login) and LOGIN["kek"] not in repr(login)
    assert is_hidden_name(PROTECTORS_FILE_NAME)
    pickle.dumps(login)  # not secret: the wrapped key is what the disk holds
