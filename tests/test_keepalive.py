"""Keep-alive policies and Greedy-Dual eviction on a fake clock, and the trace replay of the benchmark."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from minifaas._keepalive import Candidate, Decision, FixedPolicy, GreedyDualEvictor, HistogramPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import bench_keepalive
import trace_gen

MIN = 60.0


def replay(policy: HistogramPolicy | FixedPolicy, fn: str, starts: list[float], run_s: float) -> Decision:
    """Invoke ``fn`` at each start for ``run_s`` seconds; return the decision after the last invocation."""
    for t in starts:
        policy.on_invocation_start(fn, t)
        policy.on_invocation_end(fn, t + run_s)
    return policy.decide(fn, starts[-1] + run_s)


def test_fixed_policy_keeps_every_sandbox_for_its_window() -> None:
    pol = FixedPolicy(idle_timeout_s=600)
    assert replay(pol, "f", [0.0, 30.0], 1.0) == Decision(unload_at=None, prewarm_at=None, keep_until=631.0)
    pol.configure("g", 5.0)
    assert pol.decide("g", 100.0).keep_until == 105.0
    assert pol.decide("f", 100.0).keep_until == 700.0
    with pytest.raises(ValueError):
        FixedPolicy(-1)


def test_histogram_prewarms_a_timer_function_just_before_it_fires() -> None:
    pol = HistogramPolicy(fallback_s=600)
    period, run = 10 * MIN, 6.0  # idle time 9 min 54 s: bin 9 (9-10 min)
    starts = [i * period for i in range(12)]
    # until it has seen MIN_IDLE_SAMPLES idle times, the histogram is not trusted: the fixed window applies
    early = replay(pol, "timer", starts[:5], run)
    assert early == Decision(unload_at=None, prewarm_at=None, keep_until=starts[4] + run + 600)
    assert not pol.representative("timer")
    end = starts[-1] + run
    d = replay(pol, "timer", starts[5:], run)
    assert pol.representative("timer")
    # unload now, pre-warm at the 5th percentile's bin start (9 min) - 10%, keep to its bin end (10 min) + 10%
    assert d.unload_at == end
    assert d.prewarm_at == pytest.approx(end + 9 * MIN * 0.9)
    assert d.keep_until == pytest.approx(end + 10 * MIN * 1.1)
    # the next invocation falls inside the pre-warmed window
    assert d.prewarm_at is not None
    assert d.prewarm_at < starts[-1] + period < d.keep_until


def test_histogram_keeps_a_frequent_function_warm_instead_of_unloading() -> None:
    pol = HistogramPolicy()
    starts = [i * 20.0 for i in range(30)]  # idle times of ~19 s: the 5th percentile is in bin 0
    d = replay(pol, "hot", starts, 1.0)
    end = starts[-1] + 1.0
    assert (d.unload_at, d.prewarm_at) == (None, None)
    assert d.keep_until == pytest.approx(end + MIN * 1.1)


def test_histogram_falls_back_when_idle_times_are_flat_or_out_of_bounds() -> None:
    # one idle time in each 1-minute bin of the 4 hours: a flat histogram predicts nothing (CV of counts = 0)
    flat = HistogramPolicy(fallback_s=300)
    t, starts = 0.0, []
    for b in range(241):
        starts.append(t)
        t += b * MIN + 30.0
    d = replay(flat, "flat", starts, 0.0)
    assert flat.describe("flat")["bin_count_cv"] == 0.0
    assert d == Decision(None, None, starts[-1] + 300)

    # idle times of 5 hours, beyond the 4-hour histogram
    rare = HistogramPolicy(fallback_s=300)
    d = replay(rare, "rare", [i * 5 * 3600.0 for i in range(20)], 0.0)
    assert rare.describe("rare")["out_of_bounds"] == 19
    assert not rare.representative("rare")
    assert d.prewarm_at is None


def test_overlapping_invocations_are_not_idle_time() -> None:
    pol = HistogramPolicy()
    pol.on_invocation_start("f", 0.0)
    pol.on_invocation_start("f", 5.0)  # the function is busy: no idle time to record
    pol.on_invocation_end("f", 10.0)
    pol.on_invocation_end("f", 20.0)  # idle from here
    pol.on_invocation_start("f", 200.0)
    assert pol.describe("f")["samples"] == 1
    assert pol._fns["f"].counts[3] == 1  # 180 s after the last end


def test_extra_idle_sandboxes_of_a_function_get_the_shorter_window() -> None:
    pol = HistogramPolicy(fallback_s=600)
    starts = [i * 2 * 3600.0 for i in range(12)]  # idle 1:59:59, bin 119: keep-alive 2 h + 10%
    end = starts[-1] + 1.0
    first = replay(pol, "f", starts, 1.0)
    assert first.keep_until == pytest.approx(end + 120 * MIN * 1.1)
    extra = pol.decide("f", end, warm=1)
    assert extra == Decision(unload_at=None, prewarm_at=None, keep_until=end + 600)


def test_greedy_dual_evicts_the_cheap_functions_before_the_model() -> None:
    gd = GreedyDualEvictor()
    model = Candidate("model", memory_mb=512, cold_cost_ms=4000, warm_cost_ms=100, frequency=10)
    gd.touch(model.ident)  # used first: LRU would throw it out first
    cheap = [
        Candidate(f"cheap{i}", memory_mb=256, cold_cost_ms=300, warm_cost_ms=10, frequency=10)
        for i in range(6)
    ]
    for c in cheap:
        gd.touch(c.ident)
    victims = gd.choose_victims([model, *cheap], need_mb=512)
    assert [v.fn for v in victims] == ["cheap0", "cheap1"]
    # the clock rose to the evicted priority (Greedy-Dual aging)
    assert gd.clock == pytest.approx(10 * 290 / 256)
    assert gd.choose_victims([model], need_mb=1024) == []  # even all of them would not free enough
    assert gd.choose_victims([model, *cheap], need_mb=0) == []


def test_greedy_dual_aging_evicts_an_unused_model_in_the_end() -> None:
    gd = GreedyDualEvictor()
    model = Candidate("model", memory_mb=512, cold_cost_ms=4000, warm_cost_ms=100, frequency=10)
    gd.touch(model.ident)
    rounds = 0
    while True:
        # a stream of cheap functions, each freshly used at the current clock
        cheap = Candidate(f"cheap{rounds}", memory_mb=256, cold_cost_ms=300, warm_cost_ms=10, frequency=10)
        gd.touch(cheap.ident)
        victims = gd.choose_victims([model, cheap], need_mb=256)
        rounds += 1
        if victims[0].fn == "model":
            break
        assert rounds < 100
    # priority 10 x 3900 / 512 = 76.2; each cheap eviction adds 11.3 to the clock
    assert rounds == math.ceil((10 * 3900 / 512) / (10 * 290 / 256))


def test_trace_generator_is_seeded_and_azure_like() -> None:
    a = trace_gen.generate(n_functions=40, duration_s=trace_gen.SECONDS_PER_DAY, seed=7)
    b = trace_gen.generate(n_functions=40, duration_s=trace_gen.SECONDS_PER_DAY, seed=7)
    c = trace_gen.generate(n_functions=40, duration_s=trace_gen.SECONDS_PER_DAY, seed=8)
    assert a.invocations == b.invocations
    assert a.invocations != c.invocations
    assert all(x.t <= y.t for x, y in zip(a.invocations, a.invocations[1:], strict=False))
    kinds = {p.kind for p in a.functions.values()}
    assert kinds == {"periodic", "pareto", "lognormal", "bursty", "rare"}


def test_replay_of_timer_functions_histogram_beats_fixed() -> None:
    """Timers firing every 15 minutes: a 10-minute window misses every call, the histogram pre-warms."""
    trace = trace_gen.generate(
        n_functions=10, duration_s=trace_gen.SECONDS_PER_DAY, seed=3, mix={"periodic": 1.0}
    )
    periods = {}
    for fn in trace.functions:
        ts = [inv.t for inv in trace.invocations if inv.fn == fn]
        periods[fn] = round((ts[-1] - ts[0]) / (len(ts) - 1))
    slow = {fn for fn, period in periods.items() if period > 660}
    assert slow, periods
    trace.invocations = [inv for inv in trace.invocations if inv.fn in slow]
    trace.functions = {fn: trace.functions[fn] for fn in slow}
    fixed = bench_keepalive.PoolSim(trace, FixedPolicy(600), name="fixed", budget_mb=None).run()
    hist = bench_keepalive.PoolSim(trace, HistogramPolicy(fallback_s=600), name="hist", budget_mb=None).run()
    assert fixed.cold_starts == fixed.invocations  # every idle time exceeds the window
    assert hist.cold_starts <= len(slow) * 12  # cold only while the histogram learns
    assert hist.idle_sandbox_s < fixed.idle_sandbox_s
    assert hist.prewarms_used >= hist.invocations - hist.cold_starts


def test_replay_greedy_dual_keeps_the_model_through_bursts_of_cheap_functions() -> None:
    """Every 5 minutes a model function runs, then a burst of 10 cheap ones that does not fit next to it."""
    model = trace_gen.FunctionProfile("model", "periodic", memory_mb=1024, cold_ms=4000.0, warm_ms=100.0)
    cheap = [
        trace_gen.FunctionProfile(f"cheap{i}", "bursty", 256, cold_ms=300.0, warm_ms=10.0) for i in range(10)
    ]
    cycles = 24
    invs = []
    for k in range(cycles):
        t = k * 300.0
        invs.append(trace_gen.Invocation(t, "model", 0.1))
        invs += [trace_gen.Invocation(t + 150.0 + i, p.name, 0.01) for i, p in enumerate(cheap)]
    trace = trace_gen.Trace({p.name: p for p in [model, *cheap]}, invs, cycles * 300.0, seed=0)
    budget = 2048  # the model and 4 cheap sandboxes
    results = {}
    for name, evictor in (("lru", None), ("greedy-dual", GreedyDualEvictor())):
        sim = bench_keepalive.PoolSim(
            trace, FixedPolicy(math.inf), name=name, budget_mb=budget, evictor=evictor
        )
        results[name] = sim.run()
        assert results[name].peak_mb <= budget
        assert results[name].overflows == 0
    assert results["lru"].cold_by_fn["model"] == cycles  # least recently used when every burst comes
    assert results["greedy-dual"].cold_by_fn["model"] == 1  # only its first call
    assert results["greedy-dual"].cold_cost_s < results["lru"].cold_cost_s
