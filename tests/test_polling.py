"""The host polls its event loop's selector briefly while fast activations run (minifaas/_core/poll.py)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

import anyio
import pytest

import minifaas
from minifaas._core import poll as _poll
from minifaas.testing import assert_success

pytestmark = pytest.mark.anyio

NOOP = "def main(args):\n    return {}\n"
SLEEP = "import time\ndef main(args):\n    time.sleep(args.get('s', 0.2))\n    return {}\n"


async def test_engine_installs_and_restores_the_selector() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    async with minifaas.Engine() as engine:
        assert isinstance(loop._selector, _poll._PollingSelector)  # type: ignore[attr-defined]
        async with minifaas.Engine() as second:
            await second.deploy("noop", code=NOOP)
            assert_success(await second.call("noop"))
        # the first engine still polls after the second one closed
        assert isinstance(loop._selector, _poll._PollingSelector)  # type: ignore[attr-defined]
        await engine.deploy("noop", code=NOOP)
        assert_success(await engine.call("noop"))
    assert loop._selector is original  # type: ignore[attr-defined]


async def test_poll_us_zero_leaves_the_loop_alone() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    async with minifaas.Engine(poll_us=0) as engine:
        assert loop._selector is original  # type: ignore[attr-defined]
        await engine.deploy("noop", code=NOOP)
        assert_success(await engine.call("noop"))
    with pytest.raises(ValueError, match="poll_us"):
        minifaas.Engine(poll_us=-1)


async def test_poll_windows_follow_the_predicted_end() -> None:
    async with minifaas.Engine() as engine:
        sched = engine._sched
        assert sched is not None
        # a 50 ms function is not polled for by default (see POLL_MAX_RUN_MS); here it is, to see the windows
        assert sched.poll_max_run_ms < 50
        sched.poll_max_run_ms = 1000
        await engine.deploy("noop", code=NOOP)
        await engine.deploy("slow", code=SLEEP)
        for _ in range(25):
            assert_success(await engine.call("noop"))
            assert_success(await engine.call("slow", {"s": 0.05}))
        assert sched.poll_window() is None  # nothing runs: the loop sleeps as usual
        windows: list[tuple[float, float, float]] = []
        done = False

        async def watch() -> None:
            while not done:
                window = sched.poll_window()
                if window is not None:
                    windows.append((time.perf_counter(), *window))
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            t0 = time.perf_counter()
            assert_success(await engine.call("slow", {"s": 0.05}))
            done = True
        # one window, opening shortly before the 50 ms run is due and no wider than the cap
        assert windows
        opens, closes = windows[0][1] - t0, windows[0][2] - t0
        assert 0.035 < opens < 0.06, opens
        assert 0 < closes - opens <= 0.0031
        assert sched.poll_window() is None and not sched.polled
        # a no-op is due at once: its window opens when its RUN is sent
        assert_success(await engine.call("noop"))
        assert not sched.polled


async def test_a_slow_function_is_not_polled_for() -> None:
    async with minifaas.Engine() as engine:
        sched = engine._sched
        assert sched is not None
        await engine.deploy("slow", code=SLEEP)
        pool = sched.pool.function(engine._resolve("slow"))
        for _ in range(25):
            pool.record_run(50.0)  # as if it had run 25 times for 50 ms
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, "slow", {"s": 0.05})
            await anyio.sleep(0.02)
            assert not sched.polled
        assert_success((await engine.activations.list(name="slow", limit=1))[0])


def test_polling_selector_returns_events_and_honours_timeouts() -> None:
    inner = selectors.DefaultSelector()
    a, b = socket.socketpair()
    inner.register(a, selectors.EVENT_READ)
    sel = _poll._PollingSelector(inner)
    window: list[tuple[float, float]] = []
    sel.owners[1] = lambda: window[0] if window else None
    try:
        # inside a window, a timeout shorter than the window wins: timers on the loop are not delayed by polling
        now = time.perf_counter()
        window.append((now, now + 0.2))
        assert sel.select(0.02) == []
        assert 0.015 <= time.perf_counter() - now < 0.1
        # an event arriving while it polls is returned at once
        threading.Timer(0.01, b.send, args=(b"x",)).start()
        t0 = time.perf_counter()
        ready = sel.select(1.0)
        assert [key.fileobj for key, _ in ready] == [a]
        assert time.perf_counter() - t0 < 0.15
        a.recv(1)
        # a window in the future: it sleeps until about when the window opens, then polls through it
        opens = time.perf_counter() + 0.05
        window[0] = (opens, opens + 0.05)
        threading.Timer(0.07, b.send, args=(b"y",)).start()
        t0 = time.perf_counter()
        ready = sel.select(1.0)
        assert [key.fileobj for key, _ in ready] == [a]
        assert 0.065 <= time.perf_counter() - t0 < 0.12
        a.recv(1)
        # a window that has closed: it blocks for the whole timeout, like the plain selector
        t0 = time.perf_counter()
        assert sel.select(0.3) == []
        assert 0.28 <= time.perf_counter() - t0 < 0.5
        window.clear()
        assert sel.select(0) == []
        assert sel.get_map() is inner.get_map()
    finally:
        inner.close()
        a.close()
        b.close()
