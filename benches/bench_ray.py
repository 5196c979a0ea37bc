"""Ray backend vs local backend: cold start, warm latency (p50/p99) and throughput of a no-op and of a pose crop,
on a 1-node and a 2-node Ray cluster, against a bare Ray actor call measured in the same run.

Cold start: the first call of a newly deployed no-op, once its node's zygote actor runs (it is started by the first
cold start on a node and kept: the figure is the median over the ``--cold-n`` after that one). On Ray it is also
compared with a local engine's cold starts taken side by side: samples alternate between the two engines while the
Ray cluster runs (the table's local column was measured earlier, without a cluster beside it). Next to it, what a
bare Ray actor costs from nothing (creation + first call) and per call, in the same run.

Run: ``python benches/bench_ray.py [--n 2000] [--total 5000] [--crop-n 100] [--crop-total 300] [--nodes 1,2]``
(needs ``pip install 'minifaas[ray]'``). Each Ray case starts a ``ray.cluster_utils.Cluster`` on this machine: one
node with every core, or two nodes sharing the cores; each function gets ``max_sandboxes=2`` on every backend.
Prints a table with the ratio Ray / local per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import minifaas

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import drive

ROOT = Path(__file__).resolve().parent.parent
NOOP = "def main(args):\n    return {}\n"
CROP_PATH = ROOT / "functions" / "smart_body_crop"
IMAGE_PATH = ROOT / "tests" / "data" / "images" / "messi5.jpg"
SANDBOXES = 2


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def _latency(engine: minifaas.Engine, name: str, args: dict[str, Any], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        act = await engine.call(name, args)
        times.append(time.perf_counter() - t)
        assert act.status == "success", act
    return times


async def _warm(engine: minifaas.Engine, name: str, args: dict[str, Any], rounds: int) -> None:
    """Start both sandboxes and run each a few times (model loads, first-call costs) before measuring."""
    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for _ in range(SANDBOXES):
                tg.start_soon(engine.call, name, args)


class _Bare:
    """A bare Ray actor: the floor of one actor call from this driver."""

    def noop(self, args: dict[str, Any]) -> dict[str, Any]:
        return args


async def _bare_actor_cold_ms(n: int) -> float:
    """Median time to create a bare Ray actor and get its first call's answer (what a sandbox actor costs at least)."""
    import ray

    times = []
    for _ in range(n):
        t = time.perf_counter()
        actor = ray.remote(num_cpus=0)(_Bare).remote()  # type: ignore[call-overload]
        await actor.noop.remote({})
        times.append((time.perf_counter() - t) * 1000)
        ray.kill(actor)
    return sorted(times)[len(times) // 2]


async def _bare_actor_ms(n: int) -> list[float]:
    import ray

    actor = ray.remote(num_cpus=0)(_Bare).remote()  # type: ignore[call-overload]
    await actor.noop.remote({})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await actor.noop.remote({})
        times.append(time.perf_counter() - t)
    ray.kill(actor)
    return times


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def _cold_starts(engines: dict[str, minifaas.Engine], n: int, out: dict[str, Any]) -> dict[str, list[float]]:
    """``n`` cold starts on each engine, alternating (a new no-op each time, deployed, called once, deleted)."""
    colds: dict[str, list[float]] = {label: [] for label in engines}
    for engine in engines.values():
        # the first one starts the node's zygote actor (once per node and engine): not a sandbox's cold start
        await engine.deploy("cold-first", code=NOOP)
        t = time.perf_counter()
        assert (await engine.call("cold-first", {})).status == "success"
        out.setdefault("first_cold_ms", (time.perf_counter() - t) * 1000)
        await engine.delete("cold-first")
    for i in range(n):
        for label, engine in engines.items():
            # a new function each time: its first call starts a sandbox (actor) from nothing
            await engine.deploy(f"cold{i}", code=NOOP)
            t = time.perf_counter()
            act = await engine.call(f"cold{i}", {})
            colds[label].append((time.perf_counter() - t) * 1000)
            assert act.status == "success", act
            if label == "ray":
                node = str(act.annotations.get("ray_node_id"))[:8]
                out.setdefault("cold_nodes", {})[node] = out.get("cold_nodes", {}).get(node, 0) + 1
            await engine.delete(f"cold{i}")
    return colds


async def bench(backend: str, ns: argparse.Namespace) -> dict[str, Any]:
    image = IMAGE_PATH.read_bytes()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    async with minifaas.Engine(backend=backend, max_queued=1_000_000) as engine:  # type: ignore[arg-type]
        out["start_s"] = time.perf_counter() - t0
        engines = {backend: engine}
        async with contextlib.AsyncExitStack() as stack:
            if backend == "ray":
                # the local cold start measured side by side: in the same moments (samples alternate), with the Ray
                # cluster's processes running beside it as they do beside the Ray cold starts
                engines["local"] = await stack.enter_async_context(minifaas.Engine(max_queued=1_000_000))
            colds = await _cold_starts(engines, ns.cold_n, out)
        out["cold_ms"] = _median(colds[backend])
        out["cold_range"] = (min(colds[backend]), max(colds[backend]))
        if backend == "ray":
            out["side_local_cold_ms"] = _median(colds["local"])
            out["side_local_cold_range"] = (min(colds["local"]), max(colds["local"]))
            # after the cold starts: the actors it kills leave worker processes exiting in the background
            out["bare_lat"] = await _bare_actor_ms(ns.n)
            out["bare_cold_ms"] = await _bare_actor_cold_ms(ns.cold_n)
        if backend == "ray":
            # the same with an actor of its own per sandbox (what GPU functions get, and all did before)
            launcher: Any = engine._launcher
            launcher.node_zygotes = False
            actor_colds = []
            for i in range(ns.actor_cold_n):
                await engine.deploy(f"actor-cold{i}", code=NOOP)
                t = time.perf_counter()
                assert (await engine.call(f"actor-cold{i}", {})).status == "success"
                actor_colds.append((time.perf_counter() - t) * 1000)
                await engine.delete(f"actor-cold{i}")
            launcher.node_zygotes = True
            out["actor_cold_ms"] = sorted(actor_colds)[len(actor_colds) // 2]
        cases: list[tuple[str, dict[str, Any], dict[str, Any], int, int, int]] = [
            ("noop", {"code": NOOP}, {}, ns.n, ns.total, 50),
            ("crop", {"path": CROP_PATH}, {"image": image}, ns.crop_n, ns.crop_total, 5),
        ]
        for name, source, args, n, total, rounds in cases:
            await engine.deploy(name, max_sandboxes=SANDBOXES, max_queue=1_000_000, **source)
            t = time.perf_counter()
            act = await engine.call(name, args)
            assert act.status == "success", act
            out[f"{name}_cold_ms"] = (time.perf_counter() - t) * 1000
            await _warm(engine, name, args, rounds)
            out[f"{name}_lat"] = await _latency(engine, name, args, n)
            out[f"{name}_rate"] = await drive(engine, name, total, ns.inflight, args)
            # the next function gets the CPUs (on Ray, actors reserve them)
            await engine.delete(name)
        out["stats"] = engine.stats()
    return out


def bench_ray_nodes(nodes: int, ns: argparse.Namespace) -> dict[str, Any]:
    """``bench("ray")`` on a cluster of ``nodes`` nodes of this machine, sharing its cores."""
    import ray
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 2
    per_node = max(1, cores // nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        return anyio.run(bench, "ray", ns)
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="no-op latency samples")
    ap.add_argument("--total", type=int, default=5000, help="no-op throughput invocations")
    ap.add_argument("--crop-n", type=int, default=100, help="pose-crop latency samples")
    ap.add_argument("--crop-total", type=int, default=300, help="pose-crop throughput invocations")
    ap.add_argument("--inflight", type=int, default=32, help="clients with one invocation outstanding each")
    ap.add_argument("--cold-n", type=int, default=21, help="cold starts measured (median)")
    ap.add_argument("--actor-cold-n", type=int, default=3, help="cold starts with an actor per sandbox (median)")
    ap.add_argument("--nodes", default="1,2", help="Ray cluster sizes to measure, comma-separated")
    ns = ap.parse_args()
    local = anyio.run(bench, "local", ns)
    rays = {int(n): bench_ray_nodes(int(n), ns) for n in ns.nodes.split(",")}
    import ray

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, ray {ray.__version__}, "
        f"{SANDBOXES} sandboxes per function, {ns.inflight} clients in flight for throughput"
    )
    ms = 1000.0
    for nodes, ray_ in rays.items():
        starts = f"engine start: local {local['start_s']:.2f} s, ray {ray_['start_s']:.2f} s"
        print(f"\n== Ray, {nodes} node(s) == {starts}")
        print(f"{'figure':38s} {'local':>11s} {'ray':>11s} {'ray/local':>10s}")

        def row(label: str, a: float, b: float, unit: str) -> None:
            print(f"{label:38s} {a:9.2f}{unit:>2s} {b:9.2f}{unit:>2s} {b / a:9.2f}x")

        row("cold start (new function, no-op)", local["cold_ms"], ray_["cold_ms"], "ms")
        side = ray_["side_local_cold_ms"]
        slo, shi = ray_["side_local_cold_range"]
        rlo, rhi = ray_["cold_range"]
        print(
            f"  side by side (samples alternating, the cluster up): local {side:.2f} ms ({slo:.2f}-{shi:.2f}), "
            f"ray {ray_['cold_ms']:.2f} ms ({rlo:.2f}-{rhi:.2f}) on nodes {ray_['cold_nodes']}: "
            f"{ray_['cold_ms'] / side:.2f}x"
        )
        row("first cold start (ray: starts the node's zygote)", local["first_cold_ms"], ray_["first_cold_ms"], "ms")
        for name, label in (("noop", "no-op"), ("crop", "pose crop (messi5.jpg)")):
            row(f"{label} first call", local[f"{name}_cold_ms"], ray_[f"{name}_cold_ms"], "ms")
            row(f"{label} warm p50", pct(local[f"{name}_lat"], 0.5) * ms, pct(ray_[f"{name}_lat"], 0.5) * ms, "ms")
            row(f"{label} warm p99", pct(local[f"{name}_lat"], 0.99) * ms, pct(ray_[f"{name}_lat"], 0.99) * ms, "ms")
            row(f"{label} throughput", local[f"{name}_rate"], ray_[f"{name}_rate"], "/s")
        bare = pct(ray_["bare_lat"], 0.5) * ms
        noop = pct(ray_["noop_lat"], 0.5) * ms
        print(f"bare Ray actor call p50 {bare:.2f} ms; minifaas no-op p50 on Ray {noop:.2f} ms ({noop / bare:.2f}x)")
        bare_cold = ray_["bare_cold_ms"]
        cold = ray_["cold_ms"]
        print(
            f"bare Ray actor from nothing (create + first call) {bare_cold:.1f} ms; minifaas cold start on Ray "
            f"(per-node zygote) {cold:.1f} ms ({cold / bare_cold:.2f}x of the bare actor, "
            f"{cold / ray_['side_local_cold_ms']:.2f}x of local side by side); with a Ray actor of its own per sandbox "
            f"{ray_['actor_cold_ms']:.1f} ms"
        )
        print(f"ray launcher stats: {ray_['stats'].get('launcher_stats')}")


if __name__ == "__main__":
    main()
