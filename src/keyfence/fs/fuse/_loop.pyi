# The FUSE request loop's common case (_loop.c); keyfence/fs/fuse/session.py drives it.
from collections.abc import Callable
from typing import Any

IDLE: int
BUDGET: int
SUSPENDED: int
SPECIAL: int
FAILED: int
ANSWER: int
READ_ERROR: int
WRITE_ERROR: int
GONE: int

def serve(
    fd: int,
    buf: bytearray,
    view: memoryview,
    handlers: dict[int, Any],
    caller_type: type,
    fuse_error: type,
    by_opcode: list[int],
    spin_ns: int,
    budget: int,
    dirs: dict[int, tuple[int, int, int, int, Any]] | None = None,
    no_capability: set[int] | None = None,
    on_miss: Callable[[int, bytes, str], bool] | None = None,
    awake: Awake | None = None,
    /,
) -> tuple[int, int, int, int, int, int, Any, Any, Any, Any, int]: ...

class Awake:
    """A capsule: a SCHED_IDLE spinner (_awake.c)."""

def start_awake(spin_ns: int, /) -> Awake: ...
def stop_awake(awake: Awake, /) -> None: ...
