"""The mount worker process: ``python -m keyfence.fs.worker BACKING MOUNTPOINT``.

One process per mount (pyfuse3 allows one FUSE session per process),
started by the daemon with a private channel (``$KEYFENCE_WORKER_FD``) for
its keys; tests pass their own :class:`~keyfence.fs.keysource.KeySource`
to :func:`main`.  It mounts, serves until unmounted (``fusermount3 -u``,
``umount``) or told to stop (SIGTERM, SIGINT, SIGHUP: the kernel's dirty
pages are pushed first), then writes back and fsyncs everything and exits 0.

Options (docs/fs.md has the measurements behind the defaults)::

    --dirty-limit SIZE     dirty plaintext the page cache may hold (64M)
    --dirty-expire SEC     age after which dirty pages are written back (5)
    --writeback-cache      let the kernel cache writes too (off)
    --write-through SIZE   a new file's first write up to SIZE (at offset 0) is
                           sealed and stored at once, not cached (64K; 0: never)
    --readahead-kb KB      the mount's readahead window (1024; 0: kernel's)
    --attr-timeout SEC     how long the kernel may cache names and attributes (10)
    --allow-other          other users may use the mount (root's default)
    --no-allow-other       only the mounting user may (a user's default)
    --backing-fd FD        the backing directory, opened and checked by the daemon
    --fuse-fd FD           /dev/fuse, already mounted by the daemon: serve it
    --mountpoint-fd FD     the mount point (O_PATH): how a root worker unmounts
    --ready-fd FD          write "ready\\n" to FD once serving, then close it
    --spin-us US           keyfence's loop: busy-wait at most this long for the
                           next request before sleeping (200; 0 on one CPU;
                           fs/fuse/spin.py: from 50 up while a client needs it),
                           and keep an idle CPU awake this long after each
                           request (fs/fuse/_awake.c; 0: neither)
    --fuse-loop LOOP       the FUSE request loop: keyfence (fs/fuse/, our own) or
                           pyfuse3 (libfuse's); default $KEYFENCE_FUSE_LOOP or keyfence
    --no-uring             keyfence's loop: read every request from /dev/fuse even
                           when the kernel offers io_uring (fs/fuse/ring.py)

There is no way to hand libfuse a raw option: the FUSE options are made
here (``nosuid,nodev`` always, ``default_permissions``, ``allow_other``
when allowed).  Started by a root daemon, the worker runs as the mount's
owner and gets the mount already made (``--fuse-fd``: the daemon mounted
/dev/fuse on the checked mount point's descriptor, server/fuse_mount.py)
and the checked backing directory (``--backing-fd``); the names on the
command line are then only what ``keyfence status`` shows.  Without
``--fuse-fd`` (a per-user daemon) libfuse mounts by name, through
fusermount3 when not root.

The worker makes itself non-dumpable (no core file, no ptrace or
/proc/PID/mem by its own uid) before it touches a key; a root daemon
starts a user's worker as root, and the worker takes its owner's
identity only once it is non-dumpable (fs/worker_identity.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from keyfence import fdtable
from keyfence.fs import sealer
from keyfence.fs.fuse import kernel as fuse_kernel
from keyfence.fs.fuse.mount import mount_by_name
from keyfence.fs.fuse.session import Session, SessionOptions
from keyfence.fs.keysource import DaemonKeySource, GoingAway, KeySource
from keyfence.fs.log_budget import LogBudget
from keyfence.fs.mount_stats import StatsReporter
from keyfence.fs.ops import DEFAULT_ATTR_TIMEOUT, KeyfenceOperations, MountOptions
from keyfence.fs.pagecache import DEFAULT_DIRTY_LIMIT, DEFAULT_EXPIRE, WRITE_THROUGH_BYTES
from keyfence.fs.syscalls import syncfs_path, trim_heap
from keyfence.fs.worker_identity import become_owner_from_environment, harden
from keyfence.option_values import (
    parse_dirty_limit,
    parse_max_tasks,
    parse_readahead_kb,
    parse_seconds,
    parse_spin_us,
    parse_write_through,
)

__all__ = ["DEFAULT_READAHEAD_KB", "main", "run"]

log = logging.getLogger("keyfence.fs.worker")

DEFAULT_READAHEAD_KB = 1024
WORKER_DESCRIPTORS = 8192
"""The descriptor table's room made at start: idle files (up to 4,096,
fs/pagecache.py) and held directories (keyfence/fdtable.py)."""
PROG = "python -m keyfence.fs.worker"


_T = TypeVar("_T")


def _argument(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """A :mod:`keyfence.option_values` parser as an argparse type: its message, as
    a usage error (a bare ValueError would say only "invalid value")."""

    def parsed(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parsed.__name__ = parse.__name__
    return parsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="keyfence mount worker")
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--dirty-limit", type=_argument(parse_dirty_limit), default=DEFAULT_DIRTY_LIMIT)
    p.add_argument("--dirty-expire", type=_argument(parse_seconds), default=DEFAULT_EXPIRE)
    p.add_argument("--writeback-cache", action="store_true")
    write_through = _argument(parse_write_through)
    p.add_argument("--write-through", type=write_through, default=WRITE_THROUGH_BYTES)
    p.add_argument(
        "--readahead-kb", type=_argument(parse_readahead_kb), default=DEFAULT_READAHEAD_KB
    )
    p.add_argument("--attr-timeout", type=_argument(parse_seconds), default=DEFAULT_ATTR_TIMEOUT)
    p.add_argument("--max-tasks", type=_argument(parse_max_tasks), default=64)
    p.add_argument("--spin-us", type=_argument(parse_spin_us), default=default_spin_us())
    p.add_argument("--allow-other", dest="allow_other", action="store_true", default=None)
    p.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    p.add_argument("--backing-fd", type=int)
    p.add_argument("--fuse-fd", type=int)
    p.add_argument("--mountpoint-fd", type=int)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--fuse-loop", choices=FUSE_LOOPS, default=default_fuse_loop())
    p.add_argument("--no-uring", dest="uring", action="store_false")
    p.add_argument("--debug", action="store_true")
    return p


FUSE_LOOPS = ("pyfuse3", "keyfence")


def default_fuse_loop() -> str:
    """``$KEYFENCE_FUSE_LOOP`` when it names a loop (tests run whole
    directories either way with it), else keyfence's own."""
    chosen = os.environ.get("KEYFENCE_FUSE_LOOP", "")
    return chosen if chosen in FUSE_LOOPS else "keyfence"


DEFAULT_SPIN_US = 200
"""The longest keyfence's loop busy-waits for the next request: its window
starts at 50 µs and grows to this only while a client keeps coming back
just after it (fs/fuse/spin.py); at most
:data:`~keyfence.option_values.MAX_SPIN_US`."""


def default_spin_us() -> int:
    """:data:`DEFAULT_SPIN_US`, or 0 when this process may run on one CPU
    only: spinning there would hold off the very client it waits for."""
    return DEFAULT_SPIN_US if len(os.sched_getaffinity(0)) > 1 else 0


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the mount at ``mountpoint`` (from mountinfo: no
    stat, which would be a request to ourselves before we serve)."""
    target = os.path.abspath(mountpoint)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        found = None
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
        return found
    return None


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def set_readahead(mountpoint: str, kb: int) -> int | None:
    """Set the mount's readahead window (bdi ``read_ahead_kb``); the value set."""
    dev = _mount_device(mountpoint)
    if dev is None:
        return None
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        with open(path) as f:
            return int(f.read().strip())
    except OSError as err:
        log.warning("cannot set readahead of %s: %s", mountpoint, err)
        return None


async def _serve(
    ops: KeyfenceOperations,
    loop: Callable[[], Awaitable[None]],
    ready_fd: int | None,
    readahead_kb: int,
) -> None:
    """Serve the mount with ``loop`` (pyfuse3's main or keyfence's own
    session, fs/fuse/) beside the signal and readiness tasks."""
    ops.started()
    on_lost = getattr(ops.keys.source, "on_lost", None)
    if callable(on_lost):
        on_lost(functools.partial(lock_and_stop, ops, "daemon_lost"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, ops)
        nursery.start_soon(_when_up, ops, ready_fd, readahead_kb)
        await loop()
        nursery.cancel_scope.cancel()


def _terminate() -> None:
    """End whichever FUSE loop runs (on the trio thread)."""
    session = fuse_kernel.active()
    if session is not None:
        session.terminate()
    else:
        pyfuse3.terminate()


async def _when_up(ops: KeyfenceOperations, ready_fd: int | None, readahead_kb: int) -> None:
    """Once the kernel has our INIT reply (a stat of the mount answers):
    set the readahead window (INIT resets it) and say we are ready."""
    await trio.to_thread.run_sync(os.stat, ops.mountpoint)
    if readahead_kb > 0 and os.geteuid() == 0:
        got = await trio.to_thread.run_sync(set_readahead, ops.mountpoint, readahead_kb)
        log.info("readahead %s KiB", got)
    elif readahead_kb > 0:  # a user's worker may not write sysfs: the daemon does
        device = _mount_device(ops.mountpoint)
        if device is not None:
            detail = {"device": device, "kb": readahead_kb}
            await trio.to_thread.run_sync(ops.keys.report, "readahead", detail)
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)


async def _on_signals(ops: KeyfenceOperations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: pushing the kernel's dirty pages, then unmounting", signum)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(syncfs_path, ops.mountpoint)
            _terminate()
            return


def lock_and_stop(ops: KeyfenceOperations, why: str) -> None:
    """The daemon is gone (its channel closed): lock, then unmount.

    Without the daemon no key can be found and no removal can be fenced,
    so the worker does what a removal of every key would do, with the keys
    it still holds: write back and fsync everything under each, evict the
    plaintext and the key, then end the FUSE loop (the mount goes away).
    A write-back error (ENOSPC) keeps that key and retries with back-off,
    serving meanwhile, so that freeing space is enough (docs/fs.md, "Faults").
    """
    log.warning("%s: writing back with the keys held, dropping them, unmounting", why)
    delay = 0.5
    while ops.mounted and not ops.closed:
        failed = []
        for binding in ops.keys.bindings():
            try:
                ops.key_going(binding, GoingAway(binding.serial, emergency=False, op=why))
            except OSError as err:
                failed.append(f"{binding.description}: {err.strerror or err}")
        if not failed:
            break
        log.error("%s: keys kept, retrying in %.1f s: %s", why, delay, "; ".join(failed))
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    token = ops.trio_token
    if token is not None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(_terminate, trio_token=token)


_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep large buffers on glibc's heap instead of fresh mmaps, and give
    the heap back to the kernel on our own thread only.

    Every FUSE read or write-back chunk allocates buffers of about 1 MiB;
    by default glibc maps each one freshly and the kernel faults in and
    zeroes 256 pages every time, which cost two thirds of the read path
    (docs/fs.md).  With a higher mmap threshold the buffers are reused.
    glibc trims the heap inside whichever ``free`` lets its free top pass
    the trim threshold; the worker turns that off (the largest threshold)
    and the page cache's flusher trims instead once a burst was written
    back (:meth:`~keyfence.fs.pagecache.PageCache.trim_if_idle`), so no
    request and no key removal pays for it.
    """
    try:
        from keyfence.fs.syscalls import libc  # the one CDLL of fs/

        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and ok
        return bool(libc.mallopt(_M_TOP_PAD, 16 << 20)) and ok
    except (OSError, AttributeError):
        return False


def fuse_options(backing: str, allow_other: bool) -> set[str]:
    """The FUSE mount options, all made here.  ``nosuid,nodev`` always (a
    user's mount gets them from fusermount3 anyway); the kernel checks
    permissions (``default_permissions``)."""
    escaped = backing.replace("\\", "\\\\").replace(",", "\\,")
    opts = set(pyfuse3.default_options) | {"default_permissions", "nosuid", "nodev"}
    opts |= {f"fsname=keyfence:{escaped}", "subtype=keyfence"}
    if allow_other:
        opts.add("allow_other")
    return opts


def unmount_own(mountpoint: str, mountpoint_fd: int | None) -> None:
    """Take our mount away when we stop on our own (a signal, the daemon
    gone): root through the mount point's descriptor, a user through
    fusermount3 (which unmounts only that user's own FUSE mounts).
    Nothing happens when the mount is already gone."""
    import ctypes
    import subprocess

    if os.geteuid() == 0 and mountpoint_fd is not None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.umount2(f"/proc/self/fd/{mountpoint_fd}".encode(), ctypes.c_int(MNT_DETACH))
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["fusermount3", "-u", "-z", "--", mountpoint],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=30,
        )


MNT_DETACH = 2


def run(
    backing: str,
    mountpoint: str,
    source: KeySource,
    options: MountOptions,
    *,
    allow_other: bool | None = None,
    readahead_kb: int = DEFAULT_READAHEAD_KB,
    max_tasks: int = 64,
    spin_us: int | None = None,
    ready_fd: int | None = None,
    backing_fd: int | None = None,
    fuse_fd: int | None = None,
    mountpoint_fd: int | None = None,
    fuse_loop: str = "keyfence",
    uring: bool = True,
) -> int:
    """Mount, serve until unmounted, write everything back.  Exit status."""
    os.umask(0)  # modes come from the requests, already masked by the kernel
    tune_malloc()
    if fuse_loop == "keyfence":
        return _run_own(
            backing, mountpoint, source, options,
            allow_other=allow_other, readahead_kb=readahead_kb, max_tasks=max_tasks,
            spin_us=default_spin_us() if spin_us is None else spin_us,
            ready_fd=ready_fd, backing_fd=backing_fd, fuse_fd=fuse_fd,
            mountpoint_fd=mountpoint_fd, uring=uring,
        )  # fmt: skip
    # mounted by the daemon on the checked directory: serve its /dev/fuse
    target = mountpoint if fuse_fd is None else f"/dev/fd/{fuse_fd}"
    ops = KeyfenceOperations(backing, mountpoint, source, options, backing_fd=backing_fd)
    ops.cache.trim_heap = trim_heap  # glibc's own trimming is off: tune_malloc
    if allow_other is None:
        allow_other = os.geteuid() == 0
    pyfuse3.init(ops, target, fuse_options(os.path.abspath(backing), allow_other))
    unmounted = False
    stats = StatsReporter(ops, source.report, transport=lambda: "/dev/fuse (pyfuse3)")
    try:
        _report(source, "mounted", {"backing": backing, "mountpoint": ops.mountpoint})
        stats.start()
        log.info("serving as uid %d", os.geteuid())
        log.info("contents sealed by the %s path", sealer.describe())
        trio.run(
            _serve,
            ops,
            functools.partial(pyfuse3.main, min_tasks=1, max_tasks=max_tasks),
            ready_fd,
            readahead_kb,
        )
    except BaseException:
        log.exception("the FUSE loop failed")
        raise
    finally:
        ops.close()
        stats.stop()  # after the final write-back: status shows nothing dirty
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
            unmounted = True
        if fuse_fd is not None:  # libfuse unmounts only what it mounted
            unmount_own(mountpoint, mountpoint_fd)
        _finish(source, backing, ops.mountpoint, clean=unmounted)
    return 0


def _finish(source: KeySource, backing: str, mountpoint: str, *, clean: bool) -> None:
    """Both loops' last step: tell the daemon the mount is gone, close the channel."""
    _report(source, "unmounted", {"backing": backing, "mountpoint": mountpoint, "clean": clean})
    closer = getattr(source, "close", None)
    if callable(closer):
        with contextlib.suppress(Exception):
            closer()


def _run_own(
    backing: str,
    mountpoint: str,
    source: KeySource,
    options: MountOptions,
    *,
    allow_other: bool | None,
    readahead_kb: int,
    max_tasks: int,
    spin_us: int,
    ready_fd: int | None,
    backing_fd: int | None,
    fuse_fd: int | None,
    mountpoint_fd: int | None,
    uring: bool,
) -> int:
    """:func:`run` with keyfence's own loop: the same steps, our session."""
    ops = KeyfenceOperations(backing, mountpoint, source, options, backing_fd=backing_fd)
    ops.cache.trim_heap = trim_heap  # glibc's own trimming is off: tune_malloc
    if allow_other is None:
        allow_other = os.geteuid() == 0
    if fuse_fd is None:
        fd = mount_by_name(ops.mountpoint, fuse_options(os.path.abspath(backing), allow_other))
    else:
        fd = fuse_fd
    session = Session(
        ops,
        fd,
        SessionOptions(
            writeback_cache=options.writeback_cache,
            killpriv_v2=True,
            max_tasks=max_tasks,
            spin_us=spin_us,
            uring=uring,
        ),
        dir_attributes=ops.dir_attributes,
        no_capability=ops.privileges.without_capability,
    )
    ops.dir_attributes.enabled = session.options.native  # only C reads it
    ops.run_blocking = session.blocking.run  # injected: the session is made after ops
    fuse_kernel.set_active(session)
    stats = StatsReporter(ops, source.report, transport=lambda: session.transport)
    try:
        _report(source, "mounted", {"backing": backing, "mountpoint": ops.mountpoint})
        stats.start()
        log.info(
            "serving as uid %d (keyfence's FUSE loop, common case in %s; "
            "spins up to %d us for each next request)",
            os.geteuid(),
            "C" if session.options.native else "Python",
            spin_us,
        )
        log.info("contents sealed by the %s path", sealer.describe())
        trio.run(_serve, ops, session.serve, ready_fd, readahead_kb)
    except BaseException:
        log.exception("the FUSE loop failed")
        raise
    finally:
        ops.close()
        stats.stop()  # after the final write-back: status shows nothing dirty
        if not session.unmounted:  # ended by a signal or the daemon's loss
            unmount_own(ops.mountpoint, mountpoint_fd)
        fuse_kernel.set_active(None)
        with contextlib.suppress(OSError):
            os.close(fd)
        _finish(source, backing, ops.mountpoint, clean=True)
    return 0


def _report(source: KeySource, event: str, detail: dict[str, Any]) -> None:
    try:
        source.report(event, detail)
    except Exception as err:
        log.debug("report %s: %s", event, err)


def main(argv: Sequence[str] | None = None, *, key_source: KeySource | None = None) -> int:
    # first of all: never open to the owner, then the owner
    # (fs/worker_identity.py: a root daemon starts a user's worker as root)
    hardened = harden()
    try:
        if become_owner_from_environment():
            hardened = harden()  # a change of ids resets dumpability
    except (OSError, ValueError) as err:
        print(f"{PROG}: cannot take the mount owner's identity: {err}", file=sys.stderr)
        return 1
    # while this process has one thread: no doubling of the descriptor
    # table inside a request later (keyfence/fdtable.py)
    fdtable.reserve(WORKER_DESCRIPTORS)
    # SIGTERM asks a serving worker to write back and stop (_on_signals,
    # which trio installs for the loop's life and then puts this back):
    # one arriving before the loop or during the final write-back after it
    # must not kill the worker with dirty pages (the daemon sends it after
    # an unmount whose mount another namespace still holds: docs/fs.md)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s keyfence-worker[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(LogBudget())
    if not hardened:
        log.warning("could not make the worker non-dumpable")
    try:
        source = key_source if key_source is not None else DaemonKeySource.from_environment()
    except OSError as err:  # started by hand: no channel to the daemon
        print(f"{PROG}: {err.strerror}", file=sys.stderr)
        return 1
    options = MountOptions(
        dirty_limit=args.dirty_limit,
        dirty_expire=args.dirty_expire,
        attr_timeout=args.attr_timeout,
        writeback_cache=args.writeback_cache,
        write_through=args.write_through,
    )
    return run(
        args.backing,
        args.mountpoint,
        source,
        options,
        allow_other=args.allow_other,
        readahead_kb=args.readahead_kb,
        max_tasks=args.max_tasks,
        spin_us=args.spin_us,
        ready_fd=args.ready_fd,
        backing_fd=args.backing_fd,
        fuse_fd=args.fuse_fd,
        mountpoint_fd=args.mountpoint_fd,
        fuse_loop=args.fuse_loop,
        uring=args.uring,
    )


if __name__ == "__main__":
    sys.exit(main())
