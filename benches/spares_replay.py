"""The zygote's spares replayed on a fake clock: every launch of a trace replay asks :class:`ZygoteReplay`, which
sizes the spares with minifaas's own :class:`~minifaas._core.spares.SpareSizer` and plays the zygote's loop.

What is real and what is modelled:

- the sizing is the engine's: each launch is ``record``-ed in a real ``SpareSizer``, the zygote is asked for its
  ``target`` at the launch (as ``ZygoteLauncher.launch`` does before the FORK) and again whenever ``next_change_s``
  says it may drop (as the launcher's sizing task does);
- the zygote's loop follows ``minifaas_sandbox.zygote.Zygote.serve``/``fork`` with their constants: one process,
  one fork at a time; a FORK request takes the oldest ready spare, else forks on request; a request that arrives
  while a spare is being forked waits for that fork, but goes before the next; refills wait
  ``SPARE_REFORK_DELAY_S`` after a launch, but no longer than ``MAX_REFILL_DEFER_S`` after a spare went short, and
  not at all while a launch found no spare ready a moment ago (the burst outgrew them); spares beyond the target
  are discarded newest first (the spares' lower priority is not modelled: each child has a core of its own);
- the times are modelled, from this machine's measurements (:class:`Timings`): a fork of the zygote, the steps a
  child takes before it serves (on request) or before it says it is ready (a spare, with its rehearsal), and a
  hand-over. The model gives each child a core of its own (no CPU contention between children); on two cores a
  burst's forks on request queue for the CPU as well, so the real waits without spares are longer.

Costs counted: per launch, the wait from the request to a process that serves it (hand-over or fork); spare-seconds
(spares held, forked or ready, integrated over time) and the spares forked and discarded unused (their forks' CPU).
"""

from __future__ import annotations

import dataclasses
import math

from minifaas_sandbox.zygote import MAX_REFILL_DEFER_S, OUTGROWN_FOR_S, SPARE_REFORK_DELAY_S

from minifaas._core.spares import SpareSizer

__all__ = ("SPARE_PSS_MIB", "Timings", "ZygoteReplay")

#: an idle spare's PSS (benches/bench_coldstart.py --only bursts: +3.5 MiB per spare)
SPARE_PSS_MIB = 3.5


@dataclasses.dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds, measured here (README: fork() of the preloaded zygote 2-3 ms; a child's request-free steps
    1.5-2.5 ms; back to back, a cold start from a spare 4.0 ms and one forked on request 7.5 ms)."""

    #: the zygote's fork() (the zygote does nothing else meanwhile)
    fork_ms: float = 2.5
    #: a child forked on request: detach, reseed, the runtime's set-up and its copy-on-write faults
    child_ready_ms: float = 2.0
    #: a spare: the same steps, joining its cgroup and a rehearsed no-op INIT and RUN, before it says ready
    spare_ready_ms: float = 3.0
    #: a ready spare takes the request's fds and env
    handover_ms: float = 0.3


class ZygoteReplay:
    """The zygote and its spares on a fake clock. ``launch(t)`` in time order; ``finish(end)`` once at the end."""

    def __init__(self, sizer: SpareSizer, t0: float, timings: Timings | None = None) -> None:
        self.sizer = sizer
        self.timings = timings or Timings()
        self.now = t0
        self.t0 = t0
        #: the zygote is forking until then
        self.busy_until = t0
        #: the spares, oldest first: the time each is ready
        self.spares: list[float] = []
        self.want = sizer.target(t0)
        self.refork_at = t0
        self.deficit_since = t0 if self.want else math.inf
        self.forked_on_request_at = -math.inf
        #: per launch, seconds from the request to a process that serves it
        self.waits_s: list[float] = []
        self.from_spares = 0
        self.spares_forked = 0
        self.spares_discarded = 0
        self.spare_s = 0.0
        self.peak_spares = 0

    # -- the zygote's loop, between requests ------------------------------------------------------------------
    def _next_fork_at(self) -> float | None:
        if len(self.spares) >= self.want:
            return None
        # the zygote's "burst": the host wants several and none is ready, so the next launch would wait on a fork
        free = max(self.busy_until, self.now)
        # the burst outgrew the spares: a launch was forked on request a moment ago
        outgrown = self.want > 1 and free - self.forked_on_request_at < OUTGROWN_FOR_S
        due = min(self.refork_at, self.deficit_since + max(MAX_REFILL_DEFER_S, SPARE_REFORK_DELAY_S))
        return free if outgrown else max(free, due)

    def _next_decay_at(self) -> float | None:
        wait = self.sizer.next_change_s(self.now)
        return None if wait is None else self.now + wait

    def _move_to(self, t: float) -> None:
        self.spare_s += len(self.spares) * max(0.0, t - self.now)
        self.now = max(self.now, t)

    def _set_want(self, n: int) -> None:
        self.want = n
        while len(self.spares) > n:
            self.spares.pop()  # the newest first, as the zygote does
            self.spares_discarded += 1
        if len(self.spares) < n and self.deficit_since == math.inf:
            self.deficit_since = self.now

    def advance(self, t: float, *, before: bool = False) -> None:
        """Play the zygote's own steps (spare forks, the host lowering the target) up to ``t`` (``before``: only
        those that start strictly before ``t``, so a request arriving at ``t`` goes first)."""
        while True:
            fork_at, decay_at = self._next_fork_at(), self._next_decay_at()
            nxt = min((x for x in (fork_at, decay_at) if x is not None), default=math.inf)
            if nxt > t or (before and nxt == t):
                break
            self._move_to(nxt)
            if nxt == decay_at:
                self._set_want(self.sizer.target(nxt))
                continue
            fork = self.timings.fork_ms / 1000
            self.spares.append(nxt + fork + self.timings.spare_ready_ms / 1000)
            self.spares_forked += 1
            self.peak_spares = max(self.peak_spares, len(self.spares))
            self.busy_until = nxt + fork
            self.deficit_since = self.busy_until if len(self.spares) < self.want else math.inf
        self._move_to(t)

    # -- a launch -----------------------------------------------------------------------------------------------
    def launch(self, t: float) -> float:
        """A FORK request at ``t``: seconds until a process serves it."""
        self.advance(t, before=True)
        # the host records the cold start and sends the new target before its FORK (ZygoteLauncher.launch)
        self.sizer.record(t)
        self._set_want(self.sizer.target(t))
        serve = max(t, self.busy_until)
        # the zygote reads the request once the fork it is in ends, before it starts another
        self.advance(serve, before=True)
        ready = next((i for i, r in enumerate(self.spares) if r <= serve), None)
        tm = self.timings
        if ready is not None:
            self.spares.pop(ready)
            self.from_spares += 1
            if self.deficit_since == math.inf:
                self.deficit_since = serve
            wait = serve - t + tm.handover_ms / 1000
        else:
            self.forked_on_request_at = serve
            self.busy_until = serve + tm.fork_ms / 1000
            wait = serve - t + (tm.fork_ms + tm.child_ready_ms) / 1000
        self.refork_at = serve + SPARE_REFORK_DELAY_S
        self.waits_s.append(wait)
        return wait

    def finish(self, end: float) -> None:
        self.advance(end)

    # -- figures ------------------------------------------------------------------------------------------------
    def wait_ms(self, q: float) -> float:
        """The ``q`` quantile of the launch waits, in ms (0 without launches)."""
        if not self.waits_s:
            return 0.0
        waits = sorted(self.waits_s)
        return 1000 * waits[min(len(waits) - 1, int(len(waits) * q))]

    @property
    def mean_spares(self) -> float:
        return self.spare_s / max(self.now - self.t0, 1e-9)
