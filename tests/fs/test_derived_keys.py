"""Derived keys made ahead or at first use (fs/crypto.py).

New files' keys (MasterKey.new_file_cipher): derived ahead in batches, each
the format's key for its id, never handed out twice (threads, fork), wiped
with the master key.  A file cipher makes cryptography's AESGCM only when a
path needs it; a directory cipher makes its AES-SIV objects and its
symlinks key at first use, and nothing after its wipe."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from keyfence.errors import KeyfenceError
from keyfence.fs import crypto, sealer
from keyfence.fs.crypto import (
    DirectoryCipher,
    FileCipher,
    MasterKey,
    derive_file_key,
    derive_names_key,
    derive_symlinks_key,
)
from keyfence.fs.format import BLOCK_SIZE, FILE_ID_SIZE
from keyfence.testing.draws import drawn_in_threads, from_a_forked_child

MASTER = bytes(range(64))


def test_each_new_file_has_its_own_id_and_the_formats_key() -> None:
    master = MasterKey(MASTER)
    count = 3 * crypto._SPARE_FILE_KEYS + 5  # across several batches
    ciphers = [master.new_file_cipher() for _ in range(count)]
    ids = [c.file_id for c in ciphers]
    assert len(set(ids)) == count and all(len(i) == FILE_ID_SIZE for i in ids)
    for c in ciphers:
        assert c._key == derive_file_key(MASTER, c.file_id)
        # what a reader derives from the header opens what the writer sealed
        record = c.encrypt_blocks(0, b"x" * (BLOCK_SIZE + 3))
        reader = master.file_cipher(c.file_id)
        assert bytes(reader.decrypt_blocks(0, record)) == b"x" * (BLOCK_SIZE + 3)


def test_new_file_ids_are_unique_across_threads() -> None:
    master = MasterKey(MASTER)
    flat = drawn_in_threads(lambda: master.new_file_cipher().file_id, threads=6, each=500)
    assert len(flat) == 3000 and len(set(flat)) == 3000


def test_the_spares_are_wiped_with_the_master_key() -> None:
    master = MasterKey(bytes(MASTER))
    master.new_file_cipher()
    spares = list(master._spares)
    assert len(spares) == crypto._SPARE_FILE_KEYS - 1
    keys = [key for _file_id, key in spares]
    assert all(any(key) for key in keys)
    master.wipe()
    assert all(key == bytes(len(key)) for key in keys)
    assert master._spares == []
    with pytest.raises(KeyfenceError) as err:
        master.new_file_cipher()
    assert err.value.errno == errno.ENOKEY


def test_a_forked_child_never_reuses_its_parents_spares() -> None:
    master = MasterKey(MASTER)
    master.new_file_cipher()  # the batch is there before the fork
    child_bytes = from_a_forked_child(
        lambda: b"".join(master.new_file_cipher().file_id for _ in range(40))
    )
    child = {child_bytes[i : i + FILE_ID_SIZE] for i in range(0, len(child_bytes), FILE_ID_SIZE)}
    parent = {master.new_file_cipher().file_id for _ in range(40)}
    assert len(child) == 40 and not child & parent


@pytest.mark.skipif(sealer.NATIVE is None, reason="the native sealer is not built here")
def test_the_native_paths_make_no_aesgcm() -> None:
    """A new small file's write and a read of it go through the native
    sealer, which takes the key bytes: no cryptography AESGCM is made (it
    was 5-10 us of a small file's WRITE); a single-record path makes one."""
    cipher = MasterKey(MASTER).new_file_cipher()
    records = cipher.encrypt_blocks(0, os.urandom(2 * BLOCK_SIZE))
    cipher.decrypt_blocks(0, records)
    assert cipher._aead is None
    record = cipher.encrypt_block(5, b"one")
    assert cipher._aead is not None and cipher.decrypt_block(5, record) == b"one"


def test_a_lazy_aesgcm_uses_the_key_wiped_before_it() -> None:
    """wipe() zeroes the key the AESGCM would be made from: a cipher wiped
    before its first single-record use opens nothing sealed before."""
    cipher = FileCipher(derive_file_key(MASTER, bytes(16)), bytes(16))
    record = cipher.encrypt_blocks(0, b"secret")
    cipher.wipe()
    with pytest.raises(crypto.IntegrityError):
        cipher.decrypt_block(0, record)


def test_a_directory_cipher_derives_its_symlinks_key_at_first_use() -> None:
    master = MasterKey(MASTER)
    nonce = bytes(range(16))
    d = DirectoryCipher(master, nonce, 16)
    assert d._names_key == derive_names_key(MASTER, nonce)
    assert d._symlinks_key is None and d._names is None and d._symlinks is None
    target = d.encrypt_symlink(b"../target")
    assert d._symlinks_key == derive_symlinks_key(MASTER, nonce)
    # a second cipher of the same directory reads it, its names too
    other = DirectoryCipher(master, nonce, 16)
    assert other.decrypt_symlink(target) == b"../target"
    assert other.decrypt_name(d.encrypt_name(b"a name").disk_name) == b"a name"


def test_nothing_is_derived_or_made_after_a_wipe() -> None:
    """A wiped directory cipher (or one whose master key is wiped) refuses
    with ENOKEY what it has not made yet: never a name or target sealed
    under zeroed keys."""
    master = MasterKey(bytes(MASTER))
    d = master.directory_cipher(bytes(16))
    d.wipe()
    for use in (
        lambda: d.encrypt_name(b"name"),  # the C sealer is wiped: the fallback
        lambda: d.decrypt_name("AAAAAAAAAAAAAAAAAAAAAAAAAA"),
        lambda: d.encrypt_symlink(b"target"),
    ):
        with pytest.raises(KeyfenceError) as err:
            use()
        assert err.value.errno == errno.ENOKEY
    d2 = master.directory_cipher(bytes(16))
    master.wipe()
    with pytest.raises(KeyfenceError) as err:
        d2.encrypt_symlink(b"target")
    assert err.value.errno == errno.ENOKEY


RELEASED_SPARES = """
import os
from keyfence.fs.crypto import MasterKey
from keyfence.testing.memory import count_in_memory

master = MasterKey(os.urandom(64))
master.new_file_cipher()
reversed_keys = [bytes(reversed(key)) for _file_id, key in master._spares]
master.wipe()
print(*(count_in_memory(os.getpid(), bytes(reversed(needle))) for needle in reversed_keys))
"""


def test_wiped_spares_leave_no_key_bytes_in_memory() -> None:
    """The spares' keys, searched in a fresh process's memory after the
    master key's wipe: only the copy made to search for each is found."""
    done = subprocess.run(
        [sys.executable, "-c", RELEASED_SPARES], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    counts = done.stdout.split()
    assert len(counts) == crypto._SPARE_FILE_KEYS - 1 and set(counts) == {"1"}
