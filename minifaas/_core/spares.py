"""How many spares the zygote keeps forked ahead: sized by the bursts of cold starts seen lately.

A spare turns a cold start into a hand-over (3 ms instead of a fork's 5-8 ms, and no queue behind serial forks in
a burst). One spare covers launches that come one at a time; a burst of N cold starts (a new function meeting N
concurrent requests, a deploy of several functions, a map scaling out) takes N at once. The policy:

- every cold start is recorded with its time;
- a burst is the number of cold starts within ``BURST_WINDOW_S`` of each other (a sliding window ending at each
  one); its weight decays with a half-life of ``HALF_LIFE_S``, so a burst of 8 keeps 8 spares for a while, then
  4 a half-life later, and so on;
- the target is the largest decayed burst, rounded up, at least ``min_spares`` (one by default: the single cold
  start) and at most ``max_spares`` and what the memory budget leaves room for (``room`` spares).

What it costs: each idle spare holds its private memory (PSS, measured: about 3 MiB, most pages shared with the
zygote copy-on-write) and one process, and each one made is a fork of the zygote (2-3 ms of its CPU) and a
rehearsal (3-4 ms), also for those discarded unused when the demand decays. The zygote forks them in a lull, and
they take their steps at a lower priority (``minifaas_sandbox.zygote``). On bursty traces
(``benches/bench_keepalive.py --bursty-only``, this very class on a fake clock) they halve the time launches wait
for a process compared with one spare, for 4-5 spares held on average. Forgotten bursts cost nothing: history older
than ``HISTORY_S`` is dropped.
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Final

__all__ = ("BURST_WINDOW_S", "HALF_LIFE_S", "HISTORY_S", "SpareSizer")

#: cold starts this close together are one burst
BURST_WINDOW_S: Final = 0.25
#: a burst's weight halves every this many seconds
HALF_LIFE_S: Final = 60.0
#: cold starts older than this no longer count (by then a burst of 256 has decayed below one spare)
HISTORY_S: Final = 600.0
#: the most cold starts remembered (a host cold-starting constantly needs no long memory to know it)
MAX_HISTORY: Final = 4096


class SpareSizer:
    """``record(t)`` each cold start; ``target(t)`` is how many spares to keep at time ``t`` (monotonic s)."""

    def __init__(self, *, min_spares: int = 1, max_spares: int = 8, half_life_s: float = HALF_LIFE_S) -> None:
        if min_spares < 0 or max_spares < min_spares:
            raise ValueError(f"spares must satisfy 0 <= min_spares <= max_spares, got {min_spares}, {max_spares}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.min_spares = min_spares
        self.max_spares = max_spares
        self.half_life_s = half_life_s
        self._starts: collections.deque[float] = collections.deque(maxlen=MAX_HISTORY)
        #: (time the burst ended, its size), oldest first, each larger than every later one: a burst no larger than
        #: a later one never sets the demand again (it decays from earlier), so it is dropped; what remains is at
        #: most as long as the largest burst, and ``demand`` (asked at each launch) reads only that
        self._bursts: collections.deque[tuple[float, int]] = collections.deque(maxlen=MAX_HISTORY)

    def record(self, t: float) -> None:
        starts = self._starts
        starts.append(t)
        # the burst ending now: cold starts within the window (the deque is in time order)
        size = len(starts) - bisect.bisect_left(starts, t - BURST_WINDOW_S)
        bursts = self._bursts
        while bursts and bursts[-1][1] <= size:
            bursts.pop()
        bursts.append((t, size))
        self._forget(t)

    def _forget(self, now: float) -> None:
        while self._starts and self._starts[0] < now - HISTORY_S:
            self._starts.popleft()
        while self._bursts and self._bursts[0][0] < now - HISTORY_S:
            self._bursts.popleft()

    def demand(self, now: float) -> float:
        """The largest burst seen, decayed to ``now``."""
        self._forget(now)
        return max((size * 0.5 ** ((now - t) / self.half_life_s) for t, size in self._bursts), default=0.0)

    def target(self, now: float, room: int | None = None) -> int:
        """Spares to keep: the decayed demand rounded up, within [min_spares, max_spares] and ``room``."""
        n = max(self.min_spares, math.ceil(self.demand(now) - 1e-9))
        n = min(n, self.max_spares)
        if room is not None:
            n = min(n, max(0, room))
        return n

    def next_change_s(self, now: float) -> float | None:
        """Seconds until ``target`` may drop by one as the bursts decay (None: it is at its floor already)."""
        demand = self.demand(now)
        current = max(self.min_spares, math.ceil(demand - 1e-9))
        if current <= self.min_spares or demand <= 0:
            return None
        # demand falls below current - 1 after HALF_LIFE_S * log2(demand / (current - 1))
        return max(0.01, self.half_life_s * math.log2(demand / max(current - 1, 1e-9)))
