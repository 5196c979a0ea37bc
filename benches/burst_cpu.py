"""CPU time a burst costs, figures that hold on a loaded machine where wall times do not: the host's CPU for a burst
of 8 cold starts (the first after 5 s idle, and later ones), the zygote's and its spares' CPU while the burst's
INITs run (from the burst's start to its last INIT_DONE: refills there compete with them), and the host's CPU per
back-to-back cold start. Medians of the rounds.

Run: ``python benches/burst_cpu.py``; to compare two versions, run it with each one's interpreter, alternating.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import anyio

import minifaas

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import profile_bursts as pb

from tests.helpers.proc import children

SLEEP_20MS = "import time\ndef main(args):\n    time.sleep(0.02)\n    return {}\n"
NOOP = "def main(args):\n    return {}\n"
BURST = 8
ROUNDS = 4
#: longer than the interval the spares' PSS was read at (on the launch path, before)
IDLE_S = 5.5


async def run() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"burst_first_host": [], "burst_host": [], "zygote_during_inits": [], "b2b_host": []}
    async with minifaas.Engine(launcher="zygote", max_sandboxes=200, max_spares=BURST) as engine:
        await engine.deploy("teach", code=SLEEP_20MS, max_sandboxes=BURST)
        async with anyio.create_task_group() as tg:
            for _ in range(BURST):
                tg.start_soon(engine.invoke, "teach")
        for k in range(ROUNDS):
            with anyio.fail_after(60):
                while len(engine.stats()["launcher_stats"]["spares_ready"]) < BURST:
                    await anyio.sleep(0.05)
            await anyio.sleep(IDLE_S if k == 0 else 0.3)
            zygote = engine.stats()["launcher_stats"]["zygote_pid"]
            await engine.deploy(f"fresh{k}", code=SLEEP_20MS, max_sandboxes=BURST)
            pb.TIMELINE.clear()
            before = {pid: pb.cpu_ns(pid) for pid in [zygote, *children(zygote)]}
            c0 = time.thread_time()
            async with anyio.create_task_group() as tg:
                for _ in range(BURST):
                    tg.start_soon(engine.call, f"fresh{k}")
                while sum(1 for tl in pb.TIMELINE.values() if "init_done" in tl) < BURST:
                    await anyio.sleep(0)
                at = {pid: pb.cpu_ns(pid) for pid in [zygote, *children(zygote)]}
            out["burst_first_host" if k == 0 else "burst_host"].append((time.thread_time() - c0) * 1000)
            fresh = set(engine.stats()["functions"][f"guest/fresh{k}@1"]["pids"])
            spent = sum(ns - before.get(pid, 0) for pid, ns in at.items() if pid not in fresh)
            out["zygote_during_inits"].append(spent / 1e6)
            await engine.delete(f"fresh{k}")
        for i in range(20):
            await engine.deploy(f"b2b{i}", code=NOOP)
            c0 = time.thread_time()
            await engine.call(f"b2b{i}")
            out["b2b_host"].append((time.thread_time() - c0) * 1000)
    return out


def main() -> None:
    pb.instrument()
    r = anyio.run(run)
    print(json.dumps({f"{k}_cpu_ms": round(statistics.median(v), 2) for k, v in r.items()}))


if __name__ == "__main__":
    main()
