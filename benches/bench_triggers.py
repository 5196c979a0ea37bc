"""Trigger and feed figures: folder-watch detection latency, a 200-file burst, fire() overhead, end to end.

    python benches/bench_triggers.py            # about a minute
    python benches/bench_triggers.py --quick    # fewer samples
    python benches/bench_triggers.py --json out.json

Latency = time from the file being complete (written and closed, or renamed in) to the trigger's fire
reaching ``submit``, with inotify events (``events=True``, the default on Linux) and with polling alone,
side by side. Polling: a renamed-in file is whole on sight, one written in place waits out ``settle_s``
(2 s); events: both fire on the close or rename event (goal: <= 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

import minifaas
from minifaas._events.triggers import TriggerManager


class Submissions:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    async def __call__(self, name: str, args: dict[str, Any], /, *, cause: str | None) -> str:
        self.times[args.get("name", "")] = time.perf_counter()
        return uuid.uuid4().hex


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_for(cond: Any, timeout_s: float = 30.0) -> None:
    with anyio.fail_after(timeout_s):
        while not cond():
            await anyio.sleep(0.002)


async def folder_latency(interval_s: float, mode: str, n: int, events: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        sub = Submissions()
        async with anyio.create_task_group() as tg:
            tm = TriggerManager(sub, state_dir=None, task_group=tg)
            tm.create_trigger("t", rate_per_minute=None)
            tm.create_rule("r", "t", "f")
            await tm.add_feed("t", "folder", path=folder, interval_s=interval_s, events=events)
            latencies = []
            for i in range(n):
                await anyio.sleep(random.uniform(0, interval_s))  # land at a random phase of the poll cycle
                name = f"f{i}.bin"
                data = os.urandom(64 * 1024)
                if mode == "rename":
                    tmp = folder / f".{name}.part"
                    tmp.write_bytes(data)
                    await anyio.sleep(0.01)  # so the rename falls on a later clock tick than the write
                    os.replace(tmp, folder / name)
                else:
                    (folder / name).write_bytes(data)
                done = time.perf_counter()
                await wait_for(lambda name=name: name in sub.times)
                latencies.append(sub.times[name] - done)
            await tm.aclose()
    return {
        "p50_s": statistics.median(latencies),
        "p95_s": pct(latencies, 0.95),
        "max_s": max(latencies),
        "n": n,
    }


async def burst(interval_s: float, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        sub = Submissions()
        async with anyio.create_task_group() as tg:
            tm = TriggerManager(sub, state_dir=Path(d) / ".state", task_group=tg)
            tm.create_trigger("t", rate_per_minute=None)
            tm.create_rule("r", "t", "f")
            await tm.add_feed("t", "folder", path=folder, interval_s=interval_s)
            t0 = time.perf_counter()
            for i in range(n):
                (folder / f"img{i:04d}.bin").write_bytes(os.urandom(4096))
            written = time.perf_counter()
            await wait_for(lambda: len(sub.times) >= n, 60)
            last = max(sub.times.values())
            await tm.aclose()
    return {"write_s": written - t0, "last_fire_after_write_s": last - written, "total_s": last - t0, "n": n}


async def folder_scale(n: int, events: bool) -> dict[str, float]:
    """A folder of ``n`` files: time to start the feed, the event loop's worst stall while it watches, and the
    latency of one more file renamed in."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "in"
        folder.mkdir()
        for i in range(n):
            (folder / f"p{i:06}.jpg").write_bytes(b"x")
        sub = Submissions()
        lag = [0.0]

        async def ticker() -> None:
            while True:
                t = time.perf_counter()
                await anyio.sleep(0.005)
                lag[0] = max(lag[0], time.perf_counter() - t - 0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tm = TriggerManager(sub, state_dir=Path(d) / "state", task_group=tg)
            tm.create_trigger("t", rate_per_minute=None)
            tm.create_rule("r", "t", "f")
            t0 = time.perf_counter()
            await tm.add_feed("t", "folder", path=folder, interval_s=0.5, events=events)
            start_s = time.perf_counter() - t0
            lag[0] = 0.0
            await anyio.sleep(3.0)  # six polls of a folder where nothing happens
            steady_lag = lag[0]
            tmp = folder / ".new.jpg.part"
            tmp.write_bytes(b"new")
            await anyio.sleep(0.01)
            os.replace(tmp, folder / "new.jpg")
            done = time.perf_counter()
            await wait_for(lambda: "new.jpg" in sub.times)
            latency = sub.times["new.jpg"] - done
            await tm.aclose()
            tg.cancel_scope.cancel()
    return {"start_s": start_s, "steady_max_loop_stall_s": steady_lag, "new_file_latency_s": latency, "n": n}


async def fire_overhead(n: int) -> dict[str, float]:
    sub = Submissions()
    async with anyio.create_task_group() as tg:
        tm = TriggerManager(sub, state_dir=None, task_group=tg)
        tm.create_trigger("t", rate_per_minute=None)
        tm.create_rule("a", "t", "f")
        tm.create_rule("b", "t", "g")
        t0 = time.perf_counter()
        for i in range(n):
            await tm.fire("t", {"i": i})
        elapsed = time.perf_counter() - t0
        await tm.aclose()
    return {"fires_per_s": n / elapsed, "us_per_fire_2_rules": elapsed / n * 1e6}


async def end_to_end(n: int) -> dict[str, float]:
    """File complete -> trigger -> rule -> function activation ended, through the real Engine (warm)."""
    code = "def main(args):\n    return {'name': args['name'], 'sha256': args['sha256']}\n"
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "in"
        folder.mkdir()
        async with minifaas.Engine(state_dir=Path(d) / "state") as engine:
            await engine.deploy("on_file", code=code)
            await engine.invoke("on_file", {"name": "warmup", "sha256": ""})
            async with anyio.create_task_group() as tg:
                tm = TriggerManager(engine.submit, state_dir=engine.state_dir, task_group=tg)
                tm.create_trigger("t", rate_per_minute=None)
                tm.create_rule("r", "t", "on_file")
                await tm.add_feed("t", "folder", path=folder, interval_s=0.1)
                latencies = []
                for i in range(n):
                    await anyio.sleep(random.uniform(0, 0.1))
                    tmp = folder / f".f{i}.part"
                    tmp.write_bytes(os.urandom(16 * 1024))
                    await anyio.sleep(0.01)
                    os.replace(tmp, folder / f"f{i}.bin")
                    done = time.perf_counter()
                    await wait_for(lambda i=i: len(tm.list_fires("t", limit=n)) > i)
                    act_id = tm.list_fires("t")[0].activation_ids[0]
                    act = await engine.activations.wait(act_id, timeout_s=30)
                    assert act.status == "success", act.result
                    latencies.append(time.perf_counter() - done)
                await tm.aclose()
    return {"p50_s": statistics.median(latencies), "p95_s": pct(latencies, 0.95), "n": n}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n = 8 if args.quick else 30
    results: dict[str, Any] = {}
    for interval in (0.5, 0.1):
        for mode in ("write", "rename"):
            for events in (True, False):
                if mode == "write" and not events and interval == 0.1:
                    continue  # the 2 s quiet period dominates: the 0.5 s row says it
                key = f"folder_latency_{mode}_interval_{interval}s_{'events' if events else 'polling'}"
                results[key] = await folder_latency(interval, mode, n if events or mode == "rename" else 4, events)
                print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}))
    for mode in ("write", "rename"):
        ev = results[f"folder_latency_{mode}_interval_0.5s_events"]["p50_s"]
        poll = results[f"folder_latency_{mode}_interval_0.5s_polling"]["p50_s"]
        print(f"folder_latency_{mode}: events are {poll / ev:.0f}x faster than polling (median, same run)")
    for events in (True, False):
        key = f"folder_{'10k' if args.quick else '50k'}_files_{'events' if events else 'polling'}"
        results[key] = await folder_scale(10_000 if args.quick else 50_000, events)
        print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}))
    for interval in (0.5, 0.1):
        key = f"burst_200_files_interval_{interval}s"
        results[key] = await burst(interval, 200)
        print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}))
    results["fire_overhead"] = await fire_overhead(2000 if args.quick else 20000)
    print("fire_overhead", json.dumps({k: round(v, 2) for k, v in results["fire_overhead"].items()}))
    results["end_to_end_engine_interval_0.1s"] = await end_to_end(n)
    print(
        "end_to_end_engine_interval_0.1s",
        json.dumps({k: round(v, 4) for k, v in results["end_to_end_engine_interval_0.1s"].items()}),
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    out = anyio.run(main, ns)
    if ns.json is not None:
        ns.json.write_text(json.dumps(out, indent=2))
