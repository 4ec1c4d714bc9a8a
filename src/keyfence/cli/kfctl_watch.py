"""keyctl 1.6's watch queues on keyfence's notifications.

``watch_session [-f<filters>] [-n <name>] <notifylog> <gclog> <fd> <prog>
[<arg>...]`` joins a new session keyring, watches it, and runs ``prog``
with a *watch queue* on file descriptor ``fd`` (3 to 9, also named in
``$KEYCTL_WATCH_FD``); ``watch_add <fd> <key>`` and ``watch_rm <fd>
<key>`` add and remove keys on that queue from any process that inherited
it; ``watch_sync <fd>`` returns once the notifications of what happened
before it are in the logs.  A consumer process writes each notification to
``notifylog`` as keyctl does (``<key> inst|upd|clr|rev|inv|attr``, ``<key>
link|unlk <key>``) and each destruction to ``gclog`` (``<key> gc``); when
the session keyring itself is destroyed the consumer ends.

The kernel's queue is a notification pipe; keyfence's is a SOCK_SEQPACKET
socket whose other end the consumer holds.  A request on it carries its
own reply socket (SCM_RIGHTS), so concurrent ``watch_add`` calls from
several processes never read each other's answers.  The consumer watches
through its own connection to the daemon, so keys it is asked to watch
must be viewable by the same user (as the kernel's KEY_NEED_VIEW).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time

from keyfence.cli.kfctl_text import Exit, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn, TextIO

    from keyfence.cli.kfctl_tool import Kfctl

KEY_SPEC_PROCESS_KEYRING = -2
EVENT_UPDATED = 0x002
KEY_EVENTS = "inst upd link unlk clr rev inv attr"
SYNC_QUIET = 0.1
"""watch_sync: the queue counts as drained after this long without an event."""
REPLY_TIMEOUT = 60.0


def _atoi(text: str) -> int:
    """C's atoi(): optional sign and leading digits, else 0."""
    text = text.lstrip(" \t\n\v\f\r")
    sign = -1 if text[:1] == "-" else 1
    digits = text[1:] if text[:1] in "+-" else text
    n = 0
    for char in digits:
        if not "0" <= char <= "9":
            break
        n = n * 10 + ord(char) - 48
    return sign * n


def _parse_options(tool: Kfctl, args: list[str]) -> tuple[str | None, str | None, list[str]]:
    """getopt("+df:n:"): -d, -f<filters>, -n <name>, stopping at the first
    operand."""
    from keyfence.cli.kfctl_text import watch_mask

    filters: str | None = None
    name: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter == "d":
                j += 1
                continue
            if letter not in "fn":
                tool.err(f"watch_session: invalid option -- '{letter}'\n")
                raise UsageError("Unknown option")
            value = arg[j + 1 :]
            if not value:
                if i + 1 >= len(args):
                    tool.err(f"watch_session: option requires an argument -- '{letter}'\n")
                    raise UsageError("Unknown option")
                i += 1
                value = args[i]
            if letter == "f":
                watch_mask(value)
                filters = (filters or "") + value
            else:
                name = value
            break
        i += 1
    return filters, name, args[i:]


def cmd_watch_session(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_session import enter_new_session

    filters, name, rest = _parse_options(tool, args)
    if len(rest) < 4:
        tool.usage()
    notify_path, gc_path, target, program = rest[0], rest[1], rest[2], rest[3:]
    fd = _atoi(target)
    if not 3 <= fd <= 9:
        tool.err("The target fd must be between 3 and 9\n")
        raise Exit(2)
    queue, consumer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if queue.fileno() != fd:
        os.dup2(queue.fileno(), fd, inheritable=True)
        queue.close()
    else:
        os.set_inheritable(fd, True)
    try:
        logs = [open(path, "a", buffering=1) for path in (notify_path, gc_path)]  # noqa: SIM115
    except OSError as err:
        tool.fail(err.filename or notify_path, err)
    enter_new_session()
    client = tool.client
    try:
        session = client.join_session_keyring(name)
    except OSError as err:
        tool.fail("keyctl_join_session_keyring", err)
    # keyctl's credentials keep this keyring while it runs, even after the
    # program joins another (new_session); a keyfence session has one
    # keyring, so this process holds it through its own process keyring
    with contextlib.suppress(OSError):
        client.link(session, KEY_SPEC_PROCESS_KEYRING)
    client.close()
    tool.flush()
    consumer = os.fork()
    if consumer == 0:
        os.close(fd)
        _consume(consumer_end, logs, session, filters)
    consumer_end.close()
    for log in logs:
        log.close()
    error = _request(fd, f"add {session} session")
    if error:
        os.kill(consumer, signal.SIGTERM)
        tool.fail("keyctl_watch_key/session", OSError(error, os.strerror(error)))
    tool.err(f"Joined session keyring: {session}\n")
    raise Exit(_run(program, fd, consumer))


def _run(program: list[str], fd: int, consumer: int) -> int:
    """Start the program with the queue on ``fd``; wait for it and the
    consumer as keyctl does: whichever ends first stops the other; the
    consumer's status wins unless it is 0."""
    os.environ["KEYCTL_WATCH_FD"] = str(fd)
    command = os.fork()
    if command == 0:
        from keyfence.cli.kfctl_session import exec_program

        def report(text: str) -> None:
            os.write(2, text.encode())

        exec_program(program, report)
    os.close(fd)
    statuses = {consumer: 0, command: 0}
    live = set(statuses)
    while live:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in live:
            continue
        live.discard(pid)
        statuses[pid] = (
            os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        )
        for other in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGTERM)
    return statuses[consumer] or statuses[command]


def _consume(
    sock: socket.socket, logs: Sequence[TextIO], session: int, filters: str | None
) -> NoReturn:
    """The consumer process: serve the queue, write the logs."""
    from keyfence.cli.kfctl_text import watch_line, watch_mask
    from keyfence.client import Client

    notify_log, gc_log = logs
    lock = threading.Lock()
    last_event = [time.monotonic()]
    mask = watch_mask(filters)
    stop = threading.Event()

    def write(log: TextIO, text: str) -> None:
        with lock:
            log.write(text)
            log.flush()

    def on_event(note: Any) -> None:
        last_event[0] = time.monotonic()
        if note.key == marker[0]:
            with synced:
                marker[1] += 1
                synced.notify_all()
            return
        if note.event == "gc":
            write(gc_log, f"{note.key & 0xFFFFFFFF} gc\n")
            if note.key == session:
                stop.set()
                os._exit(0)
            return
        if note.event in KEY_EVENTS.split():
            write(notify_log, watch_line(note.key, note.event, note.aux))
        elif note.event == "loss":  # the daemon's queue for this uid was full
            write(notify_log, "-- LOSS --\n")

    def terminated(signum: int, frame: object) -> None:
        write(notify_log, "Monitoring terminated\n")
        if gc_log.name != notify_log.name:
            write(gc_log, "Monitoring terminated\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, terminated)
    try:
        client = Client.connect(name="kfctl-watch")
    except OSError as err:
        sys.stderr.write(f"watch_session: {os.strerror(err.errno or 0)}\n")
        os._exit(1)
    watches: dict[int, Any] = {}
    # watch_sync's marker: a key in this process's own keyring, updated to
    # send one event down the same path (the daemon's dispatcher, this
    # connection, the client's delivery thread) after everything before it
    marker = [0, 0]
    synced = threading.Condition()
    with contextlib.suppress(OSError):
        marker[0] = client.add_key("user", "kfctl-watch-sync", b"0", KEY_SPEC_PROCESS_KEYRING)
        client.watch(marker[0], on_event, EVENT_UPDATED)
    # a timeout, so that SIGTERM (which the client's reader thread may be
    # the one to receive) is handled by this thread soon
    sock.settimeout(0.2)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 256, 1)
        except TimeoutError:
            continue
        except OSError:
            os._exit(1)
        if not data:
            # every process holding the queue closed it; a kernel queue has
            # no such end: wait for watch_session's SIGTERM (or the gc)
            while True:
                time.sleep(0.2)
        reply = socket.socket(fileno=fds[0]) if fds else None
        words = data.decode(errors="replace").split()
        error = 0
        try:
            if words[:1] == ["add"] and len(words) >= 2:
                serial = int(words[1])
                if serial not in watches:
                    watches[serial] = client.watch(serial, on_event, mask)
            elif words[:1] == ["rm"] and len(words) == 2:
                watch = watches.pop(int(words[1]), None)
                if watch is None:
                    error = errno.EBADSLT
                else:
                    watch.remove()
            elif words[:1] == ["sync"]:
                _sync(client, marker, synced)
            else:
                error = errno.EINVAL
        except OSError as err:
            error = err.errno or errno.EIO
        if reply is not None:
            with contextlib.suppress(OSError):
                reply.send(str(error).encode())
            reply.close()


def _sync(client: Any, marker: list[int], synced: threading.Condition) -> None:
    """Return once every notification posted before now was written."""
    if not marker[0]:
        client.ping()
        time.sleep(SYNC_QUIET)
        return
    with synced:
        wanted = marker[1] + 1
    client.update(marker[0], str(wanted).encode())
    with synced:
        synced.wait_for(lambda: marker[1] >= wanted, REPLY_TIMEOUT)


def _request(fd: int, message: str) -> int:
    """Send ``message`` on the queue at ``fd``; the consumer's errno (0: done)."""
    # the kernel's get_watch_queue(): EBADF for any fd that is not a queue
    try:
        queue = socket.socket(fileno=os.dup(fd))
    except (OSError, OverflowError):  # OverflowError: past any C int, no such fd
        return errno.EBADF
    try:
        if queue.type != socket.SOCK_SEQPACKET or queue.family != socket.AF_UNIX:
            return errno.EBADF
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine, theirs:
            socket.send_fds(queue, [message.encode()], [theirs.fileno()])
            theirs.close()
            mine.settimeout(REPLY_TIMEOUT)
            answer = mine.recv(64)
        return int(answer or b"0") if answer else errno.EPIPE
    except OSError as err:
        return err.errno or errno.EIO
    finally:
        queue.close()


def _watch_key(tool: Kfctl, args: list[str], verb: str) -> None:
    fd = _atoi(args[0])
    key = tool.key(args[1])
    client = tool.client
    try:
        # KEY_NEED_VIEW, special ids resolved (and made) as the kernel does
        serial = client.get_keyring_id(key, True) if key < 0 else key
        client.describe(serial)
    except OSError as err:
        tool.fail("keyctl_watch_key", err)
    error = _request(fd, f"{verb} {serial}")
    if error:
        tool.fail("keyctl_watch_key", OSError(error, os.strerror(error)))


def cmd_watch_add(tool: Kfctl, args: list[str], flag: bool) -> None:
    _watch_key(tool, args, "add")


def cmd_watch_rm(tool: Kfctl, args: list[str], flag: bool) -> None:
    _watch_key(tool, args, "rm")


def cmd_watch_sync(tool: Kfctl, args: list[str], flag: bool) -> None:
    error = _request(_atoi(args[0]), "sync")
    if error:
        tool.fail("ioctl(PIPE_IOC_SYNC)", OSError(error, os.strerror(error)))
