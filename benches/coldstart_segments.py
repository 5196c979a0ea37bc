"""Where a no-op's cold start goes, segment by segment, for ``isolation="process"`` and ``"sandbox"`` interleaved
sample by sample (zygote with a ready spare, as ``bench_isolation.py``).

Timestamps on CLOCK_MONOTONIC (one clock for every process of the machine; a sandbox's PID namespace shares it):
the host's call, ``Pool.boot``, ``ZygoteLauncher.launch`` (FORK sent to the zygote -> FORKED back: the handover
to a spare), ``Sandbox.init`` (INIT sent -> INIT_DONE), and inside the sandbox the function's module running (at
INIT: after the spare took its request, READY, the environment, ``isolation.enter`` and the scratch dir) and its
``main`` running (RUN). Medians in ms; on a shared machine compare the two modes (or two checkouts run in turn),
not the absolute figures.

Run: ``python benches/coldstart_segments.py [--n 30]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import minifaas
from minifaas._core.pool import Pool
from minifaas._core.sandbox import Sandbox
from minifaas._core.zygote import ZygoteLauncher

CODE = "import time\nT0 = time.monotonic()\ndef main(args):\n    return {'t0': T0, 't1': time.monotonic()}\n"
MODES = ("process", "sandbox")
#: pause before each sample, for the zygote's spares to be forked and ready again
SAMPLE_GAP_S = 0.15

_marks: dict[str, float] = {}


def _timed(key: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _marks[key + "<"] = time.monotonic()
        try:
            return await fn(*args, **kwargs)
        finally:
            _marks[key + ">"] = time.monotonic()

    return wrapper


async def segments(n: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    async with minifaas.Engine(max_sandboxes=4) as engine:
        await engine.deploy("warmup", code=CODE)
        await engine.invoke("warmup", {})
        for i in range(n):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                name = f"seg-{mode}-{i}"
                await engine.deploy(name, code=CODE, isolation=mode)  # type: ignore[arg-type]
                await anyio.sleep(SAMPLE_GAP_S)
                _marks.clear()
                t0 = time.monotonic()
                act = await engine.call(name, {})
                t_end = time.monotonic()
                r = act.result
                points = [
                    ("call", t0),
                    ("boot", _marks["boot<"]),
                    ("FORK sent", _marks["launch<"]),
                    ("FORKED", _marks["launch>"]),
                    ("INIT sent", _marks["init<"]),
                    ("module runs", float(r["t0"])),
                    ("INIT_DONE", _marks["init>"]),
                    ("main runs", float(r["t1"])),
                    ("result", t_end),
                ]
                for (a, ta), (b, tb) in itertools.pairwise(points):
                    out[mode].setdefault(f"{a} -> {b}", []).append((tb - ta) * 1000)
                out[mode].setdefault("total", []).append((t_end - t0) * 1000)
                await engine.delete(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    ns = parser.parse_args()
    Pool.boot = _timed("boot", Pool.boot)  # type: ignore[method-assign,assignment]
    ZygoteLauncher.launch = _timed("launch", ZygoteLauncher.launch)  # type: ignore[method-assign,assignment]
    Sandbox.init = _timed("init", Sandbox.init)  # type: ignore[method-assign,assignment]
    res = anyio.run(segments, ns.n)
    print(f"{'segment (median ms)':28s} {'process':>8s} {'sandbox':>8s}")
    for key in res["process"]:
        p, s = statistics.median(res["process"][key]), statistics.median(res["sandbox"][key])
        print(f"{key:28s} {p:8.3f} {s:8.3f}")


if __name__ == "__main__":
    main()
