"""The processes of a chaos run (keyfence.testing.chaos), one role each:
*writer* (appends verifiable records to its file in a mount and logs what
write() acknowledged), *holder* (keeps a key in its process keyring),
*agent* (leads one POSIX session and runs kfctl/keyfence in it on request)
and *verify* (a fresh session that reads every file back).  Run as
``python -m keyfence.testing.chaos_roles {agent,writer,holder,verify} JSON``.

Records: ``KFR1 | writer u32 | seq u64 | length u32 | payload | blake2b-16``,
the payload a function of (writer, seq), so a record is checkable on its
own and cannot be confused with another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyfence.constants import KEY_SPEC_PROCESS_KEYRING

BIN = Path(sys.executable).parent
MAGIC = b"KFR1"
HEADER = struct.Struct("<4sIQI")
TRAILER = 16
MAX_RECORD = 64 << 10


# ------------------------------------------------------------------ records


def payload_of(writer: int, seq: int, length: int) -> bytes:
    return random.Random(writer << 40 ^ seq).randbytes(length)


def record(writer: int, seq: int, length: int) -> bytes:
    body = HEADER.pack(MAGIC, writer, seq, length) + payload_of(writer, seq, length)
    return body + hashlib.blake2b(body, digest_size=TRAILER).digest()


@dataclass
class Scan:
    records: Counter[tuple[int, int]] = field(default_factory=Counter)
    garbled_bytes: int = 0
    garbled_at: list[int] = field(default_factory=list)
    partial_bytes: int = 0
    """Bytes of records cut short by a write that returned a short count
    (the writer logged them): in the file as acknowledged, not garbled."""


def scan(data: bytes, partials: frozenset[bytes] = frozenset()) -> Scan:
    """Every intact record in ``data``; bytes that are in none are garbled
    (a region is skipped up to the next intact record), unless they are
    exactly one of ``partials``."""
    out = Scan()
    pos, bad_from = 0, -1

    def region_ends(end: int) -> None:
        if data[bad_from:end] in partials:
            out.partial_bytes += end - bad_from
        else:
            out.garbled_bytes += end - bad_from
            out.garbled_at.append(bad_from)

    while pos < len(data):
        length = _intact_at(data, pos)
        if length:
            if bad_from >= 0:
                region_ends(pos)
                bad_from = -1
            _magic, writer, seq, _n = HEADER.unpack_from(data, pos)
            out.records[(writer, seq)] += 1
            pos += length
            continue
        if bad_from < 0:
            bad_from = pos
        nxt = data.find(MAGIC, pos + 1)
        pos = len(data) if nxt < 0 else nxt
    if bad_from >= 0:
        region_ends(len(data))
    return out


def _intact_at(data: bytes, pos: int) -> int:
    if len(data) - pos < HEADER.size + TRAILER:
        return 0
    magic, writer, seq, length = HEADER.unpack_from(data, pos)
    end: int = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_RECORD or end + TRAILER > len(data):
        return 0
    body = data[pos:end]
    if hashlib.blake2b(body, digest_size=TRAILER).digest() != data[end : end + TRAILER]:
        return 0
    if body[HEADER.size :] != payload_of(writer, seq, length):
        return 0
    return end + TRAILER - pos


# ------------------------------------------------------------------ writer


class _WriterLog:
    """A writer's log: plain file, write(2) per line, fsync every 64."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lines = 0

    def line(self, text: str) -> None:
        os.write(self.fd, f"{text} {time.time():.3f}\n".encode())
        self.lines += 1
        if self.lines % 64 == 0:
            os.fsync(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def writer_main(spec: dict[str, Any]) -> int:
    wid, path = int(spec["id"]), str(spec["path"])
    rng = random.Random(spec["seed"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log = _WriterLog(spec["log"])
    seq, fd = 0, -1
    pause = float(spec.get("pause", 0.002))
    parent = os.getppid()
    try:
        while not stop.is_set() and os.getppid() == parent:  # an orphan stops
            seq += 1
            where = "open"
            try:
                if fd < 0:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                where = "write"
                length = rng.choice((rng.randrange(1, 512), rng.randrange(1, 16384), MAX_RECORD))
                data = record(wid, seq, length)
                done = os.write(fd, data)
                if done != len(data):
                    # the kernel split the write and a later part failed:
                    # the first ``done`` bytes are in the file
                    log.line(f"short {seq} {length} {done}")
                    fd, old = -1, fd
                    os.close(old)
                    stop.wait(rng.uniform(0.02, 0.1))
                    continue
                log.line(f"ok {seq}")
                roll = rng.random()
                if roll < 0.05:
                    where = "fsync"
                    os.fsync(fd)
                    log.line(f"fsync {seq}")
                elif roll < 0.07:
                    where = "close"
                    fd, old = -1, fd
                    os.close(old)
                    log.line(f"close {seq}")
            except OSError as err:
                log.line(f"err {seq} {err.errno} {where}")
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError as cerr:
                        log.line(f"err {seq} {cerr.errno} close")
                    fd = -1
                stop.wait(rng.uniform(0.02, 0.1))
                continue
            if pause:
                time.sleep(rng.uniform(0, pause))
    finally:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as err:
                log.line(f"err {seq} {err.errno} close")
        log.close()
    return 0


# ------------------------------------------------------------------ holder


def _binder(dirs: list[str], stop: threading.Event) -> threading.Thread:
    """List ``dirs`` every 0.1 s: a request from this process is what binds
    a key it holds to the mount (keys are found in the requester's keyrings)."""

    def run() -> None:
        while not stop.wait(0.1):
            for d in list(dirs):
                with contextlib.suppress(OSError):
                    os.listdir(d)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def holder_main(spec: dict[str, Any]) -> int:
    """Keep a key in this process's keyring (@p) until told to exit."""
    from keyfence.client import Client
    from keyfence.errors import KeyfenceError

    stop = threading.Event()
    with Client.connect(autostart=False) as client:
        payload = bytes.fromhex(spec["payload"])
        serial = client.add_key("logon", spec["description"], payload, KEY_SPEC_PROCESS_KEYRING)
        _binder([spec["dir"]], stop)
        print(f"ready {serial}", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "exit":
                break
            try:
                if words[0] == "revoke":
                    client.revoke(serial)
                elif words[0] == "invalidate":
                    client.invalidate(serial)
                elif words[0] == "timeout":
                    client.set_timeout(serial, int(words[1]))
                print("ok", flush=True)
            except KeyfenceError as err:
                print(f"err {err.errno} {err.strerror}", flush=True)
    stop.set()
    return 0


# ------------------------------------------------------------------ agent


class _Child:
    def __init__(self, argv: list[str], stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def role_argv(role: str, spec: dict[str, Any]) -> list[str]:
    """The command line of one role's process."""
    return [sys.executable, "-m", "keyfence.testing.chaos_roles", role, json.dumps(spec)]


def agent_main(spec: dict[str, Any]) -> int:
    """Lead one POSIX session: run commands in it, on request, one at a time."""
    from keyfence.client import Client

    with Client.connect(autostart=False) as client:
        client.join_session_keyring(None)  # the login's @s, as pam_keyinit makes it
    owned: list[str] = []
    stop = threading.Event()
    _binder(owned, stop)
    writers: list[_Child] = []
    holders: dict[int, _Child] = {}
    reply: dict[str, Any]
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        reply = {"ok": True}
        if op in ("kfctl", "keyfence"):
            done = subprocess.run(
                [str(BIN / op), *req["args"]],
                input=bytes.fromhex(req.get("stdin", "")),
                capture_output=True,
                check=False,
                timeout=120,
            )
            reply = {
                "ok": done.returncode == 0,
                "out": done.stdout.decode(errors="replace"),
                "err": done.stderr.decode(errors="replace"),
            }
        elif op == "setpolicy":
            try:
                os.setxattr(req["dir"], "user.keyfence.policy", req["policy"].encode())
            except OSError as err:
                reply = {"ok": False, "err": f"{err.strerror} ({err.errno})"}
        elif op == "own":
            owned[:] = req["dirs"]
        elif op == "writer":
            writers.append(_Child(role_argv("writer", req["spec"])))
        elif op == "holder":
            child = _Child(role_argv("holder", req["spec"]), stdin=True)
            assert child.proc.stdout is not None
            ready = child.proc.stdout.readline().split()
            if ready[:1] != ["ready"]:
                child.stop()
                reply = {"ok": False, "err": "holder did not start"}
            else:
                holders[int(ready[1])] = child
                reply = {"ok": True, "serial": int(ready[1])}
        elif op == "holder_cmd":
            holder = holders[int(req["serial"])]
            assert holder.proc.stdin is not None and holder.proc.stdout is not None
            if req["cmd"] == "exit":
                holder.proc.stdin.close()  # EOF: the holder exits
                holder.stop(signal.SIGTERM)
                del holders[int(req["serial"])]
            else:
                holder.proc.stdin.write(req["cmd"] + "\n")
                holder.proc.stdin.flush()
                answer = holder.proc.stdout.readline().strip()
                reply = {"ok": answer == "ok", "err": answer}
        elif op in ("stop_writers", "end"):
            for writer in writers:
                writer.stop()
            writers.clear()
            if op == "end":
                for holder in holders.values():
                    holder.stop()
                holders.clear()
        print(json.dumps(reply), flush=True)
        if op == "end":
            break
    stop.set()
    return 0


# ------------------------------------------------------------------ verify


def verify_main(spec: dict[str, Any]) -> int:
    """In a fresh session: add every key to @s, read every file, report."""
    from keyfence.client import Client

    with Client.connect(autostart=False) as client:
        for key in spec["keys"]:
            client.add_key("logon", key["description"], bytes.fromhex(key["payload"]), -3)
    files: dict[str, Any] = {}
    for name, path in spec["files"].items():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            files[name] = {"error": f"{err.strerror} ({err.errno})"}
            continue
        partials = frozenset(
            record(int(name), seq, length)[:done] for seq, length, done in spec["partials"][name]
        )
        found = scan(data, partials)
        files[name] = {
            "size": len(data),
            "records": [[w, s, n] for (w, s), n in found.records.items()],
            "partial_bytes": found.partial_bytes,
            "garbled_bytes": found.garbled_bytes,
            "garbled_at": found.garbled_at[:10],
        }
    print(json.dumps(files))
    return 0


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    roles = {
        "agent": agent_main,
        "writer": writer_main,
        "holder": holder_main,
        "verify": verify_main,
    }
    return roles[role](spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
