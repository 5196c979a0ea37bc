"""Keep-alive policies replayed on a synthetic Azure-like trace through minifaas's own pool, on a fake clock.

Each row replays the trace through a fresh ``minifaas._pool.Pool`` (``benches/pool_replay.py``): the pool's own
routing, start, eviction, ``became_idle`` decisions and ``reap`` rounds (expiry of kept and pre-warmed sandboxes,
pre-warming) run unchanged; the replay plays the scheduler's part and stands in for sandbox processes (a load takes
the function's ``cold_ms`` on the fake clock, a call its duration). What is counted, per row:

- cold starts (calls whose sandbox was started for them) and the seconds calls waited for those starts;
- pre-warm loads (sandboxes the policy started ahead of a call), how many a call used, how many expired unused;
- the CPU time of loads, cold and pre-warm side by side (a load costs its ``cold_ms`` whoever asked for it);
- idle sandbox-seconds and idle GB-seconds (loaded and not running, kept and pre-warmed sandboxes alike);
- with a memory budget: evictions and calls that had to wait for memory.

Usage::

    python benches/bench_keepalive.py                       # 100 functions, 3 days, seeds 6-10, 24 GiB budget
    python benches/bench_keepalive.py --seeds 1 2 3 --budget-mb 16384
    python benches/bench_keepalive.py --sensitivity         # + the histogram at other prices of a cold start

The cost-aware histogram's one knob (``COLD_START_COST_WINDOWS``) was picked on seeds 1-5: the default seeds are
6-10, traces it was not tuned on. Rows are named for what they run; none is the paper's policy as published (that
uses ARIMA for rarely called functions; here the long-idle predictor stands in, see minifaas/_core/keepalive.py).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pool_replay import LruEvictor, PoolReplay, Result
from trace_gen import SECONDS_PER_DAY, Trace, generate

from minifaas._core.keepalive import (
    COLD_START_COST_WINDOWS,
    Decision,
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
#: traces the policy's knob was not tuned on (it was picked on seeds 1-5)
DEFAULT_SEEDS = (6, 7, 8, 9, 10)

__all__ = ("PoolReplay", "Result", "run_all")


class EverySandboxHistogram(HistogramPolicy):
    """The paper's windows for every idle sandbox of a function, not only its first (the pool's adaptation)."""

    def decide(self, fn: str, now: float, *, warm: int = 0) -> Decision:
        return super().decide(fn, now, warm=0)


def run_all(trace: Trace, budget_mb: float | None, *, sensitivity: bool = False) -> list[Result]:
    """Unlimited memory: fixed 10 min, the histogram as minifaas runs it, its variants and a sweep of fixed windows
    (where the histogram sits on the cold-start / idle-time frontier); with a budget: the evictors."""
    fallback = FIXED_WINDOW_S
    setups: list[tuple[str, KeepAlivePolicy, GreedyDualEvictor | None]] = [
        (f"fixed {fallback / 60:.0f} min", FixedPolicy(fallback), None),
        ("histogram (minifaas)", HistogramPolicy(fallback_s=fallback), None),
    ]
    if budget_mb is None:
        setups += [
            ("histogram, no predictor", HistogramPolicy(fallback_s=fallback, predict_long_idle=False), None),
            (
                "paper windows only",
                HistogramPolicy(fallback_s=fallback, cost_aware=False, predict_long_idle=False),
                None,
            ),
            ("paper windows + predictor", HistogramPolicy(fallback_s=fallback, cost_aware=False), None),
            (
                "paper windows, every sb",
                EverySandboxHistogram(fallback_s=fallback, cost_aware=False, predict_long_idle=False),
                None,
            ),
        ]
        if sensitivity:
            for w in SENSITIVITY_WINDOWS:
                pol = HistogramPolicy(fallback_s=fallback, cold_cost_s=w * fallback)
                setups.append((f"histogram, cold = {w:g} win", pol, None))
        setups += [(f"fixed {m} min", FixedPolicy(m * 60.0), None) for m in SWEEP_MINUTES]
    else:
        setups = [
            (f"fixed {fallback / 60:.0f} min + LRU", FixedPolicy(fallback), LruEvictor()),
            ("histogram + LRU", HistogramPolicy(fallback_s=fallback), LruEvictor()),
            ("greedy-dual, no TTL", FixedPolicy(math.inf), GreedyDualEvictor()),
            ("histogram + greedy-dual", HistogramPolicy(fallback_s=fallback), GreedyDualEvictor()),
        ]
    return [PoolReplay(trace, pol, name=name, budget_mb=budget_mb, evictor=ev).run() for name, pol, ev in setups]


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
        f"{'policy':<28}{'cold %':>7}{'cold':>7}{'prewarm':>8}{'used':>7}{'unused':>7}{'load CPU s':>11}"
        f"{'of which pre':>13}{'idle sb-s':>11}{'idle GB-s':>11}{'evict':>7}{'waits':>6}{'peak GB':>8}"
    )
    lines = [title, head, "-" * len(head)]
    for r in results:
        load_cpu = r.cold_load_cpu_s + r.prewarm_load_cpu_s
        lines.append(
            f"{r.name:<28}{r.cold_pct:>7.2f}{r.cold_starts:>7}{r.prewarms:>8}{r.prewarms_used:>7}"
            f"{r.prewarms_expired:>7}{load_cpu:>11.0f}{r.prewarm_load_cpu_s:>13.0f}{r.idle_sandbox_s:>11.0f}"
            f"{r.idle_gb_s:>11.0f}{r.evictions:>7}{r.waits:>6}{r.peak_mb / 1024:>8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
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
        fixed_cpu = fixed.cold_load_cpu_s + fixed.prewarm_load_cpu_s
        hist_cpu = hist.cold_load_cpu_s + hist.prewarm_load_cpu_s
        goal = "met" if cut >= 0.5 and idle_ratio <= 1.0 else "NOT met"
        print(
            f"histogram vs fixed 10 min: {cut:.0%} fewer cold starts, idle sandbox-seconds x{idle_ratio:.2f} "
            f"(goal >= 50% fewer at <= x1.00: {goal}; a cold start priced at "
            f"{COLD_START_COST_WINDOWS:g} x {FIXED_WINDOW_S / 60:.0f} min of idle time); load CPU "
            f"x{hist_cpu / max(fixed_cpu, 1e-9):.2f} ({hist.prewarms} pre-warm loads, "
            f"{hist.prewarms_expired} never used), idle GB-s x{hist.idle_gb_s / max(fixed.idle_gb_s, 1e-9):.2f}"
        )
        for r in unlimited[2:]:
            if not r.name.startswith("fixed"):
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
