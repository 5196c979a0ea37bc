"""The clock triggers and feeds run on: wall-clock seconds and a sleep that honours the same clock.

Its own module so that ``triggers`` and ``feeds`` both import it and neither imports the other for it.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio

__all__ = ("Clock", "SystemClock")


class Clock(Protocol):
    """Time source for rate limits and alarms: wall-clock seconds and a sleep that honours the same clock."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Real time: ``time.time()`` (wall clock, as cron schedules need) and ``anyio.sleep``.

    Tests pass ``minifaas.testing.FakeClock`` instead.
    """

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
