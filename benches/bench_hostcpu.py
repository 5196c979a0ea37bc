"""The host's own CPU per warm call: the engine (in-memory store, ``poll_us=0``) beside a minimal asyncio host.

Run: ``python benches/bench_hostcpu.py [--n 3000] [--rounds 5]``.

The minimal host drives the same sandbox runtime (``python -m minifaas_sandbox``, INIT with the engine's own INIT
fields) over the same channel with nothing else: one RUN frame out, one RESULT frame in, decoded, per call; its CPU
per call is the floor the engine's bookkeeping (records, queues, routing, timers, statistics) is measured against.
Both sleep in ``epoll_wait`` between frames (no polling), and both count only the host process's CPU
(``time.process_time``: the sandbox is another process). Rounds alternate; medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
from minifaas_sandbox import protocol as p

import minifaas

NOOP = "def main(args):\n    return {}\n"
WARMUP_CALLS = 300


async def init_fields() -> dict[str, Any]:
    """The INIT the engine sends for the no-op (from a throwaway engine: same runtime, same settings)."""
    async with minifaas.Engine() as engine:
        await engine.deploy("noop", code=NOOP)
        fields: dict[str, Any] = engine._functions["noop"][-1].init_fields()
        return fields


async def minimal_host(n: int, fields: dict[str, Any]) -> tuple[float, float]:
    """(host CPU us per call, p50 us) of a bare asyncio host: a RUN frame out, a RESULT frame in."""
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "minifaas_sandbox", "--fd", str(child.fileno())],
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    child.close()
    host.setblocking(False)
    loop = asyncio.get_running_loop()
    decoder = p.FrameDecoder()
    inbox: asyncio.Queue[p.Message] = asyncio.Queue()

    def readable() -> None:
        try:
            data = host.recv(1 << 16)
        except BlockingIOError:
            return
        for msg in decoder.feed(data):
            inbox.put_nowait(msg)

    loop.add_reader(host.fileno(), readable)
    try:
        kind, _ = await inbox.get()
        assert kind == p.READY
        await loop.sock_sendall(host, p.encode(p.INIT, fields))
        kind, reply = await inbox.get()
        assert kind == p.INIT_DONE and reply.get("ok"), reply
        args = p.encode_body({})
        times: list[float] = []

        async def call() -> None:
            aid = os.urandom(16).hex()
            deadline = time.time_ns() // 1_000_000 + 60_000
            host.send(p.encode(p.RUN, {"aid": aid, "args": args, "deadline": deadline, "version": "1", "spin": True}))
            kind, result = await inbox.get()
            assert kind == p.RESULT and result["aid"] == aid and result["status"] == "success", result

        for _ in range(WARMUP_CALLS):
            await call()
        cpu = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            await call()
            times.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu
    finally:
        loop.remove_reader(host.fileno())
        host.sendall(p.encode(p.SHUTDOWN, {}))
        host.close()
        proc.wait(10)
    times.sort()
    return cpu / n * 1e6, times[n // 2] * 1e6


async def engine_host(n: int) -> tuple[float, float]:
    """(host CPU us per call, p50 us) of ``engine.call`` with the in-memory store and ``poll_us=0``."""
    async with minifaas.Engine(poll_us=0) as engine:
        await engine.deploy("noop", code=NOOP, max_sandboxes=1)
        for _ in range(WARMUP_CALLS):
            await engine.call("noop")
        times: list[float] = []
        cpu = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            act = await engine.call("noop")
            times.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu
        assert act.status == "success"
    times.sort()
    return cpu / n * 1e6, times[n // 2] * 1e6


def measure(n: int, rounds: int) -> dict[str, Any]:
    fields = anyio.run(init_fields)
    eng: list[tuple[float, float]] = []
    bare: list[tuple[float, float]] = []
    for _ in range(rounds):
        eng.append(anyio.run(engine_host, n))
        bare.append(asyncio.run(minimal_host(n, fields)))
    return {
        "engine_cpu_us": [round(c, 1) for c, _ in eng],
        "minimal_cpu_us": [round(c, 1) for c, _ in bare],
        "engine_p50_us": [round(t, 1) for _, t in eng],
        "minimal_p50_us": [round(t, 1) for _, t in bare],
        "ratio": [round(e[0] / b[0], 3) for e, b in zip(eng, bare, strict=True)],
    }


def table_rows(n: int = 3000) -> list[dict[str, Any]]:
    """One round's rows for ``benches/readme_table.py`` (it takes medians over its alternating rounds)."""
    m = measure(n, 1)
    return [
        {
            "key": "host_cpu",
            "label": "host CPU per warm no-op call (in-memory store, `poll_us=0`) vs a minimal asyncio host "
            "driving the same runtime",
            "value": m["ratio"][0],
            "unit": "x",
            "goal": "~27 us (the minimal host)",
            "figures": {"engine us": m["engine_cpu_us"][0], "minimal host us": m["minimal_cpu_us"][0]},
        }
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ns = ap.parse_args()
    m = measure(ns.n, ns.rounds)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {ns.rounds} alternating rounds of {ns.n} calls")
    for key, values in m.items():
        print(f"{key:16s} {values}  median {statistics.median(values)}")
    print(
        f"host CPU per warm call: engine {statistics.median(m['engine_cpu_us']):.1f} us, minimal asyncio host "
        f"{statistics.median(m['minimal_cpu_us']):.1f} us: {statistics.median(m['ratio']):.2f}x (median of "
        "per-round ratios)"
    )


if __name__ == "__main__":
    main()
