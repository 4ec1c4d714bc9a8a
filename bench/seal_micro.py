"""AES-256-GCM throughput of the contents records, native batch vs Python.

Seals ``--mib`` MiB of 4 KiB blocks per thread, in batches of ``--batch``
records, on 1 and 2 threads; the native sealer (one call per batch, GIL
released) and the ``cryptography`` path (one ``encrypt_into`` per record),
interleaved, medians of ``--runs``.  Prints GB/s of plaintext sealed.

    .venv/bin/python bench/seal_micro.py --mib 256 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from keyfence.fs import sealer
from keyfence.fs.crypto import FileCipher, RecordBuffer
from keyfence.fs.format import BLOCK_SIZE


def run(native: bool, threads: int, mib: int, batch: int) -> float:
    saved = sealer.NATIVE
    if not native:
        sealer.NATIVE = None
    try:
        ciphers = [FileCipher(os.urandom(32), os.urandom(16)) for _ in range(threads)]
    finally:
        sealer.NATIVE = saved
    blocks = [bytearray(os.urandom(BLOCK_SIZE)) for _ in range(batch)]
    rounds = (mib << 20) // (batch * BLOCK_SIZE)

    def work(cipher: FileCipher) -> None:
        out = RecordBuffer(batch)
        for r in range(rounds):
            cipher.encrypt_pages_into(r * batch, blocks, out)

    workers = [threading.Thread(target=work, args=(c,)) for c in ciphers]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return threads * rounds * batch * BLOCK_SIZE / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if sealer.NATIVE is None:
        print(f"native sealer unavailable ({sealer.describe()})")
    figures: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.runs):
        for threads in (1, 2):
            for native in (False, True) if sealer.NATIVE is not None else (False,):
                key = ("native" if native else "python", threads)
                figures.setdefault(key, []).append(run(native, threads, args.mib, args.batch))
    for (path, threads), values in figures.items():
        print(f"{path:7s} {threads} thread(s): {statistics.median(values):6.2f} GB/s")


if __name__ == "__main__":
    main()
