"""keyfence.fs.fuse.blocking: a handler's blocking call, waited for directly
while no request comes, through trio otherwise.

A pipe stands in for ``/dev/fuse`` here (readable: "a request is waiting");
tests/fs/test_fuse_loop.py has the real device (fsync through a mount).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from keyfence.fs.fuse.blocking import BlockingCalls


@pytest.fixture
def device() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_quick_call_is_answered_directly(device: tuple[int, int]) -> None:
    calls = BlockingCalls(device[0], direct_ms=5000)  # a busy machine wakes threads late
    before = open_fds()

    async def main() -> None:
        for i in range(50):
            assert await calls.run(pow, 2, i) == 2**i

    trio.run(main)
    calls.close()
    assert (calls.direct, calls.through_trio) == (50, 0)
    assert open_fds() == before  # every eventfd closed


def test_its_exception_is_raised_in_the_handler(device: tuple[int, int]) -> None:
    calls = BlockingCalls(device[0])

    async def main() -> None:
        with pytest.raises(OSError) as caught:
            await calls.run(os.fsync, 987654)  # not an open descriptor
        assert caught.value.errno == errno.EBADF

    trio.run(main)
    calls.close()


def test_a_waiting_request_sends_the_wait_through_trio(device: tuple[int, int]) -> None:
    r, w = device
    os.write(w, b"x")  # a request is queued: the loop must go back to it
    # waited for directly, the call would hold trio for 30 s: the task that
    # lets it finish could not run and it would end counted as direct
    calls = BlockingCalls(r, direct_ms=30_000)
    started, gate = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        gate.wait(30)  # still running when poll sees the request
        return "done"

    async def let_go() -> None:
        while not started.is_set():
            await trio.sleep(0.001)
        gate.set()

    async def call() -> None:
        assert await calls.run(slow) == "done"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            nursery.start_soon(let_go)

    trio.run(main)
    calls.close()
    assert (calls.direct, calls.through_trio) == (0, 1)


def test_a_long_call_lets_trio_run_meanwhile(device: tuple[int, int]) -> None:
    calls = BlockingCalls(device[0], direct_ms=5)
    gate = threading.Event()
    ticks: list[float] = []

    async def ticker() -> None:
        while not gate.is_set():
            ticks.append(time.monotonic())
            await trio.sleep(0.01)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.02)
            seen = len(ticks)
            # blocks its thread until the ticker has ticked on meanwhile
            result = await calls.run(lambda: gate.wait(10) and len(ticks))
            assert result is not None and result > seen + 3

    def release() -> None:
        while len(ticks) < 8:
            time.sleep(0.01)
        gate.set()

    threading.Thread(target=release, daemon=True).start()
    trio.run(main)
    calls.close()
    assert calls.through_trio == 1


def test_calls_run_side_by_side(device: tuple[int, int]) -> None:
    calls = BlockingCalls(device[0], threads=4, direct_ms=1)
    running = 0
    most = 0
    lock = threading.Lock()
    # four at a time, however late each thread starts: fewer threads break
    # the barrier (30 s), more than four show in ``most``
    together = threading.Barrier(4, timeout=30)

    def slow() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        together.wait()
        time.sleep(0.01)
        with lock:
            running -= 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(calls.run, slow)

    before = open_fds()
    trio.run(main)
    calls.close()
    assert most == 4  # the pool's bound, reached
    assert calls.direct + calls.through_trio == 8
    time.sleep(0.1)  # the threads leave after close()
    assert open_fds() == before


def test_a_cancelled_handler_still_waits_for_its_call(device: tuple[int, int]) -> None:
    calls = BlockingCalls(device[0], direct_ms=1)
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    async def main() -> None:
        with trio.move_on_after(0.05):
            await calls.run(slow)
        assert finished.is_set()  # shielded, as trio.to_thread waits

    trio.run(main)
    calls.close()
