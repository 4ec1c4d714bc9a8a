"""KeyBindings' lookups (fs/binding.py), with a scripted key source.

The key source is the injected dependency here (fs/keysource.KeySource):
a real mount asks the daemon; this one hands out one known key and can
make it go away at a chosen moment, which a real removal cannot be timed
to hit.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from keyfence.fs.binding import KeyBindings
from keyfence.fs.crypto import MasterKey
from keyfence.fs.keysource import FoundKey, OnGoing


class ScriptedSource:
    """Finds one key; the first watch makes the bound key go away at once
    (its removal ran before the binder's task got back to it)."""

    def __init__(self, raw: bytes, description: str) -> None:
        self.raw = raw
        self.description = description
        self.bindings: KeyBindings | None = None
        self.finds = 0
        self.watches = 0

    def find(self, descriptions: list[str], pid: int) -> FoundKey | None:
        self.finds += 1
        # a fresh copy each time: the mount wipes the one it is given
        return FoundKey(41, self.description, bytes(bytearray(self.raw)))

    def watch(self, serial: int, on_going: OnGoing) -> None:
        self.watches += 1
        if self.watches == 1:
            assert self.bindings is not None
            binding = self.bindings.get(MasterKey(bytes(bytearray(self.raw))).key_ref())
            assert binding is not None
            self.bindings.unbind(binding)  # gone and wiped, as _evict does

    def report(self, event: str, detail: dict[str, Any]) -> None:
        pass


def test_a_key_that_goes_while_it_is_bound_is_looked_up_again() -> None:
    """The request gets a usable key, not the wiped one (it used to get
    ENOKEY from a key its caller still held)."""
    raw = os.urandom(64)
    ref = MasterKey(raw).key_ref()
    source = ScriptedSource(raw, ref.description)
    bindings = KeyBindings(source)
    source.bindings = bindings

    async def main() -> MasterKey | None:
        return await bindings.unlock(ref, os.getpid())

    master = trio.run(main)
    assert master is not None
    assert master.raw == raw  # ENOKEY ("the key was wiped") before the fix
    assert source.finds == 2
    assert bindings.master(ref) is master
