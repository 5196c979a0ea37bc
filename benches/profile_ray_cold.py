"""Where a cold start on the Ray backend (per-node zygote actor) spends its time, step by step.

Each sample deploys a new no-op, calls it once (timed, as ``bench_ray.py``'s cold start) and deletes it; the host
side of the Ray sandbox is wrapped with timestamps: reservation taken or made, placement group ready, its node looked
up, node actor found, sandbox started on the node, INIT, RUN. Prints each step's median (ms from the call's start)
over the samples.

Run: ``python benches/profile_ray_cold.py [--n 15] [--nodes 1] [--gap-s 0.05]`` (a ``ray.cluster_utils.Cluster``
on this machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import anyio

import minifaas
from minifaas._backends import ray as rb

NOOP = "def main(args):\n    return {}\n"
MARKS: list[tuple[str, float]] = []


def mark(name: str) -> None:
    MARKS.append((name, time.perf_counter()))


def wrap_async(cls: Any, attr: str, label: str) -> None:
    fn = getattr(cls, attr)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{label}>")
        try:
            return await fn(*args, **kwargs)
        finally:
            mark(f"{label}<")

    setattr(cls, attr, wrapper)


def wrap_sync(obj: Any, attr: str, label: str) -> Callable[..., Any]:
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{label}>")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{label}<")

    setattr(obj, attr, wrapper)
    return wrapper


def instrument() -> None:
    import importlib

    rpg = importlib.import_module("ray.util.placement_group")

    wrap_async(rb.RayLauncher, "take_reservation", "take_reservation")
    wrap_async(rb.RayLauncher, "choose_node", "choose_node")
    wrap_async(rb.RaySandbox, "_wait_started", "pg_ready")
    wrap_sync(rpg, "placement_group_table", "pg_table")
    wrap_sync(rpg, "placement_group", "pg_create")
    wrap_async(rb.RayLauncher, "node_actor", "node_actor")
    wrap_sync(rb.RaySandbox, "_started", "started")
    wrap_async(rb.RaySandbox, "_reserve_on_node", "reserve_on_node")
    wrap_async(rb.RaySandbox, "_start_on_node", "start_on_node")
    wrap_async(rb.RaySandbox, "start", "start")
    wrap_async(rb.RaySandbox, "init", "init")
    wrap_sync(rb.RaySandbox, "send", "send")
    wrap_async(rb.RaySandbox, "_await_result", "result")


async def profile(n: int, gap_s: float) -> None:
    async with minifaas.Engine(backend="ray") as engine:
        await engine.deploy("first", code=NOOP)
        await engine.call("first", {})  # starts the node's zygote actor
        await engine.delete("first")
        rows: dict[str, list[float]] = {}
        totals = []
        for i in range(n):
            await engine.deploy(f"c{i}", code=NOOP)
            MARKS.clear()
            t0 = time.perf_counter()
            act = await engine.call(f"c{i}", {})
            totals.append((time.perf_counter() - t0) * 1000)
            assert act.status == "success", act
            seen: set[str] = set()
            for name, t in MARKS:
                if name in seen:
                    continue  # the first of each (a nested placement_group_table counts once)
                seen.add(name)
                rows.setdefault(name, []).append((t - t0) * 1000)
            await engine.delete(f"c{i}")
            await anyio.sleep(gap_s)
        print(f"cold start median {sorted(totals)[n // 2]:.2f} ms (min {min(totals):.2f}) over {n}")
        order = sorted(rows, key=lambda k: sorted(rows[k])[len(rows[k]) // 2])
        for name in order:
            v = sorted(rows[name])
            print(f"  {name:22s} at {v[len(v) // 2]:7.2f} ms (seen in {len(v)}/{n})")
        print(engine.stats().get("launcher_stats"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gap-s", type=float, default=0.05, help="pause between samples (past 2 s: no kept reservation)")
    ns = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    instrument()
    cores = os.cpu_count() or 2
    per_node = max(1, cores // ns.nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node})
    for _ in range(ns.nodes - 1):
        cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        anyio.run(profile, ns.n, ns.gap_s)
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
