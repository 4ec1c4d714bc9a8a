"""No copy of a key's payload outlives the key in the daemon (docs/security.md,
"The key channel keeps no copy of a key").

A payload passes through the daemon's socket code twice: in a request
(``add_key``, ``update``) and in a reply (``read``).  Each message used to
be decoded from a ``bytes`` copy of its body and encoded into ``bytes``
frames, freed without zeroing: once the key was gone, its payload could
still be read in the daemon's free heap.  Here the payloads are searched
for in the daemon's memory (``/proc/PID/mem``) after the keys died.
"""

from __future__ import annotations

import os

import pytest

from keyfence.client import Client
from keyfence.testing.daemon import DaemonProcess
from keyfence.testing.memory import addresses_in_memory

S = -3

SIZES = (200, 3000, 30000)
"""Sizes that land in Python's small-object pools and in glibc's heap."""
UPDATE_SIZES = (200, 3000, 4096)
"""An update takes at most a page, as KEYCTL_UPDATE does."""


def probe(payload: bytes) -> bytes:
    """64 bytes from the middle: a freed chunk's first words are the
    allocator's, the middle stays as it was."""
    middle = len(payload) // 2
    return payload[middle - 32 : middle + 32]


@pytest.mark.skipif(os.geteuid() != 0, reason="reading /proc/PID/mem of the daemon needs root")
def test_no_payload_copy_outlives_its_key(daemon: DaemonProcess) -> None:
    added = [os.urandom(size) for size in SIZES]
    updated = [os.urandom(size) for size in UPDATE_SIZES]
    with Client.connect(daemon.socket, autostart=False) as c:
        keys = []
        for n, (first, second) in enumerate(zip(added, updated, strict=True)):
            key = c.add_key("user", f"copies-{n}", first, S)
            assert c.read(key) == first
            c.update(key, second)
            assert c.read(key) == second
            keys.append(key)
        # the control: the search finds a live key's payload
        assert addresses_in_memory(daemon.process.pid, probe(updated[-1]))
        for key in keys:
            c.unlink(key, S)  # the last link: destroyed and wiped before it returns
        assert c.ping() == "pong"
    found = {
        f"{kind} {len(payload)} bytes": len(addresses_in_memory(daemon.process.pid, probe(payload)))
        for kind, payloads in (("added", added), ("updated", updated))
        for payload in payloads
    }
    assert all(n == 0 for n in found.values()), found


@pytest.mark.skipif(os.geteuid() != 0, reason="reading /proc/PID/mem of the daemon needs root")
def test_a_refused_request_leaves_no_copy_of_its_payload(daemon: DaemonProcess) -> None:
    """A helper's secrets run (2026-12-07): a request the daemon refused
    before running it (an argument of the wrong type or count, an unknown
    operation) skipped the zeroing, and its payload stayed in the heap."""
    refused = {
        "keyring given as a string": lambda c, p: c.add_key("user", "refused", p, "@s"),
        "one argument too many": lambda c, p: c._call("add_key", "user", "refused", p, S, 0),
        "key id as a string": lambda c, p: c._call("update", "123", p),
        "an unknown operation": lambda c, p: c._call("add_keyy", "user", "refused", p, S),
    }
    payloads = {name: os.urandom(3000) for name in refused}
    with Client.connect(daemon.socket, autostart=False) as c:
        for name, call in refused.items():
            with pytest.raises(OSError):
                call(c, payloads[name])
        assert c.ping() == "pong"
    found = {
        name: len(addresses_in_memory(daemon.process.pid, probe(payload)))
        for name, payload in payloads.items()
    }
    assert all(n == 0 for n in found.values()), found
