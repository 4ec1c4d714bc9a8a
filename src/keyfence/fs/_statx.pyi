# The worker's one-syscall stat (_statx.c); keyfence/fs/syscalls.py loads it.
import os

def stat_at(dir_fd: int, name: bytes, /) -> os.stat_result | None: ...
