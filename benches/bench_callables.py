"""Python-native functions: ``map`` against ProcessPoolExecutor.map, a callable's warm call against ``code=``, and
what deploying a callable costs. Every figure is a ratio measured side by side in this one run.

Run: ``python benches/bench_callables.py [--items 3000] [--rounds 5] [--calls 2000]``.

- ``map`` over ``--items`` no-op inputs with 2 sandboxes vs ``ProcessPoolExecutor(2).map`` (default chunksize):
  throughput, medians of alternating rounds (goal >= 2x);
- a deployed callable's warm call vs the same function deployed as ``code=``: p50 (goal <= 1.05x, no per-call
  unpickling);
- ``deploy`` of a callable and of the same code, and each one's first (cold) call: p50 over fresh names.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import anyio

import minifaas

NOOP_CODE = "def main(args):\n    return {}\n"


def noop(args: dict[str, Any]) -> dict[str, Any]:
    return {}


def ppe_noop(args: dict[str, Any]) -> dict[str, Any]:
    return {}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def ppe_map_rate(items: int) -> float:
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(ppe_noop, [{"i": i} for i in range(100)]))  # workers started and warm
        t0 = time.perf_counter()
        out = list(ex.map(ppe_noop, [{"i": i} for i in range(items)]))
        elapsed = time.perf_counter() - t0
    assert len(out) == items
    return items / elapsed


async def engine_map_rate(fn: minifaas.Function, items: int) -> float:
    async for _ in fn.map({"i": i} for i in range(100)):  # both sandboxes warm
        pass
    t0 = time.perf_counter()
    n = 0
    async for _ in fn.map({"i": i} for i in range(items)):
        n += 1
    elapsed = time.perf_counter() - t0
    assert n == items
    return items / elapsed


async def warm_p50(fn: minifaas.Function, calls: int) -> float:
    for _ in range(50):
        await fn.invoke({})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn.invoke({})
        times.append(time.perf_counter() - t0)
    return pct(times, 0.5)


async def main_async(ns: argparse.Namespace) -> None:
    async with minifaas.Engine() as engine:
        mapped = await engine.deploy("noop", noop, max_sandboxes=2)
        eng_rates: list[float] = []
        ppe_rates: list[float] = []
        for _ in range(ns.rounds):  # alternating rounds: both see the same machine
            eng_rates.append(await engine_map_rate(mapped, ns.items))
            ppe_rates.append(await anyio.to_thread.run_sync(ppe_map_rate, ns.items))
        eng, ppe = statistics.median(eng_rates), statistics.median(ppe_rates)
        print(f"map over {ns.items:,} no-op items, 2 workers (medians of {ns.rounds} alternating rounds)")
        print(f"  minifaas Function.map         {eng:10,.0f}/s   rounds {[round(r) for r in eng_rates]}")
        print(f"  ProcessPoolExecutor(2).map    {ppe:10,.0f}/s   rounds {[round(r) for r in ppe_rates]}")
        print(f"  ratio {eng / ppe:.2f}x (goal >= 2x)")

        by_value = await engine.deploy("warm_callable", noop, max_sandboxes=1)
        by_code = await engine.deploy("warm_code", code=NOOP_CODE, max_sandboxes=1)
        cal, cod = [], []
        for _ in range(ns.rounds):
            cal.append(await warm_p50(by_value, ns.calls))
            cod.append(await warm_p50(by_code, ns.calls))
        c, d = statistics.median(cal), statistics.median(cod)
        print(f"warm call p50 ({ns.calls} calls x {ns.rounds} alternating rounds)")
        print(f"  callable {c * 1e6:7.1f} us   code= {d * 1e6:7.1f} us   ratio {c / d:.3f}x (goal <= 1.05x)")

        dep_c, dep_s, cold_c, cold_s = [], [], [], []
        for i in range(ns.deploys):

            def fresh(args: dict[str, Any], _i: int = i) -> dict[str, Any]:
                return {"i": _i}

            t0 = time.perf_counter()
            h = await engine.deploy(f"cold_callable_{i}", fresh)
            dep_c.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await h.invoke({})
            cold_c.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await engine.deploy(f"cold_code_{i}", code=f"def main(args):\n    return {{'i': {i}}}\n")
            dep_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await engine.invoke(f"cold_code_{i}", {})
            cold_s.append(time.perf_counter() - t0)
            await anyio.sleep(0.05)  # the zygote's next spare is ready, for both alike
        ms = 1e3
        print(f"deploy and first (cold) call, p50 of {ns.deploys} fresh functions each")
        print(
            f"  deploy:     callable {pct(dep_c, 0.5) * ms:6.2f} ms   code= {pct(dep_s, 0.5) * ms:6.2f} ms   "
            f"ratio {pct(dep_c, 0.5) / pct(dep_s, 0.5):.2f}x"
        )
        print(
            f"  cold call:  callable {pct(cold_c, 0.5) * ms:6.2f} ms   code= {pct(cold_s, 0.5) * ms:6.2f} ms   "
            f"ratio {pct(cold_c, 0.5) / pct(cold_s, 0.5):.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--deploys", type=int, default=20)
    anyio.run(main_async, parser.parse_args())


async def _table_round(items: int, calls: int) -> list[dict[str, Any]]:
    async with minifaas.Engine() as engine:
        mapped = await engine.deploy("noop", noop, max_sandboxes=2)
        eng = await engine_map_rate(mapped, items)
        ppe = await anyio.to_thread.run_sync(ppe_map_rate, items)
        by_value = await engine.deploy("warm_callable", noop, max_sandboxes=1)
        by_code = await engine.deploy("warm_code", code=NOOP_CODE, max_sandboxes=1)
        cal = await warm_p50(by_value, calls)
        cod = await warm_p50(by_code, calls)
    return [
        {
            "key": "map_vs_ppe",
            "label": f"`Function.map` over {items:,} no-op items, 2 sandboxes, vs `ProcessPoolExecutor(2).map`",
            "value": eng / ppe,
            "unit": "x",
            "goal": ">= 2x",
            "figures": {"minifaas /s": eng, "ProcessPoolExecutor /s": ppe},
        },
        {
            "key": "callable_vs_code",
            "label": "a deployed callable's warm call p50 vs the same function as `code=`",
            "value": cal / cod,
            "unit": "x",
            "goal": "<= 1.05x",
            "figures": {"callable us": cal * 1e6, "code= us": cod * 1e6},
        },
    ]


def table_rows(items: int = 3000, calls: int = 2000) -> list[dict[str, Any]]:
    """One round for ``benches/readme_table.py``."""
    return anyio.run(_table_round, items, calls)


if __name__ == "__main__":
    main()
