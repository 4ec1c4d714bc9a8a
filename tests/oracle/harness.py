"""Backend-agnostic differential harness: run one op sequence, compare normalized results.

* ``Backend``: the protocol every backend implements, one method per kernel.py function,
  same names and arguments, failures raised as ``OSError(errno)``.
* ``KernelBackend``: the oracle, a worker.py subprocess acting with chosen credentials.
* ``Normalizer`` and ``run_ops``: serial numbers differ between backends (the kernel picks
  them at random), so results are compared through names given in order of first
  appearance ("k1", "k2", ...).

Example::

    ops = [("add_key", "keyring", "r", None, "@s"),
           ("add_key", "user", "a", b"x", "k1"),
           ("read", "k1")]
    with KernelBackend() as kb:
        assert run_ops(kb, ops, Normalizer()) == [
            ("ok", "k1"), ("ok", "k2"), ("ok", ["k2"])]
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

import keyfence
from keyfence.testing import kernel_keyctl as kernel

_SRC = os.path.dirname(os.path.dirname(os.path.abspath(keyfence.__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")

SPECIAL: dict[str, int] = {
    "@t": kernel.KEY_SPEC_THREAD_KEYRING,
    "@p": kernel.KEY_SPEC_PROCESS_KEYRING,
    "@s": kernel.KEY_SPEC_SESSION_KEYRING,
    "@u": kernel.KEY_SPEC_USER_KEYRING,
    "@us": kernel.KEY_SPEC_USER_SESSION_KEYRING,
    "@g": kernel.KEY_SPEC_GROUP_KEYRING,
    "@a": kernel.KEY_SPEC_REQKEY_AUTH_KEY,
    "@r": kernel.KEY_SPEC_REQUESTOR_KEYRING,
}


class Backend(Protocol):
    """What run_ops needs; KernelBackend and the model adapter both implement it."""

    def add_key(
        self, type: str, description: str | None, payload: bytes | None, keyring: int
    ) -> int: ...
    def request_key(
        self, type: str, description: str | None, callout_info: str | None, dest_keyring: int
    ) -> int: ...
    def get_keyring_id(self, id: int, create: bool) -> int: ...
    def join_session_keyring(self, name: str | None) -> int: ...
    def update(self, id: int, payload: bytes | None) -> None: ...
    def revoke(self, id: int) -> None: ...
    def chown(self, id: int, uid: int, gid: int) -> None: ...
    def setperm(self, id: int, perm: int) -> None: ...
    def describe(self, id: int) -> str: ...
    def clear(self, id: int) -> None: ...
    def link(self, id: int, ring: int) -> None: ...
    def unlink(self, id: int, ring: int) -> None: ...
    def search(self, ring: int, type: str, desc: str | None, dest: int) -> int: ...
    def read(self, id: int) -> bytes: ...
    def set_timeout(self, id: int, seconds: int) -> None: ...
    def invalidate(self, id: int) -> None: ...
    def move(self, id: int, from_ring: int, to_ring: int, flags: int) -> None: ...
    def get_security(self, id: int) -> str: ...
    def set_reqkey_keyring(self, n: int) -> int: ...
    def session_to_parent(self) -> None: ...
    def restrict_keyring(self, ring: int, type: str | None, restriction: str | None) -> None: ...
    def capabilities(self) -> bytes: ...


class WorkerError(RuntimeError):
    """The worker died or broke protocol (not a kernel error: those are OSError)."""


def _world_executable(path: str) -> bool:
    """Whether any uid can exec path: every directory o+x and the file o+x."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def _interpreter(uid: int | None) -> str:
    """A Python the target uid can exec; the venv's may live under root-only /root."""
    if uid in (None, 0) or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    return sys.executable


def _encode(value: Any) -> Any:
    return {"hex": value.hex()} if isinstance(value, bytes | bytearray) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    return value


class KernelBackend:
    """The kernel, driven through one worker process; use it as a context manager.

    ``uid``/``gid``/``groups``: credentials of the worker (via setpriv; gid defaults to
    uid, groups to none).  ``session``: "anon" (default: a fresh anonymous session keyring,
    so the caller's own session keyring is never touched), "none" (inherit), or a name.

    ``userns=True`` is the isolation option.  The worker unshares a user namespace whose
    uid_map and gid_map are the identity over the whole range ("0 0 4294967295"), then
    switches to ``uid``.  Observed on Linux 6.18 (see KERNEL_FACTS.md):

    * user and user-session keyrings (@u "_uid.N", @us "_uid_ses.N") and keyring names
      are per user namespace, so every backend gets a fresh, empty @u and @us instead of
      the machine-wide ones that persist between runs and are shared with everything
      else running as that uid; nothing is left behind when the worker exits;
    * other uids work, as the map covers them, and they are the same kernel uids
      outside, so quotas are the real per-uid ones (root_maxkeys/root_maxbytes for 0,
      maxkeys/maxbytes otherwise) and are shared with that uid's keys elsewhere;
    * but root inside is not root for the keyring checks that need CAP_SYS_ADMIN in the
      initial namespace: chown to another uid, and setperm of another uid's key, fail
      with EACCES where real root succeeds.  Use ``userns=False`` (the default) for tests
      of root's privileges, and ``userns=True`` for anything that writes to @u or @us or
      counts quota (outside a namespace those are the machine's real, shared keyrings).
    """

    def __init__(
        self,
        uid: int | None = None,
        gid: int | None = None,
        groups: Sequence[int] = (),
        *,
        session: str = "anon",
        userns: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.uid = uid
        self.timeout = timeout
        argv = [_interpreter(uid), WORKER, "--session", session]
        if uid is not None:
            spec = f"{uid}:{uid if gid is None else gid}"
            if groups:
                spec += ":" + ",".join(str(g) for g in groups)
            argv += ["--as", spec]
        if userns:
            argv.append("--userns")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        # the worker needs only keyfence.testing.kernel_keyctl (stdlib ctypes)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=_SRC)
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd="/",
            env=env,
            text=True,
            start_new_session=True,  # its own process group, killed whole by close()
        )
        try:
            first = self._receive()
            if userns:
                self._map_identity(int(first["userns"]))
                first = self._receive()
            self.pid: int = int(first["ready"]["pid"])
        except BaseException:
            self.close()
            raise

    def _map_identity(self, pid: int) -> None:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("0 0 4294967295\n")
        self._send_line("\n")

    def _send_line(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except BrokenPipeError as e:
            raise WorkerError(f"worker gone: {self._stderr_text()}") from e

    def _receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker exited: {self._stderr_text()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def call(self, op: str, *args: Any) -> Any:
        """Run one op in the worker; raises OSError with the kernel's errno on failure."""
        self._send_line(json.dumps({"op": op, "args": [_encode(a) for a in args]}) + "\n")
        reply = self._receive()
        if "errno" in reply:
            code = int(reply["errno"])
            raise OSError(code, os.strerror(code))
        if "ok" not in reply:
            raise WorkerError(f"bad reply to {op}: {reply}")
        return _decode(reply["ok"])

    def close(self) -> None:
        """Ask the worker to exit; kill its process group if it does not."""
        if self._proc.poll() is None:
            try:
                self._send_line(json.dumps({"op": "exit"}) + "\n")
                self._proc.wait(timeout=2)
            except (WorkerError, OSError, subprocess.TimeoutExpired):
                pass
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()

    def __enter__(self) -> KernelBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Worker-only helpers (not part of Backend).
    def getuid(self) -> int:
        return int(self.call("getuid"))

    def key_users(self) -> str:
        return str(self.call("key_users"))

    # The Backend protocol.
    def add_key(
        self, type: str, description: str | None, payload: bytes | None, keyring: int
    ) -> int:
        return int(self.call("add_key", type, description, payload, keyring))

    def request_key(
        self, type: str, description: str | None, callout_info: str | None, dest_keyring: int
    ) -> int:
        return int(self.call("request_key", type, description, callout_info, dest_keyring))

    def get_keyring_id(self, id: int, create: bool) -> int:
        return int(self.call("get_keyring_id", id, create))

    def join_session_keyring(self, name: str | None) -> int:
        return int(self.call("join_session_keyring", name))

    def update(self, id: int, payload: bytes | None) -> None:
        self.call("update", id, payload)

    def revoke(self, id: int) -> None:
        self.call("revoke", id)

    def chown(self, id: int, uid: int, gid: int) -> None:
        self.call("chown", id, uid, gid)

    def setperm(self, id: int, perm: int) -> None:
        self.call("setperm", id, perm)

    def describe(self, id: int) -> str:
        return str(self.call("describe", id))

    def clear(self, id: int) -> None:
        self.call("clear", id)

    def link(self, id: int, ring: int) -> None:
        self.call("link", id, ring)

    def unlink(self, id: int, ring: int) -> None:
        self.call("unlink", id, ring)

    def search(self, ring: int, type: str, desc: str | None, dest: int) -> int:
        return int(self.call("search", ring, type, desc, dest))

    def instantiate(self, id: int, payload: bytes | None, ring: int) -> None:
        self.call("instantiate", id, payload, ring)

    def reject(self, id: int, timeout: int, error: int, ring: int) -> None:
        self.call("reject", id, timeout, error, ring)

    def assume_authority(self, id: int) -> int:
        return int(self.call("assume_authority", id))

    def read(self, id: int) -> bytes:
        data: bytes = self.call("read", id)
        return data

    def set_timeout(self, id: int, seconds: int) -> None:
        self.call("set_timeout", id, seconds)

    def invalidate(self, id: int) -> None:
        self.call("invalidate", id)

    def move(self, id: int, from_ring: int, to_ring: int, flags: int) -> None:
        self.call("move", id, from_ring, to_ring, flags)

    def get_security(self, id: int) -> str:
        return str(self.call("get_security", id))

    def set_reqkey_keyring(self, n: int) -> int:
        return int(self.call("set_reqkey_keyring", n))

    def session_to_parent(self) -> None:
        self.call("session_to_parent")

    def restrict_keyring(self, ring: int, type: str | None, restriction: str | None) -> None:
        self.call("restrict_keyring", ring, type, restriction)

    def capabilities(self) -> bytes:
        data: bytes = self.call("capabilities")
        return data


class Normalizer:
    """Maps one backend's serials to "k1", "k2", ... in order of first appearance.

    Use one Normalizer per backend.  Special ids (negative) and 0 pass through unchanged.
    A keyring read() becomes a sorted list of names; members never seen before through an
    op result show as "?" (their kernel order and serials are arbitrary, so they could
    not be named consistently across backends).
    """

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self._serials: dict[str, int] = {}
        self._keyrings: set[int] = set()

    def name(self, serial: int) -> str | int:
        """The symbolic name of serial, assigning the next one if it is new."""
        if serial <= 0:
            return serial
        if serial not in self._names:
            name = f"k{len(self._names) + 1}"
            self._names[serial] = name
            self._serials[name] = serial
        return self._names[serial]

    def serial(self, ref: str | int) -> int:
        """Resolve "k3", "@s" or a plain int to the id to pass to the backend."""
        if isinstance(ref, int):
            return ref
        if ref in SPECIAL:
            return SPECIAL[ref]
        try:
            return self._serials[ref]
        except KeyError:
            raise KeyError(f"no key named {ref!r} yet") from None

    def mark_keyring(self, serial: int) -> None:
        self._keyrings.add(serial)

    def is_keyring(self, serial: int) -> bool:
        return (serial < 0 and serial != kernel.KEY_SPEC_REQKEY_AUTH_KEY) or (
            serial in self._keyrings
        )

    def keyring_names(self, data: bytes) -> list[str]:
        """A keyring read() result as sorted names ("k2" before "k10"), unknowns as "?"."""
        names = [self._names.get(s, "?") for s in kernel.keyring_serials(data)]
        return sorted(names, key=lambda n: (n == "?", int(n[1:]) if n != "?" else 0))


# Per op: which argument positions are key ids, which position (if any) names the key
# type, and how to normalize the result.
_ResultKind = Literal["key", "keyring", "read", "plain", "none"]
_SIGNATURES: dict[str, tuple[frozenset[int], int | None, _ResultKind]] = {
    "add_key": (frozenset({3}), 0, "key"),
    "request_key": (frozenset({3}), 0, "key"),
    "get_keyring_id": (frozenset({0}), None, "keyring"),
    "join_session_keyring": (frozenset(), None, "keyring"),
    "update": (frozenset({0}), None, "none"),
    "revoke": (frozenset({0}), None, "none"),
    "chown": (frozenset({0}), None, "none"),
    "setperm": (frozenset({0}), None, "none"),
    "describe": (frozenset({0}), None, "plain"),
    "clear": (frozenset({0}), None, "none"),
    "link": (frozenset({0, 1}), None, "none"),
    "unlink": (frozenset({0, 1}), None, "none"),
    "search": (frozenset({0, 3}), 1, "key"),
    "read": (frozenset({0}), None, "read"),
    "set_timeout": (frozenset({0}), None, "none"),
    "invalidate": (frozenset({0}), None, "none"),
    "move": (frozenset({0, 1, 2}), None, "none"),
    "get_security": (frozenset({0}), None, "plain"),
    "set_reqkey_keyring": (frozenset(), None, "plain"),
    "session_to_parent": (frozenset(), None, "none"),
    "restrict_keyring": (frozenset({0}), None, "none"),
    "capabilities": (frozenset(), None, "plain"),
    "instantiate": (frozenset({0, 2}), None, "none"),
    "reject": (frozenset({0, 3}), None, "none"),
    "assume_authority": (frozenset({0}), None, "key"),
}

Op = tuple[Any, ...]
Result = tuple[str, Any]


def run_op(backend: Backend, op: Op, norm: Normalizer) -> Result:
    """Run one op; returns ("ok", normalized value) or ("err", "ENOKEY").

    Errno names come from errno.errorcode, which picks one name per number: EDEADLK
    shows as "EDEADLOCK" and EOPNOTSUPP as "ENOTSUP" whichever one a backend raised.
    """
    name, *raw = op
    if name == "sleep":
        # Pseudo-op: a model backend may provide sleep() to advance its own clock.
        getattr(backend, "sleep", time.sleep)(raw[0])
        return ("ok", None)
    key_positions, type_position, kind = _SIGNATURES[name]
    args = [norm.serial(a) if i in key_positions else a for i, a in enumerate(raw)]
    try:
        value = getattr(backend, name)(*args)
    except OSError as e:
        return ("err", errno_mod.errorcode.get(e.errno or 0, str(e.errno)))
    if kind == "none":
        return ("ok", None)
    if kind == "plain":
        return ("ok", value)
    if kind == "read":
        if norm.is_keyring(args[0]):
            return ("ok", norm.keyring_names(value))
        return ("ok", value)
    if kind == "keyring" or (type_position is not None and raw[type_position] == "keyring"):
        norm.mark_keyring(value)
    return ("ok", norm.name(value))


def run_ops(backend: Backend, ops: Iterable[Op], normalizer: Normalizer) -> list[Result]:
    """Run ops in order on one backend; arguments at key positions may be "k1", "@s"...

    Besides the Backend methods, ("sleep", seconds) waits (or calls backend.sleep).
    """
    return [run_op(backend, op, normalizer) for op in ops]


__all__ = [
    "SPECIAL",
    "Backend",
    "KernelBackend",
    "Normalizer",
    "WorkerError",
    "run_op",
    "run_ops",
]
