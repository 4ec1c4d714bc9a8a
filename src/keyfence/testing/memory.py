"""Scanning a live process's memory for a secret or a plaintext marker
(root: ``/proc/PID/mem``), as the emergency, memory and benchmark checks do."""

from __future__ import annotations

from collections.abc import Iterator

_SKIPPED = ("[vvar]", "[vsyscall]", "[vvar_vclock]")
"""Mappings whose reads fault or show only the kernel's own data."""


def readable_memory(pid: int) -> Iterator[tuple[int, bytes]]:
    """(start address, contents) of each readable mapping of ``pid``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or name in _SKIPPED:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # unmapped meanwhile, or not readable after all
            yield start, data


def count_in_memory(pid: int, needle: bytes) -> int:
    """How many (non-overlapping) copies of ``needle`` ``pid`` holds."""
    return sum(data.count(needle) for _, data in readable_memory(pid))


def addresses_in_memory(pid: int, needle: bytes) -> list[int]:
    """Every address in ``pid``'s readable memory where ``needle`` starts."""
    found = []
    for start, data in readable_memory(pid):
        at = data.find(needle)
        while at >= 0:
            found.append(start + at)
            at = data.find(needle, at + 1)
    return found
