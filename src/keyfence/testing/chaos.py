"""Chaos: writers append verifiable records under several keys while every
removal path runs at random; then every acknowledged record is checked.

Shared by ``tests/fs/test_chaos.py`` (CI scale) and ``bench/soak.py`` (a
soak with a duration).  Everything is real: a daemon process, two mounts
started by it, POSIX sessions (each led by an *agent* process that runs
``kfctl``/``keyfence`` inside it), writer processes, and *holder* processes
that keep a key in their process keyring (``@p``).

Records: ``KFR1 | writer u32 | seq u64 | length u32 | payload | blake2b-16``,
the payload a function of (writer, seq), so a record is checkable on its
own and cannot be confused with another.  A writer appends records to its
own file (``O_APPEND``), fsyncs at random, keeps the file open (so its pages
stay dirty in the mount), and logs -- outside the mount, with ``write(2)``
to a plain file on the local disk, fsynced every 64 lines and at exit --
``ok SEQ`` for every record whose ``write()`` returned the whole record,
and ``err SEQ ERRNO WHERE`` for every error.  After an error it closes the
file and retries every 20-100 ms; the next record gets the next sequence
number (records after a failed write may be missing).

At the end the writers stop, the mounts are unmounted, a fresh mount is
made, a new session adds every key and reads every file: each record
logged ``ok`` must be there, intact; any byte that is not part of an
intact record is *garbled*.  Run as a module for the processes' roles:
``python -m keyfence.testing.chaos {agent,writer,holder,verify} JSON``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from keyfence.constants import KEY_SPEC_PROCESS_KEYRING
from keyfence.testing.users import src_dir

BIN = Path(sys.executable).parent
MAGIC = b"KFR1"
HEADER = struct.Struct("<4sIQI")
TRAILER = 16
MAX_RECORD = 64 << 10
CLEAR_ERRNOS = {errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED, errno.ENOENT}
"""What a writer may get from a locked directory: the key is not there
(ENOKEY, or the kernel's words for a dead key), or the name is not there
(a locked directory shows ciphertext names)."""
SESSION_PATHS = ("clear", "unlink", "move", "revoke", "invalidate", "timeout", "lock")
PROCESS_PATHS = ("process-exit", "revoke", "invalidate", "timeout")
ALL_PATHS = (*SESSION_PATHS, "process-exit", "session-end")


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


def _role_argv(role: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "keyfence.testing.chaos", role, json.dumps(spec)]


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
            writers.append(_Child(_role_argv("writer", req["spec"])))
        elif op == "holder":
            child = _Child(_role_argv("holder", req["spec"]), stdin=True)
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


class Agent:
    """The controller's handle on one session's agent."""

    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            _role_argv("agent", {}),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.ended = False

    def call(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"agent {self.index}: {op} took over {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.index} died during {op}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kfctl(self, *args: str, stdin: bytes = b"") -> dict[str, Any]:
        return self.call("kfctl", args=list(args), stdin=stdin.hex())

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            with contextlib.suppress(Exception):
                self.call("end")
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


# ------------------------------------------------------------------ controller


@dataclass
class ChaosConfig:
    duration: float = 30.0
    sessions: int = 2
    writers_per_session: int = 3
    dirs_per_mount: int = 2
    mounts: int = 2
    fenced: bool = True
    seed: int | None = None
    interval: tuple[float, float] = (0.15, 0.6)
    """Seconds between two chaos actions."""
    readd_delay: tuple[float, float] = (0.05, 0.8)
    writer_pause: float = 0.002
    dirty_expire: float = 30.0
    """The mounts' write-back expiry: long, so removals meet dirty pages."""
    sample_every: float = 0.0
    """Seconds between samples of the daemon's and workers' memory (0: none)."""
    window: float = 10.0
    """Acknowledged records are also counted per window of this many seconds."""


@dataclass
class ChaosResult:
    seed: int
    fenced: bool
    duration: float
    records_written: int = 0
    """Records whose write() returned success."""
    records_verified: int = 0
    records_lost: int = 0
    """Acknowledged records missing or damaged after the fresh mount."""
    garbled_bytes: int = 0
    partial_bytes: int = 0
    short_writes: int = 0
    """write() calls that returned a short count (the rest failed)."""
    failed_writes: int = 0
    writer_errors: dict[str, int] = field(default_factory=dict)
    """errno name -> count, over every failed open/write/fsync/close."""
    unclear_errors: dict[str, int] = field(default_factory=dict)
    """Writer errors that are not a clear "locked" error."""
    removals: dict[str, int] = field(default_factory=dict)
    readds: int = 0
    sessions_started: int = 0
    action_failures: list[str] = field(default_factory=list)
    lost_examples: list[str] = field(default_factory=list)
    dropped_reports: int = 0
    """The mounts' reports of data dropped in an emergency (fence off)."""
    read_errors: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    """Seconds of chaos actually run."""
    acked_per_window: list[int] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    """{"t", "daemon_rss_mib", "workers_rss_mib"} every ``sample_every``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Dir:
    index: int
    path: Path
    description: str
    payload: bytes
    owner: int = 0
    placement: str | None = None
    """"session" (in the owner's @s), "process" (a holder's @p) or None."""
    serial: int = 0
    ready_at: float = 0.0


def _make_key(index: int) -> tuple[str, str, bytes]:
    """(policy, key description, payload): logon keyfence keys, and every
    third directory an e4crypt-style ``ext4:`` key."""
    from keyfence.fs import e4crypt_compat
    from keyfence.fs.crypto import MasterKey

    raw = os.urandom(64)
    if index % 3 == 1:
        desc = e4crypt_compat.descriptor(raw)
        payload = e4crypt_compat.kernel_payload(raw)
        return f"ext4:{desc}", e4crypt_compat.key_description(desc), payload
    ident = MasterKey(raw).identifier
    return f"keyfence:{ident}", f"keyfence:{ident}", raw


class Chaos:
    def __init__(self, config: ChaosConfig, workdir: Path, log: IO[str] | None = None) -> None:
        self.config = config
        self.work = workdir
        self.seed = config.seed if config.seed is not None else random.randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.out = log
        self.result = ChaosResult(self.seed, config.fenced, config.duration)
        self.sock = workdir / "sock"
        self.env = dict(
            os.environ,
            KEYFENCE_SOCKET=str(self.sock),
            KEYFENCE_NO_AUTOSTART="1",
            PYTHONPATH=str(src_dir()),  # the children import this keyfence
            PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        )
        self.mounts: list[tuple[Path, Path]] = []
        self.dirs: list[_Dir] = []
        self.agents: dict[int, Agent] = {}
        self.next_agent = 0
        self.next_writer = 0
        self.writer_files: dict[int, Path] = {}
        self.daemon: subprocess.Popen[bytes] | None = None
        self._daemon_log: IO[bytes] | None = None
        self._started_wall = 0.0

    def note(self, text: str) -> None:
        if self.out is not None:
            print(f"chaos: {text}", file=self.out, flush=True)

    # -- setup and teardown

    def start(self) -> None:
        from keyfence.cli import demo_mount

        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self._daemon_log = open(self.work / "daemon.log", "wb")  # noqa: SIM115
        self.daemon = demo_mount.start_daemon(
            self.sock, fenced=self.config.fenced, env=self.env, log=self._daemon_log
        )
        if not demo_mount.wait_for_socket(self.daemon, self.sock):
            raise RuntimeError("the daemon did not start: " + self.daemon_log())
        for m in range(self.config.mounts):
            backing, mnt = self.work / f"backing{m}", self.work / f"mnt{m}"
            backing.mkdir()
            mnt.mkdir()
            self.mount(backing, mnt)
            self.mounts.append((backing, mnt))
        for _ in range(self.config.sessions):
            self.new_session()
        first = self.agents[min(self.agents)]
        for _backing, mnt in self.mounts:
            for _ in range(self.config.dirs_per_mount):
                index = len(self.dirs)
                policy, desc, payload = _make_key(index)
                path = mnt / f"d{index}"
                path.mkdir()
                d = _Dir(index, path, desc, payload, owner=first.index)
                self.dirs.append(d)
                self.readd(d, placement="session")
                # the policy needs the key in the caller's keyrings: the session's
                answer = first.call("setpolicy", dir=str(path), policy=policy)
                if not answer["ok"]:
                    raise RuntimeError(f"policy on {path}: {answer}")
        # then spread the directories over the sessions: each key moves to
        # its owner's @s (nothing is written yet)
        first.kfctl("clear", "@s")
        sessions = sorted(self.agents)
        for d in self.dirs:
            d.owner = self.rng.choice(sessions)
            self.readd(d, placement="session")
        for agent in list(self.agents.values()):
            self._own(agent)
            self.start_writers(agent)

    def mount(self, backing: Path, mnt: Path) -> None:
        from keyfence.client import Client

        with Client.connect(str(self.sock), autostart=False) as client:
            client._call(
                "mount", str(backing), str(mnt), ["--dirty-expire", str(self.config.dirty_expire)]
            )

    def daemon_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "daemon.log").read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        from keyfence.cli import demo_mount

        for agent in list(self.agents.values()):
            agent.end()
        self.agents.clear()
        for _backing, mnt in self.mounts:
            self._umount(mnt)
        if self.daemon is not None:
            demo_mount.stop_daemon(self.daemon)
            self.daemon = None
        if self._daemon_log is not None:
            self._daemon_log.close()
            self._daemon_log = None

    def _umount(self, mnt: Path) -> None:
        subprocess.run(
            [str(BIN / "keyfence"), "umount", str(mnt)],
            env=self.env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        if os.path.ismount(mnt) or _listed_mount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)

    # -- sessions, writers, keys

    def new_session(self) -> Agent:
        agent = Agent(self.next_agent, self.env)
        self.next_agent += 1
        self.agents[agent.index] = agent
        self.result.sessions_started += 1
        return agent

    def start_writers(self, agent: Agent) -> None:
        for _ in range(self.config.writers_per_session):
            d = self.rng.choice(self.dirs)
            wid = self.next_writer
            self.next_writer += 1
            path = d.path / f"w{wid}.dat"
            self.writer_files[wid] = path
            spec = {
                "id": wid,
                "path": str(path),
                "seed": self.rng.randrange(1 << 32),
                "log": str(self.work / "logs" / f"w{wid}.log"),
                "pause": self.config.writer_pause,
            }
            agent.call("writer", spec=spec)

    def _own(self, agent: Agent) -> None:
        agent.call("own", dirs=[str(d.path) for d in self.dirs if d.owner == agent.index])

    def readd(self, d: _Dir, placement: str | None = None) -> None:
        agent = self.agents[d.owner]
        placement = placement or ("session" if self.rng.random() < 0.7 else "process")
        if placement == "session":
            answer = agent.kfctl("padd", "logon", d.description, "@s", stdin=d.payload)
            if not answer["ok"]:
                self.result.action_failures.append(f"re-add d{d.index}: {answer['err'].strip()}")
                return
            d.serial = int(answer["out"].split()[0])
        else:
            spec = {"description": d.description, "payload": d.payload.hex(), "dir": str(d.path)}
            answer = agent.call("holder", spec=spec)
            if not answer["ok"]:
                self.result.action_failures.append(f"holder d{d.index}: {answer['err']}")
                return
            d.serial = int(answer["serial"])
        d.placement = placement
        self.result.readds += 1

    def _gone(self, d: _Dir, after: float = 0.0) -> None:
        d.placement = None
        d.serial = 0
        d.ready_at = time.monotonic() + after + self.rng.uniform(*self.config.readd_delay)

    # -- the removal paths

    def act(self) -> None:
        """One removal: the path used least so far among those that apply
        now (ties at random), on a directory it applies to."""
        present = [d for d in self.dirs if d.placement is not None]
        choices: list[tuple[str, _Dir | None]] = [("session-end", None)]
        for d in present:
            paths = PROCESS_PATHS if d.placement == "process" else SESSION_PATHS
            choices.extend((path, d) for path in paths)
        used = self.result.removals
        least = min(used.get(path, 0) for path, _d in choices)
        path, target = self.rng.choice([c for c in choices if used.get(c[0], 0) == least])
        if target is None:
            self.end_session(self.rng.choice(sorted(self.agents)))
            return
        d = target
        agent = self.agents[d.owner]
        if d.placement == "process":
            cmd = {
                "process-exit": "exit",
                "revoke": "revoke",
                "invalidate": "invalidate",
                "timeout": "timeout 1",
            }[path]
            answer = agent.call("holder_cmd", serial=d.serial, cmd=cmd)
        else:
            answer = self._session_removal(path, d, agent)
        if not answer["ok"]:
            self.result.action_failures.append(f"{path} d{d.index}: {answer.get('err', '')!s}")
            return
        self.result.removals[path] = self.result.removals.get(path, 0) + 1
        self.note(f"{path} d{d.index} (key {d.serial}, {d.placement})")
        if path == "move":
            return  # the key was displaced by its twin: still there
        if path == "clear":
            for other in self.dirs:
                if other.owner == d.owner and other.placement == "session":
                    self._gone(other)
        elif path == "process-exit" and d.placement == "process":
            self._gone(d)
        elif path == "timeout":
            self._gone(d, after=2.2)  # expiry is in whole seconds
        else:
            self._gone(d)

    def _session_removal(self, path: str, d: _Dir, agent: Agent) -> dict[str, Any]:
        serial = str(d.serial)
        if path == "clear":
            return agent.kfctl("clear", "@s")
        if path == "unlink":
            return agent.kfctl("unlink", serial, "@s")
        if path in ("revoke", "invalidate"):
            return agent.kfctl(path, serial)
        if path == "timeout":
            return agent.kfctl("timeout", serial, "1")
        if path == "lock":
            locked = agent.call("keyfence", args=["lock", str(d.path)])
            # fscrypt's convention: exit 1 when files were still open
            # ("incompletely locked"); the key is gone all the same
            if not locked["ok"] and "incompletely locked" in str(locked.get("err", "")):
                return dict(locked, ok=True)
            return locked
        # move: a twin of the key displaces it from @s (kfctl move -f)
        hold = agent.kfctl("newring", f"hold{d.index}", "@s")
        if not hold["ok"]:
            return hold
        ring = hold["out"].split()[0]
        twin = agent.kfctl("padd", "logon", d.description, ring, stdin=d.payload)
        if not twin["ok"]:
            return twin
        moved = agent.kfctl("move", "-f", twin["out"].split()[0], ring, "@s")
        agent.kfctl("unlink", ring, "@s")
        if moved["ok"]:
            d.serial = int(twin["out"].split()[0])
        return moved

    def end_session(self, index: int) -> None:
        """Every process of the session exits: its @s goes, and with it the
        keys there; its holders' @p too."""
        agent = self.agents.pop(index)
        agent.end()
        self.result.removals["session-end"] = self.result.removals.get("session-end", 0) + 1
        fresh = self.new_session()
        self.note(f"session {index} ended; session {fresh.index} starts")
        for d in self.dirs:
            if d.owner == index:
                d.owner = fresh.index
                self._gone(d)
        self._own(fresh)
        self.start_writers(fresh)

    # -- the run

    def run(self) -> ChaosResult:
        started = time.monotonic()
        self._started_wall = time.time()
        end = started + self.config.duration
        next_sample = started
        while time.monotonic() < end:
            time.sleep(self.rng.uniform(*self.config.interval))
            now = time.monotonic()
            if self.config.sample_every and now >= next_sample:
                next_sample = now + self.config.sample_every
                self.sample(now - started)
            for d in self.dirs:
                if d.placement is None and now >= d.ready_at:
                    self.readd(d)
            self.act()
        self.result.elapsed = time.monotonic() - started
        self.finish()
        return self.result

    def sample(self, t: float) -> None:
        daemon = self.daemon.pid if self.daemon is not None else 0
        workers = [int(m["pid"]) for m in self._mounts() if m.get("pid")]
        self.result.samples.append(
            {
                "t": round(t, 1),
                "daemon_rss_mib": _rss_mib(daemon),
                "workers_rss_mib": sum(_rss_mib(pid) for pid in workers),
            }
        )

    def finish(self) -> None:
        """Stop the writers, unmount, mount afresh, verify."""
        t0 = time.monotonic()
        for agent in list(self.agents.values()):
            agent.end()
        self.agents.clear()
        t1 = time.monotonic()
        self.result.dropped_reports = sum(len(m.get("dropped") or ()) for m in self._mounts())
        for _backing, mnt in self.mounts:
            self._umount(mnt)
        t2 = time.monotonic()
        for backing, mnt in self.mounts:
            self.mount(backing, mnt)
        self.note(f"writers stopped in {t1 - t0:.1f} s, unmounted in {t2 - t1:.1f} s")
        spec = {
            "keys": [{"description": d.description, "payload": d.payload.hex()} for d in self.dirs],
            "files": {str(w): str(p) for w, p in self.writer_files.items()},
            "partials": {str(w): self._short_writes(w) for w in self.writer_files},
        }
        (self.work / "verify.json").write_text(json.dumps(spec))  # for a post-mortem
        done = subprocess.run(
            _role_argv("verify", spec),
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
            start_new_session=True,
        )
        if done.returncode:
            raise RuntimeError(f"verify failed: {done.stderr[-3000:]}")
        self.account(json.loads(done.stdout))

    def _log_lines(self, wid: int) -> list[list[str]]:
        log = self.work / "logs" / f"w{wid}.log"
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    def _short_writes(self, wid: int) -> list[tuple[int, int, int]]:
        return [(int(w[1]), int(w[2]), int(w[3])) for w in self._log_lines(wid) if w[0] == "short"]

    def _mounts(self) -> list[dict[str, Any]]:
        from keyfence.client import Client

        with Client.connect(str(self.sock), autostart=False) as client:
            mounts: list[dict[str, Any]] = client._call("mounts")
        return mounts

    def account(self, files: dict[str, Any]) -> None:
        r = self.result
        errors: Counter[str] = Counter()
        unclear: Counter[str] = Counter()
        windows: Counter[int] = Counter()
        began = self._started_wall
        for wid, path in self.writer_files.items():
            ok: list[int] = []
            for words in self._log_lines(wid):
                if words[0] == "ok":
                    ok.append(int(words[1]))
                    windows[int((float(words[2]) - began) // self.config.window)] += 1
                elif words[0] == "err":
                    name = errno.errorcode.get(int(words[2]), words[2])
                    errors[f"{name} ({words[3]})"] += 1
                    if int(words[2]) not in CLEAR_ERRNOS:
                        unclear[f"{name} ({words[3]})"] += 1
                    if words[3] != "close":
                        r.failed_writes += 1
                elif words[0] == "short":
                    r.short_writes += 1
            r.records_written += len(ok)
            info = files.get(str(wid), {})
            if "error" in info:
                if ok:
                    r.read_errors[str(path)] = info["error"]
                    r.records_lost += len(ok)
                    r.lost_examples.append(f"w{wid}: {len(ok)} records, file {info['error']}")
                continue
            present = {s for w, s, _n in info.get("records", ()) if w == wid}
            missing = [s for s in ok if s not in present]
            r.records_verified += len(ok) - len(missing)
            r.records_lost += len(missing)
            r.garbled_bytes += int(info.get("garbled_bytes", 0))
            r.partial_bytes += int(info.get("partial_bytes", 0))
            if missing and len(r.lost_examples) < 20:
                r.lost_examples.append(
                    f"w{wid} ({path.parent.name}): {len(missing)} of {len(ok)} acknowledged "
                    f"records missing, first seq {missing[0]}; "
                    f"garbled bytes {info.get('garbled_bytes')} at {info.get('garbled_at')}"
                )
        full = int(r.elapsed // self.config.window)  # whole windows only
        r.acked_per_window = [windows.get(i, 0) for i in range(full)]
        r.writer_errors = dict(errors)
        r.unclear_errors = dict(unclear)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _listed_mount(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mounts", "rb") as f:
        return any(len(x.split()) > 1 and x.split()[1] == target for x in f)


def run_chaos(config: ChaosConfig, workdir: Path, log: IO[str] | None = None) -> ChaosResult:
    chaos = Chaos(config, workdir, log)
    try:
        chaos.start()
        return chaos.run()
    finally:
        chaos.close()


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
