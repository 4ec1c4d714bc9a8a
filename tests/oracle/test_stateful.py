"""Random op sequences through the kernel and the model, compared after every step.

A hypothesis state machine drives ONE long-lived kernel worker (root in a user
namespace, as ``differential.compare`` builds it) and, per example, a fresh
``ModelWorld`` with a ``ModelBackend(admin=False)``.  Every op runs on both sides
through ``harness.run_op`` with one ``Normalizer`` per side and per example, and the
results (value or errno name; serials named by order of appearance; keyring reads as
sorted name lists) must be identical.  A failure message is the whole script so far,
in ``differential.compare`` form, so it can be replayed as a scripted test.

Each example starts by joining a fresh anonymous session keyring on both sides and
clearing @u (private to the worker's user namespace; @us is never cleared, as that
would unlink @u from it).  @u outlives the example on the kernel side, so nothing
that outlives a clear is done to it: no setperm, chown, revoke, invalidate or
set_timeout on @u.

Known, deliberate differences that are not generated:

* The model destroys a key the moment its last link goes; the kernel's garbage
  collector does it a moment later.  The machine therefore keeps its own record of
  the link graph (``_Shadow``) and only names by serial keys that are certainly still
  alive: reachable by links from @s or @u.  A key that may have lost its last link
  (unlink, clear, move, displacement by add/link/search, revoke of a keyring it was
  in, invalidate) is never used again; rules drawing one do nothing.
* A search (or keyring read) right after invalidate races the kernel's collector,
  which unlinks the invalidated key from its keyrings (EKEYREVOKED / still listed
  until it has run): after each invalidate the machine waits until the kernel no
  longer lists the key in the keyrings that held it.
* request_key with a callout is not modelled (not generated).
* Timeouts are 0 or 1000..5000 s, so no key expires during the test.
* Order of the kernel's assoc_array (not modelled: the model keeps link order):
  a search whose answer depends on which of two sibling subtrees is searched first,
  and a link that could fail with either EDEADLK or ELOOP, are not generated
  (KERNEL_FACTS.md section 6 says to avoid the latter).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)

from keyfence.testing import kernel_keyctl as kernel
from tests.oracle.harness import KernelBackend, Normalizer, Result, run_op
from tests.oracle.model_backend import ModelBackend, ModelWorld

pytestmark = pytest.mark.kernel

SPECIALS = ("@s", "@u")
DESCS = ("a", "b", "c")
# Hits, misses, and the session keyring itself ("search @s keyring _ses" finds @s).
SEARCH_DESCS = (*DESCS, *DESCS, "_ses", "zz")
PAYLOADS = st.binary(min_size=0, max_size=6)  # b"" is EINVAL on both
REALISTIC_MASKS = (
    0x3F010000,  # user key / keyring default
    0x3F030000,  # anonymous session default
    0x3F3F0000,
    0x3F3F3F3F,
    0x3F000000,
    0x1F3F0000,  # @u default
    0x3F1B0000,
    0x3B010000,  # no POS_WRITE
    0x3D010000,  # no POS_READ
    0x37010000,  # no POS_SEARCH
    0x37000000,
    0x08000000,  # only POS_SEARCH
    0x01010000,
    0x0B0B0000,
    0x00000000,
)
MASKS = st.one_of(
    st.sampled_from(REALISTIC_MASKS),
    st.integers(0, 0xFFFFFFFF).map(lambda m: m & 0x3F3F3F3F),
    st.sampled_from((0x40000000, 0x80, 0xFFFFFFFF)),  # EINVAL
)
# Root in the namespace: only -1 and its own ids (0) are allowed targets.
OWNERS = st.sampled_from(((-1, -1), (0, -1), (-1, 0), (0, 0)))
TIMEOUTS = st.one_of(st.just(0), st.integers(1000, 5000))

# Bundles of normalized names ("k3") and the special ids "@s" and "@u"; the
# initialize rules put "@s", "@u" and @u's serial in both (and the session keyring's
# serial in RINGS), so neither is ever empty.
KEYS = Bundle("keys")  # every key, keyrings included
RINGS = Bundle("rings")  # keyrings only
# None: a keyring the key is in, if any (unlink and move would mostly miss otherwise).
HOLDER = st.one_of(st.none(), RINGS)

Step = tuple[Any, ...]


@dataclass
class _Key:
    type: str
    desc: str
    members: set[str] | None = None  # keyrings only
    revoked: bool = False

    @property
    def index(self) -> tuple[str, str]:
        return (self.type, self.desc)


@dataclass
class _Shadow:
    """The machine's own record of the link graph, updated from agreed results."""

    session: str
    user: str
    keys: dict[str, _Key] = field(default_factory=dict)
    roots: set[str] = field(default_factory=set)

    def resolve(self, ref: str) -> str:
        return {"@s": self.session, "@u": self.user}.get(ref, ref)

    def members(self, name: str) -> set[str]:
        members = self.keys[name].members
        return set() if members is None else members

    def nested(self, name: str) -> list[str]:
        return [m for m in self.members(name) if self.keys[m].members is not None]

    def reachable(self) -> set[str]:
        seen: set[str] = set()
        todo = list(self.roots)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.members(name))
        return seen

    def tree(self, top: str) -> set[str]:
        """top and every key below it."""
        seen: set[str] = set()
        todo = [top]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.members(name))
        return seen

    def height(self, name: str) -> int:
        """Length of the longest chain of keyrings headed by name."""
        if self.keys[name].members is None:
            return 0
        return 1 + max((self.height(n) for n in self.nested(name)), default=0)

    def linked(self, name: str, ring_ref: str, type: str = "", desc: str = "") -> None:
        """name was linked into ring: it displaces a member of the same type+desc."""
        ring = self.resolve(ring_ref)
        if name not in self.keys:
            self.keys[name] = _Key(type, desc, set() if type == "keyring" else None)
        index = self.keys[name].index
        members = self.members(ring)
        for other in list(members):
            if other != name and self.keys[other].index == index:
                members.discard(other)
        members.add(name)

    def unlinked(self, name: str, ring_ref: str) -> None:
        """name was unlinked from ring: the kernel deletes by type+description."""
        index = self.keys[name].index
        members = self.members(self.resolve(ring_ref))
        for other in list(members):
            if self.keys[other].index == index:
                members.discard(other)

    def parents(self, name: str) -> list[str]:
        return [r for r, k in self.keys.items() if k.members and name in k.members]

    def cycle_check_ambiguous(self, key: str, ring: str) -> bool:
        """Whether linking key into ring could fail with EDEADLK *or* ELOOP, the
        kernel's choice depending on its member order (KERNEL_FACTS.md section 6)."""
        if self.keys[key].members is None:
            return False
        return self.resolve(ring) in self.tree(key) and self.height(key) >= 7

    def search_ambiguous(self, top: str, index: tuple[str, str]) -> bool:
        """Whether two sibling subtrees below top hold different matching keys, so
        that the kernel's (depth-first, assoc_array-ordered) search could answer
        with either, or fail with either's skip reason."""
        memo: dict[str, frozenset[str]] = {}

        def matches(ring: str) -> frozenset[str]:
            if ring not in memo:
                memo[ring] = frozenset()
                found = {m for m in self.members(ring) if self.keys[m].index == index}
                for nested in self.nested(ring):
                    found |= matches(nested)
                memo[ring] = frozenset(found)
            return memo[ring]

        for ring in self.tree(top):
            branches = [matches(n) for n in self.nested(ring) if matches(n)]
            if len(branches) >= 2 and len(frozenset().union(*branches)) >= 2:
                return True
        return False


class KeyringMachine(RuleBasedStateMachine):
    kernel_backend: KernelBackend | None = None  # set by the test: one worker for all

    def __init__(self) -> None:
        super().__init__()
        backend = type(self).kernel_backend
        assert backend is not None
        self.kb = backend
        self.world = ModelWorld()
        self.mb = ModelBackend(self.world, 0, session="anon", admin=False)
        self.knorm = Normalizer()
        self.mnorm = Normalizer()
        self.script: list[Step] = []
        self.differed = False
        session = self._run("join_session_keyring", None)[1]
        self._run("clear", "@u")
        user = self._run("get_keyring_id", "@u", False)[1]
        self.shadow = _Shadow(session, user)
        self.shadow.keys[session] = _Key("keyring", "_ses", set())
        self.shadow.keys[user] = _Key("keyring", "_uid.0", set())
        self.shadow.roots = {session, user}

    # -- running and comparing ------------------------------------------------------

    def _run(self, *op: Any) -> Result:
        self.script.append(("a", *op))
        want = run_op(self.kb, op, self.knorm)
        got = run_op(self.mb, op, self.mnorm)
        if want != got:
            self.differed = True
            steps = "\n".join(f"    {step!r}," for step in self.script)
            raise AssertionError(
                f"model differs from kernel at the last step of:\n[\n{steps}\n]\n"
                f"kernel: {want!r}\nmodel:  {got!r}"
            )
        return want

    def _usable(self, *refs: str) -> bool:
        """Every ref is a special id or a key certainly still linked (see docstring)."""
        alive = self.shadow.reachable()
        return all(ref in SPECIALS or ref in alive for ref in refs)

    def _holder(self, key: str, ring: str | None) -> str:
        if ring is not None or not self._usable(key):
            return "@s" if ring is None else ring
        parents = sorted(self.shadow.parents(self.shadow.resolve(key)))
        return parents[0] if parents else "@s"

    def _protected(self, ref: str) -> bool:
        """@u outlives the example on the kernel side: leave its attributes alone."""
        return self.shadow.resolve(ref) == self.shadow.user

    def _await_kernel_gc(self, name: str, parents: list[str]) -> None:
        """Wait until the kernel's collector has unlinked invalidated name."""
        serial = self.knorm.serial(name)
        deadline = time.monotonic() + 30  # a poll: a busy machine's kworker runs late
        for parent in parents:
            while True:
                try:
                    data = self.kb.read(self.knorm.serial(parent))
                except OSError:  # not readable by us: give the collector time
                    time.sleep(0.1)
                    break
                if serial not in kernel.keyring_serials(data):
                    break
                assert time.monotonic() < deadline, f"kernel gc never unlinked {name}"
                time.sleep(0.001)

    def teardown(self) -> None:
        try:
            if not self.differed:
                self._check_shadow()
        finally:
            self.world.close()

    def _check_shadow(self) -> None:
        """The machine's own bookkeeping against the kernel (not a model check)."""
        names = {self.knorm.serial(n): n for n in self.shadow.keys}
        for ring in self.shadow.reachable():
            if self.shadow.keys[ring].members is None:
                continue
            try:
                data = self.kb.read(self.knorm.serial(ring))
            except OSError:
                continue
            listed = {names.get(s, s) for s in kernel.keyring_serials(data)}
            assert listed == self.shadow.members(ring), (
                f"test bookkeeping out of sync for {ring}: kernel {listed}, "
                f"shadow {self.shadow.members(ring)}; script {self.script}"
            )

    # -- rules ----------------------------------------------------------------------

    @initialize(targets=(KEYS, RINGS))
    def specials(self) -> Any:
        # @u by serial is not possessed (the anonymous session does not link it).
        return multiple("@s", "@u", self.shadow.user)

    @initialize(target=RINGS)
    def session_by_serial(self) -> Any:
        # Only among the rings: keeps revoke/invalidate/setperm of @s rarer.
        return self.shadow.session

    # Rules are picked uniformly, so without a head start most steps would act on
    # the three special refs; these build a small random tree first.
    @initialize(
        targets=(KEYS, RINGS),
        plan=st.lists(st.tuples(st.sampled_from(DESCS), st.integers(0, 7)), max_size=4),
    )
    def populate_keyrings(self, plan: list[tuple[str, int]]) -> Any:
        made: list[str] = []
        for desc, parent in plan:
            holders = ["@s", "@u", *(n for n in made if self._usable(n))]
            ring = holders[parent % len(holders)]
            kind, name = self._run("add_key", "keyring", desc, None, ring)
            if kind == "ok":
                self.shadow.linked(name, ring, "keyring", desc)
                made.append(name)
        return multiple(*made)

    @initialize(
        target=KEYS,
        plan=st.lists(
            st.tuples(st.sampled_from(DESCS), PAYLOADS.filter(bool), st.integers(0, 7)),
            max_size=5,
        ),
    )
    def populate_keys(self, plan: list[tuple[str, bytes, int]]) -> Any:
        made: list[str] = []
        alive = self.shadow.reachable()
        rings = sorted(n for n in alive if self.shadow.keys[n].members is not None)
        for desc, payload, parent in plan:
            ring = (["@s", *rings])[parent % (len(rings) + 1)]
            kind, name = self._run("add_key", "user", desc, payload, ring)
            if kind == "ok":
                self.shadow.linked(name, ring, "user", desc)
                made.append(name)
        return multiple(*made)

    @rule(target=KEYS, desc=st.sampled_from(DESCS), payload=PAYLOADS, ring=RINGS)
    def add_user(self, desc: str, payload: bytes, ring: str) -> Any:
        if not self._usable(ring):
            return multiple()
        kind, name = self._run("add_key", "user", desc, payload, ring)
        if kind != "ok":
            return multiple()
        self.shadow.linked(name, ring, "user", desc)
        return name

    @rule(targets=(KEYS, RINGS), desc=st.sampled_from(DESCS), ring=RINGS)
    def add_keyring(self, desc: str, ring: str) -> Any:
        if not self._usable(ring):
            return multiple()
        kind, name = self._run("add_key", "keyring", desc, None, ring)
        if kind != "ok":
            return multiple()
        self.shadow.linked(name, ring, "keyring", desc)
        return name

    @rule(key=KEYS, ring=RINGS)
    def link(self, key: str, ring: str) -> None:
        if not self._usable(key, ring):
            return
        key_name = self.shadow.resolve(key)
        if self.shadow.cycle_check_ambiguous(key_name, ring):
            return
        if self._run("link", key, ring)[0] == "ok":
            self.shadow.linked(key_name, ring)

    @rule(key=KEYS, ring=HOLDER)
    def unlink(self, key: str, ring: str | None) -> None:
        ring = self._holder(key, ring)
        if not self._usable(key, ring):
            return
        if self._run("unlink", key, ring)[0] == "ok":
            self.shadow.unlinked(self.shadow.resolve(key), ring)

    @rule(ring=RINGS)
    def clear(self, ring: str) -> None:
        if self._usable(ring) and self._run("clear", ring)[0] == "ok":
            self.shadow.members(self.shadow.resolve(ring)).clear()

    @rule(key=KEYS, src=HOLDER, dst=RINGS, flags=st.sampled_from((0, 1)))
    def move(self, key: str, src: str | None, dst: str, flags: int) -> None:
        src = self._holder(key, src)
        if not self._usable(key, src, dst):
            return
        key_name = self.shadow.resolve(key)
        if self.shadow.cycle_check_ambiguous(key_name, dst):
            return
        if self._run("move", key, src, dst, flags)[0] != "ok":
            return
        if self.shadow.resolve(src) != self.shadow.resolve(dst):
            self.shadow.unlinked(key_name, src)
            self.shadow.linked(key_name, dst)

    @rule(key=KEYS)
    def revoke(self, key: str) -> None:
        if not self._usable(key) or self._protected(key):
            return
        if self._run("revoke", key)[0] == "ok":
            info = self.shadow.keys[self.shadow.resolve(key)]
            info.revoked = True
            if info.members is not None:  # keyring_revoke() drops every link in it
                info.members.clear()

    @rule(key=KEYS)
    def invalidate(self, key: str) -> None:
        if not self._usable(key) or self._protected(key):
            return
        if self._run("invalidate", key)[0] != "ok":
            return
        name = self.shadow.resolve(key)
        parents = self.shadow.parents(name)
        for parent in parents:
            self.shadow.members(parent).discard(name)
        self.shadow.roots.discard(name)  # an invalidated @s: ENOKEY from then on
        self._await_kernel_gc(name, parents)

    @rule(key=KEYS, mask=MASKS)
    def setperm(self, key: str, mask: int) -> None:
        if self._usable(key) and not self._protected(key):
            self._run("setperm", key, mask)

    @rule(key=KEYS, owner=OWNERS)
    def chown(self, key: str, owner: tuple[int, int]) -> None:
        if self._usable(key) and not self._protected(key):
            self._run("chown", key, *owner)

    @rule(key=KEYS, seconds=TIMEOUTS)
    def set_timeout(self, key: str, seconds: int) -> None:
        if self._usable(key) and not self._protected(key):
            self._run("set_timeout", key, seconds)

    @rule(key=KEYS, payload=PAYLOADS)
    def update(self, key: str, payload: bytes) -> None:
        if self._usable(key):
            self._run("update", key, payload)  # keyrings, @u included: ENOTSUP

    @rule(key=KEYS)
    def read(self, key: str) -> None:
        if self._usable(key):
            self._run("read", key)

    @rule(key=KEYS)
    def describe(self, key: str) -> None:
        if self._usable(key):
            self._run("describe", key)

    @rule(which=st.sampled_from(SPECIALS), create=st.booleans())
    def get_keyring_id(self, which: str, create: bool) -> None:
        if which == "@s" and create and self.shadow.session not in self.shadow.roots:
            return  # would install a new session keyring the shadow knows nothing of
        self._run("get_keyring_id", which, create)

    @rule(
        ring=RINGS,
        type=st.sampled_from(("user", "user", "keyring")),
        desc=st.sampled_from(SEARCH_DESCS),
        dest=st.one_of(st.just(0), RINGS),
    )
    def search(self, ring: str, type: str, desc: str, dest: Any) -> None:
        refs = [ring] if dest == 0 else [ring, dest]
        if not self._usable(*refs):
            return
        top = self.shadow.resolve(ring)
        if self.shadow.search_ambiguous(top, (type, desc)):
            return
        if (
            dest != 0
            and type == "keyring"
            and any(self.shadow.height(n) >= 7 for n in self.shadow.reachable())
        ):
            return  # the link into dest could be EDEADLK or ELOOP
        kind, found = self._run("search", ring, type, desc, dest)
        if kind == "ok" and dest != 0 and found in self.shadow.keys:
            self.shadow.linked(found, dest)


@pytest.fixture(scope="module")
def kernel_worker() -> Iterator[KernelBackend]:
    with KernelBackend(0, userns=True) as backend:
        yield backend


def test_random_sequences_match_kernel(kernel_worker: KernelBackend) -> None:
    KeyringMachine.kernel_backend = kernel_worker
    try:
        run_state_machine_as_test(
            KeyringMachine,
            settings=settings(
                max_examples=200,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.filter_too_much,
                    HealthCheck.data_too_large,
                ],
            ),
        )
    finally:
        KeyringMachine.kernel_backend = None
