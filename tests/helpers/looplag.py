"""How late the event loop wakes: a test proving that slow work (a slow fsync, a slow cgroup attach) stays off the
loop runs this beside it and bounds the largest lag."""

from __future__ import annotations

import time

import anyio

__all__ = ("record_loop_lags",)

#: how long each sleep asks for; a lag is how long it took instead
TICK_S = 0.005


async def record_loop_lags(lags: list[float], done: anyio.Event) -> None:
    """Until ``done``: sleep TICK_S again and again, appending how long each sleep took to ``lags``."""
    while not done.is_set():
        t = time.perf_counter()
        await anyio.sleep(TICK_S)
        lags.append(time.perf_counter() - t)
