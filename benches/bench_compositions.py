"""Composition overhead: a 10-step sequence of a no-op function vs 10 direct ``engine.invoke`` calls.

Run: ``python benches/bench_compositions.py [--rounds 300] [--steps 10]``. One engine, one warm sandbox of a
no-op function; the variants are interleaved round by round so drift hits them alike. Printed: median and p90
wall time of one round (all steps), per-step time, and the ratio to the direct calls. The per-step overhead of
the conductor is ``(sequence - direct) / steps``. A sequence of host functions (``function`` steps, no
sandbox) shows the conductor's own cost per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import minifaas
from minifaas import composer as c
from minifaas._core.activation import Activation
from minifaas._workflows.conductor import call_composition, run_session
from minifaas._workflows.sessions import SessionStore

NOOP = "def main(args):\n    return args\n"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def host_noop(p: dict[str, Any]) -> dict[str, Any]:
    return p


async def main(rounds: int, steps: int) -> None:
    async with minifaas.Engine() as engine:
        await engine.deploy("noop", code=NOOP, max_sandboxes=1)
        args = {"x": 1}
        seq = c.sequence(*(["noop"] * steps))
        host_seq = c.sequence(*([host_noop] * steps))
        sessions = SessionStore()
        ids = iter(range(1 << 62))

        async def invoke(name: str, p: dict[str, Any], cause: str) -> Activation:
            return await engine.call(name, p, cause=cause)

        async def submit(name: str, p: dict[str, Any], cause: str) -> str:
            return await engine.submit(name, p, cause=cause)

        async def direct() -> None:
            for _ in range(steps):
                await engine.invoke("noop", args)

        async def conductor() -> None:
            s = await run_session(
                seq, args, invoke=invoke, submit=submit, session_id=f"{next(ids):032x}", max_steps=steps
            )
            assert s.status == "success", s.result

        async def composition() -> None:
            act = await call_composition(engine, "seq", seq, args, sessions=sessions)
            assert act.status == "success", act.result

        async def host_functions() -> None:
            s = await run_session(
                host_seq, args, invoke=invoke, submit=submit, session_id=f"{next(ids):032x}", max_steps=steps
            )
            assert s.status == "success", s.result

        variants: dict[str, Callable[[], Awaitable[None]]] = {
            f"{steps} x engine.invoke (direct)": direct,
            f"sequence of {steps} actions (run_session)": conductor,
            f"sequence of {steps} actions (call_composition)": composition,
            f"sequence of {steps} host functions": host_functions,
        }
        if hasattr(engine, "deploy_composition"):
            await engine.deploy_composition("seq", seq)

            async def engine_invoke() -> None:
                await engine.invoke("seq", args)

            variants[f"sequence of {steps} actions (engine.invoke)"] = engine_invoke

        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm up: sandbox started, code paths hot
            for _ in range(10):
                await fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                await fn()
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times[f"{steps} x engine.invoke (direct)"])
    print(f"rounds={rounds} steps={steps} (one warm sandbox of a no-op function)\n")
    print(f"{'variant':<48} {'median ms':>10} {'p90 ms':>8} {'per step us':>12} {'vs direct':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<48} {med * 1e3:>10.3f} {pct(ts, 0.9) * 1e3:>8.3f} {med / steps * 1e6:>12.1f} {med / base:>9.2f}x"
        )
    seq_med = statistics.median(times[f"sequence of {steps} actions (run_session)"])
    print(
        f"\nconductor overhead per action step: {(seq_med - base) / steps * 1e6:.1f} us "
        f"(({seq_med * 1e3:.3f} - {base * 1e3:.3f}) ms / {steps})"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    anyio.run(main, a.rounds, a.steps)
