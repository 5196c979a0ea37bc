"""Keep-alive policies replayed on a synthetic Azure-like trace: cold starts vs idle sandbox time.

A discrete-event simulation of a sandbox pool on a fake clock (no processes): each function has sandboxes
that are busy, idle (warm) or unloaded. An invocation takes an idle sandbox of its function (warm start) or
starts one (cold start: the function's cold_ms is added to its latency). When a sandbox becomes idle, the
policy's ``decide`` says when to unload it, when to pre-warm a fresh one and how long a warm one is kept.
Under a memory budget, starting a sandbox evicts idle ones: least recently used for the keep-alive policies,
Greedy-Dual (FaasCache) for the ``greedy-dual`` rows, which otherwise keep idle sandboxes until memory runs
short. Idle sandbox-seconds count every second a sandbox is loaded but not running (pre-warmed ones too).

Simplifications (say so when quoting the figures): a pre-warmed sandbox is ready at once (its load time is not
simulated); a pre-warm that does not fit into free memory is skipped; when no idle sandbox can be evicted, the
invocation runs anyway and counts as an overflow of the budget.

Usage::

    python benches/bench_keepalive.py                       # 100 functions, 3 days, seed 1, 24 GiB budget
    python benches/bench_keepalive.py --seeds 1 2 3 --budget-mb 16384
    python benches/bench_keepalive.py --sensitivity         # + the histogram at other prices of a cold start

Rows: "histogram" is the policy as minifaas runs it (the paper's window where its expected cost beats the
best fixed window for the function, see minifaas/_core/keepalive.py); "histogram, paper windows" is the paper's
window and fallback alone, with the pool's handling of extra sandboxes; "histogram, as published" also lets
every idle sandbox follow the histogram.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_gen import SECONDS_PER_DAY, Invocation, Trace, generate

from minifaas._core.keepalive import (
    COLD_START_COST_WINDOWS,
    Candidate,
    FixedPolicy,
    GreedyDualEvictor,
    HistogramPolicy,
    KeepAlivePolicy,
)

FIXED_WINDOW_S = 600.0
SWEEP_MINUTES = (5, 20, 30, 60)
#: prices of a cold start, in fallback windows, for --sensitivity
SENSITIVITY_WINDOWS = (2.0, 3.0, 6.0, 8.0)
DEFAULT_BUDGET_MB = 24 * 1024

ARRIVE, END, EXPIRE, PREWARM = 0, 1, 2, 3


@dataclasses.dataclass(eq=False)
class SimSandbox:
    id: int
    fn: str
    memory_mb: int
    busy: bool = False
    idle_since: float = 0.0
    #: bumped on every state change, so an expiry scheduled for an older state is ignored
    version: int = 0
    loaded: bool = True


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
    evictions: int = 0
    overflows: int = 0
    peak_mb: int = 0
    cold_by_fn: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def cold_pct(self) -> float:
        return 100.0 * self.cold_starts / max(self.invocations, 1)


class PoolSim:
    def __init__(
        self,
        trace: Trace,
        policy: KeepAlivePolicy,
        *,
        name: str,
        budget_mb: float | None,
        evictor: GreedyDualEvictor | None = None,
        pass_warm: bool = True,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.evictor = evictor
        self.budget_mb = budget_mb
        #: False replays the paper's policy as published: every idle sandbox follows the histogram
        self.pass_warm = pass_warm
        self.r = Result(name)
        self.idle: dict[str, list[SimSandbox]] = {fn: [] for fn in trace.functions}
        self.used_mb = 0
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = itertools.count()
        self.ids = itertools.count()
        self.decision_stamp: dict[str, int] = dict.fromkeys(trace.functions, 0)
        self.frequency: dict[str, int] = dict.fromkeys(trace.functions, 0)
        self.prewarmed: set[int] = set()

    def push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> Result:
        for inv in self.trace.invocations:
            self.push(inv.t, ARRIVE, inv)
        end = self.trace.duration_s
        while self.heap and self.heap[0][0] <= end:
            t, _, kind, payload = heapq.heappop(self.heap)
            if kind == ARRIVE:
                self.arrive(t, cast(Invocation, payload))
            elif kind == END:
                self.end(t, cast(SimSandbox, payload))
            elif kind == EXPIRE:
                sb, version = cast(tuple[SimSandbox, int], payload)
                if sb.loaded and not sb.busy and sb.version == version:
                    self.unload(t, sb)
            elif kind == PREWARM:
                fn, stamp, keep_until = cast(tuple[str, int, float], payload)
                self.prewarm(t, fn, stamp, keep_until)
        for sbs in self.idle.values():
            for sb in sbs:
                self.account_idle(end, sb)
        return self.r

    # -- events ----------------------------------------------------------------------------------------------
    def arrive(self, t: float, inv: Invocation) -> None:
        fn = inv.fn
        prof = self.trace.functions[fn]
        self.r.invocations += 1
        self.frequency[fn] += 1
        self.policy.on_invocation_start(fn, t)
        idle = self.idle[fn]
        if idle:
            sb = idle.pop()  # the most recently idle one
            self.account_idle(t, sb)
            if sb.id in self.prewarmed:
                self.prewarmed.discard(sb.id)
                self.r.prewarms_used += 1
            delay_s = 0.0
        else:
            self.make_room(t, prof.memory_mb)
            sb = SimSandbox(next(self.ids), fn, prof.memory_mb)
            self.load(sb)
            self.r.cold_starts += 1
            self.r.cold_by_fn[fn] += 1
            self.r.cold_cost_s += prof.cold_ms / 1000.0
            delay_s = prof.cold_ms / 1000.0
        sb.busy = True
        sb.version += 1
        if self.evictor is not None:
            self.evictor.touch(sb.id)
        self.push(t + delay_s + inv.duration_s, END, sb)

    def end(self, t: float, sb: SimSandbox) -> None:
        fn = sb.fn
        self.policy.on_invocation_end(fn, t)
        sb.busy = False
        sb.version += 1
        sb.idle_since = t
        d = self.policy.decide(fn, t, warm=len(self.idle[fn]) if self.pass_warm else 0)
        self.decision_stamp[fn] += 1
        if d.unload_at is not None and d.unload_at <= t:
            self.unload(t, sb, idle=False)
        else:
            self.idle[fn].append(sb)
            expiry = d.keep_until if d.unload_at is None else min(d.unload_at, d.keep_until)
            if math.isfinite(expiry):
                self.push(expiry, EXPIRE, (sb, sb.version))
        if d.prewarm_at is not None:
            self.push(d.prewarm_at, PREWARM, (fn, self.decision_stamp[fn], d.keep_until))

    def prewarm(self, t: float, fn: str, stamp: int, keep_until: float) -> None:
        if stamp != self.decision_stamp[fn] or self.idle[fn]:
            return  # a later invocation superseded this decision, or a sandbox is warm anyway
        prof = self.trace.functions[fn]
        if self.budget_mb is not None and self.used_mb + prof.memory_mb > self.budget_mb:
            return
        sb = SimSandbox(next(self.ids), fn, prof.memory_mb, idle_since=t)
        self.load(sb)
        self.idle[fn].append(sb)
        self.prewarmed.add(sb.id)
        self.r.prewarms += 1
        if self.evictor is not None:
            self.evictor.touch(sb.id)
        self.push(keep_until, EXPIRE, (sb, sb.version))

    # -- memory ----------------------------------------------------------------------------------------------
    def load(self, sb: SimSandbox) -> None:
        self.used_mb += sb.memory_mb
        self.r.peak_mb = max(self.r.peak_mb, self.used_mb)

    def unload(self, t: float, sb: SimSandbox, *, idle: bool = True) -> None:
        if idle:
            self.account_idle(t, sb)
            self.idle[sb.fn].remove(sb)
        sb.loaded = False
        sb.version += 1
        self.used_mb -= sb.memory_mb
        self.prewarmed.discard(sb.id)
        if self.evictor is not None:
            self.evictor.forget(sb.id)

    def account_idle(self, t: float, sb: SimSandbox) -> None:
        dt = max(0.0, t - sb.idle_since)
        self.r.idle_sandbox_s += dt
        self.r.idle_gb_s += dt * sb.memory_mb / 1024.0

    def make_room(self, t: float, need_mb: int) -> None:
        if self.budget_mb is None or self.used_mb + need_mb <= self.budget_mb:
            return
        idle = [sb for sbs in self.idle.values() for sb in sbs]
        short = self.used_mb + need_mb - self.budget_mb
        if self.evictor is not None:
            by_id = {sb.id: sb for sb in idle}
            cands = []
            for sb in idle:
                prof = self.trace.functions[sb.fn]
                cands.append(
                    Candidate(
                        fn=sb.fn,
                        memory_mb=sb.memory_mb,
                        cold_cost_ms=prof.cold_ms + prof.warm_ms,
                        warm_cost_ms=prof.warm_ms,
                        frequency=self.frequency[sb.fn],
                        key=sb.id,
                    )
                )
            victims = [by_id[c.key] for c in self.evictor.choose_victims(cands, short)]  # type: ignore[index]
        else:
            victims = []
            freed = 0
            for sb in sorted(idle, key=lambda s: s.idle_since):
                if freed >= short:
                    break
                victims.append(sb)
                freed += sb.memory_mb
            if freed < short:
                victims = []
        if not victims:
            self.r.overflows += 1
            return
        for sb in victims:
            self.unload(t, sb)
            self.r.evictions += 1


def run_all(trace: Trace, budget_mb: float | None, *, sensitivity: bool = False) -> list[Result]:
    """Unlimited memory: fixed 10 min, histogram, then the paper's policy alone and a sweep of fixed windows
    (where the histogram sits on the cold-start / idle-time frontier); with a budget: the evictors."""
    setups: list[tuple[str, KeepAlivePolicy, GreedyDualEvictor | None, bool]] = [
        (f"fixed {FIXED_WINDOW_S / 60:.0f} min", FixedPolicy(FIXED_WINDOW_S), None, True),
        ("histogram", HistogramPolicy(fallback_s=FIXED_WINDOW_S), None, True),
    ]
    if budget_mb is None:
        paper = HistogramPolicy(fallback_s=FIXED_WINDOW_S, cost_aware=False)
        published = HistogramPolicy(fallback_s=FIXED_WINDOW_S, cost_aware=False)
        setups += [
            ("histogram, paper windows", paper, None, True),
            ("histogram, as published", published, None, False),
        ]
        if sensitivity:
            for w in SENSITIVITY_WINDOWS:
                pol = HistogramPolicy(fallback_s=FIXED_WINDOW_S, cold_cost_s=w * FIXED_WINDOW_S)
                setups.append((f"histogram, cold = {w:g} win", pol, None, True))
        setups += [(f"fixed {m} min", FixedPolicy(m * 60.0), None, True) for m in SWEEP_MINUTES]
    else:
        setups += [
            ("greedy-dual (no TTL)", FixedPolicy(math.inf), GreedyDualEvictor(), True),
            (
                "histogram + greedy-dual",
                HistogramPolicy(fallback_s=FIXED_WINDOW_S),
                GreedyDualEvictor(),
                True,
            ),
        ]
    return [
        PoolSim(trace, pol, name=name, budget_mb=budget_mb, evictor=ev, pass_warm=warm).run()
        for name, pol, ev, warm in setups
    ]


def fixed_at_same_idle(results: list[Result], target: Result) -> float | None:
    """Cold starts of a fixed window spending ``target``'s idle sandbox-seconds (linear between windows)."""
    fixed = sorted((r for r in results if r.name.startswith("fixed")), key=lambda r: r.idle_sandbox_s)
    for lo, hi in itertools.pairwise(fixed):
        if lo.idle_sandbox_s <= target.idle_sandbox_s <= hi.idle_sandbox_s:
            w = (target.idle_sandbox_s - lo.idle_sandbox_s) / max(hi.idle_sandbox_s - lo.idle_sandbox_s, 1e-9)
            return lo.cold_starts + w * (hi.cold_starts - lo.cold_starts)
    return None


def table(results: list[Result], title: str) -> str:
    head = (
        f"{'policy':<26}{'cold %':>8}{'cold starts':>12}{'cold cost s':>12}{'idle sb-s':>12}"
        f"{'idle GB-s':>11}{'prewarms':>10}{'used':>7}{'evict':>7}{'overflow':>9}{'peak GB':>8}"
    )
    lines = [title, head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.name:<26}{r.cold_pct:>8.2f}{r.cold_starts:>12}{r.cold_cost_s:>12.0f}{r.idle_sandbox_s:>12.0f}"
            f"{r.idle_gb_s:>11.0f}{r.prewarms:>10}{r.prewarms_used:>7}{r.evictions:>7}{r.overflows:>9}"
            f"{r.peak_mb / 1024:>8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--budget-mb", type=float, default=DEFAULT_BUDGET_MB)
    parser.add_argument(
        "--sensitivity", action="store_true", help="also run the histogram at other prices of a cold start"
    )
    ns = parser.parse_args()
    for seed in ns.seeds:
        t0 = time.perf_counter()
        trace = generate(ns.functions, ns.days * SECONDS_PER_DAY, seed)
        s = trace.summary()
        print(
            f"\ntrace seed={seed}: {s['functions']} functions, {s['invocations']} invocations over "
            f"{s['days']:.1f} days, {s['share_invoked_at_most_hourly']:.0%} invoked at most hourly"
        )
        unlimited = run_all(trace, None, sensitivity=ns.sensitivity)
        print(table(unlimited, "unlimited memory"))
        fixed, hist = unlimited[:2]
        cut = 1 - hist.cold_starts / max(fixed.cold_starts, 1)
        idle_ratio = hist.idle_sandbox_s / max(fixed.idle_sandbox_s, 1e-9)
        goal = "met" if cut >= 0.5 and idle_ratio <= 1.0 else "NOT met"
        print(
            f"histogram vs fixed 10 min: {cut:.0%} fewer cold starts, idle sandbox-seconds x{idle_ratio:.2f} "
            f"(goal >= 50% fewer at <= x1.00: {goal}; a cold start priced at "
            f"{COLD_START_COST_WINDOWS:g} x {FIXED_WINDOW_S / 60:.0f} min of idle time)"
        )
        for r in unlimited[2:]:
            if r.name.startswith("histogram"):
                print(
                    f"  {r.name}: {1 - r.cold_starts / max(fixed.cold_starts, 1):.0%} fewer, "
                    f"x{r.idle_sandbox_s / max(fixed.idle_sandbox_s, 1e-9):.2f}"
                )
        same = fixed_at_same_idle(unlimited, hist)
        if same is not None:
            print(
                f"a fixed window with the histogram's idle sandbox-seconds: ~{same:.0f} cold starts "
                f"(interpolated); the histogram has {1 - hist.cold_starts / same:.0%} fewer"
            )
        print()
        print(table(run_all(trace, ns.budget_mb), f"memory budget {ns.budget_mb / 1024:.0f} GiB"))
        print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
