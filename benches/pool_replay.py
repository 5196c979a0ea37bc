"""Replay an invocation trace through minifaas's own pool (minifaas._pool.Pool) on a fake clock.

The keep-alive code under test is the pool's: ``route``, ``may_start`` (eviction by the pool's evictor),
``reserve`` and ``boot``, ``started_run``, ``became_idle`` (the policy's decision) and ``reap`` (expiry, pre-warming).
This module plays the scheduler's part around it, the way minifaas._core.scheduler does (a request takes a free
sandbox, else starts one if fewer are starting than requests wait, else waits), and stands a :class:`TraceSandbox`
in for each sandbox process: loading it takes the function's ``cold_ms`` on the fake clock and running a call its
duration; nothing is executed. Time jumps from event to event (arrivals, ends, loads done, and the times the pool
says something is due), so three days of trace replay in seconds.

Costs counted per run: cold starts (a call whose sandbox was started for it, as the scheduler counts them), pre-warm
loads (sandboxes the policy started ahead of a call) and their CPU time (a load costs its ``cold_ms`` of CPU whoever
asked for it), idle sandbox-seconds and idle GB-seconds (loaded, not running: kept and pre-warmed sandboxes alike,
counted from the end of the load to the stop), and calls that had to wait for memory.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import anyio
import anyio.abc
from spares_replay import ZygoteReplay
from trace_gen import FunctionProfile, Invocation, Trace

from minifaas._core.function import FunctionSpec
from minifaas._core.keepalive import Candidate, FixedPolicy, GreedyDualEvictor, KeepAlivePolicy
from minifaas._core.pool import FunctionPool, Pool
from minifaas._core.sandbox import Sandbox
from minifaas._deploy.bundle import Bundle
from minifaas.testing import FakeClock

#: a trace function may run this many sandboxes at once (bursts)
REPLAY_MAX_SANDBOXES = 64
FIXED_WINDOW_S = 600.0

ARRIVE, END, LOADED, REAP = 0, 1, 2, 3


class TraceSandbox(Sandbox):
    """Stands in for a sandbox process: the pool's handle without a process, and what the bench measures."""

    def __init__(self, fn_key: str, clock: FakeClock, memory_mb: int) -> None:
        super().__init__(fn_key, {})
        self.clock = clock
        self.memory_mb = memory_mb
        self.last_used = clock.monotonic()
        self.loaded_at: float | None = None
        self.stopped_at: float | None = None
        self.busy_s = 0.0

    async def start(self, launcher: Any, env: Any, tg: Any, *, wait_ready: bool = True) -> None:
        self.launch_how = "fork"

    async def init(self, fields: dict[str, Any], timeout_s: float = math.inf) -> dict[str, Any]:
        self.state = "ready"
        self.loaded_at = self.clock.monotonic()
        return {"ok": True}

    async def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = self.clock.monotonic()
        self.state = "dead"
        self.closed.set()

    def idle_s(self, end: float) -> float:
        if self.loaded_at is None:
            return 0.0
        stop = self.stopped_at if self.stopped_at is not None else end
        return max(0.0, stop - self.loaded_at - self.busy_s)


class LruEvictor(GreedyDualEvictor):
    """Evicts the least recently touched idle sandboxes (the bench's baseline next to Greedy-Dual)."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._tick = itertools.count()

    def touch(self, key: Hashable) -> None:
        self._stamps[key] = float(next(self._tick))

    def priority(self, c: Candidate) -> float:
        return self._stamps.get(c.ident, -1.0)


@dataclasses.dataclass
class Result:
    name: str
    invocations: int = 0
    cold_starts: int = 0
    cold_cost_s: float = 0.0
    idle_sandbox_s: float = 0.0
    idle_gb_s: float = 0.0
    prewarms: int = 0
    prewarms_used: int = 0
    prewarms_expired: int = 0
    cold_load_cpu_s: float = 0.0
    prewarm_load_cpu_s: float = 0.0
    evictions: int = 0
    waits: int = 0
    peak_mb: int = 0
    cold_by_fn: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def cold_pct(self) -> float:
        return 100.0 * self.cold_starts / max(self.invocations, 1)

    @property
    def overflows(self) -> int:
        """Calls that waited for memory (the old simulation ran them over the budget instead)."""
        return self.waits


class PoolReplay:
    """One trace through a fresh :class:`Pool` with ``policy`` (and ``evictor``), on a fake clock."""

    def __init__(
        self,
        trace: Trace,
        policy: KeepAlivePolicy,
        *,
        name: str,
        budget_mb: float | None,
        evictor: GreedyDualEvictor | None = None,
        zygote: Callable[[float], ZygoteReplay] | None = None,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.evictor = evictor
        self.budget_mb = budget_mb
        self.r = Result(name)
        self.clock = FakeClock()
        self.t0 = self.clock.monotonic()
        #: the zygote's spares (benches/spares_replay.py): each load then waits for its launch first
        self.zygote = zygote(self.t0) if zygote is not None else None
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.sandboxes: list[TraceSandbox] = []
        self.specs: dict[str, FunctionSpec] = {}
        self.loading: dict[int, bool] = {}
        self.pump_all_due = False
        self.waited: set[int] = set()
        #: functions whose queue could not start a sandbox in this event (a wait, unless a stop frees room)
        self.blocked: set[FunctionPool] = set()
        self.reap_at: dict[int, float] = {}
        fixed = policy if isinstance(policy, FixedPolicy) else getattr(policy, "fallback", None)
        self.window_s = fixed.idle_timeout_s if isinstance(fixed, FixedPolicy) else FIXED_WINDOW_S

    def run(self) -> Result:
        return anyio.run(self._run)

    # -- set-up ------------------------------------------------------------------------------------------------
    def _spec(self, prof: FunctionProfile) -> FunctionSpec:
        spec = self.specs.get(prof.name)
        if spec is None:
            bundle = Bundle({"kind": "code", "code": "", "filename": prof.name}, prof.name, {}, {}, "trace")
            spec = self.specs[prof.name] = FunctionSpec(
                name=prof.name,
                version="1",
                namespace="trace",
                bundle=bundle,
                memory_mb=prof.memory_mb,
                max_sandboxes=REPLAY_MAX_SANDBOXES,
                # the pool gives each function this window (FixedPolicy.configure): the policy's own
                idle_timeout_s=self.window_s,
                keepalive="replay",  # type: ignore[arg-type]
            )
        return spec

    def _factory(self, fn_key: str, services: Any) -> Any:
        prof = self.trace.functions[fn_key.split("/", 1)[1].rsplit("@", 1)[0]]
        sb = TraceSandbox(fn_key, self.clock, prof.memory_mb)
        self.sandboxes.append(sb)
        return sb

    async def _run(self) -> Result:
        async with anyio.create_task_group() as tg:
            pool = self.pool = Pool(
                tg,
                launcher=None,  # type: ignore[arg-type]
                services={},
                max_total=10**6,
                memory_budget_mb=None if self.budget_mb is None else int(self.budget_mb),
                now=self.clock.monotonic,
                idle_timeout_s=FIXED_WINDOW_S,
            )
            pool.policies["replay"] = self.policy
            if self.evictor is not None:
                pool.evictor = self.evictor
            pool.sandbox_factory = self._factory
            pool.warm_up = self._warm_up
            pool.on_capacity = self._capacity_freed
            for inv in self.trace.invocations:
                self._push(inv.t, ARRIVE, inv)
            end = self.t0 + self.trace.duration_s
            while self.heap and self.heap[0][0] <= end:
                t, _, kind, payload = heapq.heappop(self.heap)
                if t > self.clock.monotonic():
                    self.clock.advance(t - self.clock.monotonic())
                if kind == ARRIVE:
                    self._arrive(payload)
                elif kind == END:
                    self._end(*payload)
                elif kind == LOADED:
                    await self._loaded(*payload)
                elif self.reap_at.get(id(payload)) == t:
                    del self.reap_at[id(payload)]
                    self._schedule_reap(payload, t + pool.reap(t, [payload], max_delay_s=math.inf))
                if self.pump_all_due:
                    self.pump_all_due = False
                    for fp in list(pool.functions.values()):
                        if fp.queue:
                            self._pump(fp)
                await anyio.lowlevel.checkpoint()  # let retired sandboxes' stop() run at this time
                if self.pump_all_due:  # their stop() freed capacity: the queues try again at this same time
                    self.pump_all_due = False
                    for fp in list(pool.functions.values()):
                        if fp.queue:
                            self._pump(fp)
                self._count_waits()
            self.clock.advance(max(0.0, end - self.clock.monotonic()))
            self._finish(end)
            tg.cancel_scope.cancel()
        return self.r

    # -- the scheduler's part ----------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (self.t0 + t if kind == ARRIVE else t, next(self.seq), kind, payload))

    def _count_waits(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for fp in blocked:
            if fp.queue and fp.starting < len(fp.queue):
                head = id(fp.queue[0][0])
                if head not in self.waited:
                    self.waited.add(head)  # no memory even after evicting: it waits for a sandbox to end or expire
                    self.r.waits += 1

    def _capacity_freed(self) -> None:
        self.pump_all_due = True

    def _arrive(self, inv: Invocation) -> None:
        prof = self.trace.functions[inv.fn]
        fp = self.pool.function(self._spec(prof))
        self.r.invocations += 1
        fp.queue.append((inv, self.clock.monotonic()))
        self._pump(fp)

    def _pump(self, fp: FunctionPool) -> None:
        pool = self.pool
        while fp.queue:
            sb = pool.route(fp, None)
            if sb is not None:
                inv, queued_at = fp.queue.popleft()
                self._begin(fp, sb, inv, queued_at)  # type: ignore[arg-type]
                continue
            if fp.starting < len(fp.queue) and pool.may_start(fp):
                self._start(fp, prewarm=False)
                continue
            if fp.starting < len(fp.queue):
                self.blocked.add(fp)  # counted as a wait if still so once retired sandboxes had their stop() run
            break

    def _start(self, fp: FunctionPool, *, prewarm: bool) -> TraceSandbox:
        sb = self.pool.reserve(fp)
        assert isinstance(sb, TraceSandbox)
        sb.prewarmed = prewarm
        prof = self.trace.functions[fp.spec.name]
        if prewarm:
            self.r.prewarm_load_cpu_s += prof.cold_ms / 1000.0
        else:
            self.r.cold_load_cpu_s += prof.cold_ms / 1000.0
        self.r.peak_mb = max(self.r.peak_mb, self.pool.memory_in_use())
        now = self.clock.monotonic()
        launch_s = self.zygote.launch(now) if self.zygote is not None else 0.0
        self._push(now + launch_s + prof.cold_ms / 1000.0, LOADED, (fp, sb))
        return sb

    def _warm_up(self, fp: FunctionPool) -> None:
        self._start(fp, prewarm=True)

    async def _loaded(self, fp: FunctionPool, sb: TraceSandbox) -> None:
        if sb.state != "starting":
            return
        await self.pool.boot(fp, sb)  # type: ignore[arg-type]
        # the pool measures a start in real time (here ~0): tell Greedy-Dual the trace's cost instead
        fp.cold_ms = self.trace.functions[fp.spec.name].cold_ms
        self._schedule_reap(fp, sb.expires)
        self._pump(fp)

    def _begin(self, fp: FunctionPool, sb: Any, inv: Invocation, queued_at: float) -> None:
        now = self.clock.monotonic()
        prof = self.trace.functions[inv.fn]
        cold = sb.runs == 0 and not sb.prewarmed
        if cold:
            self.r.cold_starts += 1
            self.r.cold_by_fn[inv.fn] += 1
            self.r.cold_cost_s += now - queued_at
        elif sb.runs == 0:
            self.r.prewarms_used += 1
        sb.inflight[str(id(inv))] = inv
        sb.runs += 1
        self.pool.started_run(fp, sb, now)
        fp.record_run(prof.warm_ms, cold=cold)
        sb.busy_s += inv.duration_s
        self._push(now + inv.duration_s, END, (fp, sb, inv))

    def _end(self, fp: FunctionPool, sb: Any, inv: Invocation) -> None:
        now = self.clock.monotonic()
        sb.inflight.pop(str(id(inv)), None)
        sb.last_used = now
        self.pool.became_idle(fp, sb, now)
        self._schedule_reap(fp, sb.expires)
        if fp.prewarm_at is not None:
            self._schedule_reap(fp, fp.prewarm_at)
        self._pump(fp)

    def _schedule_reap(self, fp: FunctionPool, t: float) -> None:
        # one pending round per function, at the earliest time something of it is due
        t = max(t, self.clock.monotonic())
        if math.isfinite(t) and t < self.reap_at.get(id(fp), math.inf):
            self.reap_at[id(fp)] = t
            heapq.heappush(self.heap, (t, next(self.seq), REAP, fp))

    def _finish(self, end: float) -> None:
        r = self.r
        if self.zygote is not None:
            self.zygote.finish(end)
        for sb in self.sandboxes:
            idle = sb.idle_s(end)
            r.idle_sandbox_s += idle
            r.idle_gb_s += idle * sb.memory_mb / 1024.0
        r.prewarms = self.pool.stats["policy_prewarms"]
        r.prewarms_expired = self.pool.stats["prewarms_expired_unused"]
        r.evictions = self.pool.stats["evictions_memory"] + self.pool.stats["evictions_capacity"]


def replay_all(
    trace: Trace, setups: Iterable[tuple[str, KeepAlivePolicy, GreedyDualEvictor | None]], budget_mb: float | None
) -> list[Result]:
    return [PoolReplay(trace, pol, name=name, budget_mb=budget_mb, evictor=ev).run() for name, pol, ev in setups]
