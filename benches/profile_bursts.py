"""Where a burst's time goes: CPU time per process (``/proc/<pid>/task/*/schedstat``, ns) over the half second of
a burst of 8 cold starts (``bench_coldstart.py --only bursts``' scenario, a warm function running flat out), and each
new sandbox's timeline on the host's clock (launch asked, launched, INIT_DONE).

CPU time barely depends on how loaded the machine is, so the split holds on a shared machine where wall times do
not. Run: ``python benches/profile_bursts.py [--runs 3] [--max-spares 8]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import minifaas
from minifaas._core import sandbox as sandbox_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.proc import children

SLEEP_20MS = "import time\ndef main(args):\n    time.sleep(0.02)\n    return {}\n"
NOOP = "def main(args):\n    return {}\n"
BURST = 8
WINDOW_S = 0.5


def cpu_ns(pid: int) -> int:
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        pass
    return total


#: sandbox id -> event -> host perf_counter time
TIMELINE: dict[str, dict[str, float]] = collections.defaultdict(dict)


def instrument() -> None:
    """Stamp each sandbox's protocol steps on the host (wrapping the Sandbox methods, nothing else changed)."""
    orig_start, orig_init = sandbox_mod.Sandbox.start, sandbox_mod.Sandbox.init

    async def start(self: Any, *a: Any, **kw: Any) -> float:
        TIMELINE[self.id]["launch"] = time.perf_counter()
        out = await orig_start(self, *a, **kw)
        TIMELINE[self.id]["forked"] = time.perf_counter()
        return out

    async def init(self: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        out = await orig_init(self, *a, **kw)
        TIMELINE[self.id]["init_done"] = time.perf_counter()
        return out

    sandbox_mod.Sandbox.start = start  # type: ignore[method-assign]
    sandbox_mod.Sandbox.init = init  # type: ignore[method-assign]


async def one_run(max_spares: int) -> dict[str, Any]:
    TIMELINE.clear()
    async with minifaas.Engine(launcher="zygote", max_sandboxes=3 * BURST, max_spares=max_spares) as engine:
        await engine.deploy("teach", code=SLEEP_20MS, max_sandboxes=BURST)
        async with anyio.create_task_group() as tg:
            for _ in range(BURST):
                tg.start_soon(engine.invoke, "teach")
        with anyio.fail_after(60):
            while len(engine.stats()["launcher_stats"]["spares_ready"]) < max_spares:
                await anyio.sleep(0.01)
        await engine.deploy("hot", code=NOOP, max_sandboxes=1)
        await engine.invoke("hot")
        await engine.deploy("fresh", code=SLEEP_20MS, max_sandboxes=BURST)
        stats = engine.stats()
        zygote = stats["launcher_stats"]["zygote_pid"]
        hot = stats["functions"]["guest/hot@1"]["pids"][0]
        before = {pid: cpu_ns(pid) for pid in [os.getpid(), zygote, *children(zygote)]}
        stop = anyio.Event()
        hot_calls = [0]

        async def hot_loop() -> None:
            while not stop.is_set():
                await engine.invoke("hot")
                hot_calls[0] += 1

        ends: list[float] = []

        async def call() -> None:
            act = await engine.call("fresh")
            assert act.status == "success", act
            ends.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(hot_loop)
            await anyio.sleep(0.2)
            quiet_cpu = {pid: cpu_ns(pid) for pid in (os.getpid(), hot, zygote)}
            calls0 = hot_calls[0]
            await anyio.sleep(WINDOW_S)
            quiet_calls = hot_calls[0] - calls0
            quiet_cpu = {pid: cpu_ns(pid) - ns for pid, ns in quiet_cpu.items()}
            before = {pid: cpu_ns(pid) for pid in [os.getpid(), zygote, *children(zygote)]}
            calls0 = hot_calls[0]
            t0 = time.perf_counter()
            async with anyio.create_task_group() as burst:
                for _ in range(BURST):
                    burst.start_soon(call)
            await anyio.sleep(max(0.0, t0 + WINDOW_S - time.perf_counter()))
            after = {pid: cpu_ns(pid) for pid in [os.getpid(), zygote, *children(zygote)]}
            burst_calls = hot_calls[0] - calls0
            stop.set()
        fresh = set(engine.stats()["functions"]["guest/fresh@1"]["pids"])
        teach = set(engine.stats()["functions"]["guest/teach@1"]["pids"])
    split: dict[str, float] = collections.Counter()
    for pid, ns in after.items():
        ms = (ns - before.get(pid, 0)) / 1e6
        if pid == os.getpid():
            split["host"] += ms
        elif pid == zygote:
            split["zygote (forks)"] += ms
        elif pid == hot:
            split["hot sandbox"] += ms
        elif pid in fresh:
            split["burst sandboxes"] += ms
        elif pid in teach:
            split["other sandboxes"] += ms
        elif pid in before:
            split["old spares"] += ms
        else:
            split["new spares"] += ms
    steps = collections.defaultdict(list)
    for tl in TIMELINE.values():
        if "init_done" in tl and tl["launch"] >= t0:
            steps["launch->forked"].append((tl["forked"] - tl["launch"]) * 1000)
            steps["forked->init_done"].append((tl["init_done"] - tl["forked"]) * 1000)
            steps["launch at (from t0)"].append((tl["launch"] - t0) * 1000)
    return {
        "split_ms": dict(split),
        "quiet_ms": {"host": quiet_cpu[os.getpid()] / 1e6, "hot sandbox": quiet_cpu[hot] / 1e6},
        "hot_ratio": burst_calls / max(quiet_calls, 1),
        "slowest_ms": (max(ends) - t0) * 1000,
        "steps": {k: (round(min(v), 1), round(statistics.median(v), 1), round(max(v), 1)) for k, v in steps.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-spares", type=int, default=8)
    ns = ap.parse_args()
    instrument()
    for _ in range(ns.runs):
        r = anyio.run(one_run, ns.max_spares)
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["split_ms"].items()))
        quiet = ", ".join(f"{k} {v:.1f}" for k, v in r["quiet_ms"].items())
        print(f"load {os.getloadavg()[0]:.1f}; CPU ms in the burst's {WINDOW_S} s: {split}; quiet window: {quiet}")
        steps = r["steps"]
        print(f"  hot fn x{r['hot_ratio']:.2f}; slowest {r['slowest_ms']:.1f} ms; steps ms (min, p50, max): {steps}")


if __name__ == "__main__":
    main()
