"""Spares sized by demand: the zygote keeps as many children forked ahead as recent bursts of cold starts asked for,
back to one when they decay, within the engine's bound and memory budget. Real zygotes and forks."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from minifaas_sandbox import zygote as sandbox_zygote

import minifaas
from minifaas._core import spares
from minifaas._core.keepalive import FixedPolicy
from minifaas._core.launch import Launched, scrubbed_env
from minifaas._core.pool import REAP_INTERVAL_MAX_S
from minifaas._core.spares import BURST_WINDOW_S, SpareSizer
from minifaas._core.zygote import ZygoteLauncher
from minifaas.testing import assert_success
from tests.helpers.proc import children

pytestmark = pytest.mark.anyio

SLEEP = "import time\ndef main(args):\n    time.sleep(args.get('s', 0.02))\n    return {}\n"


# -- the policy ------------------------------------------------------------------------------------------------
def test_one_spare_for_single_cold_starts() -> None:
    sizer = SpareSizer(min_spares=1, max_spares=8)
    assert sizer.target(0.0) == 1
    for t in (0.0, 1.0, 2.0, 3.0):  # one at a time, far apart
        sizer.record(t)
    assert sizer.target(3.0) == 1


def test_a_burst_sets_the_spares_and_decays_by_half_lives() -> None:
    sizer = SpareSizer(min_spares=1, max_spares=8, half_life_s=60.0)
    times = [100.0 + i * BURST_WINDOW_S / 10 for i in range(8)]
    for t in times:
        sizer.record(t)
    end = times[-1]
    assert sizer.target(end) == 8
    assert sizer.target(end + 60.0) == 4
    assert sizer.target(end + 120.0) == 2
    assert sizer.target(end + 600.0) == 1  # forgotten: back to the floor
    assert sizer.next_change_s(end + 600.0) is None
    wait = sizer.next_change_s(end)
    assert wait is not None and sizer.target(end + wait + 0.01) == 7


def test_bounds_and_room() -> None:
    sizer = SpareSizer(min_spares=0, max_spares=4)
    assert sizer.target(0.0) == 0
    for _ in range(10):
        sizer.record(5.0)
    assert sizer.target(5.0) == 4  # the engine's bound
    assert sizer.target(5.0, room=2) == 2  # what the memory budget leaves room for
    assert sizer.target(5.0, room=0) == 0
    with pytest.raises(ValueError, match="min_spares <= max_spares"):
        SpareSizer(min_spares=3, max_spares=2)


# -- the zygote ------------------------------------------------------------------------------------------------
async def _until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def _burst(launcher: ZygoteLauncher, n: int) -> list[Launched]:
    procs: list[Launched] = []

    async def one() -> None:
        procs.append(await launcher.launch(scrubbed_env()))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return procs


async def _end(procs: list[Launched]) -> None:
    for proc in procs:
        proc.kill()
        await proc.wait()
        proc.close()


async def test_a_burst_is_met_by_spares_the_next_time_and_they_go_back_to_one() -> None:
    now = [1000.0]  # the demand's clock, moved by the test (the forks and processes are real)
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), max_spares=8, clock=lambda: now[0]) as launcher:
        await _until(lambda: len(launcher.stats()["spares_ready"]) == 1)
        first = await _burst(launcher, 8)  # the first burst: nobody could have known
        try:
            assert launcher.stats()["spares_target"] == 8
            await _until(lambda: len(launcher.stats()["spares_ready"]) == 8)
            zygote = launcher.stats()["zygote_pid"]
            spares = set(launcher.stats()["spares_ready"])
            assert spares <= set(children(zygote))  # real processes, children of the zygote
            ahead_before = launcher.stats()["forks_ahead"]
            second = await _burst(launcher, 8)
            assert launcher.stats()["forks_ahead"] - ahead_before == 8  # every one handed over, none forked late
            assert {p.pid for p in second} == spares
            await _end(second)
            now[0] += 120.0  # two half-lives later: a burst of 16 counts as 4
            launcher.resize_spares()
            await _until(lambda: launcher.stats()["spares_target"] == 4 and launcher.stats()["spares"] == 4)
            now[0] += 600.0  # forgotten: back to one
            launcher.resize_spares()
            await _until(lambda: launcher.stats()["spares"] == 1)
            await _until(lambda: len(children(launcher.stats()["zygote_pid"])) == len(first) + 1)
        finally:
            await _end(first)


async def test_a_burst_its_spares_served_is_refilled_in_a_lull_not_beside_its_inits() -> None:
    # a long lull (3 s) makes "not at once" visible on a loaded machine
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), max_spares=4, refork_delay_s=3.0) as launcher:
        await _until(lambda: len(launcher.stats()["spares_ready"]) == 1)
        first = await _burst(launcher, 4)
        try:
            await _until(lambda: len(launcher.stats()["spares_ready"]) == 4)
            second = await _burst(launcher, 4)
            assert all(getattr(proc, "ahead", False) for proc in second)  # all four from spares
            await anyio.sleep(0.5)
            assert launcher.stats()["spares"] == 0  # no fork beside the burst's first steps
            await _until(lambda: len(launcher.stats()["spares_ready"]) == 4)  # after the lull
            await _end(second)
        finally:
            await _end(first)


async def test_launches_that_change_no_target_leave_the_sizing_task_asleep() -> None:
    now = [1000.0]  # a clock that stands still: no decay is due while the test runs
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), max_spares=4, clock=lambda: now[0]) as launcher:
        first = await _burst(launcher, 4)
        try:
            await _until(lambda: len(launcher.stats()["spares_ready"]) == 4)
            plans = [0]
            real = launcher.sizer.next_change_s

            def next_change_s(at: float) -> float | None:
                plans[0] += 1
                return real(at)

            launcher.sizer.next_change_s = next_change_s  # type: ignore[method-assign]
            second = await _burst(launcher, 4)  # the same demand: the target stays 4
            await anyio.sleep(0.2)
            assert launcher.stats()["spares_target"] == 4
            assert plans[0] == 0  # the task that plans the decay was not woken four times for nothing
            await _end(second)
        finally:
            await _end(first)


async def test_no_spares_when_the_engine_says_none() -> None:
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), min_spares=0, max_spares=0) as launcher:
        procs = await _burst(launcher, 3)
        try:
            await anyio.sleep(0.3)
            stats = launcher.stats()
            assert stats["spares"] == 0 and stats["forks_ahead"] == 0 and stats["spares_target"] == 0
            assert sorted(children(stats["zygote_pid"])) == sorted(p.pid for p in procs)
        finally:
            await _end(procs)


async def test_launches_do_not_read_the_spares_memory_and_it_is_measured_beside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from minifaas._core import zygote as host_zygote

    readers: list[bool] = []
    real = host_zygote._pss_kib

    def pss_kib(pid: int) -> int:
        readers.append(threading.current_thread() is threading.main_thread())
        return real(pid)

    monkeypatch.setattr(host_zygote, "_pss_kib", pss_kib)
    monkeypatch.setattr(host_zygote, "SPARE_PSS_READ_INTERVAL_S", 0.05)  # stale at every launch below
    room: list[float] = []
    launcher = ZygoteLauncher(
        preload=("minifaas_sandbox.runtime",), min_spares=2, max_spares=2, room=lambda mb: room.append(mb) or 8
    )
    async with launcher:
        await _until(lambda: len(launcher._zygote.ready_spare_pids if launcher._zygote else ()) == 2)
        await _until(lambda: launcher.spare_mb() != host_zygote.SPARE_MB_ESTIMATE)  # measured, not estimated
        await anyio.sleep(0.1)
        readers.clear()
        procs = await _burst(launcher, 2)
        try:
            # the budget asked for the spare's size at each launch, and nobody read /proc on the event loop for it
            assert room and not any(readers)
        finally:
            await _end(procs)


@pytest.mark.skipif(sandbox_zygote.SPARE_NICE == 0, reason="spares are not niced")
async def test_a_ready_spare_waits_at_the_zygotes_priority() -> None:
    """Once ready (its steps ran nicer) it is back at the zygote's priority, so its request wakes it at once and no
    setpriority lies on the launch path (a spare woken at nice +10 waited behind busier processes)."""
    if not sandbox_zygote._may_renice(os.getpriority(os.PRIO_PROCESS, 0)):
        pytest.skip("this host may not raise a priority again (no CAP_SYS_NICE, RLIMIT_NICE too low)")
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), min_spares=1, max_spares=1) as launcher:
        await _until(lambda: len(launcher.stats()["spares_ready"]) == 1)
        zygote = launcher.stats()["zygote_pid"]
        base = os.getpriority(os.PRIO_PROCESS, zygote)
        spare = launcher.stats()["spares_ready"][0]
        assert os.getpriority(os.PRIO_PROCESS, spare) == base
        (proc,) = await _burst(launcher, 1)
        try:
            assert proc.pid == spare
            assert os.getpriority(os.PRIO_PROCESS, spare) == base
            # the refill (the host may not have heard yet that the spare was taken)
            await _until(lambda: [s for s in launcher.stats()["spares_ready"] if s != spare] != [])
        finally:
            await _end([proc])
        (refill,) = (s for s in launcher.stats()["spares_ready"] if s != spare)
        assert os.getpriority(os.PRIO_PROCESS, refill) == base


@pytest.mark.skipif(sandbox_zygote.SPARE_NICE == 0, reason="spares are not niced")
async def test_a_refilling_spare_takes_only_cpu_that_running_work_leaves() -> None:
    """A refill takes its steps in the idle scheduling class (eight at nice +10 still took a third of a core from a
    warm function beside a burst); once ready, it waits for its request back at the zygote's normal priority. The
    cores are kept busy meanwhile, so that its steps last long enough to be seen."""
    if not sandbox_zygote._may_renice(os.getpriority(os.PRIO_PROCESS, 0)):
        pytest.skip("this host may not raise a priority again (no CAP_SYS_NICE, RLIMIT_NICE too low)")
    spin = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n    pass\n"
    async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), min_spares=1, max_spares=1) as launcher:
        await _until(lambda: len(launcher.stats()["spares_ready"]) == 1)
        zygote = launcher.stats()["zygote_pid"]
        base = os.getpriority(os.PRIO_PROCESS, zygote)
        spinners = [await anyio.open_process([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
        try:
            (proc,) = await _burst(launcher, 1)
            try:
                # the refill is forked and takes its steps in the idle class (slowly: the cores are busy)
                def refill() -> int | None:
                    return next((k for k in children(zygote) if k != proc.pid), None)

                await _until(lambda: refill() is not None)
                spare = refill()
                assert spare is not None
                await _until(lambda: os.sched_getscheduler(spare) == os.SCHED_IDLE, timeout_s=5)
            finally:
                for s in spinners:
                    s.kill()
                    await s.wait()
            await _until(lambda: spare in launcher.stats()["spares_ready"])
            assert os.sched_getscheduler(spare) == os.SCHED_OTHER
            assert os.getpriority(os.PRIO_PROCESS, spare) == base
        finally:
            for s in spinners:
                if s.returncode is None:
                    s.kill()
            await _end([proc])


# -- through the engine ----------------------------------------------------------------------------------------
async def _burst_calls(engine: minifaas.Engine, name: str, n: int) -> list[minifaas.Activation]:
    acts: list[minifaas.Activation] = []

    async def one() -> None:
        acts.append(assert_success(await engine.call(name, {"s": 0.2})))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return acts


async def test_engine_bursts_start_sandboxes_in_parallel_from_spares() -> None:
    async with minifaas.Engine(launcher="zygote", max_spares=8) as engine:
        await engine.deploy("warmup", code=SLEEP, max_sandboxes=8)
        await _burst_calls(engine, "warmup", 8)  # teaches the engine that bursts of 8 happen
        await _until(lambda: len(engine.stats()["launcher_stats"]["spares_ready"]) >= 8)
        await engine.deploy("fresh", code=SLEEP, max_sandboxes=8)
        acts = await _burst_calls(engine, "fresh", 8)
        cold = [a for a in acts if a.annotations["cold"]]
        assert len(cold) == 8 and len({a.annotations["sandbox"] for a in acts}) == 8
        assert all(a.annotations.get("spare") is True for a in cold), [a.annotations for a in cold]
        # they ran side by side: eight 0.2 s sleeps in well under 8 x 0.2 s
        starts, ends = [a.start for a in acts], [a.end or 0 for a in acts]
        assert max(ends) - min(starts) < 8 * 200 / 2
        stats = engine.stats()["launcher_stats"]
        assert all(kib > 0 for kib in stats["spares_pss_kib"]) and len(stats["spares_pss_kib"]) == stats["spares"]


async def test_memory_budget_bounds_the_spares() -> None:
    async with minifaas.Engine(launcher="zygote", max_spares=8, memory_budget_mb=512) as engine:
        await engine.deploy("big", code=SLEEP, max_sandboxes=8, memory_mb=256)
        # two sandboxes take the whole budget: no room is left for idle spares, whatever the burst asked
        await _burst_calls(engine, "big", 2)
        assert engine._pool is not None and engine._pool.memory_in_use(include_reserved=False) == 512
        await _until(lambda: engine.stats()["launcher_stats"]["spares"] == 0)
        assert engine.stats()["launcher_stats"]["spares_target"] == 0
        await engine.delete("big")  # the budget is free again: spares come back
        await _burst_calls_of(engine, 1)
        await _until(lambda: engine.stats()["launcher_stats"]["spares"] >= 1)


async def _burst_calls_of(engine: minifaas.Engine, n: int) -> None:
    await engine.deploy("small", code=SLEEP, max_sandboxes=8, memory_mb=64)
    await _burst_calls(engine, "small", n)


# -- the trace replay (benches/spares_replay.py: the real SpareSizer, the zygote's loop on a fake clock) ---------
def _replay_modules() -> tuple[Any, Any, Any]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    import pool_replay
    import spares_replay
    import trace_gen

    return pool_replay, spares_replay, trace_gen


def test_replayed_zygote_holds_its_spares_and_lets_a_burst_decay() -> None:
    _, spares_replay, _ = _replay_modules()
    sizer = SpareSizer(min_spares=1, max_spares=8)
    zygote = spares_replay.ZygoteReplay(sizer, 0.0)
    waits = [zygote.launch(10.0) for _ in range(8)]  # nobody could have known: forks on request, one by one
    fork_s = zygote.timings.fork_ms / 1000
    assert waits[0] == pytest.approx(zygote.timings.handover_ms / 1000)  # the one spare
    assert waits[-1] >= 6 * fork_s  # the seventh fork behind six others
    assert sizer.target(10.0) == 8  # the real sizer heard every launch
    zygote.advance(11.0)
    assert len(zygote.spares) == 8 and zygote.peak_spares == 8
    again = [zygote.launch(11.0) for _ in range(8)]
    assert again == pytest.approx([zygote.timings.handover_ms / 1000] * 8)
    zygote.finish(11.0 + 3600.0)
    assert len(zygote.spares) == 1 and zygote.spares_discarded == 7  # decayed back to one
    # spare-seconds: one spare for the hour, more only while the burst was remembered
    assert 3600.0 < zygote.spare_s < 3600.0 + 8 * 4 * sizer.half_life_s


def test_replay_of_repeated_bursts_demand_sized_spares_cut_the_wait_for_spare_seconds() -> None:
    pool_replay, spares_replay, trace_gen = _replay_modules()
    prof = trace_gen.FunctionProfile("fan", "flash", memory_mb=256, cold_ms=200.0, warm_ms=50.0)
    # bursts of 8 concurrent calls, 5 s apart: the sandboxes expire between them (keep-alive 2 s), the burst's
    # demand does not (a twelfth of a half-life)
    invs = [trace_gen.Invocation(1.0 + k * 5.0 + i * 0.001, "fan", 0.05) for k in range(10) for i in range(8)]
    trace = trace_gen.Trace({"fan": prof}, invs, 60.0, seed=0)
    out = {}
    for name, hi in (("one", 1), ("demand", 8)):
        made: list[Any] = []

        def zygote(t0: float, hi: int = hi, made: list[Any] = made) -> Any:
            made.append(spares_replay.ZygoteReplay(SpareSizer(min_spares=1, max_spares=hi), t0))
            return made[-1]

        result = pool_replay.PoolReplay(trace, FixedPolicy(2.0), name=name, budget_mb=None, zygote=zygote).run()
        assert result.cold_starts == 80
        out[name] = made[0]
    one, demand = out["one"], out["demand"]
    assert len(one.waits_s) == len(demand.waits_s) == 80
    assert one.from_spares == 10  # one per burst
    assert demand.from_spares == 1 + 9 * 8  # the first burst taught it; every later one is all hand-overs
    assert max(demand.waits_s[8:]) < min(max(one.waits_s[k : k + 8]) for k in range(8, 80, 8))
    assert sum(demand.waits_s) < sum(one.waits_s) / 3
    assert one.spare_s < demand.spare_s < 8 * one.spare_s  # the price, in spare-seconds


def test_bursty_trace_has_concurrent_bursts_and_timers_on_the_clock() -> None:
    _, _, trace_gen = _replay_modules()
    trace = trace_gen.generate(20, trace_gen.SECONDS_PER_DAY, seed=4, mix={"flash": 0.5, "cron": 0.5})
    assert trace == trace_gen.generate(20, trace_gen.SECONDS_PER_DAY, seed=4, mix={"flash": 0.5, "cron": 0.5})
    kinds = {p.kind for p in trace.functions.values()}
    assert kinds == {"flash", "cron"}
    for fn, prof in trace.functions.items():
        times = [inv.t for inv in trace.invocations if inv.fn == fn]
        if prof.kind == "cron":
            assert all(t % 300.0 < trace_gen.FLASH_SPREAD_S for t in times)  # every period is a multiple of 5 min
        else:
            bursts = [list(g) for g in _groups(times, gap_s=trace_gen.FLASH_SPREAD_S)]
            assert all(2 <= len(b) <= trace_gen.FLASH_MAX_CALLS for b in bursts)


def _groups(times: list[float], gap_s: float) -> list[list[float]]:
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][0] <= gap_s:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


async def test_a_bursts_inits_run_side_by_side() -> None:
    # a module that takes 0.3 s to import: eight INITs one after another would take 2.4 s; a call lasts long enough
    # that no sandbox done with its INIT takes another's request
    slow_init = "import time\ntime.sleep(0.3)\ndef main(args):\n    time.sleep(0.5)\n    return {}\n"
    async with minifaas.Engine(launcher="zygote", max_spares=8) as engine:
        await engine.deploy("warmup", code=SLEEP, max_sandboxes=8)
        await _burst_calls(engine, "warmup", 8)
        await _until(lambda: len(engine.stats()["launcher_stats"]["spares_ready"]) >= 8)
        await engine.deploy("slow", code=slow_init, max_sandboxes=8)
        acts: list[minifaas.Activation] = []

        async def one() -> None:
            acts.append(assert_success(await engine.call("slow")))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        assert all(a.init_time for a in acts), [a.init_time for a in acts]
        # each INIT ran from (start - init_time) to start: there is a moment when all eight were running
        began = [a.start - (a.init_time or 0) for a in acts]
        assert max(began) < min(a.start for a in acts), sorted(zip(began, (a.start for a in acts), strict=True))


def test_sizer_keeps_only_the_bursts_that_can_still_set_the_demand() -> None:
    import math
    import random

    rng = random.Random(5)
    sizer = SpareSizer(min_spares=1, max_spares=64)
    times: list[float] = []
    t = 0.0
    for _ in range(5000):  # a host cold-starting all day: gaps from 1 ms to a minute
        t += rng.choice((0.001, 0.01, 0.1, 1.0, 60.0)) * rng.random()
        times.append(t)
        sizer.record(t)
    # the demand every burst in the last HISTORY_S would give (bursts: cold starts within the window up to each)
    now = t + 1.0
    recent = [x for x in times if x >= now - spares.HISTORY_S]
    sizes = [sum(1 for y in recent[: i + 1] if y >= x - BURST_WINDOW_S) for i, x in enumerate(recent)]
    expected = max(n * 0.5 ** ((now - x) / sizer.half_life_s) for x, n in zip(recent, sizes, strict=True))
    assert math.isclose(sizer.demand(now), expected)
    assert len(sizer._bursts) <= max(sizes)  # not thousands: launches read it


async def test_a_burst_of_cold_starts_does_not_run_the_reaper_once_per_start() -> None:
    async with minifaas.Engine(launcher="zygote", max_spares=8) as engine:
        pool = engine._pool
        assert pool is not None
        for i in range(30):  # functions a reaper round reads one by one
            await engine.deploy(f"other{i}", code=SLEEP)
        await engine.deploy("fan", code=SLEEP, max_sandboxes=8)
        rounds = [0]
        real = pool.reap

        def reap(*args: Any, **kwargs: Any) -> float:
            rounds[0] += 1
            return real(*args, **kwargs)

        pool.reap = reap  # type: ignore[method-assign]
        t0 = time.monotonic()
        acts = await _burst_calls(engine, "fan", 8)
        elapsed = time.monotonic() - t0
        cold = sum(1 for a in acts if a.annotations["cold"])
        assert cold >= 4, [a.annotations for a in acts]
        # its own timer runs a round every REAP_INTERVAL_MAX_S at most; the cold starts must not add one each
        assert rounds[0] <= 1 + elapsed / REAP_INTERVAL_MAX_S, (rounds, elapsed, cold)


def test_hand_overs_that_arrive_together_are_reported_once() -> None:
    """FORK frames read together (a burst) are answered FORKED by FORKED, and the spares they took are reported
    to the host in one SPARES_STATE after them, not one per hand-over: each report woke the host's event loop once
    more per cold start of the burst. Drives a real zygote over its control socket."""
    import socket
    import subprocess
    import sys

    from minifaas_sandbox import protocol as p

    n = 3
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-m", "minifaas_sandbox.zygote", "--fd", str(child.fileno())]
    argv += ["--preload", "minifaas_sandbox.runtime"]
    proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), env=scrubbed_env(), start_new_session=True)
    child.close()
    host.settimeout(30)
    decoder = p.FrameDecoder()
    pending: list[tuple[int, dict[str, Any]]] = []
    kept: list[int] = []

    def receive() -> tuple[int, dict[str, Any]]:
        while not pending:
            data = host.recv(1 << 16)
            assert data, "the zygote closed its control socket"
            pending.extend(decoder.feed(data))
        return pending.pop(0)

    try:
        assert receive()[0] == sandbox_zygote.HELLO
        host.sendall(p.encode(sandbox_zygote.SPARES, {"n": n}))
        deadline = time.monotonic() + 30
        while True:
            kind, fields = receive()
            if kind == sandbox_zygote.SPARES_STATE and len(fields["ready"]) == n:
                break
            assert time.monotonic() < deadline, fields
        frames, fds = b"", []
        for seq in range(1, n + 1):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            kept += [mine.detach(), out_r, err_r]
            fds += [theirs.fileno(), out_w, err_w]
            frames += p.encode(sandbox_zygote.FORK, {"seq": seq, "env": scrubbed_env()})
            theirs.detach()
        socket.send_fds(host, [frames], fds)  # one read for the zygote: a burst
        for fd in fds:
            os.close(fd)
        kinds = [receive()[0] for _ in range(n + 1)]
        assert kinds == [sandbox_zygote.FORKED] * n + [sandbox_zygote.SPARES_STATE], [
            sandbox_zygote.NAMES.get(k, k) for k in kinds
        ]
    finally:
        host.close()
        for fd in kept:
            os.close(fd)
        proc.wait(timeout=30)
