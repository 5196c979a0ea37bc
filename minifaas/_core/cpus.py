"""Warm work keeps its cores: a sandbox running flat out gets a core of its own, and cold starts use the rest.

A burst of cold starts is short and parallel: the zygote forks, spares take their steps, eight new sandboxes run
their INIT at once. Left to the kernel's balancer, that work spreads over every core, and a warm function running
flat out beside it loses a share of its core to each of them. Measured on two cores (``python
benches/bench_coldstart.py --only bursts``): 20 functions deployed and cold-started back to back took 30-40% of the
throughput of a warm function running flat out, even with the spares' steps in the idle scheduling class.

So, while at least one core stays free for everything else, a sandbox that wanted a core for at least
``HOT_SHARE`` of the time over the last ``HOT_CHECKS`` checks (running, or runnable and waiting for one: a sandbox
starved by its neighbours counts as much as one that has its core) is pinned to the core it runs on
(``sched_setaffinity``), and everything else the engine started -- the zygote (whose forks inherit its mask: spares
and new sandboxes), its spares, every other sandbox, and their own children -- is kept to the remaining cores, and
so is the thread that runs the engine's event loop (that thread only: the embedding program's other threads are
left alone). It gives its core back once it wanted it less than ``COOL_SHARE`` of the time for ``HOT_CHECKS``
checks, or stops; when none runs flat out any more, or too many do to leave a core free, every mask goes back to
what it was (also for threads the loop's thread started meanwhile, which inherited its mask).

Cost: a cold start kept to the other cores waits for them (back to back beside a warm function on two cores, a
cold start's p50 measured 3.4-4.4 ms against 3.5-3.7 ms), and so does the engine's own work on its loop; a sandbox
is pinned only after ``HOT_CHECKS * CPU_CHECK_S`` flat out; and while any sandbox is busy, a check every
``CPU_CHECK_S`` reads ``/proc/<pid>/schedstat`` of the busy ones (an idle engine pays nothing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import anyio

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ("CPU_CHECK_S", "CpuKeeper")

#: how often the busy sandboxes' CPU use is read, while any is busy
CPU_CHECK_S: Final = 0.05
#: the share of the time between two checks a sandbox's processes must have run or waited to run (wanted a core)
#: to count as running flat out
HOT_SHARE: Final = 0.8
#: consecutive checks at that share before a sandbox is pinned (a short run is not worth moving anything for), and
#: under COOL_SHARE before a pinned one gives its core back
HOT_CHECKS: Final = 2
COOL_SHARE: Final = 0.5
#: how deep a sandbox's process tree is followed (its own children, theirs...) when a mask is set
TREE_MAX_DEPTH: Final = 4

_log = logging.getLogger("minifaas.cpus")


class CpuKeeper:
    """Pins sandboxes running flat out to cores of their own and keeps the rest of the engine's processes off
    them (see the module's docstring). Owned by the engine's task group through :meth:`run`."""

    def __init__(
        self,
        pool: Pool,
        zygote_pids: Callable[[], Iterable[int]],
        cpus: Iterable[int] | None = None,
        *,
        confine_loop: bool = True,
    ) -> None:
        self.pool = pool
        self._zygote_pids = zygote_pids
        self.cpus: frozenset[int] = frozenset(cpus if cpus is not None else os.sched_getaffinity(0))
        self._wake = anyio.Event()
        #: pid -> (when read, its CPU ns then, consecutive checks at HOT_SHARE or more, under COOL_SHARE)
        self._samples: dict[int, tuple[float, int, int, int]] = {}
        #: pid of a sandbox -> the core it is pinned to
        self.pinned: dict[int, int] = {}
        self._zygotes_applied: frozenset[int] = frozenset()
        #: the checking loop runs (while any sandbox is busy): no need to wake it at every run
        self._checking = False
        #: keep the event loop's thread (where checks run) off the pinned cores too
        self.confine_loop = confine_loop
        self._loop_mask: set[int] = set(self.cpus)
        self._loop_confined: frozenset[int] | None = None
        self.counts = {"partitions": 0, "releases": 0}

    @property
    def enabled(self) -> bool:
        return len(self.cpus) >= 2

    def wake(self) -> None:
        """A sandbox started a run: check while any is busy (called by the pool, on the event loop)."""
        if not self._checking:
            self._wake.set()

    async def run(self) -> None:
        if not self.enabled:
            return
        self._loop_mask = os.sched_getaffinity(0)  # this thread's: the event loop's
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                self._checking = True
                # the check that finds nothing busy any more releases what was pinned
                while self.check():
                    await anyio.sleep(CPU_CHECK_S)
                self._checking = False
        finally:
            if self.pinned:
                self._release()

    def _busy(self) -> list[int]:
        pids = []
        for fp in self.pool.functions.values():
            for sb in fp.sandboxes:
                if sb.inflight and sb.state == "ready" and sb.proc is not None:
                    pids.append(sb.proc.pid)
        return pids

    def check(self, now: float | None = None) -> bool:
        """Read the busy sandboxes' CPU use; pin, move or release as it says. Whether any sandbox is busy."""
        now = time.monotonic() if now is None else now
        busy = self._busy()
        samples: dict[int, tuple[float, int, int, int]] = {}
        for pid in busy:
            run_ns = _demand_ns(pid)
            if run_ns < 0:
                continue
            hot_streak = cool_streak = 0
            prev = self._samples.get(pid)
            if prev is not None:
                when, before, hot_before, cool_before = prev
                share = (run_ns - before) / 1e9 / max(now - when, 1e-6)
                hot_streak = hot_before + 1 if share >= HOT_SHARE else 0
                cool_streak = cool_before + 1 if share < COOL_SHARE else 0
            samples[pid] = (now, run_ns, hot_streak, cool_streak)
        self._samples = samples
        self._rebalance(samples)
        return bool(busy)

    def _rebalance(self, samples: dict[int, tuple[float, int, int, int]]) -> None:
        """Pin the sandboxes that want a core of their own, keep everything else off those cores, or release."""
        hot = [pid for pid, sample in samples.items() if sample[2] >= HOT_CHECKS]
        # hysteresis: a pinned sandbox keeps its core while it stays busy, until it has wanted less than COOL_SHARE
        # of it for HOT_CHECKS checks (another process of the machine's sharing that core must not unpin it)
        hot += [pid for pid in self.pinned if pid in samples and pid not in hot and samples[pid][3] < HOT_CHECKS]
        # all that want a core now, pinned or not yet: no core would be left for the rest
        wanting = sum(1 for sample in samples.values() if sample[2] >= 1)
        if not hot or max(len(hot), wanting) >= len(self.cpus):
            if self.pinned:
                self._release()
            return
        assign = {pid: cpu for pid, cpu in self.pinned.items() if pid in hot}
        free = sorted(self.cpus - set(assign.values()))
        for pid in hot:
            if pid not in assign:
                cpu = _last_cpu(pid)
                assign[pid] = cpu if cpu in free else free[0]
                free.remove(assign[pid])
        zygotes = frozenset(self._zygote_pids())
        if assign == self.pinned and zygotes == self._zygotes_applied:
            return
        for pid, cpu in assign.items():
            if self.pinned.get(pid) != cpu:
                _set_tree(pid, {cpu}, skip=())
        rest = set(free)
        for pid in self._others(assign):
            _set_tree(pid, rest, skip=assign)
        if self.confine_loop:
            # the event loop's thread only (pid 0 is the calling thread): one thread uses one core at a time, and
            # this decides that the engine's own work (launches, results) waits on the other cores rather than
            # taking the pinned one
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, rest)
            self._loop_confined = frozenset(rest)
        if not self.pinned:
            self.counts["partitions"] += 1
        self.pinned = assign
        self._zygotes_applied = zygotes
        _log.debug("sandboxes %s pinned; the rest of the engine on cores %s", assign, sorted(rest))

    def _others(self, pinned: Iterable[int]) -> list[int]:
        """Every process of the engine's but the pinned sandboxes: the zygotes (and their spares) and the rest."""
        skip = set(pinned)
        pids = [pid for pid in self._zygote_pids() if pid not in skip]
        for fp in self.pool.functions.values():
            for sb in fp.sandboxes:
                if sb.proc is not None and sb.proc.pid not in skip:
                    pids.append(sb.proc.pid)
        return pids

    def _release(self) -> None:
        everything = set(self.cpus)
        for pid in [*self.pinned, *self._others(())]:
            _set_tree(pid, everything, skip=())
        if self._loop_confined is not None:
            # the loop's thread, and any thread of the host started meanwhile (which inherited its mask)
            for tid in _threads_with_mask(self._loop_confined):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, self._loop_mask)
            self._loop_confined = None
        self.pinned = {}
        self._zygotes_applied = frozenset()
        self.counts["releases"] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "cores": sorted(self.cpus),
            #: sandbox pid -> the core it has to itself while it runs flat out
            "pinned": dict(self.pinned),
            **self.counts,
        }


def _demand_ns(pid: int) -> int:
    """ns a process and its direct children (a sandbox in a PID namespace of its own may be the parent of the
    process that runs the function) spent running or runnable, waiting for a core, so far; -1 once it is gone. A
    process that wants a core but has to share it counts as much as one that has it."""
    total = _own_demand_ns(pid)
    if total < 0:
        return -1
    for kid in _children(pid):
        total += max(_own_demand_ns(kid), 0)
    return total


def _own_demand_ns(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return int(run_ns) + int(wait_ns)
    except (OSError, ValueError):
        return -1


def _last_cpu(pid: int) -> int:
    """The core a process last ran on (field 39 of /proc/<pid>/stat), or -1."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


def _threads_with_mask(mask: frozenset[int]) -> list[int]:
    """This process's threads whose CPU mask is ``mask``."""
    tids = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):
                if os.sched_getaffinity(int(task)) == mask:
                    tids.append(int(task))
    return tids


def _set_tree(pid: int, cpus: set[int], skip: Iterable[int]) -> None:
    """Set the mask of ``pid`` and its descendants (not those in ``skip``, nor below them); gone ones are fine."""
    avoid = set(skip)
    level = [pid]
    for _ in range(TREE_MAX_DEPTH):
        below: list[int] = []
        for p in level:
            if p in avoid:
                continue
            with contextlib.suppress(OSError):  # gone, or not ours to set
                os.sched_setaffinity(p, cpus)
            below += _children(p)
        if not below:
            return
        level = below
