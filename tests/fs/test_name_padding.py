"""Name padding (e4crypt's ``-p``; docs/format.md 3.2): what an encrypted
name tells about its plaintext's length, the version 2 policy record, and
the old records that must still read as they did.

The unit half checks the cipher and the record; the mount half makes
directories with ``keyfence e4crypt add_key -p 4`` and ``-p 32`` on a real
mount through a real daemon and looks at the backing names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import (
    NAME_MAX,
    NAME_PADDINGS,
    POLICY_FILE_NAME,
    FormatError,
    IntegrityError,
    KeyKind,
    Policy,
    b64url_decode,
    padded_name_length,
)
from keyfence.testing.daemon import DaemonProcess
from tests.fs.test_daemon_mount import PASSPHRASE, mounted, session_sh

__all__ = ["mounted"]

VECTORS = Path(__file__).parent / "vectors"
MASTER = MasterKey(bytes(range(64)))
DIR_NONCE = bytes(range(0xA0, 0xB0))
SIV_TAG = 16


def sealed_length(disk_name: str) -> int:
    return len(b64url_decode(disk_name))


def test_padded_length_is_the_kernels() -> None:
    """fscrypt_fname_encrypted_size(): max(len, 16) rounded up, at most 255."""
    assert [padded_name_length(n, 4) for n in (1, 16, 17, 20, 21)] == [16, 16, 20, 20, 24]
    assert [padded_name_length(n, 32) for n in (1, 32, 33, 250, 255)] == [32, 32, 64, 255, 255]
    assert padded_name_length(7, 0) == 7  # version 1: no padding
    for padding in NAME_PADDINGS:
        for n in range(1, NAME_MAX + 1):
            padded = padded_name_length(n, padding)
            assert n <= padded <= NAME_MAX
            assert padded == NAME_MAX or padded % padding == 0


@pytest.mark.parametrize("padding", NAME_PADDINGS)
def test_names_of_1_to_40_bytes_leak_only_the_padded_length(padding: int) -> None:
    cipher = MASTER.directory_cipher(DIR_NONCE, padding)
    by_padded: dict[int, set[int]] = {}
    for n in range(1, 41):
        name = bytes([0x61 + n % 26]) * n
        enc = cipher.encrypt_name(name)
        length = sealed_length(enc.disk_name)
        assert length == SIV_TAG + padded_name_length(n, padding)
        by_padded.setdefault(padded_name_length(n, padding), set()).add(len(enc.disk_name))
        assert cipher.decrypt_name(enc.disk_name) == name
    # every name with the same padded length has the same on-disk length, and
    # only as many lengths show as there are padded lengths
    assert all(len(lengths) == 1 for lengths in by_padded.values())
    assert len(by_padded) == len({padded_name_length(n, padding) for n in range(1, 41)})
    assert len(by_padded) == {4: 7, 8: 4, 16: 3, 32: 2}[padding]


def test_unpadded_directories_keep_exact_lengths() -> None:
    cipher = MASTER.directory_cipher(DIR_NONCE)
    lengths = [sealed_length(cipher.encrypt_name(b"n" * n).disk_name) for n in range(1, 41)]
    assert lengths == [SIV_TAG + n for n in range(1, 41)]


def test_a_name_padded_otherwise_fails_authentication() -> None:
    """One ciphertext per name: an unpadded name in a padded directory (or one
    with extra NULs) is not a name of that directory."""
    padded = MASTER.directory_cipher(DIR_NONCE, 16)
    plain = MASTER.directory_cipher(DIR_NONCE)
    with pytest.raises(IntegrityError, match="not padded"):
        padded.decrypt_name(plain.encrypt_name(b"short").disk_name)
    over = MASTER.directory_cipher(DIR_NONCE, 32).encrypt_name(b"short")
    with pytest.raises(IntegrityError, match="not padded"):
        padded.decrypt_name(over.disk_name)
    # and an unpadded directory refuses a padded one (a name with NULs)
    with pytest.raises(IntegrityError):
        plain.decrypt_name(padded.encrypt_name(b"short").disk_name)


def test_long_names_still_work_padded() -> None:
    cipher = MASTER.directory_cipher(DIR_NONCE, 32)
    for n in (150, 160, 161, 200, 255):
        enc = cipher.encrypt_name(b"L" * n)
        assert cipher.decrypt_name(enc.disk_name, enc.sidecar_content) == b"L" * n
    assert not cipher.encrypt_name(b"L" * 130).is_long  # 160 padded: 236 characters
    assert cipher.encrypt_name(b"L" * 161).is_long  # 192 padded: 278 characters


def test_vectors_padded_names_and_policies() -> None:
    v = json.loads((VECTORS / "names_padded.json").read_text())
    master = MasterKey(bytes.fromhex(v["master_key"]))
    for group in v["paddings"]:
        cipher = master.directory_cipher(bytes.fromhex(v["dir_nonce"]), group["padding"])
        for entry in group["names"]:
            name = bytes.fromhex(entry["name"])
            enc = cipher.encrypt_name(name)
            assert (enc.disk_name, enc.full) == (entry["disk_name"], entry["full"])
            sidecar = enc.full.encode() if enc.is_long else None
            assert cipher.decrypt_name(entry["disk_name"], sidecar) == name
            assert len(b64url_decode(entry["full"])) == SIV_TAG + entry["padded_length"]
    for entry in json.loads((VECTORS / "policy_padded.json").read_text())["records"]:
        record = bytes.fromhex(entry["record"])
        policy = Policy.parse(record)
        assert policy.name_padding == entry["name_padding"] and policy.version == 2
        assert policy.key.hex == entry["key"] and policy.serialize() == record
        assert len(record) == 44


def test_version_1_records_read_as_unpadded() -> None:
    """Every directory made before padding: 40 bytes, version 1, names at
    their exact length; its subdirectories stay so (inherited as fscrypt)."""
    for entry in json.loads((VECTORS / "policy.json").read_text())["records"]:
        policy = Policy.parse(bytes.fromhex(entry["record"]))
        assert policy.name_padding == 0 and policy.version == 1
        assert policy.with_nonce(bytes(16)).name_padding == 0
        assert len(policy.serialize()) == 40


def test_padding_is_part_of_the_policy() -> None:
    ref = MASTER.key_ref(KeyKind.E4CRYPT_DESCRIPTOR)
    p4, p32 = Policy(ref, DIR_NONCE, name_padding=4), Policy(ref, DIR_NONCE, name_padding=32)
    assert not p4.same_key_and_modes(p32)  # rename between them: EXDEV
    assert p4.with_nonce(bytes(16)).name_padding == 4
    good = bytearray(p32.serialize())
    assert good[40:] == bytes([3, 0, 0, 0])  # fscrypt's FSCRYPT_POLICY_FLAGS_PAD_32
    for offset, value, message in [
        (40, 4, "unknown policy flags 0x04"),
        (41, 1, "reserved bytes are not zero"),
    ]:
        broken = bytearray(good)
        broken[offset] = value
        with pytest.raises(FormatError, match=message):
            Policy.parse(bytes(broken))
    with pytest.raises(FormatError, match="name padding"):
        Policy(ref, DIR_NONCE, name_padding=12)


# ------------------------------------------------------------ on a real mount


def cipher_name(directory: Path) -> str:
    """The one subdirectory of a backing directory."""
    (only,) = (p.name for p in directory.iterdir() if p.is_dir())
    return only


def test_directories_with_p_4_and_p_32(mounted: tuple[DaemonProcess, Path, Path]) -> None:
    daemon, backing, mnt = mounted
    for name in ("p4", "p32", "pdefault"):
        (mnt / name).mkdir()
    pw = f"echo '{PASSPHRASE.strip()}' |"
    made = session_sh(
        daemon,
        f"{pw} keyfence e4crypt add_key -S s:pad -p 4 {mnt}/p4"
        f" && {pw} keyfence e4crypt add_key -S s:pad -p 32 {mnt}/p32"
        f" && {pw} keyfence e4crypt add_key -S s:pad {mnt}/pdefault"
        f" && for n in $(seq 1 40); do"
        f"   name=$(printf '%*s' $n '' | tr ' ' n);"
        f"   for d in p4 p32 pdefault; do echo $n > {mnt}/$d/$name; done;"
        f" done"
        f" && mkdir {mnt}/p4/sub && echo deep > {mnt}/p4/sub/f"
        f" && keyfence e4crypt get_policy {mnt}/p4 {mnt}/p32",
    )
    assert made.returncode == 0, made.stderr
    desc = made.stdout.split("[")[1].split("]")[0]
    # get_policy prints what e4crypt prints: the descriptor only
    assert f"{mnt}/p4: {desc}\n{mnt}/p32: {desc}\n" in made.stdout
    for name, padding in (("p4", 4), ("p32", 32), ("pdefault", 16)):
        record = (backing / name / POLICY_FILE_NAME).read_bytes()
        assert Policy.parse(record).name_padding == padding
        status = json.loads(os.getxattr(mnt / name, "user.keyfence.status"))
        assert status["options"]["padding"] == padding
        disk = [n for n in os.listdir(backing / name) if not n.startswith(".keyfence")]
        if name == "p4":  # a subdirectory inherits the padding, with its own nonce
            sub = Policy.parse(
                (backing / name / cipher_name(backing / name) / POLICY_FILE_NAME).read_bytes()
            )
            assert sub.name_padding == 4
            disk.remove(cipher_name(backing / name))
        assert len(disk) == 40
        shown = sorted({sealed_length(n) - SIV_TAG for n in disk})
        assert shown == sorted({padded_name_length(n, padding) for n in range(1, 41)}), name
    # the names read back, in the mount and after a remount of the key
    again = session_sh(
        daemon,
        f"keyfence unlock -S s:pad {mnt}/p4 >/dev/null && cat {mnt}/p4/nnnnnnnnnnnnnnnnnnnnnnnnn"
        f" && cat {mnt}/p4/sub/f && ls {mnt}/p32 | wc -l",
        stdin=PASSPHRASE,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["25", "deep", "40"]


def test_set_policy_with_another_padding_is_refused(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    daemon, _backing, mnt = mounted
    (mnt / "once").mkdir()
    first = session_sh(daemon, f"keyfence e4crypt add_key -S s:x -p 8 {mnt}/once", stdin=PASSPHRASE)
    assert first.returncode == 0, first.stderr
    desc = first.stdout.split("[")[1].split("]")[0]
    same = session_sh(daemon, f"keyfence e4crypt set_policy -p 8 {desc} {mnt}/once")
    assert same.returncode == 0 and "applied to" in same.stdout, same.stdout + same.stderr
    unsaid = session_sh(daemon, f"keyfence e4crypt set_policy {desc} {mnt}/once")
    assert unsaid.returncode == 0, unsaid.stdout + unsaid.stderr
    other = session_sh(daemon, f"keyfence e4crypt set_policy -p 32 {desc} {mnt}/once")
    assert other.returncode == 1
    assert "Error [File exists] setting policy." in other.stdout
    bad = session_sh(daemon, f"keyfence e4crypt set_policy -p 5 {desc} {mnt}/once")
    assert bad.returncode == 2 and "Invalid padding 5" in bad.stderr
    assert "Traceback" not in bad.stderr + other.stderr
