"""What ``isolation="sandbox"`` costs: cold start of a no-op (zygote with a ready spare), warm round trip and
throughput, against ``isolation="process"``, measured side by side in one engine, interleaved sample by sample so a
loaded machine slows both alike.

Also the set-up alone (``minifaas_sandbox.isolation.enter`` in a child forked as pid 1 of a PID namespace of its
own), with and without the spare's preparation (``prepare_root``), in wall and CPU time: what a sandbox adds to a
cold start (CPU time is the figure a loaded machine does not blur).

Run: ``python benches/bench_isolation.py [--n 40]``. Prints medians, and each goal of issue 21 with this run's figure.
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
THROUGHPUT_ROUNDS = 4


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def cold_and_warm(n: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": [], "tput": [], "spare": []} for m in MODES}
    async with minifaas.Engine(max_sandboxes=4) as engine:
        await engine.deploy("warmup", code=NOOP)
        await engine.invoke("warmup", {})
        for i in range(n):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                name = f"cold-{mode}-{i}"
                await engine.deploy(name, code=NOOP, isolation=mode)  # type: ignore[arg-type]
                await anyio.sleep(SAMPLE_GAP_S)
                t0 = time.perf_counter()
                act = await engine.call(name, {})
                out[mode]["cold"].append((time.perf_counter() - t0) * 1000)
                # a cold start the zygote served from a spare ready for it (what the goal is about)
                out[mode]["spare"].append(1.0 if act.annotations.get("spare") else 0.0)
                await engine.delete(name)
        for mode in MODES:
            await engine.deploy(f"warm-{mode}", code=NOOP, isolation=mode)  # type: ignore[arg-type]
            await engine.invoke(f"warm-{mode}", {})
        for _ in range(WARM_RUNS):
            for mode in MODES:
                t0 = time.perf_counter()
                await engine.invoke(f"warm-{mode}", {})
                out[mode]["warm"].append((time.perf_counter() - t0) * 1000)
        for rnd in range(THROUGHPUT_ROUNDS):
            # alternating which mode goes first, as the cold starts do: a fixed order gave the second one whatever
            # the first left behind (a trim, a refill of spares)
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                done = 0
                end = time.perf_counter() + THROUGHPUT_S / THROUGHPUT_ROUNDS
                while time.perf_counter() < end:
                    await engine.invoke(f"warm-{mode}", {})
                    done += 1
                out[mode]["tput"].append(done / (THROUGHPUT_S / THROUGHPUT_ROUNDS))
    return out


def setup_cost(n: int, *, prepared: bool) -> tuple[list[float], list[float]]:
    """isolation.enter alone (wall and CPU ms), in children forked as a zygote forks a sandboxed spare (pid 1 of a
    PID namespace of its own, after the zygote's preparation); ``prepared``: the spare built its root's shared part
    ahead (isolation.prepare_root), as a zygote's spare does."""
    from minifaas_sandbox import isolation

    isolation.prepare()
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(n):
        r, w = os.pipe()
        pid = isolation.fork_in_pid_namespace()
        if pid == 0:
            if prepared:
                isolation.prepare_root()
            t0, c0 = time.perf_counter(), time.thread_time()
            isolation.enter({}, network=True, memory_mb=64)
            os.write(w, f"{time.perf_counter() - t0} {time.thread_time() - c0}".encode())
            os._exit(0)
        os.close(w)
        a, b = os.read(r, 128).split()
        wall.append(float(a) * 1000)
        cpu.append(float(b) * 1000)
        os.close(r)
        os.waitpid(pid, 0)
    return wall, cpu


def goal(what: str, value: float, limit: float, unit: str, *, at_least: bool = False) -> None:
    met = value >= limit if at_least else value <= limit
    sign = ">=" if at_least else "<="
    print(f"goal {what} {sign} {limit:g}{unit}: {value:.2f}{unit} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    ns = parser.parse_args()
    for prepared in (False, True):
        wall, cpu = setup_cost(ns.n, prepared=prepared)
        what = "after the spare's preparation" if prepared else "all of it at INIT (no spare)"
        print(
            f"isolation.enter, {what}: p50 {statistics.median(wall):.2f} ms wall, "
            f"{statistics.median(cpu):.2f} ms CPU, p90 {pct(wall, 0.9):.2f} ms wall"
        )
    res = anyio.run(cold_and_warm, ns.n)
    for mode in MODES:
        r = res[mode]
        print(
            f"{mode:8s} cold p50 {statistics.median(r['cold']):6.2f} ms p90 {pct(r['cold'], 0.9):6.2f} ms | "
            f"warm p50 {statistics.median(r['warm']) * 1000:7.1f} us | throughput {statistics.median(r['tput']):7.0f}/s"
            f" | cold starts from a spare {sum(r['spare']):.0f}/{len(r['spare'])}"
        )
    p, s = res["process"], res["sandbox"]
    goal("sandbox cold start p50", statistics.median(s["cold"]), 5.0, " ms")
    goal("cold p50 sandbox/process", statistics.median(s["cold"]) / statistics.median(p["cold"]), 1.3, "x")
    goal("warm p50 sandbox/process", statistics.median(s["warm"]) / statistics.median(p["warm"]), 1.05, "x")
    goal(
        "throughput sandbox/process",
        statistics.median(s["tput"]) / statistics.median(p["tput"]),
        0.95,
        "x",
        at_least=True,
    )


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
