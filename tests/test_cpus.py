"""Warm work keeps its cores (minifaas._core.cpus): real sandboxes, real CPU load, masks read back from the kernel."""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
import pytest

import minifaas
from minifaas.testing import assert_success
from tests.helpers.proc import children

CORES = frozenset(os.sched_getaffinity(0))
pytestmark = [pytest.mark.anyio, pytest.mark.skipif(len(CORES) < 2, reason="needs two cores or more")]

SPIN = (
    "import time\n"
    "def main(args):\n"
    "    end = time.monotonic() + args['s']\n"
    "    while time.monotonic() < end:\n"
    "        pass\n"
    "    return {}\n"
)
SLEEP = "import time\ndef main(args):\n    time.sleep(args['s'])\n    return {}\n"
NOOP = "def main(args):\n    return {}\n"


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


def _pid(engine: minifaas.Engine, name: str) -> int:
    (pid,) = engine.stats()["functions"][f"guest/{name}@1"]["pids"]
    return int(pid)


def _zygote(engine: minifaas.Engine) -> int:
    return int(engine.stats()["launcher_stats"]["zygote_pid"])


async def test_a_sandbox_running_flat_out_gets_a_core_and_cold_starts_the_rest() -> None:
    async with minifaas.Engine(launcher="zygote", min_spares=2, max_spares=2) as engine:
        await engine.deploy("hot", code=SPIN)
        await engine.deploy("cold", code=NOOP)
        assert_success(await engine.call("hot", {"s": 0}))
        hot = _pid(engine, "hot")
        zygote = _zygote(engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, "hot", {"s": 2.0})
            await _until(lambda: hot in engine.stats()["cpus"]["pinned"])
            core = engine.stats()["cpus"]["pinned"][hot]
            rest = set(CORES - {core})
            assert os.sched_getaffinity(hot) == {core}
            # the zygote, its spares and every sandbox it forks from now on stay off that core
            assert os.sched_getaffinity(zygote) == rest
            # and the engine's event loop's thread (this one), so its launches wait on the other cores too
            assert os.sched_getaffinity(0) == rest
            spares = [k for k in children(zygote) if k != hot]
            assert spares and all(os.sched_getaffinity(k) == rest for k in spares)
            assert_success(await engine.call("cold"))
            assert os.sched_getaffinity(_pid(engine, "cold")) == rest
            assert engine.stats()["cpus"]["partitions"] == 1
        # the run ended: every mask is the host's again
        await _until(lambda: not engine.stats()["cpus"]["pinned"])
        for pid in (hot, zygote, _pid(engine, "cold"), *children(zygote)):
            assert os.sched_getaffinity(pid) == set(CORES), pid
        assert os.sched_getaffinity(0) == set(CORES)
        assert engine.stats()["cpus"]["releases"] == 1


@pytest.mark.skipif(len(CORES) > 4, reason="would need a sandbox running flat out on every core")
async def test_no_core_is_kept_when_every_core_runs_flat_out() -> None:
    """Pinning needs a core left for everything else: with as many sandboxes running flat out as cores, none."""
    n = len(CORES)
    async with minifaas.Engine(launcher="zygote") as engine:
        await engine.deploy("hot", code=SPIN, max_sandboxes=n)
        seen: list[dict[int, int]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(engine.call, "hot", {"s": 1.0})
            for _ in range(15):
                await anyio.sleep(0.05)
                seen.append(engine.stats()["cpus"]["pinned"])
        assert not any(seen), seen


async def test_a_busy_sandbox_that_sleeps_is_not_pinned() -> None:
    async with minifaas.Engine(launcher="zygote") as engine:
        await engine.deploy("sleepy", code=SLEEP)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, "sleepy", {"s": 0.6})
            await anyio.sleep(0.5)
            assert engine.stats()["cpus"]["pinned"] == {}
        assert engine.stats()["cpus"]["partitions"] == 0


async def test_keep_warm_cores_off_pins_nothing() -> None:
    async with minifaas.Engine(launcher="zygote", keep_warm_cores=False) as engine:
        await engine.deploy("hot", code=SPIN)
        assert_success(await engine.call("hot", {"s": 0}))
        hot = _pid(engine, "hot")
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, "hot", {"s": 0.6})
            await anyio.sleep(0.5)
            assert os.sched_getaffinity(hot) == set(CORES)
        assert "cpus" not in engine.stats()
