"""The permission matrix, kernel vs model.

For each class (possessor, user, group, other) and each of the 64 values of
that class's byte, a key K owned by uid 4401 gets that byte (the other
classes' bytes zero, except the possessor byte of 0x3f that keeps the owner
able to setperm K when the class under test is not the possessor), and a
caller of that class tries the operation each bit guards:

    view → describe(K)    read → read(K)      write → update(K, b"new")
    search → search(R, "user", desc, 0)       link → link(K, @s), unlink(K, @s)
    setattr → set_timeout(K, 0)

R (perm 0x3f3f3f3f, in the owner's @s) holds K and grants everyone SEARCH.
The unlink always runs: ENOENT when the link failed.

Callers: possessor = the owner reaching K through its own @s (@s → R → K);
user = another process of the owner's uid, whose @s does not reach K; group =
uid 4402 with supplementary group 4401 (K's gid); other = uid 4403.

The possessor class cannot reuse one key for every mask: without possessor
SEARCH the owner no longer possesses K, and without possessor SETATTR it may
not setperm it (user byte zero), so each such mask gets a fresh key (48 keys
of quota, freed when the workers exit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from tests.oracle.differential import Actor, Step, kernel_side, model_side
from tests.oracle.harness import Result

pytestmark = pytest.mark.kernel

OWNER = Actor(uid=4401, gid=4401)
CALLERS = {
    "possessor": ("a", OWNER),
    "user": ("u", Actor(uid=4401, gid=4401)),  # another process of the owner's uid
    "group": ("g", Actor(uid=4402, gid=4402, groups=(4401,))),
    "other": ("o", Actor(uid=4403, gid=4403)),
}
SHIFT = {"possessor": 24, "user": 16, "group": 8, "other": 0}
KEEP_OWNER = 0x3F000000  # possessor byte while testing user/group/other
POS_SEARCH_SETATTR = 0x28  # what the owner needs to setperm K again (possessor class)

PROBES = ("view", "read", "write", "search", "link", "unlink", "setattr")


def probe(actor: str, key: str, desc: str, ring: str) -> list[Step]:
    """One step per permission, in PROBES order."""
    return [
        (actor, "describe", key),
        (actor, "read", key),
        (actor, "update", key, b"new"),
        (actor, "search", ring, "user", desc, 0),
        (actor, "link", key, "@s"),
        (actor, "unlink", key, "@s"),
        (actor, "set_timeout", key, 0),
    ]


class Script:
    """Steps with a label each, and the names the keys will get (k1, k2...)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.labels: list[str] = []
        self.probes: dict[str, int] = {}  # label → index of its first probe step
        self._keys = 0

    def add(self, step: Step, label: str = "setup") -> None:
        self.steps.append(step)
        self.labels.append(label)

    def new_key(self, step: Step, label: str = "setup") -> str:
        """A step that returns a new key; its name."""
        self.add(step, label)
        self._keys += 1
        return f"k{self._keys}"

    def add_probe(self, label: str, actor: str, key: str, desc: str, ring: str) -> None:
        self.probes[label] = len(self.steps)
        for name, step in zip(PROBES, probe(actor, key, desc, ring), strict=True):
            self.add(step, f"{label} {name}")


def run(script: Script, actors: Mapping[str, Actor]) -> tuple[list[str], list[Result]]:
    """Run on both sides: the differing steps (described) and the kernel's results."""
    with kernel_side(actors) as kside, model_side(actors) as mside:
        diffs = []
        for index, (step, label) in enumerate(zip(script.steps, script.labels, strict=True)):
            want = kside.run(step)
            got = mside.run(step)
            if want != got:
                diffs.append(f"step {index} [{label}] {step!r}: kernel {want!r}, model {got!r}")
        return diffs, kside.log


def setup(script: Script) -> tuple[str, str]:
    """R in the owner's @s, open to all; K (desc "pm") in R.  Returns (R, K)."""
    ring = script.new_key(("a", "add_key", "keyring", "r", None, "@s"))
    script.add(("a", "setperm", ring, 0x3F3F3F3F))
    key = script.new_key(("a", "add_key", "user", "pm", b"v", ring))
    return ring, key


def matrix_script(cls: str) -> Script:
    actor = CALLERS[cls][0]
    shift = SHIFT[cls]
    script = Script()
    ring, key = setup(script)
    if cls != "possessor":
        for bits in range(64):
            label = f"{cls} {bits:#04x}"
            script.add(("a", "setperm", key, KEEP_OWNER | bits << shift), label)
            script.add_probe(label, actor, key, "pm", ring)
        return script
    # Masks that keep the owner possessing K and able to setperm it: one key.
    keep = [b for b in range(64) if b & POS_SEARCH_SETATTR == POS_SEARCH_SETATTR]
    for bits in keep:
        label = f"{cls} {bits:#04x}"
        script.add(("a", "setperm", key, bits << shift), label)
        script.add_probe(label, actor, key, "pm", ring)
    # The others lock the owner out of K: a fresh key for each.
    for bits in sorted(set(range(64)) - set(keep)):
        label = f"{cls} {bits:#04x}"
        desc = f"p{bits:02x}"
        fresh = script.new_key(("a", "add_key", "user", desc, b"v", ring), label)
        script.add(("a", "setperm", fresh, bits << shift), label)
        script.add_probe(label, actor, fresh, desc, ring)
    return script


def actors_for(callers: Sequence[str]) -> dict[str, Actor]:
    actors = {"a": OWNER}
    for cls in callers:
        name, actor = CALLERS[cls]
        actors[name] = actor
    return actors


def probe_results(log: list[Result], start: int) -> dict[str, str]:
    """ok/errno per probe (unlink left out: it only undoes the link)."""
    return {
        name: "ok" if log[start + i][0] == "ok" else str(log[start + i][1])
        for i, name in enumerate(PROBES)
        if name != "unlink"
    }


@pytest.mark.parametrize("cls", sorted(CALLERS))
def test_permission_matrix_matches_kernel(cls: str) -> None:
    script = matrix_script(cls)
    diffs, kernel_log = run(script, actors_for([cls]))
    # The setup really exercises this class: with its byte zero the caller
    # gets nothing, with all six bits it gets everything (on the kernel).
    none = probe_results(kernel_log, script.probes[f"{cls} 0x00"])
    full = probe_results(kernel_log, script.probes[f"{cls} 0x3f"])
    assert set(none.values()) == {"EACCES"}, f"{cls} byte 0x00 on the kernel: {none}"
    assert set(full.values()) == {"ok"}, f"{cls} byte 0x3f on the kernel: {full}"
    assert diffs == [], f"{len(diffs)} differing steps:\n" + "\n".join(diffs)


# Which class byte applies: the owner never falls through to group or other;
# a group member falls through to other when the group byte is zero; the
# possessor byte adds to whichever class applies.
CROSS_CALLERS = {
    **{name: actor for name, actor in CALLERS.values()},
    "h": Actor(uid=4404, gid=4401),  # group by primary gid
}
CROSS_MASKS = [
    0x3F00003F,  # other only
    0x3F003F00,  # group only
    0x3F3F0000,  # user only
    0x3F000123,  # group view, other the rest
    0x3F013F00,  # user view, group all
    0x08010000,  # possessor search (so possessed), user view
    0x10020000,  # possessor link without search (not possessed), user read
    0x01000002,  # possessor view only, other read
]


def test_class_precedence_matches_kernel() -> None:
    script = Script()
    ring, _ = setup(script)
    for i, mask in enumerate(CROSS_MASKS):
        for actor in CROSS_CALLERS:
            # A fresh key each: some masks lock the owner out of setperm.
            label = f"{mask:#010x} as {actor}"
            desc = f"x{i}{actor}"
            key = script.new_key(("a", "add_key", "user", desc, b"v", ring), label)
            script.add(("a", "setperm", key, mask), label)
            script.add_probe(label, actor, key, desc, ring)
    diffs, kernel_log = run(script, CROSS_CALLERS)
    # Sanity: the group member falls through to other; the owner does not.
    assert probe_results(kernel_log, script.probes["0x3f00003f as g"])["read"] == "ok"
    assert probe_results(kernel_log, script.probes["0x3f00003f as u"])["read"] == "EACCES"
    assert diffs == [], f"{len(diffs)} differing steps:\n" + "\n".join(diffs)
