"""Where a cold start on the Ray backend (per-node zygote actor) spends its time, step by step.

Each sample deploys a new no-op, calls it once (timed, as ``bench_ray.py``'s cold start) and deletes it; the host
side of the Ray sandbox is wrapped with timestamps: reservation taken or made, placement group ready, its node looked
up, node actor found, sandbox started on the node, INIT, RUN; and inside the node actor (``node.*``: its calls,
the fork, READY, INIT, RUN in the sandbox), on the same clock (``perf_counter`` is the machine's monotonic clock).
Prints each step's median (ms from the call's start) over the samples, and the node each sample ran on.

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


def _node_marks_class() -> Any:
    """A NodeActor that timestamps its steps (a class of this script: Ray ships it by value to the worker)."""
    from minifaas._backends.raynode import NodeActor

    class TimedNodeActor(NodeActor):
        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            from minifaas._core import sandbox as core_sandbox
            from minifaas._core import zygote

            self._marks: list[tuple[str, float]] = []
            marks = self._marks

            def wrap(cls: Any, attr: str, label: str) -> None:
                fn = getattr(cls, attr)

                @functools.wraps(fn)
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    marks.append((f"node.{label}>", time.perf_counter()))
                    try:
                        return await fn(*args, **kwargs)
                    finally:
                        marks.append((f"node.{label}<", time.perf_counter()))

                setattr(cls, attr, wrapper)

            for name in ("start", "init", "execute", "start_init", "start_run", "result"):
                if hasattr(NodeActor, name):
                    wrap(NodeActor, name, name)
            wrap(rb.SandboxActor, "describe", "describe")
            sandbox_init = rb.SandboxActor.__init__

            def made(actor: Any, *args: Any, **kwargs: Any) -> None:
                marks.append(("node.SandboxActor()>", time.perf_counter()))
                sandbox_init(actor, *args, **kwargs)
                marks.append(("node.SandboxActor()<", time.perf_counter()))

            rb.SandboxActor.__init__ = made  # type: ignore[method-assign]
            wrap(zygote.ZygoteLauncher, "launch", "fork")
            wrap(core_sandbox.Sandbox, "init", "sandbox_init")
            on_readable = core_sandbox.Sandbox._on_readable

            def readable(sb: Any) -> None:
                marks.append(("node.channel_readable", time.perf_counter()))
                on_readable(sb)

            core_sandbox.Sandbox._on_readable = readable  # type: ignore[method-assign]
            send = core_sandbox.Sandbox.send

            def sent(sb: Any, kind: int, fields: dict[str, Any]) -> None:
                marks.append((f"node.send_{kind}", time.perf_counter()))
                send(sb, kind, fields)

            core_sandbox.Sandbox.send = sent  # type: ignore[method-assign]

        async def take_marks(self) -> list[tuple[str, float]]:
            out = list(self._marks)
            self._marks.clear()
            return out

    return TimedNodeActor


def instrument() -> None:
    import importlib

    rpg = importlib.import_module("ray.util.placement_group")

    wrap_sync(rb.RayLauncher, "take_reservation", "take_reservation")
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
    import ray

    async with minifaas.Engine(backend="ray") as engine:
        launcher: Any = engine._launcher
        groups = {rb.RAY_CONTROL_GROUP: rb.RAY_CONTROL_CONCURRENCY}
        launcher.node_actor_class = ray.remote(concurrency_groups=groups)(_node_marks_class())
        await engine.deploy("first", code=NOOP)
        await engine.call("first", {})  # starts the node's zygote actor
        await engine.delete("first")
        rows: dict[str, list[float]] = {}
        totals = []
        nodes: dict[str, int] = {}
        for i in range(n):
            await engine.deploy(f"c{i}", code=NOOP)
            for actor, _name in list(launcher.nodes.values()):
                await actor.take_marks.remote()  # what happened before this sample (the last one's end)
            MARKS.clear()
            t0 = time.perf_counter()
            act = await engine.call(f"c{i}", {})
            totals.append((time.perf_counter() - t0) * 1000)
            assert act.status == "success", act
            node = str(act.annotations.get("ray_node_id", ""))[:8]
            nodes[node] = nodes.get(node, 0) + 1
            for actor, _name in list(launcher.nodes.values()):
                MARKS.extend(await actor.take_marks.remote())
            MARKS.sort(key=lambda m: m[1])
            seen: set[str] = set()
            for name, t in MARKS:
                if name in seen:
                    continue  # the first of each (a nested placement_group_table counts once)
                seen.add(name)
                rows.setdefault(name, []).append((t - t0) * 1000)
            await engine.delete(f"c{i}")
            await anyio.sleep(gap_s)
        print(f"cold start median {sorted(totals)[n // 2]:.2f} ms (min {min(totals):.2f}) over {n}; nodes {nodes}")
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
