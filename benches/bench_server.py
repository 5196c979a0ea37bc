"""HTTP overhead of the dev server: blocking invoke over REST vs ``engine.invoke`` on the same warm sandbox.

Run: ``python benches/bench_server.py [--rounds 300]``. One engine with one warm sandbox of a no-op function
and its dev server on a free port of 127.0.0.1. The HTTP client (httpx, one keep-alive connection) runs in a
child process, so it does not share the server's interpreter; the in-process ``engine.invoke`` rounds and the
HTTP rounds alternate in batches so drift hits them alike. Printed: p50/p90/p99 of ``engine.invoke``, of a
blocking ``POST ...?blocking=true&result=true`` and of a non-blocking POST (202), and the HTTP overhead at the
median.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import anyio
import httpx

import minifaas
from minifaas._server.app import ServerHandle, serve

NOOP = "def main(args):\n    return args\n"
BATCH = 50


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def client(url: str, auth: str, rounds: int, blocking: bool) -> None:
    """Child process: ``rounds`` sequential invocations; prints their latencies (ms) as JSON."""
    user, _, key = auth.partition(":")
    params = {"blocking": "true", "result": "true"} if blocking else {}
    out: list[float] = []
    with httpx.Client(base_url=url, auth=(user, key), timeout=60) as http:
        for i in range(rounds + 5):
            t0 = time.perf_counter()
            r = http.post("/api/v1/namespaces/_/actions/noop", params=params, json={"i": i})
            dt = (time.perf_counter() - t0) * 1000
            assert r.status_code == (200 if blocking else 202), r.text
            if i >= 5:  # the first requests open the connection
                out.append(dt)
    print(json.dumps(out))


async def http_batch(handle: ServerHandle, rounds: int, blocking: bool) -> list[float]:
    cmd = [sys.executable, __file__, "--client", handle.url, handle.auth, str(rounds), str(int(blocking))]
    proc = await anyio.run_process(cmd, check=True)
    values: list[float] = json.loads(proc.stdout)
    return values


async def main(rounds: int) -> None:
    async with minifaas.Engine() as engine, anyio.create_task_group() as tg:
        handle: ServerHandle = await tg.start(functools.partial(serve, engine, "127.0.0.1", 0))
        await engine.deploy("noop", code=NOOP, max_sandboxes=1)
        await engine.invoke("noop", {})
        direct: list[float] = []
        blocking: list[float] = []
        accepted: list[float] = []
        done = 0
        while done < rounds:
            n = min(BATCH, rounds - done)
            for i in range(n):
                t0 = time.perf_counter()
                await engine.invoke("noop", {"i": i})
                direct.append((time.perf_counter() - t0) * 1000)
            blocking += await http_batch(handle, n, True)
            accepted += await http_batch(handle, n, False)
            done += n
        handle.stop()
    rows: list[tuple[str, list[float]]] = [
        ("engine.invoke", direct),
        ("HTTP blocking result=true", blocking),
        ("HTTP non-blocking (202)", accepted),
    ]
    print(f"{rounds} rounds, warm sandbox, no-op function; milliseconds")
    print(f"{'':28} {'p50':>7} {'p90':>7} {'p99':>7}")
    for name, values in rows:
        print(f"{name:28} {pct(values, 0.5):7.2f} {pct(values, 0.9):7.2f} {pct(values, 0.99):7.2f}")
    print(f"HTTP overhead at p50: {pct(blocking, 0.5) - pct(direct, 0.5):.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _, _, url, auth, n, block = sys.argv
        client(url, auth, int(n), bool(int(block)))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rounds", type=int, default=300)
        args: Any = parser.parse_args()
        anyio.run(main, args.rounds)
