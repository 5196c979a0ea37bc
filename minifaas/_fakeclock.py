"""FakeClock: a clock tests move by hand, with a wall time and a monotonic time of its own.

What it drives, given as ``Engine(clock=...)``:

* keep-alive (the pool's reaper: idle expiry, pre-warming, ``min_sandboxes``) reads ``monotonic()``;
* triggers and feeds (rate limits, interval and cron alarms) read ``now()``, the wall time, and sleep with
  ``sleep()``.

What it does not drive: timeouts of activations, the sandboxes' own clocks, activation timestamps (``start``,
``end``) and log timestamps, which stay real time: a fake clock must never make a real process wait or look hung.

``advance(s)`` moves both times forward. ``set(t)`` moves only the wall time, backwards too (a clock correction or
a daylight-saving test); the monotonic time never goes back. Each move wakes whatever waits on the clock: sleepers,
and listeners registered with ``on_advance`` (an engine's reaper), which an engine drops when it closes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import anyio

__all__ = ("FAKE_CLOCK_START", "FakeClock")

#: the default wall time: a Monday morning in 2025 (cron expressions see a realistic date, not 1970)
FAKE_CLOCK_START: Final = datetime(2025, 1, 6, 9, 0, 0, tzinfo=UTC).timestamp()
#: the default monotonic time: its origin is arbitrary, as time.monotonic's is
MONOTONIC_START_S: Final = 1000.0


class FakeClock:
    """A clock tests move by hand: ``now()``/``time()`` wall seconds, ``monotonic()`` seconds; see the module doc."""

    def __init__(self, start: float = FAKE_CLOCK_START, *, monotonic_start: float = MONOTONIC_START_S) -> None:
        self._wall = float(start)
        self._mono = float(monotonic_start)
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        """Wall-clock seconds since the epoch (what cron schedules and rate limits read)."""
        return self._wall

    def time(self) -> float:
        """Same as :meth:`now` (the name ``time.time`` has)."""
        return self._wall

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that only grow (what keep-alive reads)."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: both times move forward, then every listener and sleeper is woken."""
        if seconds < 0:
            raise ValueError(f"advance() lets time pass and cannot go back ({seconds} s); use set() for wall time")
        self._wall += seconds
        self._mono += seconds
        self._notify()

    def set(self, wall: float | datetime) -> None:
        """Set the wall time (forward or back, a timestamp or an aware datetime); the monotonic time stays."""
        if isinstance(wall, datetime):
            if wall.tzinfo is None:
                raise ValueError("set() needs an aware datetime (with tzinfo), not a naive one")
            wall = wall.timestamp()
        self._wall = float(wall)
        self._notify()

    def _notify(self) -> None:
        for cb in list(self._listeners):
            cb()

    def on_advance(self, cb: Callable[[], None]) -> Callable[[], None]:
        """Call ``cb`` after every move of the clock; returns a function that drops it again."""
        self._listeners.append(cb)

        def remove() -> None:
            if cb in self._listeners:
                self._listeners.remove(cb)

        return remove

    @property
    def listeners(self) -> int:
        """How many listeners and sleepers wait on the clock (a closed engine leaves none behind)."""
        return len(self._listeners)

    async def sleep(self, seconds: float) -> None:
        """Return once the monotonic time has moved ``seconds`` forward, or ``set()`` put the wall time past the
        sleep's end (so a test can jump to a cron alarm's minute)."""
        until_mono = self._mono + seconds
        until_wall = self._wall + seconds
        while self._mono < until_mono and self._wall < until_wall:
            ev = anyio.Event()
            self._listeners.append(ev.set)
            try:
                await ev.wait()
            finally:
                self._listeners.remove(ev.set)
