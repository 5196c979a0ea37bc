"""Core engine benchmark: warm invoke latency and throughput, side by side with ProcessPoolExecutor and a raw pipe.

Run: ``python benches/bench_core.py [--n 3000]``. Prints a table of ratios measured in this one run.

The engine runs with the in-memory store and with a durable one (a ``state_dir``: SQLite, written by the store's
writer thread with group commit), alternating round after round with the baselines; medians are compared.

By default the engine's event loop polls for a result around when it is due (``minifaas/_core/poll.py``), where the
two baselines sleep in ``recv``/``epoll_wait`` as they normally do; the engine is also measured with
``poll_us=0`` (sleeping like them), so the share of the polling in the figures is visible.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import anyio
import msgpack

import minifaas
from minifaas._core.poll import HOST_POLL_US

NOOP = "def main(args):\n    return {}\n"
#: issue 25's goals for durable records (a state_dir) against the in-memory store, medians of per-round ratios
DURABLE_P50_GOAL = 1.3
DURABLE_RATE_GOAL = 0.8


def noop() -> dict[str, object]:
    return {}


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def _pipe_child(conn_fd: int, parent_fd: int) -> None:
    import socket

    # the parent's end, inherited by fork: closed, so the parent closing it ends this loop
    os.close(parent_fd)
    s = socket.socket(fileno=conn_fd)
    while True:
        head = s.recv(4, socket.MSG_WAITALL)
        if not head:
            return
        n = int.from_bytes(head, "big")
        body = s.recv(n, socket.MSG_WAITALL)
        s.sendall(head + body)


def bench_raw_pipe(n: int, payload: bytes) -> list[float]:
    import socket

    a, b = socket.socketpair()
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_pipe_child, args=(b.fileno(), a.fileno()))
    proc.start()
    b.close()
    frame = len(payload).to_bytes(4, "big") + payload
    times = []
    for _ in range(n):
        t = time.perf_counter()
        a.sendall(frame)
        head = a.recv(4, socket.MSG_WAITALL)
        a.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
        times.append(time.perf_counter() - t)
    a.close()
    proc.join(5)
    return times


def bench_ppe_latency(n: int) -> list[float]:
    with ProcessPoolExecutor(1) as ex:
        ex.submit(noop).result()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ex.submit(noop).result()
            times.append(time.perf_counter() - t)
    return times


def bench_ppe_throughput(total: int, inflight: int) -> float:
    with ProcessPoolExecutor(2) as ex:
        for f in [ex.submit(noop) for _ in range(100)]:
            f.result()
        t = time.perf_counter()
        pending = []
        done = 0
        while done < total:
            while len(pending) < inflight and done + len(pending) < total:
                pending.append(ex.submit(noop))
            pending.pop(0).result()
            done += 1
        return total / (time.perf_counter() - t)


async def bench_engine(
    n: int, total: int, inflight: int, launcher: str, poll_us: int = HOST_POLL_US, durable: bool = False
) -> tuple[list[float], float, dict]:
    state_dir = tempfile.mkdtemp(prefix="minifaas-bench-") if durable else None
    try:
        return await _bench_engine(n, total, inflight, launcher, poll_us, state_dir)
    finally:
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


async def _bench_engine(
    n: int, total: int, inflight: int, launcher: str, poll_us: int, state_dir: str | None
) -> tuple[list[float], float, dict]:
    engine_ = minifaas.Engine(state_dir, launcher=launcher, poll_us=poll_us)  # type: ignore[arg-type]
    async with engine_ as engine:
        await engine.deploy("noop", code=NOOP, max_sandboxes=2, max_queue=100_000)
        for _ in range(200):
            await engine.call("noop")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            act = await engine.call("noop")
            times.append(time.perf_counter() - t)
            assert act.status == "success"
        # throughput: 2 sandboxes, `inflight` invocations outstanding at any time
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(engine.invoke, "noop")
        rate = await drive(engine, "noop", total, inflight)
        return times, rate, engine.stats()


async def drive(
    engine: minifaas.Engine, name: str, total: int, inflight: int, args: dict[str, Any] | None = None
) -> float:
    """Calls per second of ``total`` calls of ``name`` by ``inflight`` clients, each with one call outstanding."""
    remaining = total

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            act = await engine.call(name, args)
            assert act.status == "success", act

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(inflight):
            tg.start_soon(client)
    return total / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="latency samples")
    ap.add_argument("--total", type=int, default=20000, help="throughput invocations")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--launcher", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the engine and the baselines")
    ns = ap.parse_args()
    payload = msgpack.packb([4, {"aid": "0" * 32, "args": b"\x80", "deadline": 0, "version": "1"}])
    # the machine drifts (frequency, other load): the engine and its baselines alternate, round after round, and
    # the medians are compared
    eng_lats: list[float] = []
    sleepy_lats: list[float] = []
    ppe_lats: list[float] = []
    raws: list[float] = []
    eng_rates: list[float] = []
    sleepy_rates: list[float] = []
    ppe_rates: list[float] = []
    durable_lats: list[float] = []
    durable_rates: list[float] = []
    durable_p50s: list[float] = []
    memory_p50s: list[float] = []
    for _ in range(ns.rounds):
        lat, rate, stats = anyio.run(bench_engine, ns.n, ns.total, ns.inflight, ns.launcher)
        eng_lats += lat
        eng_rates.append(rate)
        memory_p50s.append(pct(lat, 0.5))
        # the same with records in SQLite under a state_dir (durable: an accepted record is stored before submit
        # returns, a final one before the caller sees it)
        lat, rate, _ = anyio.run(bench_engine, ns.n, ns.total, ns.inflight, ns.launcher, HOST_POLL_US, True)
        durable_lats += lat
        durable_rates.append(rate)
        durable_p50s.append(pct(lat, 0.5))
        # the same without the host's polling (Engine(poll_us=0)): it sleeps in epoll_wait like the two baselines
        lat, rate, _ = anyio.run(bench_engine, ns.n, ns.total, ns.inflight, ns.launcher, 0)
        sleepy_lats += lat
        sleepy_rates.append(rate)
        ppe_lats += bench_ppe_latency(ns.n)
        raws += bench_raw_pipe(ns.n, payload)
        ppe_rates.append(bench_ppe_throughput(ns.total, ns.inflight))
    eng_lat, sleepy_lat, ppe_lat, raw = eng_lats, sleepy_lats, ppe_lats, raws
    eng_rate, sleepy_rate, ppe_rate = (statistics.median(r) for r in (eng_rates, sleepy_rates, ppe_rates))
    paired = statistics.median(e / b for e, b in zip(eng_rates, ppe_rates, strict=True))
    us = 1e6
    rows = [
        ("minifaas engine.call (full record)", pct(eng_lat, 0.5) * us, pct(eng_lat, 0.99) * us),
        ("minifaas engine.call, poll_us=0", pct(sleepy_lat, 0.5) * us, pct(sleepy_lat, 0.99) * us),
        ("minifaas engine.call, durable (state_dir)", pct(durable_lats, 0.5) * us, pct(durable_lats, 0.99) * us),
        ("ProcessPoolExecutor.submit().result()", pct(ppe_lat, 0.5) * us, pct(ppe_lat, 0.99) * us),
        ("raw socketpair round trip", pct(raw, 0.5) * us, pct(raw, 0.99) * us),
    ]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, launcher={stats['launcher']}")
    print(f"{'warm round trip (no-op)':42s} {'p50 us':>9s} {'p99 us':>9s}")
    for name, p50, p99 in rows:
        print(f"{name:42s} {p50:9.1f} {p99:9.1f}")
    print(f"ratio p50 minifaas / ProcessPoolExecutor: {rows[0][1] / rows[3][1]:.2f}x (goal <= 0.5x)")
    print(f"ratio p50 durable / ProcessPoolExecutor: {rows[2][1] / rows[3][1]:.2f}x")
    print(f"ratio p50 minifaas, poll_us=0 / ProcessPoolExecutor: {rows[1][1] / rows[3][1]:.2f}x")
    print(f"ratio p50 minifaas / raw pipe: {rows[0][1] / rows[4][1]:.2f}x (the raw pipe blocks in recv)")
    lat_ratio = statistics.median(d / m for d, m in zip(durable_p50s, memory_p50s, strict=True))
    rate_ratio = statistics.median(d / m for d, m in zip(durable_rates, eng_rates, strict=True))
    print(
        f"durable / in-memory: warm p50 {lat_ratio:.2f}x "
        f"(goal <= {DURABLE_P50_GOAL}x: {_met(lat_ratio <= DURABLE_P50_GOAL)}), "
        f"throughput {rate_ratio:.2f}x (goal >= {DURABLE_RATE_GOAL}x: {_met(rate_ratio >= DURABLE_RATE_GOAL)}), "
        f"medians of per-round ratios; durable p50 {statistics.median(durable_p50s) * 1e6:.1f} us, in-memory "
        f"{statistics.median(memory_p50s) * 1e6:.1f} us; durable throughput {statistics.median(durable_rates):,.0f}/s, "
        f"{statistics.median(durable_rates) / ppe_rate:.2f}x ProcessPoolExecutor"
    )
    print(f"mean minifaas {statistics.mean(eng_lat) * us:.1f} us")
    print()
    print(
        f"throughput, 2 workers, {ns.inflight} in flight: minifaas {eng_rate:,.0f}/s, "
        f"ProcessPoolExecutor(2) {ppe_rate:,.0f}/s (medians of {ns.rounds} rounds), ratio {eng_rate / ppe_rate:.2f}x, "
        f"median of per-round ratios {paired:.2f}x (goal >= 2x); with poll_us=0 {sleepy_rate:,.0f}/s, "
        f"{sleepy_rate / ppe_rate:.2f}x"
    )
    print(
        f"rounds: minifaas {[round(r) for r in eng_rates]}, durable {[round(r) for r in durable_rates]}, "
        f"ProcessPoolExecutor {[round(r) for r in ppe_rates]}"
    )


def table_rows(n: int = 3000, total: int = 20000, inflight: int = 64) -> list[dict[str, object]]:
    """One round for ``benches/readme_table.py``: the engine in memory and durable, ProcessPoolExecutor."""
    mem_lat, mem_rate, _ = anyio.run(bench_engine, n, total, inflight, "auto")
    dur_lat, dur_rate, _ = anyio.run(bench_engine, n, total, inflight, "auto", HOST_POLL_US, True)
    ppe_lat = bench_ppe_latency(n)
    ppe_rate = bench_ppe_throughput(total, inflight)
    us = 1e6
    mem_p50, dur_p50, ppe_p50 = pct(mem_lat, 0.5) * us, pct(dur_lat, 0.5) * us, pct(ppe_lat, 0.5) * us
    return [
        {
            "key": "p50_vs_ppe",
            "label": "warm no-op round trip p50, full record, vs `ProcessPoolExecutor.submit().result()`",
            "value": mem_p50 / ppe_p50,
            "unit": "x",
            "goal": "<= 0.5x",
            "figures": {"minifaas us": mem_p50, "ProcessPoolExecutor us": ppe_p50},
        },
        {
            "key": "tput_vs_ppe",
            "label": f"throughput, 2 sandboxes, {inflight} in flight, vs `ProcessPoolExecutor(2)`",
            "value": mem_rate / ppe_rate,
            "unit": "x",
            "goal": ">= 2x",
            "figures": {"minifaas /s": mem_rate, "ProcessPoolExecutor /s": ppe_rate},
        },
        {
            "key": "durable_p50",
            "label": "durable records (`state_dir`, SQLite) vs in-memory: warm no-op p50",
            "value": dur_p50 / mem_p50,
            "unit": "x",
            "goal": "<= 1.3x",
            "figures": {"durable us": dur_p50, "in-memory us": mem_p50},
        },
        {
            "key": "durable_tput",
            "label": f"durable records vs in-memory: throughput, 2 sandboxes, {inflight} in flight",
            "value": dur_rate / mem_rate,
            "unit": "x",
            "goal": ">= 0.8x",
            "figures": {"durable /s": dur_rate, "vs ProcessPoolExecutor(2)": dur_rate / ppe_rate},
        },
    ]


if __name__ == "__main__":
    main()
