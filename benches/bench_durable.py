"""What bounds durable throughput: the gap between durable records and the in-memory store, taken apart.

Run: ``python benches/bench_durable.py [--rounds 5] [--total 20000]``.

Each round measures the throughput of ``bench_core`` (a no-op, 2 sandboxes, 64 calls in flight) four ways, one after
the other, and medians of the per-round ratios to the in-memory store are printed:

    memory        the in-memory store
    durable       a ``state_dir`` (SQLite): the real thing
    no-sqlite     durable, with the writer's SQL statement skipped: the event loop's share (encoding rows, the
                  hand-over, the callbacks, the writer thread's Python sharing the GIL), without SQLite's CPU
    memory+bg     the in-memory store beside a separate process (no GIL shared) doing the writer's SQLite work
                  at the rate and transaction size the durable run had: SQLite's CPU alone, on the same cores

If ``memory+bg`` falls about as far below ``memory`` as ``durable`` does, the cost is the SQLite work competing for
the machine's cores with the event loop and the sandboxes, not anything done in the engine's own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import minifaas
from minifaas._core import store as store_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import drive

NOOP = "def main(args):\n    return {}\n"
WARMUP_CALLS = 300
INFLIGHT = 64


async def throughput(total: int, state_dir: str | None) -> tuple[float, dict[str, Any]]:
    async with minifaas.Engine(state_dir) as engine:
        await engine.deploy("noop", code=NOOP, max_sandboxes=2, max_queue=100_000)
        for _ in range(WARMUP_CALLS):
            await engine.call("noop")
        rate = await drive(engine, "noop", total, INFLIGHT)
        return rate, engine.stats()["store"]


def run(total: int, durable: bool) -> tuple[float, dict[str, Any]]:
    state_dir = tempfile.mkdtemp(prefix="minifaas-bench-") if durable else None
    try:
        return anyio.run(throughput, total, state_dir)
    finally:
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


def run_without_sqlite(total: int) -> float:
    real = store_module.SQLiteStore._commit
    store_module.SQLiteStore._commit = lambda self, rows: None  # type: ignore[method-assign,assignment]
    try:
        return run(total, True)[0]
    finally:
        store_module.SQLiteStore._commit = real  # type: ignore[method-assign]


def background_writer(rows_per_commit: int, commits_per_s: float, seconds: float) -> None:
    """In its own process: commit ``rows_per_commit`` final records ``commits_per_s`` times a second."""
    state_dir = Path(tempfile.mkdtemp(prefix="minifaas-bench-"))
    store = store_module.SQLiteStore(state_dir / store_module.DB_FILE_NAME)
    template = minifaas.Activation(
        activation_id="",
        name="noop",
        status="success",
        annotations={"kind": "python:3", "limits": {"timeout": 60000, "memory": 256}, "sandbox": "sb1"},
    )
    period = 1 / commits_per_s
    end = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < end:
            rows = []
            for _ in range(rows_per_commit):
                template.activation_id = f"{n:032x}"
                template.start = template.end = template.accepted = int(time.time() * 1000)
                rows.append(store_module._row(template))
                n += 1
            store._commit(rows)
            time.sleep(period)
    finally:
        store.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def run_beside_sqlite(total: int, rows_per_commit: int, rows_per_s: float) -> float:
    seconds = 4 * total / rows_per_s + 10  # outlasts the measurement (which starts after the engine's start)
    bg = subprocess.Popen(
        [sys.executable, __file__, "--bg", str(rows_per_commit), str(rows_per_s / rows_per_commit), str(seconds)]
    )
    try:
        time.sleep(0.3)
        return run(total, False)[0]
    finally:
        bg.kill()
        bg.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--total", type=int, default=20000)
    ap.add_argument("--bg", nargs=3, type=float, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.bg:
        background_writer(int(ns.bg[0]), ns.bg[1], ns.bg[2])
        return
    ratios: dict[str, list[float]] = {"durable": [], "no-sqlite": [], "memory+bg": []}
    rates: dict[str, list[float]] = {"memory": [], **{k: [] for k in ratios}}
    for _ in range(ns.rounds):
        memory, _ = run(ns.total, False)
        durable, stats = run(ns.total, True)
        no_sqlite = run_without_sqlite(ns.total)
        rows_per_commit = max(1, round(stats["rows_written"] / max(1, stats["commits"])))
        beside = run_beside_sqlite(ns.total, rows_per_commit, durable)
        for key, rate in (("memory", memory), ("durable", durable), ("no-sqlite", no_sqlite), ("memory+bg", beside)):
            rates[key].append(rate)
            if key != "memory":
                ratios[key].append(rate / memory)
        print(
            f"round: memory {memory:,.0f}/s, durable {durable:,.0f}/s ({rows_per_commit} rows a commit), "
            f"no-sqlite {no_sqlite:,.0f}/s, memory beside SQLite {beside:,.0f}/s",
            flush=True,
        )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {ns.rounds} rounds, {INFLIGHT} in flight")
    print(f"memory: {statistics.median(rates['memory']):,.0f}/s")
    for key, values in ratios.items():
        print(
            f"{key:10s} {statistics.median(rates[key]):9,.0f}/s  {statistics.median(values):.2f}x memory "
            f"(rounds {min(values):.2f}-{max(values):.2f})"
        )


if __name__ == "__main__":
    main()
