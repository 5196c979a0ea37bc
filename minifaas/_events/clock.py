"""The clock triggers and feeds run on: wall-clock seconds and a sleep that honours the same clock.

Its own module so that ``triggers`` and ``feeds`` both import it and neither imports the other for it.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio

__all__ = ("Clock", "SystemClock")


class Clock(Protocol):
    """Time source for rate limits and alarms: wall-clock seconds (``now``) and a sleep.

    A clock may also have ``monotonic()``, the time ``sleep`` runs on, which the wall clock may leave when an
    operator or NTP steps it: rate windows and interval alarms use it (see ``feeds.monotonic_of``).
    """

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Real time: ``time.time()`` (wall clock, as cron schedules need), ``time.monotonic()`` and ``anyio.sleep``.

    Tests pass ``minifaas.testing.FakeClock`` instead.
    """

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
