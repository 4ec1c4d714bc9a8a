"""Write the frozen test vectors of the on-disk format (version 1, and 3.2's
name padding, policy version 2).

Run once: ``.venv/bin/python tests/fs/vectors/generate.py``.  It refuses to
overwrite existing files: the vectors pin the format, so a file written
today reads back after any later change.  Regenerating them means changing
the format, which needs a new format version instead.

Inputs are fixed (master key, file id, directory nonce, block nonces, via an
injected nonce source).  The e4crypt descriptors were also checked against
Debian's ``/usr/sbin/e4crypt`` (e2fsprogs 1.47.0); see test_format.py for
the live comparison.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keyfence.fs import e4crypt_compat
from keyfence.fs.crypto import (
    MasterKey,
    derive_file_key,
    derive_names_key,
    derive_symlinks_key,
)
from keyfence.fs.format import NAME_PADDINGS, FileHeader, KeyKind, Policy, padded_name_length
from keyfence.fs.protector import LoginProtector, Protectors, ScryptParams

HERE = Path(__file__).parent

MASTER = bytes(range(64))
FILE_ID = bytes(range(0xF0, 0x100))
OTHER_FILE_ID = bytes(range(0xE0, 0xF0))
DIR_NONCE = bytes(range(0xA0, 0xB0))
BLOCK_NONCES = [bytes(range(0xB0, 0xBC)), bytes(range(0xC0, 0xCC))]
FULL_BLOCK = bytes(i % 251 for i in range(4096))
LAST_BLOCK = b"hello, keyfence\n"

E4CRYPT_CASES = [
    # passphrase, -S argument, descriptor printed by Debian's e4crypt 1.47.0
    ("hunter2", "0x0102030405060708", "e28e6032d715b2bb"),
    ("pw", "s:hello", "a97df5a4e4eafa41"),
    ("pw", "0x", "88b89836da21ab3f"),
    ("pw", "12345678-1234-1234-1234-123456789ABC", "0021de2202c0dde2"),
    ("", "s:hello", "74e79cabe991e3a7"),
]


def fixed_nonces(*nonces: bytes) -> Any:
    """A nonce source handing out exactly these values, in order."""
    it: Iterator[bytes] = iter(nonces)

    def source(n: int) -> bytes:
        value = next(it)
        assert len(value) == n
        return value

    return source


def build() -> dict[str, Any]:
    master = MasterKey(MASTER)
    vectors: dict[str, Any] = {}

    vectors["keys.json"] = {
        "master_key": MASTER.hex(),
        "key_identifier": master.identifier,
        "keyring_description": master.key_ref().description,
        "e4crypt_descriptor_of_master": master.e4crypt_descriptor,
        "file_id": FILE_ID.hex(),
        "file_key": derive_file_key(MASTER, FILE_ID).hex(),
        "dir_nonce": DIR_NONCE.hex(),
        "names_key": derive_names_key(MASTER, DIR_NONCE).hex(),
        "symlinks_key": derive_symlinks_key(MASTER, DIR_NONCE).hex(),
    }

    e4 = []
    for passphrase, salt_arg, expected in E4CRYPT_CASES:
        salt = e4crypt_compat.parse_salt(salt_arg)
        assert isinstance(salt, bytes)
        key = e4crypt_compat.derive_key(passphrase.encode(), salt)
        desc = e4crypt_compat.descriptor(key)
        assert desc == expected, (passphrase, salt_arg, desc)
        e4.append(
            {
                "passphrase": passphrase,
                "salt_argument": salt_arg,
                "salt": salt.hex(),
                "key": key.hex(),
                "descriptor": desc,
                "keyring_description": e4crypt_compat.key_description(desc),
                "key_identifier": MasterKey(key).identifier,
            }
        )
    vectors["e4crypt.json"] = {"source": "Debian e2fsprogs 1.47.0 /usr/sbin/e4crypt", "cases": e4}

    cipher = master.file_cipher(FILE_ID, nonce_source=fixed_nonces(*BLOCK_NONCES))
    full = cipher.encrypt_block(0, FULL_BLOCK)
    last = cipher.encrypt_block(1, LAST_BLOCK)
    header = FileHeader(FILE_ID).serialize()
    vectors["contents.json"] = {
        "master_key": MASTER.hex(),
        "file_id": FILE_ID.hex(),
        "header": header.hex(),
        "blocks": [
            {
                "index": 0,
                "nonce": BLOCK_NONCES[0].hex(),
                "plaintext": FULL_BLOCK.hex(),
                "record": full.hex(),
            },
            {
                "index": 1,
                "nonce": BLOCK_NONCES[1].hex(),
                "plaintext": LAST_BLOCK.hex(),
                "record": last.hex(),
            },
        ],
        "file": (header + full + last).hex(),
        "plaintext_size": len(FULL_BLOCK) + len(LAST_BLOCK),
    }

    directory = master.directory_cipher(DIR_NONCE)
    names = []
    for name in [b"hello.txt", "h\u00e9llo w\u00f6rld \u2603.txt".encode(), b"x" * 175]:
        enc = directory.encrypt_name(name)
        assert not enc.is_long
        names.append({"name": name.hex(), "disk_name": enc.disk_name})
    long_names = []
    for name in [b"x" * 176, b"long-" + b"y" * 250]:
        enc = directory.encrypt_name(name)
        assert enc.is_long
        long_names.append(
            {
                "name": name.hex(),
                "disk_name": enc.disk_name,
                "sidecar_name": enc.sidecar_name,
                "sidecar_content": enc.full,
            }
        )
    vectors["names.json"] = {
        "master_key": MASTER.hex(),
        "dir_nonce": DIR_NONCE.hex(),
        "names": names,
        "long_names": long_names,
    }

    vectors["symlinks.json"] = {
        "master_key": MASTER.hex(),
        "dir_nonce": DIR_NONCE.hex(),
        "targets": [
            {"target": t.hex(), "encoded": directory.encrypt_symlink(t)}
            for t in [b"../some/target", b"/etc/hostname", "d\u00e9j\u00e0 vu".encode()]
        ],
    }

    by_id = Policy(master.key_ref(KeyKind.IDENTIFIER), DIR_NONCE)
    e4key = MasterKey(bytes.fromhex(e4[0]["key"]))
    by_desc = Policy(e4key.key_ref(KeyKind.E4CRYPT_DESCRIPTOR), DIR_NONCE)
    vectors["policy.json"] = {
        "records": [
            {
                "key_kind": "identifier",
                "key": by_id.key.hex,
                "keyring_description": by_id.key.description,
                "dir_nonce": DIR_NONCE.hex(),
                "contents": by_id.contents_mode.label,
                "names": by_id.names_mode.label,
                "record": by_id.serialize().hex(),
            },
            {
                "key_kind": "e4crypt-descriptor",
                "key": by_desc.key.hex,
                "keyring_description": by_desc.key.description,
                "dir_nonce": DIR_NONCE.hex(),
                "contents": by_desc.contents_mode.label,
                "names": by_desc.names_mode.label,
                "record": by_desc.serialize().hex(),
            },
        ]
    }
    vectors["protectors.json"] = protectors_vector(by_id)
    vectors.update(padded_vectors(master))
    return vectors


PADDED_NAMES = [b"a", b"hello.txt", b"exactly-16-bytes", b"seventeen-bytes-x", b"x" * 160]


def padded_vectors(master: MasterKey) -> dict[str, Any]:
    """Added with format.md 3.2 (name padding, policy version 2): the same
    names under each padding, and a version 2 policy record for each."""
    paddings = []
    records = []
    for padding in NAME_PADDINGS:
        directory = master.directory_cipher(DIR_NONCE, padding)
        names = []
        for name in PADDED_NAMES:
            enc = directory.encrypt_name(name)
            names.append(
                {
                    "name": name.hex(),
                    "padded_length": padded_name_length(len(name), padding),
                    "disk_name": enc.disk_name,
                    "full": enc.full,
                }
            )
        paddings.append({"padding": padding, "names": names})
        policy = Policy(master.key_ref(KeyKind.IDENTIFIER), DIR_NONCE, name_padding=padding)
        records.append(
            {
                "key_kind": "identifier",
                "key": policy.key.hex,
                "dir_nonce": DIR_NONCE.hex(),
                "name_padding": padding,
                "version": policy.version,
                "record": policy.serialize().hex(),
            }
        )
    return {
        "names_padded.json": {
            "master_key": MASTER.hex(),
            "dir_nonce": DIR_NONCE.hex(),
            "paddings": paddings,
        },
        "policy_padded.json": {"records": records},
    }


PROTECTOR_UID = 1000
PROTECTOR_PASSPHRASE = b"correct horse battery staple"
PROTECTOR_SALT = bytes(range(0x10, 0x20))
PROTECTOR_NONCE = bytes(range(0x20, 0x2C))
PROTECTOR_SCRYPT = (10, 8, 1)
E4CRYPT_SALT = bytes.fromhex("0102030405060708")


def protectors_vector(policy: Policy) -> dict[str, Any]:
    """docs/format.md 3.1: a protectors file with an e4crypt salt and one
    login protector (scrypt N = 2^10 to keep the test fast)."""
    log2_n, r, p = PROTECTOR_SCRYPT
    login = LoginProtector.wrap(
        PROTECTOR_UID,
        PROTECTOR_PASSPHRASE,
        MASTER,
        policy.key,
        params=ScryptParams(log2_n, r, p),
        salt=PROTECTOR_SALT,
        nonce=PROTECTOR_NONCE,
    )
    params = ScryptParams(log2_n, r, p)
    return {
        "master_key": MASTER.hex(),
        "keyring_description": policy.key.description,
        "e4crypt_salt": E4CRYPT_SALT.hex(),
        "login": {
            "uid": PROTECTOR_UID,
            "passphrase": PROTECTOR_PASSPHRASE.decode(),
            "scrypt_log2_n": log2_n,
            "scrypt_r": r,
            "scrypt_p": p,
            "salt": PROTECTOR_SALT.hex(),
            "nonce": PROTECTOR_NONCE.hex(),
            "kek": params.derive(PROTECTOR_PASSPHRASE, PROTECTOR_SALT).hex(),
            "wrapped": login.wrapped.hex(),
        },
        "file": Protectors([E4CRYPT_SALT], [login]).serialize().hex(),
    }


def main() -> int:
    """Write the vectors that are missing; never overwrite one (unless --force)."""
    vectors = build()
    force = "--force" in sys.argv
    missing = {n: c for n, c in vectors.items() if force or not (HERE / n).exists()}
    if not missing:
        print(f"refusing to overwrite frozen vectors: {', '.join(vectors)}", file=sys.stderr)
        return 1
    for name, content in missing.items():
        (HERE / name).write_text(json.dumps(content, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
