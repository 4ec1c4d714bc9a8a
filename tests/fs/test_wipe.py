"""fs/wipe.py: what the worker lets go of is zeroed, what is still used is not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keyfence.fs import sealer, wipe


def test_only_objects_no_one_else_holds_are_zeroed() -> None:
    kept_elsewhere = bytearray(b"secret page" * 10)
    alone = b"secret name"  # a constant: the code object holds it too
    other = bytearray(b"secret reply" * 10)
    view = memoryview(other)[3:9]  # a reply being sent still holds its buffer
    objects: list[object] = [kept_elsewhere, alone, bytes(bytearray(alone)), other]
    del other
    assert wipe.release(objects) == 1  # only the fresh copy of ``alone``
    assert alone == b"secret name"
    assert objects == []
    assert kept_elsewhere == b"secret page" * 10
    assert bytes(view) == b"ret re"
    pending: list[object] = [view.obj]
    assert wipe.release(pending, keep_shared=True) == 0
    assert len(pending) == 1  # still in use: kept for later
    del view
    assert wipe.release(pending, keep_shared=True) == 1
    assert pending == []


def test_zero_overwrites_in_place() -> None:
    name, page = bytes(bytearray(b"plain name")), bytearray(b"plain page")
    wipe.zero(name)
    wipe.zero(page)
    assert name == bytes(10) and page == bytes(10)


def test_a_large_buffer_is_zeroed_natively_and_wholly() -> None:
    """A write-back's 1 MiB buffers go through the native sealer's
    cache-bypassing ``zero`` (where built): every byte, none around it."""
    if sealer.NATIVE is None:
        pytest.skip(f"native sealer not available: {sealer.describe()}")
    assert wipe._stream_zero is sealer.NATIVE.zero
    page = bytearray(b"plain page" * 200_000 + b"tail")
    wipe.zero(page)
    assert page == bytes(2_000_004)
    zero = sealer.NATIVE.zero
    for size in (0, 1, 15, 16, 17, 63, 64, 65, 127, 1000, 70_000):
        for skew in range(0, 20, 3):  # unaligned starts and ends
            around = bytearray(b"\xa5" * (size + 40))
            zero(memoryview(around)[skew : skew + size])
            assert around[skew : skew + size] == bytes(size)
            assert around[:skew] + around[skew + size :] == b"\xa5" * 40
    with pytest.raises(BufferError):
        zero(b"read-only bytes")
    with pytest.raises(BufferError):
        zero(memoryview(bytearray(64))[::2])  # not contiguous
    with pytest.raises(TypeError):
        zero("text")


def test_shared_small_bytes_are_never_touched() -> None:
    one = bytes([ord("k")])  # CPython's shared one-byte object
    wipe.zero(one)
    wipe.zero(b"")
    assert one == b"k" and bytes([ord("k")]) == b"k"


RELEASED_CIPHER = """
import gc, os
from keyfence.fs import wipe
from keyfence.fs.crypto import MasterKey
from keyfence.testing.memory import count_in_memory

master = MasterKey(os.urandom(64))
file_cipher = master.file_cipher(os.urandom(16))
file_cipher.decrypt_block(0, file_cipher.encrypt_block(0, b"x" * 4096))
dir_cipher = master.directory_cipher(os.urandom(16))
dir_cipher.decrypt_name(dir_cipher.encrypt_name(b"a name").disk_name)
reversed_keys = [bytes(reversed(file_cipher._key)), bytes(reversed(dir_cipher._names_key))]
objects = [file_cipher, dir_cipher]
del file_cipher, dir_cipher
assert wipe.release(objects) == 2
gc.collect()
for needle in reversed_keys:
    key = bytes(reversed(needle))
    print(count_in_memory(os.getpid(), key))
"""


def test_a_released_cipher_leaves_no_key_bytes_in_memory() -> None:
    """The derived keys of a file cipher and a directory cipher, searched in
    a fresh process's memory after release (the needle is kept reversed, so
    the only copy found besides the fresh one searched for is a leftover).
    A fresh process: in pytest's, after hundreds of tests, the allocator's
    state decides whether some freed copy elsewhere happens to match."""
    done = subprocess.run(
        [sys.executable, "-c", RELEASED_CIPHER], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]  # ``key`` itself, each
