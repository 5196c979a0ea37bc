"""TFLite functions through the engine: cold start, model-cold and model-warm latency, and warm vs in-process.

Run: ``python benches/bench_models.py [--n 200] [--cold 20] [--fn smart_body_crop auto_tag]``. One run, printed as
a table with ratios (p50 and p99 of end-to-end latency as the caller sees it).

Per function, on the same real photo (``tests/data/images/messi5.jpg`` passed as bytes):

- ``cold start``: a new deployment's first call: fork + init of a sandbox, models loaded (the host store already
  holds them, so nothing is copied), then the run;
- ``model-cold``: a warm sandbox asked for models at URLs it has not loaded (fresh copies of the same files,
  put in the host store beforehand): an interpreter is built from the store's file, then the run;
- ``model-warm``: the same sandbox again, every model a cache hit: the steady state;
- ``in-process``: ``minifaas.testing.call`` of the same function in this process, warm (its models cached);
  twice: with OpenCV's thread pool as this process has it (as a sandbox has it too: the zygote turns OpenCV's
  pool off before forking and each child turns it back on), and single-threaded, for reference;
- ``no-op``: the engine's round trip for the same arguments to a function that does nothing: its fixed cost.

The warm variants are interleaved call by call, in an order shuffled every round, so that drift of the machine
(frequency, other load) and hot caches favour none; the "paired" ratio is the median over rounds of the engine's
call / the in-process call of the same round. Functions are deployed with ``memory_mb=MEMORY_MB`` (see there).
Goal (issue 4): model-warm through the engine <= 1.10x in-process.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cv2

import minifaas
from minifaas.testing import call as call_in_process
from minifaas.testing import run as run_in_process

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
PHOTO = ROOT / "tests" / "data" / "images" / "messi5.jpg"
WARM_UP_CALLS = 5
#: model-cold samples pile up interpreters in one sandbox (LRU up to 512 MB): the default 256 MB address-space
#: budget fits about one set of pose models, then building an interpreter fails inside XNNPACK
MEMORY_MB = 2048
OVERHEAD_GOAL = 1.10
ORDER_SEED = 9
NOOP = "def main(args):\n    return {}\n"
#: function -> (its arguments besides the photo, its model parameters); auto_tag is asked for labels only
#: (``person=False`` skips the pose models), so it is a classifier call
FUNCTION_ARGS: dict[str, dict[str, Any]] = {
    "smart_body_crop": {},
    "auto_tag": {"person": False},
}
MODEL_PARAMS: dict[str, tuple[str, ...]] = {
    "smart_body_crop": ("detector_url", "landmark_url"),
    "auto_tag": ("classifier_url", "labels_url"),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


async def timed(engine: minifaas.Engine, name: str, args: dict[str, Any]) -> tuple[float, minifaas.Activation]:
    t = time.perf_counter()
    act = await engine.call(name, args)
    elapsed = time.perf_counter() - t
    if act.status != "success":
        raise SystemExit(f"{name} failed: {act.status} {act.result}")
    return elapsed, act


def model_ms(act: minifaas.Activation) -> tuple[float, float]:
    """(download ms, load ms) summed over the models the activation loaded."""
    loaded = act.annotations.get("models", [])
    return sum(m["download_ms"] for m in loaded), sum(m["load_ms"] for m in loaded)


async def bench_function(fn: str, n: int, cold_n: int, scratch: Path, launcher: str) -> dict[str, Any]:
    photo = PHOTO.read_bytes()
    args = {"image": photo, **FUNCTION_ARGS[fn]}
    out: dict[str, Any] = {}
    # in-memory records as by default; an empty host model store of this run's own (the engine reads the env var)
    os.environ["MINIFAAS_MODEL_CACHE"] = str(scratch / f"models-{fn}")
    async with minifaas.Engine(launcher=launcher) as engine:  # type: ignore[arg-type]
        # the very first call: empty host store, so the models are copied in ("downloaded") too
        await engine.deploy("first", path=FUNCTIONS / fn, max_sandboxes=1, memory_mb=MEMORY_MB)
        first_s, first = await timed(engine, "first", args)
        out["first"] = (first_s * 1000, *model_ms(first), first.init_time or 0)
        await engine.delete("first")

        cold: list[float] = []
        cold_init: list[float] = []
        cold_load: list[float] = []
        for i in range(cold_n):
            name = f"cold{i}"
            await engine.deploy(name, path=FUNCTIONS / fn, max_sandboxes=1, memory_mb=MEMORY_MB)
            s, act = await timed(engine, name, args)
            assert act.annotations["cold"] and act.annotations["model_cache"] == "miss"
            cold.append(s)
            cold_init.append(float(act.init_time or 0))
            cold_load.append(model_ms(act)[1])
            await engine.delete(name)  # its sandbox stops: every sample starts from the same pool
        out["cold"], out["cold_init"], out["cold_load"] = ms(cold), cold_init, cold_load

        info = await engine.deploy("warm", path=FUNCTIONS / fn, max_sandboxes=1, memory_mb=MEMORY_MB)
        defaults = info["params"]
        for _ in range(WARM_UP_CALLS):
            await timed(engine, "warm", args)

        # model-cold: the warm sandbox gets URLs it never loaded; the host store already holds them
        model_cold: list[float] = []
        model_cold_load: list[float] = []
        for i in range(cold_n):
            fresh: dict[str, Any] = {}
            for param in MODEL_PARAMS[fn]:
                source = Path(str(defaults[param]).removeprefix("file://"))
                copy = scratch / f"{fn}-{i}-{source.name}"
                shutil.copyfile(source, copy)
                fresh[param] = copy.as_uri()
                await engine.model_store.fetch(fresh[param])
            s, act = await timed(engine, "warm", {**args, **fresh})
            assert not act.annotations["cold"] and act.annotations["model_cache"] == "miss"
            model_cold.append(s)
            model_cold_load.append(model_ms(act)[1])
        out["model_cold"], out["model_cold_load"] = ms(model_cold), model_cold_load

        # interleaved warm samples: engine, in-process (OpenCV threads as they are), in-process single-threaded
        for _ in range(WARM_UP_CALLS):
            call_in_process(FUNCTIONS / fn, args, in_process=True)
        cv2_threads = cv2.getNumThreads()
        variants: dict[str, Callable[[], None]] = {
            "in_process": lambda: cv2.setNumThreads(cv2_threads),
            "in_process_1t": lambda: cv2.setNumThreads(0),
        }
        warm: list[float] = []
        warm_compute: list[float] = []
        local: dict[str, list[float]] = {k: [] for k in variants}
        local_compute: dict[str, list[float]] = {k: [] for k in variants}
        hits = 0
        order = ["engine", *variants]
        rng = random.Random(ORDER_SEED)
        for _ in range(n):
            # a call right after one of the same kind finds the caches hot: the order changes on every round
            rng.shuffle(order)
            for key in order:
                if key == "engine":
                    s, act = await timed(engine, "warm", args)
                    warm.append(s)
                    warm_compute.append(sum(act.annotations.get("timings", {}).values()))
                    hits += act.annotations["model_cache"] == "hit"
                    continue
                variants[key]()
                t = time.perf_counter()
                local_act = run_in_process(FUNCTIONS / fn, args, in_process=True)
                local[key].append(time.perf_counter() - t)
                if local_act.status != "success":
                    raise SystemExit(f"{fn} failed in-process: {local_act.result}")
                local_compute[key].append(sum(local_act.annotations.get("timings", {}).values()))
        cv2.setNumThreads(cv2_threads)
        assert hits == n, f"{n - hits} warm calls missed the model cache"
        out["warm"] = ms(warm)
        out["warm_compute"] = warm_compute
        out["cv2_threads"] = cv2_threads
        for key, values in local.items():
            out[key] = ms(values)
            out[f"{key}_compute"] = local_compute[key]
        # the engine's own cost for these arguments: a no-op function, same payload (the photo's bytes)
        await engine.deploy("noop", code=NOOP, max_sandboxes=1)
        for _ in range(WARM_UP_CALLS):
            await timed(engine, "noop", args)
        out["noop"] = ms([(await timed(engine, "noop", args))[0] for _ in range(n)])
        out["stats"] = engine.stats()
    return out


def report(fn: str, n: int, r: dict[str, Any]) -> None:
    first_ms, first_dl, first_load, first_init = r["first"]
    warm50, warm99 = pct(r["warm"], 0.5), pct(r["warm"], 0.99)
    print(f"\n== {fn} ({'; '.join(f'{k}={v}' for k, v in FUNCTION_ARGS[fn].items()) or 'defaults'}), messi5.jpg bytes")
    print(f"{'latency (ms)':52s} {'samples':>7s} {'p50':>8s} {'p99':>8s} {'p50 / warm':>10s}")
    rows = [
        ("cold start (new sandbox, models loaded)", "cold"),
        ("model-cold (warm sandbox, models not loaded)", "model_cold"),
        ("model-warm through the engine", "warm"),
        (f"in-process warm (OpenCV {r['cv2_threads']} threads)", "in_process"),
        ("in-process warm (OpenCV single-threaded)", "in_process_1t"),
        ("engine round trip of a no-op, same arguments", "noop"),
    ]
    for label, key in rows:
        values = r[key]
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        print(f"{label:52s} {len(values):7d} {p50:8.1f} {p99:8.1f} {p50 / warm50:9.2f}x")
    print(
        f"  cold start parts (p50): sandbox init {pct(r['cold_init'], 0.5):.1f} ms, "
        f"model load {pct(r['cold_load'], 0.5):.1f} ms; model-cold load p50 {pct(r['model_cold_load'], 0.5):.1f} ms"
    )
    print(
        f"  very first call (empty host store): {first_ms:.1f} ms = init {first_init} ms + "
        f"store copy {first_dl:.1f} ms + load {first_load:.1f} ms + run"
    )
    for key, label in (("in_process_1t", "single-threaded in-process"), ("in_process", "in-process as is")):
        p50 = warm50 / pct(r[key], 0.5)
        p99 = warm99 / pct(r[key], 0.99)
        # each engine sample against the in-process sample of the same round: robust to drift of the machine
        paired = [w / x for w, x in zip(r["warm"], r[key], strict=True)]
        verdict = "meets" if p50 <= OVERHEAD_GOAL else "misses"
        print(
            f"  engine warm / {label}: p50 {p50:.3f}x, p99 {p99:.3f}x, median of paired ratios "
            f"{pct(paired, 0.5):.3f}x (+{warm50 - pct(r[key], 0.5):.1f} ms at p50); "
            f"{verdict} the <= {OVERHEAD_GOAL:.2f}x goal at p50"
        )
    compute = pct(r["warm_compute"], 0.5)
    compute_1t = pct(r["in_process_1t_compute"], 0.5)
    local_1t = pct(r["in_process_1t"], 0.5)
    print(
        f"  where it goes (p50): the function's timed steps {compute:.1f} ms in the sandbox vs {compute_1t:.1f} ms "
        f"in-process single-threaded; the rest (image decode, plus for the engine transport, scheduling, "
        f"records) {warm50 - compute:.1f} ms vs {local_1t - compute_1t:.1f} ms"
    )
    print(f"  model-cold / model-warm p50 {pct(r['model_cold'], 0.5) / warm50:.2f}x, "
          f"cold start / model-warm p50 {pct(r['cold'], 0.5) / warm50:.2f}x")  # fmt: skip
    st = r["stats"]
    print(f"  engine: launcher {st['launcher']}, cold starts {st['cold_starts']}, warm runs {st['warm_runs']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="warm samples per variant")
    ap.add_argument("--cold", type=int, default=20, help="cold start and model-cold samples")
    ap.add_argument("--launcher", default="auto", choices=["auto", "spawn", "zygote"])
    ap.add_argument("--fn", nargs="+", default=list(FUNCTION_ARGS), choices=list(FUNCTION_ARGS))
    ns = ap.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores (load average {load}), {ns.n} warm samples, "
          f"{ns.cold} cold samples")  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="bench-models-"))
    try:
        for fn in ns.fn:
            report(fn, ns.n, anyio.run(bench_function, fn, ns.n, ns.cold, scratch, ns.launcher))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
