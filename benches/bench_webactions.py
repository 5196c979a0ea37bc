"""What a web action and an API gateway route cost over the REST API's blocking invoke, on one warm sandbox.

Run: ``python benches/bench_webactions.py [--rounds 300]``. One engine, one warm sandbox of a no-op web action
(``web-export: true``), a gateway route onto it, and the dev server on a free port of 127.0.0.1. The HTTP client
(httpx, one keep-alive connection) runs in a child process; the three kinds of request alternate in batches so
drift hits them alike. Printed: p50/p90/p99 of ``POST .../actions/noop?blocking=true&result=true``, of ``GET
/api/v1/web/guest/default/noop.json`` and of ``GET /api/guest/bench/noop`` (the route), and each one's median as
a ratio of the REST call's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import anyio
import httpx

import minifaas
from minifaas._server.app import ServerHandle, serve

NOOP = "def main(args):\n    return {'ok': True}\n"
BATCH = 50
KINDS = ("rest", "web", "route")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def client(url: str, auth: str, rounds: int, kind: str) -> None:
    """Child process: ``rounds`` sequential requests of one kind; prints their latencies (ms) as JSON."""
    user, _, key = auth.partition(":")
    out: list[float] = []
    with httpx.Client(base_url=url, auth=(user, key), timeout=60) as http:
        for i in range(rounds + 5):
            t0 = time.perf_counter()
            if kind == "rest":
                r = http.post("/api/v1/namespaces/_/actions/noop?blocking=true&result=true", json={"i": i})
            elif kind == "web":
                r = http.get("/api/v1/web/guest/default/noop.json", params={"i": i}, auth=None)
            else:
                r = http.get("/api/guest/bench/noop", params={"i": i}, auth=None)
            dt = (time.perf_counter() - t0) * 1000
            assert r.status_code == 200, r.text
            if i >= 5:  # the first requests open the connection
                out.append(dt)
    print(json.dumps(out))


async def batch(handle: ServerHandle, rounds: int, kind: str) -> list[float]:
    cmd = [sys.executable, __file__, "--client", handle.url, handle.auth, str(rounds), kind]
    proc = await anyio.run_process(cmd, check=True)
    values: list[float] = json.loads(proc.stdout)
    return values


async def main(rounds: int) -> None:
    async with minifaas.Engine() as engine, anyio.create_task_group() as tg:
        handle: ServerHandle = await tg.start(functools.partial(serve, engine, "127.0.0.1", 0))
        await engine.deploy("noop", code=NOOP, max_sandboxes=1, annotations={"web-export": True})
        await engine.invoke("noop", {})
        user, _, key = handle.auth.partition(":")
        async with httpx.AsyncClient(base_url=handle.url, auth=(user, key)) as http:
            apidoc = {
                "gatewayBasePath": "/bench",
                "gatewayPath": "/noop",
                "gatewayMethod": "GET",
                "action": {"name": "noop"},
            }
            r = await http.post("/api/v1/web/whisk.system/apimgmt/createApi", json={"apidoc": apidoc})
            r.raise_for_status()
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        done = 0
        while done < rounds:
            n = min(BATCH, rounds - done)
            for kind in KINDS:
                times[kind] += await batch(handle, n, kind)
            done += n
        handle.stop()
    base = pct(times["rest"], 0.5)
    print(f"{'request':<34} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50 / REST':>11}")
    labels = {"rest": "REST blocking result=true", "web": "web action .json (no auth)", "route": "gateway route"}
    for kind in KINDS:
        v = times[kind]
        p50 = pct(v, 0.5)
        print(f"{labels[kind]:<34} {p50:8.2f} {pct(v, 0.9):8.2f} {pct(v, 0.99):8.2f} {p50 / base:11.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
        parser.add_argument("--rounds", type=int, default=300)
        anyio.run(main, parser.parse_args().rounds)
