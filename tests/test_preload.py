"""Deploy-time model preloading into the zygote, prewarmed stem cells and min_sandboxes (issue: cold starts)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import minifaas
from minifaas.testing import assert_success

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
MESSI = (ROOT / "tests" / "data" / "images" / "messi5.jpg").read_bytes()


async def test_models_named_at_deploy_are_shared_from_the_zygote() -> None:
    async with minifaas.Engine() as engine:
        await engine.deploy(
            "crop", path=ROOT / "functions" / "smart_body_crop", models=["detector_url", "landmark_url"]
        )
        stats = engine.stats()
        assert stats["launcher"] == "zygote"
        # both pose models (2,959,046 + 6,440,512 bytes) now live in the zygote's memory
        assert stats["launcher_stats"]["model_bytes"] >= 2_959_046 + 6_440_512
        act = await engine.call("crop", {"image": MESSI})
        assert_success(act)
        assert act.result["person"] is True
        assert act.annotations["launch"] == "fork"


async def test_prewarmed_stem_cell_is_specialized() -> None:
    async with minifaas.Engine(prewarm=2) as engine:
        with anyio.fail_after(30):
            while len(engine._pool.stem) < 2:  # type: ignore[union-attr]
                await anyio.sleep(0.02)
        await engine.deploy("hello", code="def main(a):\n    return {'ok': True}\n")
        act = await engine.call("hello")
        assert_success(act)
        stats = engine.stats()
        assert stats["prewarmed_specializations"] == 1
        # the pool refills the stem cell it used
        with anyio.fail_after(30):
            while len(engine._pool.stem) < 2:  # type: ignore[union-attr]
                await anyio.sleep(0.02)


async def test_min_sandboxes_kept_warm(fake_clock: minifaas.testing.FakeClock) -> None:
    async with minifaas.Engine(clock=fake_clock) as engine:
        await engine.deploy("warm", code="def main(a):\n    return {}\n", min_sandboxes=2, idle_timeout_s=1)
        await engine.invoke("warm")  # creates the pool entry; the reaper then tops it up to 2
        engine._pool.wake_reaper()  # type: ignore[union-attr]
        with anyio.fail_after(30):
            while engine.stats()["functions"]["guest/warm@1"]["idle"] < 2:
                await anyio.sleep(0.02)
        pids = sorted(engine.stats()["functions"]["guest/warm@1"]["pids"])
        fake_clock.advance(3600)  # an hour idle, far past idle_timeout_s
        await anyio.sleep(0.3)
        # the same two processes are still there: min_sandboxes are never reaped
        assert sorted(engine.stats()["functions"]["guest/warm@1"]["pids"]) == pids
        act = await engine.call("warm")
        assert_success(act)
        assert act.result == {} and len(pids) == 2


async def test_min_sandboxes_warm_before_the_first_request() -> None:
    async with minifaas.Engine() as engine:
        await engine.deploy("provisioned", code="def main(a):\n    return {}\n", min_sandboxes=1)
        with anyio.fail_after(30):
            while engine.stats()["functions"].get("guest/provisioned@1", {}).get("idle", 0) < 1:
                await anyio.sleep(0.02)
        act = await engine.call("provisioned")
        assert act.annotations["cold"] is False and act.init_time is None


async def test_histogram_policy_unloads_and_prewarms(fake_clock: minifaas.testing.FakeClock) -> None:
    async with minifaas.Engine(clock=fake_clock, keepalive="histogram") as engine:
        await engine.deploy("periodic", code="def main(a):\n    return {}\n")
        key = "guest/periodic@1"
        for _ in range(12):  # a timer-like function: one call every 5 minutes
            await engine.invoke("periodic")
            fake_clock.advance(300)
            await anyio.sleep(0.05)
        await engine.invoke("periodic")
        # representative histogram: unload right after use, pre-warm at p5 - 10% (about 4.5 minutes later)
        with anyio.fail_after(10):
            while engine.stats()["functions"][key]["sandboxes"]:
                await anyio.sleep(0.02)
        fake_clock.advance(290)
        with anyio.fail_after(30):
            while engine.stats()["functions"][key]["idle"] < 1:
                await anyio.sleep(0.02)
        assert engine.stats()["policy_prewarms"] >= 1
        act = await engine.call("periodic")
        assert act.annotations["cold"] is False


async def test_a_prewarmed_sandbox_nobody_uses_expires(fake_clock: minifaas.testing.FakeClock) -> None:
    async with minifaas.Engine(clock=fake_clock, keepalive="histogram") as engine:
        await engine.deploy("periodic", code="def main(a):\n    return {}\n")
        key = "guest/periodic@1"
        for _ in range(12):  # a timer-like function (one call every 5 minutes) that then stops
            await engine.invoke("periodic")
            fake_clock.advance(300)
            await anyio.sleep(0.05)
        await engine.invoke("periodic")
        with anyio.fail_after(10):
            while engine.stats()["functions"][key]["sandboxes"]:
                await anyio.sleep(0.02)
        prewarms = engine.stats().get("policy_prewarms", 0)
        fake_clock.advance(290)  # the policy pre-warms one about 4.5 minutes after the last call
        with anyio.fail_after(30):
            while engine.stats()["functions"][key]["idle"] < 1:
                await anyio.sleep(0.02)
        assert engine.stats()["policy_prewarms"] == prewarms + 1
        # no call comes: past the policy's keep-alive end (p99 + 10% of the idle times, ~6.6 min) it is stopped
        fake_clock.advance(60)
        await anyio.sleep(0.1)
        assert engine.stats()["functions"][key]["idle"] == 1
        fake_clock.advance(100 * 3600)
        with anyio.fail_after(10):
            while engine.stats()["functions"][key]["sandboxes"]:
                await anyio.sleep(0.02)
        stats = engine.stats()
        assert stats["prewarms_expired_unused"] == 1 and stats["policy_prewarms"] == prewarms + 1


async def test_greedy_dual_forgets_a_function_hot_long_ago(fake_clock: minifaas.testing.FakeClock) -> None:
    # frequency counts over a function's live sandboxes (FaasCache): 100 calls long ago do not protect it now
    async with minifaas.Engine(clock=fake_clock, memory_budget_mb=512) as engine:
        noop = "def main(a):\n    return {}\n"
        await engine.deploy("steady", code=noop, memory_mb=256)
        await engine.deploy("once-hot", code=noop, memory_mb=256, idle_timeout_s=60)
        await engine.deploy("newcomer", code=noop, memory_mb=256)
        await engine.deploy("first", code=noop, memory_mb=256, idle_timeout_s=1)
        await engine.invoke("first")  # the engine's first start (its zygote's) is slower than the rest
        fake_clock.advance(2)
        for _ in range(100):
            await engine.invoke("once-hot")
        fake_clock.advance(120)  # its sandbox expires: all its live sandboxes are gone
        with anyio.fail_after(10):
            while engine.stats()["functions"]["guest/once-hot@1"]["sandboxes"]:
                await anyio.sleep(0.02)
        for _ in range(30):
            await engine.invoke("steady")
        await engine.invoke("once-hot")  # back, on a new sandbox: 1 call on it
        await engine.invoke("newcomer")  # the budget is full: one idle sandbox must go
        functions = engine.stats()["functions"]
        assert functions["guest/steady@1"]["sandboxes"] == 1
        assert functions["guest/once-hot@1"]["sandboxes"] == 0
        assert engine.stats()["evictions_memory"] == 1
