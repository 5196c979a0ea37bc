"""Busy-poll the event loop's selector around the moment a sandbox's result is due, instead of sleeping through it.

Waking a sleeping process on an idle core is slow on virtual machines: measured here, a RESULT that reaches a host
asleep in ``epoll_wait`` costs 0.2-0.6 ms before the host runs, and the host's late RUN then finds the sandbox
asleep too. For a no-op function that is several times the round trip itself.

The scheduler knows when a result is due: a warm function's mean run time, measured by its sandboxes. For each
running activation of a short function (``POLL_MAX_RUN_MS``: for longer ones the wake-up is a small share, and a
polling host slows the busy sandbox next to it) with enough samples it publishes a window, from a little before
the predicted end to a little after (``Scheduler.poll_window``). This module wraps the selector of asyncio's
selector event loop so that, when the loop would otherwise sleep:

    no window, or one that ends in the past   -> block as usual
    the next window opens in the future         -> block until it opens (or an event, or the loop's own timeout),
                                                   waking early by as much as timed sleeps have overslept lately
    inside a window                             -> ask the selector with a zero timeout, again and again, until an
                                                   event arrives or the window closes; then block as usual

Polling never delays the loop's own work (it only happens where the loop would sleep, and never past the loop's
timeout), gives the core away between polls (``sched_yield``, so a sandbox on the same core still runs), and costs
at most the window's length in CPU per activation: nothing at all while no predictable function runs.

Other event loops (uvloop, the proactor on Windows) are left alone: they simply do not poll.
"""

from __future__ import annotations

import asyncio
import math
import os
import selectors
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ("HOST_POLL_US", "PollWindow", "install", "uninstall")

#: the poll window's margin around a predicted result, in microseconds: longer than a no-op round trip, far shorter
#: than a scheduler tick, so a wrong guess costs little
HOST_POLL_US: Final = 200

#: bounds and gain of the running estimate of how late a timed sleep wakes up
MAX_OVERSLEEP_S: Final = 0.002
OVERSLEEP_GAIN: Final = 8

#: (opens, closes) in ``time.perf_counter()`` seconds
PollWindow = tuple[float, float]
WindowSource = Callable[[], PollWindow | None]


#: selectors whose timeouts count whole milliseconds
_MS_SELECTORS: Final = tuple(
    getattr(selectors, name)
    for name in ("EpollSelector", "PollSelector", "DevpollSelector")
    if hasattr(selectors, name)
)


class _PollingSelector:
    """Delegates everything to the loop's own selector; ``select`` polls inside the owners' windows."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self.inner = inner
        self.owners: dict[int, WindowSource] = {}
        #: how late a timed sleep ends, on average (seconds)
        self.oversleep_s = 0.0
        self.ms_timeouts = isinstance(inner, _MS_SELECTORS)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _window(self) -> PollWindow | None:
        best: PollWindow | None = None
        for source in self.owners.values():
            window = source()
            if window is not None and (best is None or window[0] < best[0]):
                best = window
        return best

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        inner = self.inner
        if timeout is not None and timeout <= 0:
            return inner.select(timeout)
        window = self._window()
        if window is None:
            return inner.select(timeout)
        opens, closes = window
        now = time.perf_counter()
        wait = opens - now - self.oversleep_s
        if self.ms_timeouts:
            wait = math.floor(wait * 1000) / 1000  # epoll rounds a timeout up to the next millisecond
        if wait > 0:
            if timeout is not None and timeout <= wait:
                return inner.select(timeout)
            ready = inner.select(wait)
            woke = time.perf_counter()
            if ready:
                return ready
            # waking from a timed sleep is late by about as much as waking for an event: learn by how much, and
            # go to sleep that much earlier next time
            late = min(max(woke - now - wait, 0.0), MAX_OVERSLEEP_S)
            self.oversleep_s += (late - self.oversleep_s) / OVERSLEEP_GAIN
            if timeout is not None:
                timeout = max(0.0, timeout - (woke - now))
            now = woke
        end = closes if timeout is None else min(closes, now + timeout)
        t0 = now
        while True:
            ready = inner.select(0)
            if ready:
                return ready
            now = time.perf_counter()
            if now >= end:
                break
            os.sched_yield()
        if timeout is not None:
            timeout = max(0.0, timeout - (now - t0))
        return inner.select(timeout)


def install(loop: asyncio.AbstractEventLoop, owner: int, windows: WindowSource) -> bool:
    """Make ``loop`` poll inside the windows ``windows()`` returns; False if this loop cannot."""
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, _PollingSelector):
        selector.owners[owner] = windows
        return True
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) or not isinstance(
        selector, selectors.BaseSelector
    ):
        return False
    wrapper = _PollingSelector(selector)
    wrapper.owners[owner] = windows
    loop._selector = wrapper  # type: ignore[attr-defined]
    return True


def uninstall(loop: asyncio.AbstractEventLoop, owner: int) -> None:
    """Stop polling for ``owner``; the loop gets its own selector back when no owner is left."""
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, _PollingSelector):
        return
    selector.owners.pop(owner, None)
    if not selector.owners:
        loop._selector = selector.inner  # type: ignore[attr-defined]
