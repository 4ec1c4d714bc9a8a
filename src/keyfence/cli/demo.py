"""``keyfence demo``: the seed scenario on the key model.

Until the encrypted filesystem exists, the key user is a small write-back
cache: writes stay in memory as dirty plaintext, and are encrypted with the
session's key only when flushed.  Logging out (``clear @s``) calls the cache
synchronously before the key goes; it flushes with the key it is about to
lose, and only then is the key wiped.  ``--emergency`` shows the other
choice: the key is wiped at once, and the cache says what it dropped.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyfence.keys import Caller, KeyService
from keyfence.keys.notify import KeyEvent, Notification, Phase

PAGE = 4096
SALT = bytes.fromhex("6b657966656e63652d64656d6f2d3031")
PASSPHRASE = b"correct horse battery staple"


def derive_key(passphrase: bytes, salt: bytes) -> bytes:
    """A 64-byte master key from a passphrase, the way e4crypt derives one."""
    return hashlib.pbkdf2_hmac("sha512", passphrase, salt, 65536, 64)


class WriteBackCache:
    """Dirty pages in memory, encrypted (AES-256-GCM, one nonce per page)
    and written to ``directory`` only on flush."""

    def __init__(self, service: KeyService, owner: Caller, key_id: int, directory: Path) -> None:
        self.service, self.owner, self.key_id, self.directory = service, owner, key_id, directory
        self.dirty: dict[str, bytearray] = {}
        self.dropped: dict[str, int] = {}
        service.watch(owner, key_id, self.on_key_event, KeyEvent.ALL, sync=True, name="demo cache")

    def write(self, name: str, data: bytes) -> None:
        self.dirty.setdefault(name, bytearray()).extend(data)

    def dirty_bytes(self) -> int:
        return sum(len(buf) for buf in self.dirty.values())

    def on_key_event(self, note: Notification) -> None:
        if note.phase is Phase.BEFORE:
            self.flush(note)
        elif note.emergency:
            # the key is already gone: account for what could not be written
            for name, buf in self.dirty.items():
                self.dropped[name] = len(buf)
                buf[:] = bytes(len(buf))
            self.dirty.clear()

    def flush(self, note: Notification | None = None) -> None:
        with self.service.use_key(self.owner, self.key_id) as payload:
            with payload.view() as master:
                aead = AESGCM(bytes(master[:32]))
            for name, buf in list(self.dirty.items()):
                path = self.directory / f"{name}.enc"
                with open(path, "ab") as out:
                    for offset in range(0, len(buf), PAGE):
                        nonce = os.urandom(12)
                        out.write(
                            nonce + aead.encrypt(nonce, bytes(buf[offset : offset + PAGE]), None)
                        )
                        if note is not None and offset % (256 * PAGE) == 0:
                            note.report_progress(self.dirty_bytes() - offset, f"flushing {name}")
                    out.flush()
                    os.fsync(out.fileno())
                del self.dirty[name]


def read_back(path: Path, master: bytes) -> bytes:
    aead = AESGCM(master[:32])
    data, out = path.read_bytes(), bytearray()
    record = 12 + PAGE + 16
    for offset in range(0, len(data), record):
        chunk = data[offset : offset + record]
        out += aead.decrypt(chunk[:12], chunk[12:], None)
    return bytes(out)


def run(*, emergency: bool = False) -> int:
    """Run the scenario, printing each step with its timing; 0 if the data survived
    (or, with ``emergency``, if exactly what was dropped was reported)."""
    start = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{(time.perf_counter() - start) * 1000:8.1f} ms] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="keyfence-demo-") as tmp, KeyService() as service:
        backing = Path(tmp)
        session = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), session="login")
        step("key service started (in-process; the daemon arrives with issue 4)")
        ses = service.join_session_keyring(session)
        master = derive_key(PASSPHRASE, SALT)
        descriptor = hashlib.sha512(hashlib.sha512(master).digest()).hexdigest()[:16]
        key_id = service.add_key(session, "logon", f"keyfence:{descriptor}", master, -3)
        step(f"login session keyring {ses}; added logon key {key_id} 'keyfence:{descriptor}'")
        cache = WriteBackCache(service, session, key_id, backing)
        cache.write("my_file", b"test\n")
        big = os.urandom(8 << 20)
        cache.write("big_file", big)
        step(f"wrote my_file and big_file: {cache.dirty_bytes():,} bytes dirty, none on disk")
        payload = service.find_key(key_id)
        assert payload is not None and payload.payload is not None
        address, size = payload.payload.address, len(payload.payload)

        def show(progress: object) -> None:
            left = getattr(progress, "remaining_bytes", 0)
            if left:
                step(f"  ... waiting for the demo cache: {left:,} bytes left")

        kind = "emergency clear" if emergency else "clear"
        step(f"logout: {kind} @s")
        service.clear(session, -3, emergency=emergency, progress=show)
        service.wait_for_notifications(5)
        wiped = ctypes.string_at(address, size) == bytes(size)
        step(f"@s cleared; key payload zeroed in memory: {wiped}")
        if emergency:
            for name, count in sorted(cache.dropped.items()):
                step(f"dropped, never written: {name}: {count:,} bytes")
            ok = wiped and cache.dropped == {"my_file": 5, "big_file": len(big)}
            step("the emergency wipe said exactly what was lost" if ok else "MISMATCH")
            return 0 if ok else 1
        step("new session: derive the key from the same passphrase and read back")
        again = derive_key(PASSPHRASE, SALT)
        small = read_back(backing / "my_file.enc", again)
        large = read_back(backing / "big_file.enc", again)
        ok = wiped and small == b"test\n" and large == big
        step(f"my_file reads {small!r}; big_file intact: {large == big}")
        step("no data lost" if ok else "DATA LOST")
        return 0 if ok else 1
