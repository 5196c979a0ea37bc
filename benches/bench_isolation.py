"""What ``isolation="sandbox"`` costs: cold start of a no-op (zygote with a ready spare), warm round trip and
throughput, against ``isolation="process"``, measured side by side in one engine, interleaved sample by sample so a
loaded machine slows both alike.

Also the set-up alone (``minifaas_sandbox.isolation.enter`` in a forked child, the spare's preparation done), which
is what a sandbox adds to a cold start.

Run: ``python benches/bench_isolation.py [--n 40]``. Prints medians and the ratios of this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import anyio

import minifaas

NOOP = "def main(args):\n    return {}\n"
MODES = ("process", "sandbox")
#: pause before each cold-start sample, for the zygote's spare to be forked and ready again
SAMPLE_GAP_S = 0.15
WARM_RUNS = 300
THROUGHPUT_S = 2.0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def cold_and_warm(n: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": [], "tput": []} for m in MODES}
    async with minifaas.Engine(max_sandboxes=4) as engine:
        await engine.deploy("warmup", code=NOOP)
        await engine.invoke("warmup", {})
        for i in range(n):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                name = f"cold-{mode}-{i}"
                await engine.deploy(name, code=NOOP, isolation=mode)  # type: ignore[arg-type]
                await anyio.sleep(SAMPLE_GAP_S)
                t0 = time.perf_counter()
                await engine.invoke(name, {})
                out[mode]["cold"].append((time.perf_counter() - t0) * 1000)
                await engine.delete(name)
        for mode in MODES:
            await engine.deploy(f"warm-{mode}", code=NOOP, isolation=mode)  # type: ignore[arg-type]
            await engine.invoke(f"warm-{mode}", {})
        for _ in range(WARM_RUNS):
            for mode in MODES:
                t0 = time.perf_counter()
                await engine.invoke(f"warm-{mode}", {})
                out[mode]["warm"].append((time.perf_counter() - t0) * 1000)
        for _ in range(3):
            for mode in MODES:
                done = 0
                end = time.perf_counter() + THROUGHPUT_S / 3
                while time.perf_counter() < end:
                    await engine.invoke(f"warm-{mode}", {})
                    done += 1
                out[mode]["tput"].append(done / (THROUGHPUT_S / 3))
    return out


def setup_cost(n: int) -> list[float]:
    """isolation.enter alone, in forked children of a process that did the spare's preparation."""
    from minifaas_sandbox import isolation

    isolation.prepare()
    samples: list[float] = []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            t0 = time.perf_counter()
            isolation.enter({}, network=True, memory_mb=64)
            os.write(w, str(time.perf_counter() - t0).encode())
            os._exit(0)
        os.close(w)
        samples.append(float(os.read(r, 64)) * 1000)
        os.close(r)
        os.waitpid(pid, 0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    ns = parser.parse_args()
    enter = setup_cost(ns.n)
    print(f"isolation.enter alone: p50 {statistics.median(enter):.2f} ms, p90 {pct(enter, 0.9):.2f} ms")
    res = anyio.run(cold_and_warm, ns.n)
    for mode in MODES:
        r = res[mode]
        print(
            f"{mode:8s} cold p50 {statistics.median(r['cold']):6.2f} ms p90 {pct(r['cold'], 0.9):6.2f} ms | "
            f"warm p50 {statistics.median(r['warm']) * 1000:7.1f} us | throughput {statistics.median(r['tput']):7.0f}/s"
        )
    p, s = res["process"], res["sandbox"]
    print(f"cold p50 ratio sandbox/process: {statistics.median(s['cold']) / statistics.median(p['cold']):.2f}x")
    print(f"warm p50 ratio sandbox/process: {statistics.median(s['warm']) / statistics.median(p['warm']):.2f}x")
    print(f"throughput ratio sandbox/process: {statistics.median(s['tput']) / statistics.median(p['tput']):.2f}x")


def table_rows(n: int = 12) -> list[dict[str, object]]:
    """One round for ``benches/readme_table.py``: ``isolation="sandbox"`` against ``"process"``."""
    res = anyio.run(cold_and_warm, n)
    p, s = res["process"], res["sandbox"]
    med = statistics.median
    return [
        {
            "key": "cold",
            "label": 'cold start of a no-op, `isolation="sandbox"` vs `"process"` (zygote with a ready spare)',
            "value": med(s["cold"]) / med(p["cold"]),
            "unit": "x",
            "goal": None,
            "figures": {"sandbox ms": med(s["cold"]), "process ms": med(p["cold"])},
        },
        {
            "key": "warm",
            "label": 'warm no-op p50, `isolation="sandbox"` vs `"process"`',
            "value": med(s["warm"]) / med(p["warm"]),
            "unit": "x",
            "goal": None,
            "figures": {"sandbox us": med(s["warm"]) * 1000, "process us": med(p["warm"]) * 1000},
        },
    ]


if __name__ == "__main__":
    main()
