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
    python benches/bench_keepalive.py --bursty-only         # only the zygote's spares on bursty traces

Bursty traces (``trace_gen.BURSTY_MIX``: concurrent bursts and timers on the clock besides the usual mix) replay
through the same pool (fixed 10 min keep-alive) with the zygote's spares (``benches/spares_replay.py``: the engine's
own ``SpareSizer``, the zygote's loop on the fake clock with measured fork times): each row sizes the spares
differently, and says how long launches waited for a process and how many spare-seconds that cost.

The cost-aware histogram's one knob (``COLD_START_COST_WINDOWS``) was picked on seeds 1-5: the default seeds are
6-10, traces it was not tuned on. Rows are named for what they run; none is the paper's policy as published (that
uses ARIMA for rarely called functions; here the long-idle predictor stands in, see minifaas/_core/keepalive.py).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pool_replay import LruEvictor, PoolReplay, Result
from spares_replay import SPARE_PSS_MIB, ZygoteReplay
from trace_gen import BURSTY_MIX, SECONDS_PER_DAY, Trace, generate

from minifaas._core.keepalive import (
    COLD_START_COST_WINDOWS,
    Decision,
    FixedPolicy,
    GreedyDualEvictor,
    HistogramPolicy,
    KeepAlivePolicy,
)
from minifaas._core.spares import HALF_LIFE_S, SpareSizer
from minifaas._core.zygote import DEFAULT_MAX_SPARES

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


#: (row, min_spares, max_spares, half-life s): the engine's default, the fixed sizes around it, other half-lives
SPARE_SETUPS: tuple[tuple[str, int, int, float], ...] = (
    ("no spare (fork on request)", 0, 0, HALF_LIFE_S),
    ("one spare (max_spares=1)", 1, 1, HALF_LIFE_S),
    (f"by demand, 1-{DEFAULT_MAX_SPARES} (minifaas)", 1, DEFAULT_MAX_SPARES, HALF_LIFE_S),
    (f"by demand, half-life {HALF_LIFE_S / 4:g} s", 1, DEFAULT_MAX_SPARES, HALF_LIFE_S / 4),
    (f"by demand, half-life {HALF_LIFE_S * 4:g} s", 1, DEFAULT_MAX_SPARES, HALF_LIFE_S * 4),
    (f"always {DEFAULT_MAX_SPARES} spares", DEFAULT_MAX_SPARES, DEFAULT_MAX_SPARES, HALF_LIFE_S),
)


def _zygote(sizer: SpareSizer, made: list[ZygoteReplay], t0: float) -> ZygoteReplay:
    made.append(ZygoteReplay(sizer, t0))
    return made[-1]


def run_spares(trace: Trace) -> list[tuple[str, Result, ZygoteReplay]]:
    """The trace through the pool (fixed 10 min) once per way of sizing the zygote's spares."""
    rows = []
    for name, lo, hi, half_life in SPARE_SETUPS:
        sizer = SpareSizer(min_spares=lo, max_spares=hi, half_life_s=half_life)
        made: list[ZygoteReplay] = []
        zygote = functools.partial(_zygote, sizer, made)
        result = PoolReplay(trace, FixedPolicy(FIXED_WINDOW_S), name=name, budget_mb=None, zygote=zygote).run()
        rows.append((name, result, made[0]))
    return rows


def spares_table(rows: list[tuple[str, Result, ZygoteReplay]]) -> str:
    head = (
        f"{'spares':<32}{'launches':>9}{'spare':>7}{'wait p50':>9}{'p90':>6}{'p99':>6}{'max':>6}{'total s':>8}"
        f"{'spare-s':>9}{'mean':>6}{'MiB-s':>9}{'forked':>8}{'unused':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, _result, z in rows:
        lines.append(
            f"{name:<32}{len(z.waits_s):>9}{z.from_spares / max(len(z.waits_s), 1):>7.0%}{z.wait_ms(0.5):>9.1f}"
            f"{z.wait_ms(0.9):>6.1f}{z.wait_ms(0.99):>6.1f}{max(z.waits_s, default=0) * 1000:>6.1f}"
            f"{sum(z.waits_s):>8.1f}{z.spare_s:>9.0f}{z.mean_spares:>6.2f}{z.spare_s * SPARE_PSS_MIB:>9.0f}"
            f"{z.spares_forked:>8}{z.spares_discarded:>7}"
        )
    return "\n".join(lines)


def report_spares(trace: Trace) -> None:
    s = trace.summary()
    print(
        f"\nbursty trace seed={trace.seed}: {s['functions']} functions {s['functions_by_kind']}, "
        f"{s['invocations']} invocations over {s['days']:.1f} days; keep-alive fixed {FIXED_WINDOW_S / 60:.0f} min"
    )
    print("launch wait (ms): from a sandbox's launch to a process serving it (hand-over or fork); spare-s: spares held")
    print(f"x seconds (MiB-s at {SPARE_PSS_MIB} MiB PSS each); forked/unused: spares forked, discarded never used")
    rows = run_spares(trace)
    print(spares_table(rows))
    one, demand = rows[1][2], rows[2][2]
    print(
        f"by demand vs one spare: launch wait p50 {demand.wait_ms(0.5):.1f} vs {one.wait_ms(0.5):.1f} ms, p99 "
        f"{demand.wait_ms(0.99):.1f} vs {one.wait_ms(0.99):.1f} ms, total {sum(demand.waits_s):.0f} vs "
        f"{sum(one.waits_s):.0f} s ({1 - sum(demand.waits_s) / max(sum(one.waits_s), 1e-9):.0%} less), "
        f"for x{demand.spare_s / max(one.spare_s, 1e-9):.2f} the spare-seconds ({demand.mean_spares:.2f} spares held "
        f"on average, {(demand.spare_s - one.spare_s) * SPARE_PSS_MIB / (s['days'] * SECONDS_PER_DAY):.1f} MiB more)"
    )


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
    parser.add_argument("--bursty-only", action="store_true", help="only the spares on bursty traces")
    ns = parser.parse_args()
    for seed in [] if ns.bursty_only else ns.seeds:
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
    for seed in ns.seeds:
        report_spares(generate(ns.functions, ns.days * SECONDS_PER_DAY, seed, mix=BURSTY_MIX))


if __name__ == "__main__":
    main()
