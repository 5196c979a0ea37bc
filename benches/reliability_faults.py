"""The ten faults of issue 25, each tried on a real engine: what happens, nothing lost, nothing hung.

Used by ``benches/bench_reliability.py --only faults`` (one README row per fault). For each fault, every accepted
invocation is followed to its final record: ``lost`` counts those without exactly one end (an end hook counts them,
and the store must read the same), ``hung`` those not ended within a bound. About a minute on 2 cores.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

import minifaas

#: how long any one activation may take to end in these scenarios before it counts as hung
HUNG_AFTER_S = 30.0
SLEEP = "import time\ndef main(a):\n    time.sleep(a.get('s', 0))\n    return {'s': a.get('s', 0)}\n"
NOOP = "def main(a):\n    return {'ok': 1}\n"


class Tally:
    """Every accepted activation of one scenario and how many times each ended."""

    def __init__(self, engine: minifaas.Engine) -> None:
        self.engine = engine
        self.ids: list[str] = []
        self.ends: collections.Counter[str] = collections.Counter()
        engine.add_end_hook(lambda act: self.ends.update([act.activation_id]))

    async def submit(self, name: str, args: dict[str, Any]) -> str:
        aid = await self.engine.submit(name, args)
        self.ids.append(aid)
        return aid

    async def call(self, name: str, args: dict[str, Any]) -> minifaas.Activation:
        aid = await self.submit(name, args)
        return await self.engine.activations.wait(aid, timeout_s=HUNG_AFTER_S)

    async def settle(self) -> dict[str, Any]:
        statuses: collections.Counter[str] = collections.Counter()
        hung = lost = 0
        for aid in self.ids:
            try:
                act = await self.engine.activations.wait(aid, timeout_s=HUNG_AFTER_S)
            except minifaas.ActivationTimeout:
                hung += 1
                continue
            stored = await self.engine.activations.get(aid)
            if self.ends[aid] != 1 or not stored.done or stored.status != act.status:
                lost += 1
            statuses[act.status] += 1
        return {"accepted": len(self.ids), "statuses": dict(statuses), "lost": lost, "hung": hung}


def _row(n: int, fault: str, outcome: str, tally: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"n": n, "fault": fault, "outcome": outcome, "seconds": round(seconds, 1), **tally, **extra}


async def f1_store_write_fails(tmp: Path) -> dict[str, Any]:
    """Another connection holds the state database's write lock for 3 s while 20 calls run side by side."""
    t0 = time.monotonic()
    async with minifaas.Engine(tmp / "f1", close_timeout_s=5) as engine:
        tally = Tally(engine)
        await engine.deploy("f", code=NOOP, max_sandboxes=2)
        await tally.call("f", {})
        other = sqlite3.connect(str(tmp / "f1" / "activations.sqlite3"), isolation_level=None, timeout=10)
        other.execute("BEGIN IMMEDIATE")
        durations: list[float] = []
        failing = False

        async def one() -> None:
            t = time.monotonic()
            await tally.call("f", {})
            durations.append(time.monotonic() - t)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
            await anyio.sleep(3.0)
            failing = bool(engine.stats().get("store", {}).get("failing"))
            other.execute("COMMIT")
            other.close()
        result = await tally.settle()
        with anyio.fail_after(15):
            while engine.stats().get("store", {}).get("failing"):
                await anyio.sleep(0.1)
        caught_up = time.monotonic() - t0
    outcome = (
        f"20 calls side by side: all ended, slowest {max(durations):.1f} s; the writer said failing: {failing}, "
        f"retried and caught up once unlocked ({caught_up:.1f} s in); engine up"
    )
    return _row(1, "state database write-locked 3 s", outcome, result, time.monotonic() - t0)


async def f2_init_hangs(tmp: Path) -> dict[str, Any]:
    hang = "import time\nprint('loading')\ntime.sleep(3600)\ndef main(a):\n    return {}\n"
    t0 = time.monotonic()
    async with minifaas.Engine(close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("hang", code=hang, timeout_s=1.0)
        await engine.deploy("one", code=SLEEP, max_sandboxes=1, max_queue_wait_s=0.5)
        await tally.call("one", {})
        hung_ids = [await tally.submit("hang", {}) for _ in range(3)]
        busy = await tally.submit("one", {"s": 1.5})
        queued = await tally.submit("one", {})
        result = await tally.settle()
        first = await engine.activations.get(hung_ids[0])
        q = await engine.activations.get(queued)
        await engine.activations.get(busy)
    outcome = (
        f"init past timeout_s=1: {first.status} after {first.duration / 1000:.1f} s with its logs; "
        f"queued past max_queue_wait_s=0.5: {q.status} (queue_timeout)"
    )
    return _row(2, "import sleeps 1 h; a queue wait past its bound", outcome, result, time.monotonic() - t0)


async def f3_crash_loop(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("bad", code="raise RuntimeError('boom')\ndef main(a):\n    return {}\n", min_sandboxes=1)
        await anyio.sleep(3.0)
        stats = engine.stats()
        launches = stats.get("forks", 0) + stats.get("spawns", 0)
        act = await tally.call("bad", {})
        result = await tally.settle()
    says = "says so" if "failed initializations in a row" in act.result.get("error", "") else "does NOT say so"
    outcome = f"{launches} launches in 3 s (back-off; was hundreds a second); the call: {act.status}, {says}"
    return _row(3, "import raises, min_sandboxes=1", outcome, result, time.monotonic() - t0, launches=launches)


async def f4_stalled_zygote(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(launcher="zygote", close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("long", code=SLEEP)
        await engine.deploy("cold", code=NOOP)
        await engine.deploy("warm", code=NOOP)
        await tally.call("long", {})
        await tally.call("warm", {})
        running = await tally.submit("long", {"s": 12.0})
        await anyio.sleep(0.3)
        zygote = engine.stats()["launcher_stats"]["zygote_pid"]
        os.kill(zygote, signal.SIGSTOP)
        t = time.monotonic()
        cold = await tally.call("cold", {})
        cold_s = time.monotonic() - t
        retired = engine.stats()["launcher_stats"]["zygotes_retired"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote, signal.SIGCONT)
        # and the new zygote killed outright: the warm sandboxes it did not fork... and those it did, serve on
        os.kill(engine.stats()["launcher_stats"]["zygote_pid"], signal.SIGKILL)
        warm_pids = engine.stats()["functions"]["guest/warm@1"]["pids"]
        warm = [await tally.call("warm", {}) for _ in range(20)]
        same = engine.stats()["functions"]["guest/warm@1"]["pids"] == warm_pids
        result = await tally.settle()
        long = await engine.activations.get(running)
    outcome = (
        f"stalled (SIGSTOP): cold start served by a new zygote after {cold_s:.1f} s ({cold.status}), "
        f"{retired} retired; its 12 s call {long.status}; zygote SIGKILLed: 20 warm calls, "
        f"{sum(a.status == 'success' for a in warm)} success on the same sandboxes: {same}"
    )
    return _row(4, "zygote stopped, then a zygote killed", outcome, result, time.monotonic() - t0)


async def f5_two_engines(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(tmp / "f5", close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("long", code=SLEEP)
        running = await tally.submit("long", {"s": 1.0})
        await anyio.sleep(0.3)
        try:
            async with minifaas.Engine(tmp / "f5", launcher="spawn"):
                second = "started (!)"
        except minifaas.StateDirLocked:
            second = "StateDirLocked"
        async with minifaas.Engine(tmp / "f5", read_only=True) as reader:
            seen = (await reader.activations.get(running)).status
        result = await tally.settle()
        act = await engine.activations.get(running)
    outcome = (
        f"second engine: {second}; a read-only one reads the running record ({seen}); "
        f"the first's activation: {act.status}, recovered: {bool(act.annotations.get('recovered'))}"
    )
    return _row(5, "a second engine on a live state dir", outcome, result, time.monotonic() - t0)


async def f6_daemon_holds_channel(tmp: Path) -> dict[str, Any]:
    daemon = (
        "import os, time\ndef main(a):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(40)\n"
        "        os._exit(0)\n    return {'ok': 1}\n"
    )
    t0 = time.monotonic()
    engine = minifaas.Engine(close_timeout_s=1)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(engine)
        tally = Tally(engine)
        await engine.deploy("d", code=daemon, timeout_s=5)
        await tally.call("d", {})
        pid = engine.stats()["functions"]["guest/d@1"]["pids"][0]
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        with anyio.fail_after(HUNG_AFTER_S):
            while engine.stats()["functions"]["guest/d@1"]["pids"] == [pid]:
                await anyio.sleep(0.01)
        seen_s = time.monotonic() - t
        await tally.call("d", {})
        result = await tally.settle()
        t = time.monotonic()
        with anyio.fail_after(HUNG_AFTER_S):
            await engine.aclose()
        close_s = time.monotonic() - t
    outcome = f"death seen after {seen_s:.2f} s (pidfd); aclose() with the daemon alive: {close_s:.1f} s"
    return _row(6, "a setsid() daemon holding the channel", outcome, result, time.monotonic() - t0)


async def f7_caps(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(max_sandboxes=1, memory_budget_mb=100, close_timeout_s=0.5) as engine:
        try:
            await engine.deploy("big", code=NOOP, memory_mb=256)
            refused = "accepted (!)"
        except minifaas.DeployError:
            refused = "DeployError"
    async with minifaas.Engine(prewarm=1, max_sandboxes=2, memory_budget_mb=300, close_timeout_s=0.5) as engine:
        tally = Tally(engine)
        await engine.deploy("a", code=SLEEP, memory_mb=200)
        await engine.deploy("b", code=SLEEP, memory_mb=200)
        with anyio.fail_after(10):
            while not engine._pool.stem:  # type: ignore[union-attr]
                await anyio.sleep(0.05)
        peak = 0
        await tally.submit("a", {"s": 1.0})
        await anyio.sleep(0.2)
        await tally.submit("b", {})
        for _ in range(20):
            peak = max(peak, engine._pool.memory_in_use())  # type: ignore[union-attr]
            await anyio.sleep(0.05)
        result = await tally.settle()
    outcome = f"memory_mb over the budget: {refused} at deploy; with a stem cell, peak {peak} of 300 MB in use"
    return _row(7, "memory budget vs stem cells and big functions", outcome, result, time.monotonic() - t0)


async def f8_structured(tmp: Path) -> dict[str, Any]:
    from tests.helpers.proc import descendants, proc_table

    t0 = time.monotonic()
    before = descendants(os.getpid(), proc_table())
    engine = minifaas.Engine()
    await engine.__aenter__()
    tally = Tally(engine)
    await engine.deploy("f", code=NOOP)
    await tally.call("f", {})
    result = await tally.settle()
    try:
        with anyio.fail_after(30):
            await engine.aclose()
        bounded = "closed"
    except BaseException as exc:  # what the fault raised: a cancel-scope RuntimeError
        bounded = type(exc).__name__
    await engine.__aexit__(None, None, None)
    state = tmp / "f8"
    (state / "triggers").mkdir(parents=True)
    (state / "triggers" / "state.json").write_text("{not json")
    try:
        async with minifaas.Engine(state):
            failed = "started (!)"
    except minifaas.TriggerError:
        failed = "TriggerError"
    await anyio.sleep(1.0)
    left = len(descendants(os.getpid(), proc_table()) - before)
    outcome = f"aclose() inside fail_after: {bounded}; a corrupt state file at start: {failed}, {left} processes left"
    return _row(8, "close in a cancel scope; a failing start", outcome, result, time.monotonic() - t0, left=left)


async def f9_pipelining(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("f", code=SLEEP, max_sandboxes=8)
        for _ in range(500):
            await tally.call("f", {})
        slowest: list[float] = []
        for _ in range(3):
            t = time.monotonic()
            lat: list[float] = []

            async def one(lat: list[float] = lat, t: float = t) -> None:
                await tally.call("f", {"s": 0.2})
                lat.append(time.monotonic() - t)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one)
            slowest.append(max(lat))
        result = await tally.settle()
    outcome = (
        f"after 500 fast calls, 4 parallel 0.2 s calls: slowest {', '.join(f'{s:.2f}' for s in slowest)} s per burst "
        "(queued behind each other: 0.8 s)"
    )
    return _row(9, "fast calls, then slow ones in parallel", outcome, result, time.monotonic() - t0)


async def f10_death_between_requests(tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    async with minifaas.Engine(close_timeout_s=1) as engine:
        tally = Tally(engine)
        await engine.deploy("f", code=NOOP, max_sandboxes=1)
        kills = 0
        for _ in range(30):
            await tally.call("f", {})
            os.kill(engine.stats()["functions"]["guest/f@1"]["pids"][0], signal.SIGKILL)
            kills += 1
            await tally.call("f", {})  # routed before the host has read the end of the channel
        result = await tally.settle()
    outcome = f"{kills} SIGKILLs between two requests: the unread RUN is resent to a new sandbox"
    return _row(10, "a sandbox killed between requests", outcome, result, time.monotonic() - t0, kills=kills)


SCENARIOS: tuple[Callable[[Path], Awaitable[dict[str, Any]]], ...] = (
    f1_store_write_fails,
    f2_init_hangs,
    f3_crash_loop,
    f4_stalled_zygote,
    f5_two_engines,
    f6_daemon_holds_channel,
    f7_caps,
    f8_structured,
    f9_pipelining,
    f10_death_between_requests,
)


async def run_all(say: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="minifaas-faults-") as tmp:
        for scenario in SCENARIOS:
            try:
                row = await scenario(Path(tmp))
            except Exception as exc:  # a scenario that breaks is a row saying so, not the end of the bench
                n = SCENARIOS.index(scenario) + 1
                row = _row(n, scenario.__name__, f"FAILED: {type(exc).__name__}: {exc}", {"lost": -1, "hung": -1}, 0)
            say(
                f"fault {row['n']}: {row['fault']}: {row['outcome']}; accepted {row.get('accepted', 0)}, "
                f"lost {row['lost']}, hung {row['hung']} ({row['seconds']} s)"
            )
            rows.append(row)
    return rows


def table_rows(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(r.get("statuses", {}).items()))
        out.append(
            f"| fault {r['n']}: {r['fault']} | {r.get('accepted', 0)} accepted ({statuses}) | {r['outcome']} | "
            f"{r['lost']} lost, {r['hung']} hung ({r['seconds']} s) |"
        )
    return out
