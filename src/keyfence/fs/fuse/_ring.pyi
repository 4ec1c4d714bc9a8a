# One FUSE queue through io_uring (_ring.c); keyfence/fs/fuse/ring.py serves it.
from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import Buffer

WOKEN: int
GONE: int
SUSPENDED: int
FAILED: int
ANSWER: int

class Ring:
    fd: int
    wake_fd: int
    served: int
    tabled: int
    def __init__(self, fuse_fd: int, qid: int, depth: int, payload_size: int) -> None: ...
    def register(self) -> None: ...
    def serve(
        self,
        view: memoryview,
        handlers: dict[int, Any],
        caller_type: type,
        fuse_error: type,
        by_opcode: list[int],
        lock: Any,
        dirs: dict[int, tuple[int, int, int, int, Any]] | None = None,
        no_capability: set[int] | None = None,
        on_miss: Callable[[int, bytes, str], bool] | None = None,
        /,
    ) -> tuple[int, int, Any, Any, Any, Any]: ...
    def commit(self, entry: int, error: int, parts: Sequence[Buffer], /) -> None: ...
    def keep_awake(self, cpu: int, spin_ns: int, /) -> None: ...
    def close(self) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
