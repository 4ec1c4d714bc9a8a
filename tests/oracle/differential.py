"""Run one script through the kernel and through the model, side by side.

A script is a list of steps ``(actor, op, *args)``; actors are processes
with credentials (uid, gid, groups), each a KernelBackend worker on the
kernel side and a ModelBackend on the model side.  Serials are global on
both sides, so one Normalizer per side names them in order of appearance.

Kernel workers run in fresh user namespaces (``userns=True``): @u and @us
are then private to the test and nothing of the machine's real keyrings is
touched; root there has no CAP_SYS_ADMIN over keys, so the model's actors
are built with ``admin=False``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tests.oracle.harness import KernelBackend, Normalizer, Result, run_op
from tests.oracle.model_backend import ModelBackend, ModelWorld


@dataclass(frozen=True)
class Actor:
    uid: int = 0
    gid: int | None = None
    groups: tuple[int, ...] = ()
    session: str = "anon"


ROOT = {"a": Actor()}

Step = tuple[object, ...]


@dataclass
class Side:
    backends: dict[str, object]
    norm: Normalizer = field(default_factory=Normalizer)
    log: list[Result] = field(default_factory=list)

    def run(self, step: Step) -> Result:
        actor, *op = step
        try:
            result = run_op(self.backends[str(actor)], tuple(op), self.norm)  # type: ignore[arg-type]
        except KeyError as err:  # names a key this side never returned
            result = ("harness", str(err))
        self.log.append(result)
        return result


@contextlib.contextmanager
def kernel_side(actors: Mapping[str, Actor]) -> Iterator[Side]:
    with contextlib.ExitStack() as stack:
        backends: dict[str, object] = {}
        for name, actor in actors.items():
            backends[name] = stack.enter_context(
                KernelBackend(
                    actor.uid, actor.gid, actor.groups, session=actor.session, userns=True
                )
            )
        yield Side(backends)


@contextlib.contextmanager
def model_side(actors: Mapping[str, Actor]) -> Iterator[Side]:
    world = ModelWorld()
    try:
        backends: dict[str, object] = {
            name: ModelBackend(
                world, actor.uid, actor.gid, actor.groups, session=actor.session, admin=False
            )
            for name, actor in actors.items()
        }
        yield Side(backends)
    finally:
        world.close()


def compare(script: Sequence[Step], actors: Mapping[str, Actor] = ROOT) -> list[str]:
    """Run ``script`` on both sides; return the differing steps, described."""
    with kernel_side(actors) as kside, model_side(actors) as mside:
        diffs = []
        for index, step in enumerate(script):
            if step[0] == "sleep":
                time.sleep(float(step[1]))  # type: ignore[arg-type]
                next(iter(mside.backends.values())).sleep(float(step[1]))  # type: ignore[attr-defined]
                continue
            want = kside.run(step)
            got = mside.run(step)
            if want != got:
                diffs.append(f"step {index} {step!r}: kernel {want!r}, model {got!r}")
        return diffs
