"""Synthetic, seeded, bursty multi-function invocation traces shaped like the Azure Functions trace.

"Serverless in the Wild" (ATC'20) found that invocation rates span eight orders of magnitude, that about half
of the applications have timer triggers (near-periodic idle times), that 45% are invoked at most once an hour,
and that the rest have heavy-tailed, bursty inter-arrival times. This generator mixes five kinds of functions:

=========  =======================================================================================
periodic   timer triggers: a period of 1 minute to 8 hours, a random phase and a few seconds of jitter
pareto     Pareto inter-arrival times (alpha 1.2-2.0, median 30 s-1 h): short gaps, a long tail of long ones
lognormal  lognormal inter-arrival times, median 1 minute-4 hours
bursty     on/off: bursts of ~20 calls a few seconds apart, separated by 20-90 minute lognormal gaps
rare       Poisson with a mean gap of 2-8 hours (mostly beyond a 4 h histogram)
=========  =======================================================================================

``BURSTY_MIX`` adds two kinds whose calls come at the same instant, so they meet no sandbox free and each takes a
cold start of its own, all at once (what the zygote's spares are sized for):

=========  =======================================================================================
flash      concurrent bursts: 2-32 calls within 50 ms (a fan-out, a client retrying in parallel), then
           a lognormal gap of 10-90 minutes
cron       timers on the clock (every 5, 15, 30 or 60 minutes at :00, within 50 ms): the functions
           sharing a period fire together
=========  =======================================================================================

A third of the functions are "model" functions: more memory and a cold start of seconds (loading a model),
the others are light (a cold start of a few hundred ms). Usage::

    python benches/trace_gen.py --functions 100 --days 3 --seed 1      # prints a summary
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable

SECONDS_PER_DAY = 86400.0
DEFAULT_MIX: dict[str, float] = {
    "periodic": 0.30,
    "pareto": 0.15,
    "lognormal": 0.20,
    "bursty": 0.15,
    "rare": 0.20,
}
#: up to 8 hours: timers beyond a 4-hour idle-time histogram exist (Azure's include daily ones)
TIMER_PERIODS_S = (60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0, 28800.0)
TIMER_PERIOD_WEIGHTS = (2, 3, 2, 2, 2, 3, 2, 1, 1, 1)
TIMER_JITTER_S = 2.0
#: the bursty traces: a quarter of concurrent bursts, a quarter of timers on the clock, the rest as DEFAULT_MIX
BURSTY_MIX: dict[str, float] = {"flash": 0.25, "cron": 0.25, **{k: v / 2 for k, v in DEFAULT_MIX.items()}}
#: a concurrent burst's calls arrive within this
FLASH_SPREAD_S = 0.05
FLASH_MAX_CALLS = 32
#: cron periods (s): every 5, 15, 30, 60 minutes, at the same phase for all
CRON_PERIODS_S = (300.0, 900.0, 1800.0, 3600.0)
MODEL_FUNCTION_SHARE = 1 / 3


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionProfile:
    name: str
    kind: str
    memory_mb: int
    #: sandbox start + init (+ model load) in ms: what a cold start adds to an invocation
    cold_ms: float
    #: median execution time in ms
    warm_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class Invocation:
    t: float
    fn: str
    duration_s: float


@dataclasses.dataclass
class Trace:
    functions: dict[str, FunctionProfile]
    invocations: list[Invocation]
    duration_s: float
    seed: int

    def summary(self) -> dict[str, object]:
        per_fn = Counter(inv.fn for inv in self.invocations)
        kinds = Counter(p.kind for p in self.functions.values())
        calls_by_kind: Counter[str] = Counter()
        for fn, n in per_fn.items():
            calls_by_kind[self.functions[fn].kind] += n
        hourly = sum(1 for fn in self.functions if per_fn[fn] <= self.duration_s / 3600.0)
        return {
            "functions": len(self.functions),
            "invocations": len(self.invocations),
            "days": self.duration_s / SECONDS_PER_DAY,
            "functions_by_kind": dict(kinds),
            "invocations_by_kind": dict(calls_by_kind),
            "share_invoked_at_most_hourly": round(hourly / max(len(self.functions), 1), 3),
            "median_calls_per_function": statistics.median(per_fn[fn] for fn in self.functions),
        }


def _arrivals(kind: str, rng: random.Random, duration_s: float) -> list[float]:
    gens: dict[str, Callable[[random.Random, float], list[float]]] = {
        "periodic": _periodic,
        "pareto": _renewal(lambda r: _pareto_gap(r)),
        "lognormal": _renewal(lambda r: _lognormal_gap(r)),
        "bursty": _bursty,
        "rare": _renewal(lambda r: _rare_gap(r)),
        "flash": _flash,
        "cron": _cron,
    }
    return gens[kind](rng, duration_s)


def _periodic(rng: random.Random, duration_s: float) -> list[float]:
    period = rng.choices(TIMER_PERIODS_S, weights=TIMER_PERIOD_WEIGHTS)[0]
    t = rng.uniform(0, period)
    out = []
    while t < duration_s:
        out.append(max(0.0, t + rng.gauss(0, TIMER_JITTER_S)))
        t += period
    return out


def _renewal(draw_factory: Callable[[random.Random], Callable[[], float]]) -> Callable[..., list[float]]:
    def gen(rng: random.Random, duration_s: float) -> list[float]:
        draw = draw_factory(rng)
        t = draw() * rng.random()
        out = []
        while t < duration_s:
            out.append(t)
            t += draw()
        return out

    return gen


def _pareto_gap(rng: random.Random) -> Callable[[], float]:
    alpha = rng.uniform(1.2, 2.0)
    median_s = math.exp(rng.uniform(math.log(30.0), math.log(3600.0)))
    xm = median_s / 2 ** (1 / alpha)
    return lambda: xm * rng.paretovariate(alpha)


def _lognormal_gap(rng: random.Random) -> Callable[[], float]:
    mu = rng.uniform(math.log(60.0), math.log(4 * 3600.0))
    sigma = rng.uniform(0.5, 1.5)
    return lambda: rng.lognormvariate(mu, sigma)


def _rare_gap(rng: random.Random) -> Callable[[], float]:
    mean_s = rng.uniform(2 * 3600.0, 8 * 3600.0)
    return lambda: rng.expovariate(1 / mean_s)


def _bursty(rng: random.Random, duration_s: float) -> list[float]:
    off_mu = rng.uniform(math.log(1200.0), math.log(5400.0))
    mean_burst = rng.uniform(5, 40)
    in_burst_gap_s = rng.uniform(0.5, 5.0)
    t = rng.lognormvariate(off_mu, 0.6) * rng.random()
    out = []
    while t < duration_s:
        n = 1 + int(rng.expovariate(1 / mean_burst))
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(1 / in_burst_gap_s)
        t += rng.lognormvariate(off_mu, 0.6)
    return [x for x in out if x < duration_s]


def _flash(rng: random.Random, duration_s: float) -> list[float]:
    gap_mu = rng.uniform(math.log(600.0), math.log(5400.0))
    mean_extra = rng.uniform(2.0, 10.0)
    t = rng.lognormvariate(gap_mu, 0.6) * rng.random()
    out = []
    while t < duration_s:
        n = min(FLASH_MAX_CALLS, 2 + int(rng.expovariate(1 / mean_extra)))
        out += [t + rng.uniform(0.0, FLASH_SPREAD_S) for _ in range(n)]
        t += rng.lognormvariate(gap_mu, 0.6)
    return sorted(x for x in out if x < duration_s)


def _cron(rng: random.Random, duration_s: float) -> list[float]:
    period = rng.choice(CRON_PERIODS_S)
    times = (k * period + rng.uniform(0.0, FLASH_SPREAD_S) for k in range(int(duration_s // period) + 1))
    return [t for t in times if t < duration_s]


def _profile(name: str, kind: str, rng: random.Random) -> FunctionProfile:
    if rng.random() < MODEL_FUNCTION_SHARE:
        memory = rng.choice((512, 1024, 2048))
        cold_ms = rng.uniform(1500.0, 5000.0)
        warm_ms = math.exp(rng.uniform(math.log(50.0), math.log(2000.0)))
    else:
        memory = rng.choice((128, 256, 256, 512))
        cold_ms = rng.uniform(150.0, 500.0)
        warm_ms = math.exp(rng.uniform(math.log(5.0), math.log(500.0)))
    return FunctionProfile(name, kind, memory, round(cold_ms, 1), round(warm_ms, 1))


def generate(
    n_functions: int = 100,
    duration_s: float = 3 * SECONDS_PER_DAY,
    seed: int = 1,
    mix: dict[str, float] | None = None,
) -> Trace:
    """``n_functions`` functions over ``duration_s`` seconds; the same seed gives the same trace."""
    mix = mix or DEFAULT_MIX
    rng = random.Random(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n_functions)
    functions: dict[str, FunctionProfile] = {}
    invocations: list[Invocation] = []
    for i, kind in enumerate(kinds):
        # one generator per function: adding a function does not reshuffle the others' arrivals
        frng = random.Random(rng.getrandbits(64))
        prof = _profile(f"f{i:03d}-{kind}", kind, frng)
        functions[prof.name] = prof
        sigma = 0.4
        for t in _arrivals(kind, frng, duration_s):
            dur_s = prof.warm_ms / 1000.0 * frng.lognormvariate(0.0, sigma)
            invocations.append(Invocation(t, prof.name, dur_s))
    invocations.sort(key=lambda inv: (inv.t, inv.fn))
    return Trace(functions, invocations, duration_s, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    trace = generate(ns.functions, ns.days * SECONDS_PER_DAY, ns.seed)
    for key, value in trace.summary().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
