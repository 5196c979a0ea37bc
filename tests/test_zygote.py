"""The zygote launcher: real zygote processes, real forks, the real sandbox runtime, real model files."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from minifaas_sandbox import protocol as p

import minifaas
from minifaas._core.launch import Launched, SpawnLauncher
from minifaas._core.zygote import DEFAULT_PRELOAD, ZygoteError, ZygoteLauncher, ZygotePool
from minifaas._environ import SANDBOX_ENV_DEFAULTS, scrubbed_env
from tests.helpers.looplag import record_loop_lags
from tests.helpers.proc import children as _children
from tests.helpers.proc import smaps_rollup_kb as _pss_kb

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork server, pidfds and /proc are Linux-only")

MODELS_DIR = Path(__file__).resolve().parents[1] / "functions" / "models"
MODELS = tuple(sorted(glob.glob(str(MODELS_DIR / "*.tflite"))))
#: sha256 of the model files as MODELS.md lists them
MODEL_SHA256 = {
    "pose_detection.tflite": "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
    "pose_landmark_full.tflite": "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
    "efficientnet_lite0_int8.tflite": "2016ccdbdb9c44335ab6398e4a1d437ed99c8edee84c32323cfa4cec6b8d3a98",
}
FORK_RUNS = int(os.environ.get("MINIFAAS_ZYGOTE_FORK_RUNS", "30"))
SPAWN_RUNS = int(os.environ.get("MINIFAAS_ZYGOTE_SPAWN_RUNS", "8"))
STEP_TIMEOUT_S = 30.0


class Channel:
    """The host end of a sandbox's protocol channel, read and written the way the pool does."""

    def __init__(self, proc: Launched) -> None:
        self.proc = proc
        self.decoder = p.FrameDecoder()
        self.pending: list[p.Message] = []

    async def recv(self) -> p.Message:
        with anyio.fail_after(STEP_TIMEOUT_S):
            while not self.pending:
                try:
                    data = self.proc.channel.recv(1 << 16)
                except BlockingIOError:
                    await anyio.wait_readable(self.proc.channel)
                    continue
                if not data:
                    raise EOFError("the sandbox closed its channel")
                self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def expect(self, kind: int) -> dict[str, Any]:
        got, fields = await self.recv()
        assert got == kind, (p.NAMES.get(got), fields)
        return fields

    def send(self, kind: int, fields: dict[str, Any]) -> None:
        self.proc.channel.setblocking(True)
        try:
            self.proc.channel.sendall(p.encode(kind, fields))
        finally:
            self.proc.channel.setblocking(False)

    async def init(self, code: str) -> None:
        source = {"kind": "code", "code": code, "filename": "__main__.py"}
        self.send(p.INIT, {"name": "t", "version": "0.0.1", "namespace": "guest", "main": "main", "source": source})
        reply = await self.expect(p.INIT_DONE)
        assert reply["ok"], reply

    async def run(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.send(p.RUN, {"aid": "a1", "args": args or {}, "deadline": 0, "version": "0.0.1"})
        fields = await self.expect(p.RESULT)
        assert fields["status"] == "success", fields
        result: dict[str, Any] = fields["result"]
        return result


async def _ready(proc: Launched) -> Channel:
    ch = Channel(proc)
    ready = await ch.expect(p.READY)
    assert ready["pid"] == proc.pid
    return ch


async def _wait(proc: Launched) -> int:
    with anyio.fail_after(STEP_TIMEOUT_S):
        return await proc.wait()


async def _end(proc: Launched) -> int:
    proc.kill()
    status = await _wait(proc)
    proc.close()
    return status


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn)


def _family_pss_kb(zygote: int) -> int:
    """PSS of a zygote and every child it has (sandboxes, and the spare it forked ahead): their whole memory."""
    return _pss_kb(zygote)["Pss"] + sum(_pss_kb(child)["Pss"] for child in _children(zygote))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


PROBE = """
import os, random, sys
import numpy as np

def main(args):
    os.write(1, b"straight to fd 1\\n")
    return {
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "stdin": os.readlink("/proc/self/fd/0"),
        "env": dict(os.environ),
        "random": random.random(),
        "np_random": float(np.random.random()),
        "np_randint": int(np.random.randint(0, 2**31)),
        "threads": len(os.listdir("/proc/self/task")),
        "modules": [m for m in ("numpy", "cv2", "ai_edge_litert.interpreter") if m in sys.modules],
    }
"""


def test_fork_path_runs_a_function_in_a_clean_child() -> None:
    async def main() -> None:
        env = scrubbed_env({"ZYGOTE_TEST_VAR": "from-launch"})
        async with ZygoteLauncher() as launcher:
            proc = await launcher.launch(env)
            assert proc.how == "fork"
            ch = await _ready(proc)
            await ch.init(PROBE)
            got = await ch.run()
            assert got["pid"] == proc.pid
            # its own session and process group: killpg reaches whatever it starts
            assert got["sid"] == got["pgid"] == proc.pid
            # only stdin/stdout/stderr, the channel, the host's lifeline, and the fd listdir itself opened
            assert len(got["fds"]) == 6, got["fds"]
            assert got["fds"][:3] == [0, 1, 2]
            assert got["stdin"] == "/dev/null"
            child_env = {k: v for k, v in got["env"].items() if not k.startswith("__OW_")}
            assert child_env == env
            assert got["threads"] == 1
            assert set(got["modules"]) == {"numpy", "cv2", "ai_edge_litert.interpreter"}
            # fd 1 of the child is the stdout pipe handed to the zygote
            with anyio.fail_after(STEP_TIMEOUT_S):
                await anyio.wait_readable(proc.stdout_fd)
            assert os.read(proc.stdout_fd, 1024) == b"straight to fd 1\n"
            ch.send(p.SHUTDOWN, {})
            assert await _wait(proc) == 0
            proc.close()

            # an exit code and a signal, both as the zygote saw them when it reaped the child
            proc = await launcher.launch(env)
            ch = await _ready(proc)
            await ch.init("import os\ndef main(args):\n    os._exit(7)\n")
            ch.send(p.RUN, {"aid": "x", "args": {}, "deadline": 0})
            assert await _wait(proc) == 7
            proc.close()
            proc = await launcher.launch(env)
            await _ready(proc)
            assert await _end(proc) == -signal.SIGKILL

            stats = launcher.stats()
            assert stats["forks"] == 3
            assert stats["spawns_fallback"] == 0
            assert stats["zygote_restarts"] == 0
            assert stats["preload_failed"] == {}
            assert stats["zygote_threads"] == 1, "threads in the zygote make forking unsafe"
            zygote_pid = stats["zygote_pid"]
            assert isinstance(zygote_pid, int)
        # closing the launcher ends (and reaps) the zygote
        assert not _alive(zygote_pid)

    _run(main)


def test_fork_to_ready_is_much_faster_than_spawn() -> None:
    """Fork-to-READY against a fresh ``sys.executable`` importing the same preload set."""

    async def timed(launch: Callable[[], Awaitable[Launched]]) -> float:
        t0 = time.perf_counter()
        proc = await launch()
        await _ready(proc)
        ms = (time.perf_counter() - t0) * 1000
        await _end(proc)
        return ms

    def summary(ms: list[float]) -> str:
        q = statistics.quantiles(ms, n=100, method="inclusive")
        return f"p50 {statistics.median(ms):.1f} ms, p99 {q[98]:.1f} ms (n={len(ms)})"

    async def main() -> None:
        env = scrubbed_env()
        spawner = SpawnLauncher(preload=DEFAULT_PRELOAD)
        spawn_ms = [await timed(lambda: spawner.launch(env)) for _ in range(SPAWN_RUNS)]
        async with ZygoteLauncher() as launcher:
            await timed(lambda: launcher.launch(env))  # the first launch also waits for the zygote to start
            fork_ms = [await timed(lambda: launcher.launch(env)) for _ in range(FORK_RUNS)]
            assert launcher.stats()["forks"] == FORK_RUNS + 1
        print(f"\nfork-to-READY:  {summary(fork_ms)}\nspawn-to-READY: {summary(spawn_ms)}")
        assert statistics.median(fork_ms) * 5 < statistics.median(spawn_ms)

    _run(main)


HOLD_PROBE = """
import hashlib, os
import minifaas_sandbox

_held = {}

def main(args):
    for path in args["paths"]:
        data = minifaas_sandbox._preloaded_models.get(path)
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        _held[path] = data  # kept, as the model cache keeps what it loads
    return {
        "sha256": {os.path.basename(p): hashlib.sha256(d).hexdigest() for p, d in _held.items()},
        "preloaded": sorted(os.path.basename(p) for p in minifaas_sandbox._preloaded_models),
    }
"""


async def _pss_per_extra_child_kb(models: tuple[str, ...]) -> tuple[float, int, int]:
    """Hold the model files' bytes in 1, then 4 forked children: (PSS per extra child, total of 1, of 4)."""
    async with ZygoteLauncher(models=models, max_spares=1) as launcher:  # one spare in every reading
        chans: list[Channel] = []

        async def add_child() -> None:
            ch = await _ready(await launcher.launch(scrubbed_env()))
            await ch.init(HOLD_PROBE)
            got = await ch.run({"paths": list(MODELS)})
            # hashing read every page of every model: reading must not copy them
            assert got["sha256"] == MODEL_SHA256
            assert len(got["preloaded"]) == (len(MODEL_SHA256) if models else 0)
            chans.append(ch)

        async def total_pss_kb() -> int:
            # the same family each time: the children and one spare, ready (the zygote forks it a little after a
            # launch, and it grows while it rehearses)
            await _spare_of(launcher, {ch.proc.pid for ch in chans})
            return _family_pss_kb(launcher.stats()["zygote_pid"])

        try:
            await add_child()
            one = await total_pss_kb()
            for _ in range(3):
                await add_child()
            four = await total_pss_kb()
        finally:
            for ch in chans:
                await _end(ch.proc)
        return (four - one) / 3, one, four


def test_children_share_preloaded_model_pages() -> None:
    """Model bytes read by the zygote stay one copy however many children hold them (PSS, smaps_rollup)."""
    model_kb = sum(os.path.getsize(m) for m in MODELS) // 1024

    async def main() -> None:
        shared, one, four = await _pss_per_extra_child_kb(MODELS)
        own, own_one, own_four = await _pss_per_extra_child_kb(())
        print(
            f"\nmodels {model_kb} kB. Preloaded in the zygote: PSS of zygote + 1 child {one} kB, "
            f"+ 4 children {four} kB, {shared:.0f} kB per extra child. Each child reading its own copy: "
            f"{own_one} kB, {own_four} kB, {own:.0f} kB per extra child"
        )
        # a child reading the files pays for a private copy; one using the zygote's bytes does not
        assert own - shared > model_kb * 0.8

    _run(main)


def test_concurrent_launches_each_get_their_own_fork() -> None:
    async def main() -> None:
        procs: list[Launched] = []

        async def one(launcher: ZygoteLauncher) -> None:
            proc = await launcher.launch(scrubbed_env())
            procs.append(proc)
            ch = await _ready(proc)
            await ch.init("import os\ndef main(args):\n    return {'pid': os.getpid()}\n")
            assert await ch.run() == {"pid": proc.pid}

        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",)) as launcher:
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(one, launcher)
            finally:
                for proc in procs:
                    await _end(proc)
            assert len({proc.pid for proc in procs}) == 6
            assert all(proc.how == "fork" for proc in procs)
            assert launcher.stats()["forks"] == 6

    _run(main)


def test_zygote_crash_recovery() -> None:
    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",)) as launcher:
            first = await launcher.launch(env)
            first_ch = await _ready(first)
            old = launcher.stats()["zygote_pid"]
            os.kill(old, signal.SIGKILL)
            # no waiting for the launcher to notice: the very next launch has to cope
            second = await launcher.launch(env)
            assert second.how == "fork"
            ch = await _ready(second)
            await ch.init("def main(args):\n    return {'ok': 1}\n")
            assert await ch.run() == {"ok": 1}
            stats = launcher.stats()
            assert stats["zygote_restarts"] == 1
            assert stats["spawns_fallback"] == 0
            assert stats["zygote_pid"] not in (None, old)
            # a sandbox does not die with its zygote (it dies with the host): it serves on, and its end is seen
            # and its status read without the zygote
            await first_ch.init("def main(args):\n    return {'first': 1}\n")
            assert await first_ch.run() == {"first": 1}
            assert _alive(first.pid)
            first_ch.send(p.SHUTDOWN, {})
            # an orphan's status is read from its zombie, unless whoever adopted it reaped it first (unknown)
            assert await _wait(first) in (0, None)
            first.close()
            assert await _end(second) == -signal.SIGKILL

    _run(main)


def test_fallback_to_spawn_is_counted(tmp_path: Path) -> None:
    """A zygote that dies at every start is restarted once, then launches spawn (and the stats say so)."""
    (tmp_path / "zygote_test_crash.py").write_text(
        "import os\nif os.environ.get('ZYGOTE_TEST_CRASH'):\n    os._exit(3)\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    zygote_env = scrubbed_env({"PYTHONPATH": pythonpath, "ZYGOTE_TEST_CRASH": "1"})
    sandbox_env = scrubbed_env({"PYTHONPATH": pythonpath})

    async def main() -> None:
        preload = ("zygote_test_crash", "minifaas_sandbox.runtime")
        async with ZygoteLauncher(preload=preload, env=zygote_env) as launcher:
            proc = await launcher.launch(sandbox_env)
            assert proc.how == "spawn"
            ch = await _ready(proc)
            await ch.init("def main(args):\n    return {'ok': 2}\n")
            assert await ch.run() == {"ok": 2}
            assert await _end(proc) == -signal.SIGKILL
            stats = launcher.stats()
            assert stats["spawns_fallback"] == 1
            assert stats["zygote_restarts"] == 1
            assert stats["forks"] == 0
            assert stats["zygote_pid"] is None
            assert launcher.last_error is not None

    _run(main)


def test_random_generators_differ_between_children() -> None:
    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher() as launcher:
            draws = []
            for _ in range(2):
                proc = await launcher.launch(env)
                ch = await _ready(proc)
                await ch.init(PROBE)
                draws.append(await ch.run())
                await _end(proc)
        a, b = draws
        assert a["random"] != b["random"]
        assert a["np_random"] != b["np_random"]
        assert a["np_randint"] != b["np_randint"]

    _run(main)


def test_pool_keeps_one_zygote_per_preload_set() -> None:
    async def main() -> None:
        light = ("minifaas_sandbox.runtime",)
        other = ("colorsys", "minifaas_sandbox.runtime")
        async with ZygotePool() as pool:
            a = await pool.get(light)
            assert await pool.get(light) is a
            b = await pool.get(other)
            procs = [await a.launch(scrubbed_env()), await b.launch(scrubbed_env())]
            for proc in procs:
                ch = await _ready(proc)
                await ch.init("import sys\ndef main(args):\n    return {'c': 'colorsys' in sys.modules}\n")
                assert (await ch.run())["c"] is (proc is procs[1])
                await _end(proc)
            pids = {key: s["zygote_pid"] for key, s in pool.stats().items()}
            assert set(pids) == {light, other}
            assert len(set(pids.values())) == 2
        assert not any(_alive(pid) for pid in pids.values())

    _run(main)


def test_launch_outside_async_with_is_refused() -> None:
    async def main() -> None:
        launcher = ZygoteLauncher(preload=("minifaas_sandbox.runtime",))
        with pytest.raises(ZygoteError):
            await launcher.launch(scrubbed_env())
        async with launcher:
            pass
        with pytest.raises(ZygoteError):
            await launcher.launch(scrubbed_env())

    _run(main)


PREBUILT_PROBE = """
import os
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from minifaas_sandbox import models

def main(args):
    rng = np.random.default_rng(7)
    same = {}
    for url in args["urls"]:
        served = models.load(url)
        fresh = Interpreter(model_path=url.removeprefix("file://"), num_threads=1)
        fresh.allocate_tensors()
        outs = []
        for interp in (served, fresh):
            x = [rng.random(d["shape"], dtype=np.float32) for d in interp.get_input_details()]
            for d, v in zip(interp.get_input_details(), x):
                interp.set_tensor(d["index"], v)
            interp.invoke()
            outs.append([interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()])
            rng = np.random.default_rng(7)  # the fresh interpreter gets the same inputs
        same[os.path.basename(url)] = all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))
    return {"same": same, "stats": models.stats(), "threads": len(os.listdir("/proc/self/task"))}
"""


def test_sandbox_adopts_the_interpreter_the_zygote_built() -> None:
    """Models named at deploy get their interpreters built in the zygote (one thread) before it forks: a forked
    sandbox's first load is a cache hit without a load, and computes what a freshly built interpreter does."""
    urls = [(MODELS_DIR / name).as_uri() for name in ("pose_detection.tflite", "pose_landmark_full.tflite")]

    async def main() -> None:
        async with minifaas.Engine(launcher="zygote") as engine:
            await engine.deploy("probe", code=PREBUILT_PROBE, models=urls, memory_mb=1024)
            stats = engine.stats()["launcher_stats"]
            assert len(stats["prebuilt_models"]) == 2 and stats["prebuild_errors"] == {}
            zygote = stats["zygote_pid"]
            # building (and warming) the interpreters started no thread: the zygote can still fork safely
            assert stats["zygote_threads"] == 1
            assert len(os.listdir(f"/proc/{zygote}/task")) == 1
            act = await engine.call("probe", {"urls": urls})
            assert act.status == "success", act
            assert act.annotations["launch"] == "fork" and act.annotations["cold"]
            assert act.annotations["model_cache"] == "hit"
            assert [m["url"] for m in act.annotations["models"]] == urls
            assert all(m["prebuilt"] and m["load_ms"] == 0 for m in act.annotations["models"])
            assert act.result["same"] == {"pose_detection.tflite": True, "pose_landmark_full.tflite": True}
            cache = act.result["stats"]
            sizes = sum(os.path.getsize(u.removeprefix("file://")) for u in urls)
            assert (cache["entries"], cache["bytes"], cache["misses"]) == (2, sizes, 0)
            assert (cache["prebuilt_adopted"], cache["prebuilt_waiting"]) == (2, 0)
            assert len(os.listdir(f"/proc/{zygote}/task")) == 1

    _run(main)


def test_forked_sandbox_gets_opencvs_default_thread_pool_back() -> None:
    # the zygote turns OpenCV's pool off before forking (a pool there would be dead in every child); its children
    # must still decode and resize with as many threads as any process here would
    default = subprocess.run(
        [sys.executable, "-c", "import cv2; print(cv2.getNumThreads())"], capture_output=True, text=True, check=True
    )
    code = "import cv2\ndef main(args):\n    return {'threads': cv2.getNumThreads()}\n"

    async def main() -> None:
        async with minifaas.Engine(launcher="zygote") as engine:
            await engine.deploy("cv", code=code)
            act = await engine.call("cv")
            assert act.annotations["launch"] == "fork"
            assert act.result["threads"] == int(default.stdout)

    _run(main)


async def _gone(pid: int, timeout_s: float = 2.0) -> bool:
    """True once ``pid`` has ended (a zombie counts as ended), False if it is still alive after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while _alive(pid):
            await anyio.sleep(0.01)
    return not _alive(pid)


async def _spare_of(launcher: ZygoteLauncher, known: set[int]) -> int:
    """The pid of the child the zygote forked ahead, once it is ready to serve (the zygote forks it when idle,
    and it reports it once it has joined its cgroup and rehearsed a cold start)."""
    for _ in range(1000):
        ready = [pid for pid in launcher.stats()["spares_ready"] if pid not in known]
        if ready:
            assert len(ready) == 1, ready
            return int(ready[0])
        await anyio.sleep(0.01)
    raise AssertionError("the zygote forked no spare")


def test_fork_ahead_serves_launches_from_a_spare() -> None:
    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher(max_spares=1) as launcher:  # one spare: bursts are tests/test_spares.py's
            first = await launcher.launch(env)  # starts the zygote
            spare = await _spare_of(launcher, {first.pid})
            second = await launcher.launch(env)
            # the launch took the child the zygote had forked before it was asked
            assert second.pid == spare and getattr(second, "ahead", False)
            third_spare = await _spare_of(launcher, {first.pid, second.pid})
            third = await launcher.launch(env)
            assert third.pid == third_spare
            chans = [await _ready(proc) for proc in (first, second, third)]
            runs = []
            for ch in chans:
                await ch.init(PROBE)
                runs.append(await ch.run())
            # each is a sandbox of its own: own session, reseeded, stdin /dev/null, one thread
            assert len({r["pid"] for r in runs}) == 3
            for r in runs:
                assert r["sid"] == r["pid"] and r["stdin"] == "/dev/null" and r["threads"] == 1
            assert len({r["random"] for r in runs}) == 3 and len({r["np_random"] for r in runs}) == 3
            stats = launcher.stats()
            assert stats["forks"] == 3 and stats["forks_ahead"] >= 2 and stats["zygote_threads"] == 1
            for ch in chans:
                await _end(ch.proc)

    _run(main)


def test_next_spare_is_forked_once_the_launch_has_settled() -> None:
    """Forking the zygote (2-3 ms of CPU) beside a sandbox's first steps slows its cold start on two cores, so
    the zygote forks the next spare ``refork_delay_s`` after the launch that took the last one."""

    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), refork_delay_s=0.5, max_spares=1) as launcher:
            first = await launcher.launch(env)
            spare = await _spare_of(launcher, {first.pid})
            second = await launcher.launch(env)
            taken = time.monotonic()
            assert second.pid == spare
            zygote = launcher.stats()["zygote_pid"]
            await anyio.sleep(0.3)
            assert sorted(_children(zygote)) == sorted([first.pid, second.pid])  # no spare yet
            nxt = await _spare_of(launcher, {first.pid, second.pid})
            assert time.monotonic() - taken >= 0.5
            third = await launcher.launch(env)
            assert third.pid == nxt and getattr(third, "ahead", False)
            for proc in (first, second, third):
                await _end(proc)

    _run(main)
    with pytest.raises(ValueError, match="refork_delay_s"):
        ZygoteLauncher(refork_delay_s=-1)


def test_a_spares_rehearsal_leaves_nothing_behind() -> None:
    """A spare runs a no-op INIT and RUN before its request (to take a fresh fork's first-touch costs early):
    the function it becomes sees its own environment and module only, at import as in main."""
    code = (
        "import os, sys\n"
        "AT_IMPORT = {k: v for k, v in os.environ.items() if k.startswith('__OW_')}\n"
        "def main(args):\n"
        "    return {'at_import': AT_IMPORT, 'aid': os.environ['__OW_ACTIVATION_ID'],\n"
        "            'module': sys.modules['__minifaas_function__'].__file__,\n"
        "            'pid': os.getpid()}\n"
    )

    async def main() -> None:
        async with minifaas.Engine(launcher="zygote") as engine:
            await engine.deploy("first", code="def main(args):\n    return {}\n")
            await engine.invoke("first")
            launcher = engine._launcher
            assert isinstance(launcher, ZygoteLauncher)
            known = set(engine.stats()["functions"]["guest/first@1"]["pids"])
            spare = await _spare_of(launcher, known)
            await engine.deploy("probe", code=code)
            act = await engine.call("probe")
            assert act.status == "success", act
            assert act.result["pid"] == spare and act.annotations["cold"]
            assert act.result["at_import"] == {}
            assert act.result["aid"] == act.activation_id
            assert act.result["module"] == "__main__.py"

    _run(main)


def test_spare_forked_before_a_model_load_is_not_used() -> None:
    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), max_spares=1) as launcher:
            first = await launcher.launch(env)
            stale = await _spare_of(launcher, {first.pid})
            await launcher.load_models(list(MODELS))
            assert await _gone(stale)  # discarded: it would not hold the models
            ch = await _ready(await launcher.launch(env))
            await ch.init(HOLD_PROBE)
            got = await ch.run({"paths": list(MODELS)})
            assert len(got["preloaded"]) == len(MODEL_SHA256)
            for proc in (first, ch.proc):
                await _end(proc)

    _run(main)


def test_spare_ends_with_its_zygote_and_can_be_turned_off() -> None:
    async def main() -> None:
        env = scrubbed_env()
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), max_spares=1) as launcher:
            first = await launcher.launch(env)
            spare = await _spare_of(launcher, {first.pid})
            os.kill(launcher.stats()["zygote_pid"], signal.SIGKILL)
            assert await _gone(spare)  # nothing is left behind by a dead zygote
            await _end(first)
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), fork_ahead=False) as launcher:
            child = await launcher.launch(env)
            await _ready(child)
            await anyio.sleep(0.1)
            assert _children(launcher.stats()["zygote_pid"]) == [child.pid]
            assert launcher.stats()["forks_ahead"] == 0
            await _end(child)

    _run(main)


def test_zygote_starts_with_the_sandboxes_malloc_settings() -> None:
    # glibc reads MALLOC_* when a process starts: forked sandboxes only have them if their zygote started with them
    async def main() -> None:
        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",)) as launcher:
            child = await launcher.launch(scrubbed_env())
            with open(f"/proc/{launcher.stats()['zygote_pid']}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
                assert environ[name.encode()] == SANDBOX_ENV_DEFAULTS[name].encode()
            await _end(child)

    _run(main)


#: a stand-in zygote that only reads its control socket (fd in argv[1]) until the host closes its end
_READ_TO_EOF = "import os, sys\nfd = int(sys.argv[1])\nwhile os.read(fd, 65536):\n    pass\n"


def test_a_zygote_reader_cancelled_as_its_data_arrives_raises_nothing_in_the_loop() -> None:
    """The zygote's control reader used anyio's UNIX stream, whose selector callback is the bare future's
    set_result: cancelled in the very loop turn the zygote's bytes arrived (an engine closing while its zygote
    reports), the callback raised InvalidStateError inside the event loop, an ERROR of whichever test ran."""
    import socket

    from minifaas._core.zygote import _Zygote

    async def race() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        host, peer = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-c", _READ_TO_EOF, str(peer.fileno())], pass_fds=(peer.fileno(),))
        try:
            zygote = _Zygote(proc, await anyio.abc.UNIXSocketStream.from_socket(host))
            async with anyio.create_task_group() as tg:
                tg.start_soon(zygote.read_loop)
                await anyio.wait_all_tasks_blocked()  # the reader waits for the socket
                peer.send(b"\0")
                # one loop turn: the socket's readiness is queued behind this task, which cancels the reader first
                await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            await anyio.sleep(0.05)  # the queued callback has run
        finally:
            peer.close()
            proc.kill()
            proc.wait()
        return errors

    errors = anyio.run(race)
    assert not errors, [ctx.get("exception") or ctx.get("message") for ctx in errors]


def test_cgroup_attach_of_a_fork_on_request_leaves_the_event_loop_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked on request (no spare) is moved into its cgroup before the launch returns, but not on the
    event loop: that write waits for an RCU grace period on cgroup v1, and there it stalled every other activation
    (a warm function's calls) once per cold start. A slow attach (0.3 s) here must not stall a ticking task."""
    from minifaas._core.launch import PIDS

    slow_s = 0.3
    attached: dict[int, str | None] = {}
    real_attach = PIDS.attach

    def slow_attach(pid: int) -> str | None:
        time.sleep(slow_s)
        attached[pid] = real_attach(pid)
        return attached[pid]

    monkeypatch.setattr(PIDS, "attach", slow_attach)

    async def main() -> None:
        lags: list[float] = []
        done = anyio.Event()

        async with ZygoteLauncher(preload=("minifaas_sandbox.runtime",), fork_ahead=False) as launcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(record_loop_lags, lags, done)
                t0 = time.perf_counter()
                proc = await launcher.launch(scrubbed_env())
                took = time.perf_counter() - t0
                done.set()
            try:
                # the attach happened before the launch returned (the host sends function code after it)
                assert list(attached) == [proc.pid] and took >= slow_s, (attached, took)
                assert proc.cgroup == attached[proc.pid]  # type: ignore[attr-defined]
                ch = await _ready(proc)
                await ch.init("def main(args):\n    return {'ok': True}\n")
                assert await ch.run() == {"ok": True}
            finally:
                await _end(proc)
        assert max(lags) < slow_s / 2, max(lags)

    _run(main)
