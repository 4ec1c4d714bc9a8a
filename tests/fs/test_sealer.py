"""The native batch sealer (fs/_sealer.c) against the Python path (fs/sealer.py).

Both must make byte-identical records from the same nonces, open each
other's records, name the failing block, read holes as zeros, and refuse
bad arguments with ValueError (never a crash).  tests/fs/test_format.py runs
the frozen vectors on both paths.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyfence.fs import sealer
from keyfence.fs.crypto import FileCipher, MasterKey, RecordBuffer
from keyfence.fs.format import BLOCK_OVERHEAD, BLOCK_SIZE, RECORD_SIZE, IntegrityError

MASTER = bytes(range(64))
FILE_ID = bytes(range(0xF0, 0x100))
KEY = bytes(range(32))


def _native() -> ModuleType:
    if sealer.NATIVE is None:
        reason = f"native sealer not available: {sealer.describe()}"
        print(reason)
        pytest.skip(reason)
    return sealer.NATIVE


@pytest.fixture
def native() -> ModuleType:
    return _native()


def counting_nonces() -> Callable[[int], bytes]:
    counter = iter(range(1, 1 << 60))
    return lambda n: next(counter).to_bytes(n, "big")


def cipher_on(path: str, nonces: Callable[[int], bytes] | None = None) -> FileCipher:
    """A cipher of FILE_ID sealing on ``path`` ("native" or "python")."""
    saved = sealer.NATIVE
    if path == "python":
        sealer.NATIVE = None
    try:
        if nonces is None:
            return MasterKey(MASTER).file_cipher(FILE_ID)
        return MasterKey(MASTER).file_cipher(FILE_ID, nonce_source=nonces)
    finally:
        sealer.NATIVE = saved


@pytest.fixture
def both(native: ModuleType) -> Iterator[tuple[FileCipher, FileCipher]]:
    yield cipher_on("native", counting_nonces()), cipher_on("python", counting_nonces())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=BLOCK_SIZE),
    st.randoms(use_true_random=False),
)
def test_records_are_byte_identical(indexes: list[int], last: int, rnd: object) -> None:
    _native()
    fast, slow = cipher_on("native", counting_nonces()), cipher_on("python", counting_nonces())
    blocks = [os.urandom(BLOCK_SIZE) for _ in indexes[:-1]] + [os.urandom(last)]
    outs = []
    for c in (fast, slow):
        out = RecordBuffer(len(blocks))
        n = c.encrypt_indexed_into(indexes, blocks, out)
        assert n == (len(blocks) - 1) * RECORD_SIZE + last + BLOCK_OVERHEAD
        outs.append(bytes(out.buffer[:n]))
    assert outs[0] == outs[1]
    # each record opens on the other path, as the block it was sealed as
    for k, (index, block) in enumerate(zip(indexes, blocks, strict=True)):
        record = outs[0][k * RECORD_SIZE : k * RECORD_SIZE + len(block) + BLOCK_OVERHEAD]
        assert slow.decrypt_blocks(index, record) == block
        assert fast.decrypt_blocks(index, record) == block


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=9 * BLOCK_SIZE + 5), st.integers(0, 1 << 40))
def test_consecutive_blocks_and_short_last(data: bytes, first: int) -> None:
    _native()
    fast, slow = cipher_on("native", counting_nonces()), cipher_on("python", counting_nonces())
    records = fast.encrypt_blocks(first, data)
    assert bytes(records) == bytes(slow.encrypt_blocks(first, data))
    assert bytes(fast.decrypt_blocks(first, records)) == data
    assert bytes(slow.decrypt_blocks(first, records)) == data


def test_tampered_record_names_its_block(both: tuple[FileCipher, FileCipher]) -> None:
    fast, _ = both
    records = bytearray(fast.encrypt_blocks(100, os.urandom(5 * BLOCK_SIZE + 7)))
    for k, where in [(0, 3), (2, 2 * RECORD_SIZE + 500), (4, 4 * RECORD_SIZE + 12 + BLOCK_SIZE)]:
        bad = bytearray(records)
        bad[where] ^= 0x40
        with pytest.raises(IntegrityError) as info:
            fast.decrypt_blocks(100, bad)
        assert info.value.errno == errno.EIO
        assert info.value.block == 100 + k
        assert f"block {100 + k}" in str(info.value)
    # the short last record, cut by a byte: the tag no longer fits
    with pytest.raises(IntegrityError) as info:
        fast.decrypt_blocks(100, records[:-1])
    assert info.value.block == 105
    # moved: read as other indexes
    with pytest.raises(IntegrityError) as info:
        fast.decrypt_blocks(101, records)
    assert info.value.block == 101


def test_holes_read_as_zeros(both: tuple[FileCipher, FileCipher]) -> None:
    fast, slow = both
    a, c = b"a" * BLOCK_SIZE, b"c" * 10
    body = bytearray(fast.encrypt_blocks(0, a + bytes(BLOCK_SIZE) + c))
    body[RECORD_SIZE : 2 * RECORD_SIZE] = bytes(RECORD_SIZE)  # block 1 never written
    expected = a + bytes(BLOCK_SIZE) + c
    assert bytes(fast.decrypt_blocks(0, body)) == expected
    assert bytes(slow.decrypt_blocks(0, body)) == expected
    # a hole as the short last record too
    assert bytes(fast.decrypt_blocks(7, bytes(BLOCK_OVERHEAD + 5))) == bytes(5)
    # zeros but one bit is no hole
    almost = bytearray(RECORD_SIZE)
    almost[-1] = 1
    with pytest.raises(IntegrityError) as info:
        fast.decrypt_blocks(7, almost)
    assert info.value.block == 7


def test_open_new_hands_out_only_what_it_wrote(native: ModuleType) -> None:
    """open_new's buffer is not zeroed before it is filled: after a failed
    record nothing of what the heap held (here: plaintext freed just
    before, of the same size, which malloc hands back) comes out."""
    fast = cipher_on("native")
    size = 64 * BLOCK_SIZE
    records = bytearray(fast.encrypt_blocks(0, bytes(size)))
    records[40 * RECORD_SIZE + 100] ^= 1
    for _ in range(20):
        secret = bytearray(b"\xa5" * size)
        del secret  # freed: its memory is what the next buffer of this size gets
        failed, out = native.open_new(fast._key, FILE_ID, 0, records)
        assert failed == 40
        assert out == bytearray(size)
        ok, plain = native.open_new(fast._key, FILE_ID, 0, bytes(records[: 40 * RECORD_SIZE]))
        assert ok == -1 and plain == bytearray(40 * BLOCK_SIZE)


def test_bad_arguments_are_value_errors(native: ModuleType) -> None:
    blocks = [bytes(BLOCK_SIZE), b"end"]
    nonces = bytes(24)
    out = bytearray(2 * RECORD_SIZE)
    good = (KEY, FILE_ID, nonces, 0, blocks, out)
    assert native.seal(*good) == RECORD_SIZE + 3 + BLOCK_OVERHEAD
    bad_seals = {
        "short key": (KEY[:31], *good[1:]),
        "long key": (KEY + b"x", *good[1:]),
        "file id": (KEY, FILE_ID[:15], *good[2:]),
        "too few nonces": (KEY, FILE_ID, nonces[:12], *good[3:]),
        "too many nonces": (KEY, FILE_ID, nonces + bytes(12), *good[3:]),
        "negative index": (KEY, FILE_ID, nonces, -1, blocks, out),
        "index past 2**64": (KEY, FILE_ID, nonces, (1 << 64) - 1, blocks, out),
        "one index per block": (KEY, FILE_ID, nonces, [0], blocks, out),
        "index in a list past 2**64": (KEY, FILE_ID, nonces, [0, 1 << 64], blocks, out),
        "short inner block": (KEY, FILE_ID, nonces, 0, [b"x", b"y"], out),
        "empty last block": (KEY, FILE_ID, nonces, 0, [bytes(BLOCK_SIZE), b""], out),
        "long last block": (KEY, FILE_ID, nonces, 0, [bytes(BLOCK_SIZE)] * 2 + [b"x"], out),
        "buffer too small": (KEY, FILE_ID, nonces, 0, blocks, bytearray(RECORD_SIZE + 30)),
    }
    for what, args in bad_seals.items():
        with pytest.raises(ValueError):
            native.seal(*args)
            pytest.fail(what)
    with pytest.raises(TypeError):
        native.seal(KEY, FILE_ID, nonces, 0, blocks)
    with pytest.raises(TypeError):
        native.seal(KEY, FILE_ID, nonces, ["0", "1"], blocks, out)
    with pytest.raises((TypeError, BufferError)):
        native.seal(KEY, FILE_ID, nonces, 0, blocks, bytes(2 * RECORD_SIZE))  # read-only
    records = bytes(out[: RECORD_SIZE + 3 + BLOCK_OVERHEAD])
    plain = bytearray(BLOCK_SIZE + 3)
    assert native.open(KEY, FILE_ID, 0, records, plain) == -1
    assert bytes(plain) == bytes(BLOCK_SIZE) + b"end"
    bad_opens = {
        "short key": (KEY[:16], FILE_ID, 0, records, plain),
        "file id": (KEY, b"", 0, records, plain),
        "negative first": (KEY, FILE_ID, -1, records, plain),
        "past 2**64": (KEY, FILE_ID, (1 << 64) - 1, records, plain),
        "buffer too small": (KEY, FILE_ID, 0, records, bytearray(BLOCK_SIZE + 2)),
        "truncated last record": (KEY, FILE_ID, 0, records[: RECORD_SIZE + 20], plain),
    }
    for what, open_args in bad_opens.items():
        with pytest.raises(ValueError):
            native.open(*open_args)
            pytest.fail(what)
    assert native.open(KEY, FILE_ID, 0, b"", bytearray()) == -1
    assert native.open_new(KEY, FILE_ID, 0, records) == (-1, bytearray(BLOCK_SIZE) + b"end")
    assert native.open_new(KEY, FILE_ID, 0, b"") == (-1, bytearray())
    for what, open_args in bad_opens.items():
        if what == "buffer too small":
            continue  # open_new makes its own
        with pytest.raises(ValueError):
            native.open_new(*open_args[:4])
            pytest.fail(what)
    with pytest.raises(TypeError):
        native.open_new(KEY, FILE_ID, 0, records, plain)
    with pytest.raises(TypeError):
        native.open_new(KEY, FILE_ID, "0", records)
    # and through FileCipher: its own errors, as on the Python path
    fast = cipher_on("native")
    with pytest.raises(ValueError, match="output buffer too small"):
        fast.encrypt_indexed_into([0, 1], blocks, memoryview(bytearray(RECORD_SIZE)))
    with pytest.raises(ValueError):
        cipher_on("native", lambda n: bytes(n - 1)).encrypt_blocks(0, b"x")


def test_gil_released_while_sealing(native: ModuleType) -> None:
    """Another thread runs Python while a batch is being sealed.

    With a long switch interval a thread that holds the GIL keeps it: were
    the GIL held through ``seal``, the counter could not move between the
    two reads of ``ticks`` around the call.  No time is assumed: any of 50
    calls showing progress is enough."""
    blocks = [bytes(BLOCK_SIZE)] * 1024
    nonces = bytes(12 * len(blocks))
    out = bytearray(len(blocks) * RECORD_SIZE)
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    counter = threading.Thread(target=count)
    moved = False
    try:
        counter.start()
        for _ in range(50):
            before = ticks
            native.seal(KEY, FILE_ID, nonces, 0, blocks, out)
            if ticks != before:
                moved = True
                break
    finally:
        stop.set()
        sys.setswitchinterval(old)
        counter.join()
    assert moved


def test_environment_forces_the_python_path(native: ModuleType) -> None:
    code = "from keyfence.fs import sealer; print(sealer.describe())"
    env = dict(os.environ)
    for value, expected in [("1", "python (KEYFENCE_NO_NATIVE set)"), ("0", "native (OpenSSL")]:
        env[sealer.DISABLE_ENV] = value
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(expected)
