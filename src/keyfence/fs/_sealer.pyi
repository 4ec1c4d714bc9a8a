# The native sealer (_sealer.c); keyfence/fs/sealer.py loads it.
from collections.abc import Sequence

from typing_extensions import Buffer

OPENSSL_VERSION: str

def seal(
    key: Buffer,
    file_id: Buffer,
    nonces: Buffer,
    indexes: int | Sequence[int],
    blocks: Sequence[Buffer],
    out: Buffer,
    /,
) -> int: ...
def open(key: Buffer, file_id: Buffer, first: int, records: Buffer, out: Buffer, /) -> int: ...
def open_new(
    key: Buffer, file_id: Buffer, first: int, records: Buffer, /
) -> tuple[int, bytearray]: ...
