"""Cold starts: a no-op function's first result through the engine, forked from the zygote vs a fresh interpreter,
and the memory of four pose-crop sandboxes forked from a zygote that holds their models.

Run: ``python benches/bench_coldstart.py [--n 30]``. Prints ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anyio

import minifaas

ROOT = Path(__file__).resolve().parent.parent
NOOP = "def main(args):\n    return {}\n"
MESSI = ROOT / "tests" / "data" / "images" / "messi5.jpg"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def cold_starts(launcher: str, n: int) -> list[float]:
    """Each sample deploys a new function (no warm sandbox) and times its first invocation to the result."""
    async with minifaas.Engine(launcher=launcher, max_sandboxes=4) as engine:  # type: ignore[arg-type]
        await engine.deploy("warmup", code=NOOP)
        await engine.invoke("warmup")  # the zygote (or the interpreter's page cache) is ready
        times = []
        for i in range(n):
            name = f"cold{i}"
            await engine.deploy(name, code=NOOP, idle_timeout_s=0.01)
            t = time.perf_counter()
            act = await engine.call(name)
            times.append((time.perf_counter() - t) * 1000)
            assert act.status == "success" and act.annotations["cold"], act
            await engine.delete(name)
        return times


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


async def crop_memory() -> tuple[int, int, int]:
    """PSS of one pose-crop sandbox, and of four, all forked from a zygote holding the models (plus the zygote)."""
    async with minifaas.Engine(launcher="zygote") as engine:
        await engine.deploy("crop", path=ROOT / "functions" / "smart_body_crop",
                            models=["detector_url", "landmark_url"], max_sandboxes=4, memory_mb=1024)
        image = MESSI.read_bytes()
        await engine.invoke("crop", {"image": image})
        zygote = engine.stats()["launcher_stats"]["zygote_pid"]
        pids = engine.stats()["functions"]["guest/crop@1"]["pids"]
        one = pss_kb(pids[0])
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(engine.invoke, "crop", {"image": image})
        pids = engine.stats()["functions"]["guest/crop@1"]["pids"]
        while len(pids) < 4:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(engine.invoke, "crop", {"image": image})
            pids = engine.stats()["functions"]["guest/crop@1"]["pids"]
        four = sum(pss_kb(pid) for pid in pids[:4])
        return one, four, pss_kb(zygote)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ns = ap.parse_args()
    fork = anyio.run(cold_starts, "zygote", ns.n)
    spawn = anyio.run(cold_starts, "spawn", ns.n)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'no-op cold start to first result':40s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(f"{'fork from the zygote':40s} {pct(fork, 0.5):8.1f} {pct(fork, 0.99):8.1f}")
    print(f"{'spawn sys.executable + same preload':40s} {pct(spawn, 0.5):8.1f} {pct(spawn, 0.99):8.1f}")
    print(f"ratio spawn/fork at p50: {pct(spawn, 0.5) / pct(fork, 0.5):.1f}x (goals: fork p50 <= 10 ms, >= 20x)")
    one, four, zygote = anyio.run(crop_memory)
    print()
    print(f"PSS of one pose-crop sandbox: {one / 1024:.1f} MiB; four: {four / 1024:.1f} MiB "
          f"({four / one:.2f}x one; goal <= 1.5x); the zygote holding the models: {zygote / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
