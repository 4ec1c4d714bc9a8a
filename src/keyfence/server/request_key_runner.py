"""request-key(8) for keyfence: run the handler of a key under construction.

When request_key() with callout info finds nothing, the key service makes
the key and calls :func:`install`'s hook, which does what the kernel and
/sbin/request-key do between them:

1. choose the handler from a request-key.conf(5) file -- keyfence's own,
   ``/etc/keyfence/request-key.conf`` and ``/etc/keyfence/request-key.d/
   *.conf``, or ``$KEYFENCE_REQUEST_KEY_CONF`` (and the ``.d`` directory
   beside it) in the daemon's environment: the least wild line matching
   ``create``, the key's type, description and callout info wins, the
   first of equals (request-key's rule);
2. expand its macros: ``%k`` key, ``%t`` type, ``%d`` description, ``%c``
   callout info, ``%u``/``%g`` the requester's uid/gid, ``%T``/``%P``/``%S``
   its thread, process and session keyrings, ``%o`` the operation, ``%%``
   a literal ``%`` (``%{type:desc}`` key substitution is not provided);
3. run it as the requesting user (uid, gid, groups), in a new session,
   stdin/stdout/stderr on /dev/null, with ``KEYFENCE_SOCKET`` naming this
   daemon, holding the authority over the key: the process is held on its
   stdin until the service has recorded it (pid and start time), so no call
   it makes can come first;
4. a ``|program`` line gets the callout info on stdin and, if it exits 0,
   the key is instantiated with what it printed (read up to a payload's
   limit: one that prints more is killed);
5. when the handler exits (or, after :data:`HANDLER_TIMEOUT`, is killed
   with its process group) and the key is still uninstantiated, it is
   negated (ENOKEY for 60 s), which wakes the waiters.  How many handlers
   a user can have running is bounded by the key quota: each construction
   is a key charged to the requester.  No matching line
   does the same at once (request-key: "No matching action").
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from keyfence.keys import upcall
from keyfence.keys.caller import Caller
from keyfence.keys.errors import fail
from keyfence.keys.key_type import ADD_KEY_PAYLOAD_MAX
from keyfence.keys.keyctl import KeyService
from keyfence.keys.request_key import Construction
from keyfence.keys.text import as_bytes

log = logging.getLogger(__name__)

DEFAULT_CONF = "/etc/keyfence/request-key.conf"
CONF_ENV = "KEYFENCE_REQUEST_KEY_CONF"
HANDLER_TIMEOUT = 120
"""Seconds a handler may run before it is killed and the key negated: the
kernel waits for ever, but a waiter here holds a daemon thread, and no user
may hold the daemon's threads for long (docs/cli.md, "request-key").
``$KEYFENCE_REQUEST_KEY_TIMEOUT`` in the daemon's environment overrides it."""
HANDLER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HOLD = 'read _ || exit 1; {stdin}exec "$0" "$@"'
"""The handler waits for a first line on its stdin until the daemon has
recorded its pid; a ``|program`` then reads the callout info from the same
pipe, any other handler gets /dev/null.  Not a pipe of its own: its number
would be the daemon's next free descriptor, and /bin/sh (dash) takes only
one digit in ``<&N`` ("Bad fd number") -- a daemon with ten descriptors open
ran no handler at all."""


@dataclass(frozen=True)
class UpcallArgs:
    """What request-key is told about a construction (the arguments of one upcall)."""

    op: str
    key: int
    type: str
    description: str
    callout: str
    uid: int
    gid: int
    thread: int
    process: int
    session: int


def match(pattern: str, datum: str) -> int | None:
    """request-key's match(): None, or how many characters the one ``*``
    stood for (0 for an exact match).  ``abc*def`` matches by prefix and
    suffix (keyutils 1.6.3 compares the prefix twice there, a bug)."""
    star = pattern.find("*")
    if star < 0:
        return 0 if pattern == datum else None
    head, tail = pattern[:star], pattern[star + 1 :].replace("*", "")
    if len(datum) < len(head) + len(tail):
        return None
    if datum.startswith(head) and datum.endswith(tail):
        return len(datum) - len(head) - len(tail)
    return None


def conf_files(conf: str) -> Iterator[str]:
    """The ``.d`` directory's ``*.conf`` files (sorted), then the file."""
    directory = os.path.splitext(conf)[0] + ".d"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(".conf") or not os.path.isfile(path):
            continue
        yield path
    yield conf


def choose(conf: str, request: UpcallArgs) -> str | None:
    """The command line of the least wild matching line, or None."""
    best: tuple[int, ...] | None = None
    command = None
    datums = (request.op, request.type, request.description, request.callout)
    for path in conf_files(conf):
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            if not line or line[0] == "#" or line[0].isspace():
                continue
            fields = line.split(None, 4)
            if len(fields) < 5:
                log.warning("%s:%d: syntax error", path, number)
                continue
            wildness = []
            for pattern, datum in zip(fields[:4], datums, strict=True):
                wild = match(pattern, datum)
                if wild is None:
                    break
                wildness.append(wild)
            else:
                if best is None or tuple(wildness) < best:
                    best, command = tuple(wildness), fields[4]
    return command


def expand(command: str, request: UpcallArgs) -> tuple[list[str], bool]:
    """The argv of a command line (program path first) and whether it is a
    ``|program``; EINVAL for a macro request-key would refuse.  Macros are
    whole words of one letter after the ``%`` (``--key=%k`` and ``%kx``
    are passed as they are, as request-key passes them)."""
    piped = command.startswith("|")
    if piped:
        command = command[1:]
    words = command.split()
    if not words:
        raise fail(22, "no command")
    macros = {
        "o": request.op,
        "k": str(request.key),
        "t": request.type,
        "d": request.description,
        "c": request.callout,
        "u": str(request.uid),
        "g": str(request.gid),
        "T": str(request.thread),
        "P": str(request.process),
        "S": str(request.session),
    }
    argv = [words[0]]
    for word in words[1:]:
        if word.startswith("%%"):
            argv.append(word[1:])
        elif word.startswith("%") and len(word) > 2 and word[1] != "{":
            argv.append(word)  # request-key: a longer word is no macro
        elif word.startswith("%"):
            value = macros.get(word[1:])
            if value is None:
                raise fail(22, f"unsupported macro {word!r}")
            argv.append(value)
        else:
            argv.append(word)
    return argv, piped


def lineage(caller: Caller) -> Iterator[tuple[int, int]]:
    """The caller's process and its ancestors as (pid, start time), from
    /proc (a process that is gone ends the chain)."""
    pid = caller.pid
    seen = 0
    while pid > 1 and seen < 64:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return
        fields = stat[stat.rfind(b")") + 2 :].split()
        yield pid, int(fields[19])
        pid = int(fields[1])
        seen += 1


class Runner:
    """The service's request_key upcall hook (one per daemon)."""

    def __init__(self, service: KeyService, socket_path: str) -> None:
        self.service = service
        self.socket_path = socket_path

    @property
    def conf(self) -> str:
        return os.environ.get(CONF_ENV) or DEFAULT_CONF

    def __call__(self, construction: Construction) -> None:
        svc = self.service
        key = construction.key
        thread, process, session = upcall.requester_keyring_ids(svc, construction)
        requester = construction.requester
        request = UpcallArgs(
            op="create",
            key=key.serial,
            type=key.type.name,
            description=key.description,
            callout=construction.callout,
            uid=requester.uid,
            gid=requester.gid,
            thread=thread,
            process=process,
            session=session,
        )
        command = choose(self.conf, request)
        if command is None:
            log.info("request-key: no matching action for key %d", key.serial)
            upcall.handler_ended(svc, construction)
            return
        try:
            argv, piped = expand(command, request)
        except OSError as err:
            log.warning("request-key: %s", err)
            upcall.handler_ended(svc, construction)
            return
        self._spawn(construction, request, argv, piped)

    def _spawn(
        self, construction: Construction, request: UpcallArgs, argv: list[str], piped: bool
    ) -> None:
        requester = construction.requester
        switch = os.geteuid() == 0 and requester.uid != 0
        if not switch and requester.uid != os.geteuid():
            raise fail(13, "this daemon cannot run a handler as that user")
        env = {
            "PATH": HANDLER_PATH,
            "HOME": "/",
            "KEYFENCE_SOCKET": self.socket_path,
            "KEYFENCE_NO_AUTOSTART": "1",
        }
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        child = subprocess.Popen(
            ["/bin/sh", "-c", _HOLD.format(stdin="" if piped else "exec </dev/null; "), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if piped else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            start_new_session=True,
            user=requester.uid if switch else None,
            group=requester.gid if switch else None,
            extra_groups=sorted(requester.groups) if switch else None,
        )
        assert child.stdin is not None
        hold = child.stdin.fileno()
        try:
            start = next(lineage(Caller(uid=requester.uid, gid=requester.gid, pid=child.pid)))
            upcall.grant(self.service, construction, start)
            os.write(hold, b"go\n")  # unbuffered: sh's read takes this line alone
        except (OSError, StopIteration):
            child.kill()
        if not piped:
            with contextlib.suppress(OSError):
                child.stdin.close()
        threading.Thread(
            target=self._wait,
            args=(construction, child, request.callout if piped else None),
            name=f"keyfence-request-key-{construction.key.serial}",
            daemon=True,
        ).start()

    def _wait(
        self, construction: Construction, child: subprocess.Popen[bytes], callout: str | None
    ) -> None:
        svc = self.service
        limit = _timeout()
        serial = construction.key.serial
        try:
            if callout is not None:
                out = _handler_output(child, as_bytes(callout), limit)
                if out is None:
                    _kill(
                        child,
                        f"the handler of key {serial} printed more than "
                        f"{ADD_KEY_PAYLOAD_MAX} bytes",
                    )
                elif child.returncode == 0:
                    try:
                        upcall.instantiate_from_handler(svc, construction, bytes(out))
                    except OSError as err:
                        log.info("request-key: key %d: %s", serial, err)
                    finally:
                        out[:] = bytes(len(out))
            else:
                child.wait(limit)
        except subprocess.TimeoutExpired:
            _kill(child, f"the handler of key {serial} ran {limit:g} s")
        finally:
            upcall.handler_ended(svc, construction)


def _kill(child: subprocess.Popen[bytes], why: str) -> None:
    """Kill a handler and what it started (its process group), and reap it."""
    log.warning("request-key: %s; killed", why)
    with contextlib.suppress(OSError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _handler_output(
    child: subprocess.Popen[bytes], callout: bytes, timeout: float
) -> bytearray | None:
    """A ``|program`` handler's output once it has exited: the callout info
    on its stdin (at most CALLOUT_MAX bytes, within a pipe's buffer, so the
    write does not wait for the handler), what it prints read up to a
    payload's limit.  None as soon as it prints more (the caller kills it:
    the daemon holds no more than a key can take for any handler).
    subprocess.TimeoutExpired past ``timeout``."""
    assert child.stdin is not None and child.stdout is not None
    deadline = time.monotonic() + timeout
    with contextlib.suppress(BrokenPipeError):  # it exited, or closed its stdin
        child.stdin.write(callout)
        child.stdin.flush()
    with contextlib.suppress(BrokenPipeError):
        child.stdin.close()
    fd = child.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    out = bytearray()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(child.args, timeout)
            if not poller.poll(min(left, 60) * 1000):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            out += chunk
            if len(out) > ADD_KEY_PAYLOAD_MAX:
                out[:] = bytes(len(out))
                return None
    except BaseException:
        out[:] = bytes(len(out))
        raise
    finally:
        child.stdout.close()
    child.wait(max(0.0, deadline - time.monotonic()))
    return out


def _timeout() -> float:
    try:
        return float(os.environ.get("KEYFENCE_REQUEST_KEY_TIMEOUT", HANDLER_TIMEOUT))
    except ValueError:
        return HANDLER_TIMEOUT


def install(service: KeyService, socket_path: str) -> None:
    """Make ``service`` call out through request-key.conf, as this daemon."""
    service.request_key_upcall = Runner(service, socket_path)
    service.process_lineage = lineage
