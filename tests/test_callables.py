"""Python-native functions: deploy a callable or a class by value, handles, map, numpy payloads. Real sandboxes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import minifaas
from minifaas.testing import assert_success

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
async def minifaas_engine() -> AsyncIterator[minifaas.Engine]:
    """One engine for the module (overrides the plugin's): callables deploy fast, sandboxes stay warm."""
    async with minifaas.Engine() as engine:
        yield engine


# -- what travels by value ------------------------------------------------------------------------------------
FACTOR = 3


def _scale(x: float) -> float:
    return x * FACTOR


def triple(args: dict[str, Any]) -> dict[str, Any]:
    return {"y": _scale(args["x"]), "pid": os.getpid()}


async def test_function_with_globals_and_helpers_runs_in_a_sandbox(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(triple)  # name from __name__; this test module is not importable there
    assert isinstance(handle, minifaas.Function) and handle.name == "triple" and handle["version"] == handle.version
    assert handle["origin"] == f"callable {__name__}.triple"
    act = assert_success(await handle.call({"x": 2}))
    assert act.result["y"] == 6 and act.result["pid"] != os.getpid()
    assert act.annotations["sandbox"].startswith("sb")


async def test_closures_and_lambdas_travel(minifaas_engine: minifaas.Engine) -> None:
    offset = 10

    def add(args: dict[str, Any]) -> dict[str, Any]:
        return {"z": args["x"] + offset}

    assert await (await minifaas_engine.deploy("add", add)).invoke({"x": 1}) == {"z": 11}
    doubled = await minifaas_engine.deploy("lam", lambda a: {"twice": a["v"] * 2})
    assert await doubled.invoke({"v": 4}) == {"twice": 8}
    with pytest.raises(minifaas.DeployError, match="lambda needs an explicit name"):
        await minifaas_engine.deploy(lambda a: a)


def test_a_function_defined_in_main_travels(tmp_path: Path) -> None:
    """A script's own function (module ``__main__``), deployed with the blocking twin, as a newcomer would."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import minifaas

            GREETING = "hello"

            def greet(args):
                return {"msg": f"{GREETING} {args['name']}"}

            with minifaas.SyncEngine() as engine:
                fn = engine.deploy(greet)
                print(fn.invoke({"name": "Ada"})["msg"])
                print(list(r["msg"] for r in fn.map([{"name": "A"}, {"name": "B"}])))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hello Ada", "['hello A', 'hello B']"]


@pytest.mark.parametrize(
    ("make", "culprit"),
    [
        pytest.param(threading.Lock, "'resource' of", id="lock"),
        pytest.param(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "'resource' of", id="socket"),
        pytest.param(lambda: open(os.devnull, "rb"), "'resource' of", id="open-file"),  # noqa: SIM115
    ],
)
async def test_what_cannot_travel_is_a_deploy_error_naming_it(
    minifaas_engine: minifaas.Engine, make: Any, culprit: str
) -> None:
    resource = make()
    try:

        def uses(args: dict[str, Any]) -> dict[str, Any]:
            return {"r": repr(resource)}

        with pytest.raises(minifaas.DeployError, match=f"closure variable {culprit}") as info:
            await minifaas_engine.deploy("uses", uses)
        assert type(resource).__name__ in str(info.value)
        with pytest.raises(minifaas.FunctionNotFound):
            await minifaas_engine.get_function("uses")  # nothing half-deployed
    finally:
        close = getattr(resource, "close", None)
        if close is not None:
            close()


_CONNECTION = threading.Lock()  # stands for a global database connection


def _query() -> int:
    with _CONNECTION:
        return 1


def reads_through_a_helper(args: dict[str, Any]) -> dict[str, Any]:
    return {"n": _query()}


async def test_the_error_names_a_global_held_by_a_helper(minifaas_engine: minifaas.Engine) -> None:
    with pytest.raises(minifaas.DeployError, match="global '_CONNECTION' of _query"):
        await minifaas_engine.deploy(reads_through_a_helper)


# -- classes --------------------------------------------------------------------------------------------------
class Model:
    """A class: setup once per sandbox (init time), state across warm calls, teardown at retirement."""

    marker: str = ""

    def setup(self) -> None:
        time.sleep(0.2)  # stands for loading a model
        self.weights = np.arange(4, dtype=np.float32)
        self.calls = 0
        print("setup done")

    def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"calls": self.calls, "pid": os.getpid(), "score": float(self.weights @ np.asarray(args["v"]))}

    def teardown(self) -> None:
        Path(self.marker).write_text(f"torn down after {self.calls} calls")


async def test_class_setup_state_and_teardown(tmp_path: Path) -> None:
    marker = tmp_path / "teardown.txt"

    class Tracked(Model):
        pass

    Tracked.marker = str(marker)
    async with minifaas.Engine() as engine:
        handle = await engine.deploy("model", Tracked, max_sandboxes=1)
        first = assert_success(await handle.call({"v": [1, 1, 1, 1]}))
        assert first.result["score"] == 6.0 and first.result["calls"] == 1
        assert first.annotations["cold"] is True and first.init_time is not None and first.init_time >= 200
        assert any(line.endswith("stdout: setup done") for line in first.logs)
        second = assert_success(await handle.call({"v": [0, 0, 0, 1]}))
        assert second.result == {"calls": 2, "pid": first.result["pid"], "score": 3.0}
        assert second.annotations["cold"] is False and second.init_time is None
        assert not marker.exists()
    assert marker.read_text() == "torn down after 2 calls"


class Echo:
    def main(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"echo": args}


class NotAHandler:
    def setup(self) -> None:
        pass


async def test_class_entry_points(minifaas_engine: minifaas.Engine) -> None:
    assert await (await minifaas_engine.deploy(Echo)).invoke({"a": 1}) == {"echo": {"a": 1}}
    with pytest.raises(minifaas.DeployError, match=r"no __call__\(self, args\) or main\(self, args\)"):
        await minifaas_engine.deploy(NotAHandler)


# -- async ----------------------------------------------------------------------------------------------------
async def nap(args: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(args["s"])
    print("woke", args["i"])
    return {"i": args["i"], "pid": os.getpid(), "loop": id(asyncio.get_running_loop())}


async def test_async_functions_share_one_loop_per_sandbox(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(nap, concurrency=4, max_sandboxes=1)
    await handle.invoke({"s": 0, "i": -1})  # warm
    t0 = time.perf_counter()
    acts = await asyncio.gather(*(handle.call({"s": 0.5, "i": i}) for i in range(4)))
    elapsed = time.perf_counter() - t0
    for i, act in enumerate(acts):
        assert_success(act)
        assert act.result["i"] == i
        assert [line.split(": ", 1)[1] for line in act.logs] == [f"woke {i}"]  # each print in its own record
    assert len({a.result["pid"] for a in acts}) == 1 and len({a.result["loop"] for a in acts}) == 1
    assert elapsed < 1.5, f"four 0.5 s naps on one loop took {elapsed:.2f} s: they did not overlap"


# -- versions -------------------------------------------------------------------------------------------------
async def test_versions_of_callables(minifaas_engine: minifaas.Engine) -> None:
    global FACTOR
    first = await minifaas_engine.deploy("scaler", triple)
    again = await minifaas_engine.deploy("scaler", triple)
    assert again.version == first.version  # identical: the same version
    bigger = await minifaas_engine.deploy("scaler", triple, memory_mb=512)
    assert int(bigger.version) == int(first.version) + 1  # other options: a new version
    old_factor = FACTOR
    try:
        FACTOR = 5  # a changed global
        changed = await minifaas_engine.deploy("scaler", triple, memory_mb=512)
    finally:
        FACTOR = old_factor
    assert int(changed.version) == int(bigger.version) + 1

    def triple_v2(args: dict[str, Any]) -> dict[str, Any]:  # a changed body
        return {"y": args["x"] * 30}

    body = await minifaas_engine.deploy("scaler", triple_v2)
    assert int(body.version) == int(changed.version) + 1
    assert (await minifaas_engine.invoke(f"scaler@{first.version}", {"x": 1}))["y"] == 3
    assert (await changed.invoke({"x": 1}))["y"] == 5  # a deploy's handle is pinned to its version
    assert (await minifaas_engine.invoke("scaler", {"x": 1}))["y"] == 30  # the name follows the latest
    await minifaas_engine.set_alias("scaler", "prod", changed.version)
    prod = await minifaas_engine.function("scaler@prod")
    assert (await prod.invoke({"x": 2}))["y"] == 10


async def test_decorator_records_options(minifaas_engine: minifaas.Engine) -> None:
    @minifaas.function(name="decorated", memory_mb=384, max_sandboxes=3)
    def fn(args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    assert fn({}) == {"ok": True}  # still a plain function
    info = await minifaas_engine.deploy(fn)
    assert info.name == "decorated" and info["limits"]["memory_mb"] == 384 and info["limits"]["max_sandboxes"] == 3
    overridden = await minifaas_engine.deploy(fn, memory_mb=512)  # the call's own options win
    assert overridden["limits"]["memory_mb"] == 512 and overridden["limits"]["max_sandboxes"] == 3

    @minifaas.function(memroy_mb=1)
    def typo(args: dict[str, Any]) -> dict[str, Any]:
        return {}

    with pytest.raises(minifaas.DeployError, match=r"unknown option.*memroy_mb"):
        await minifaas_engine.deploy(typo)


# -- map ------------------------------------------------------------------------------------------------------
def square(args: dict[str, Any]) -> dict[str, Any]:
    time.sleep(args.get("s", 0))
    if args.get("fail"):
        raise ValueError(f"item {args['i']} failed")
    return {"i": args["i"], "sq": args["i"] ** 2}


async def test_map_keeps_order_and_tags_every_activation(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(square, max_sandboxes=2)
    items = [{"i": i, "s": 0.02 if i % 3 == 0 else 0} for i in range(60)]
    results = handle.map(items)
    out = [r["i"] async for r in results]
    assert out == list(range(60))
    records = await minifaas_engine.activations.list(cause=results.map_id, limit=100)
    assert len(records) == 60 and {r.status for r in records} == {"success"}


async def test_map_unordered_yields_as_they_finish(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(square, max_sandboxes=2)
    items = [{"i": 0, "s": 1.0}, *({"i": i} for i in range(1, 6))]
    out = [r["i"] async for r in handle.map(items, ordered=False)]
    assert sorted(out) == list(range(6)) and out[-1] == 0


async def test_map_streams_through_a_bounded_window(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(square, max_sandboxes=2)
    pulled = 0

    def endless() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        while True:  # a generator of a million items is never materialised: this one has no end at all
            pulled += 1
            yield {"i": pulled}

    seen = []
    async with handle.map(endless(), concurrency=5) as results:
        async for r in results:
            seen.append(r["i"])
            assert pulled - len(seen) <= 5, "more inputs pulled than the window allows"
            if len(seen) == 40:
                break
    assert seen == list(range(1, 41))
    stopped_at = pulled
    await anyio.sleep(0.3)
    assert pulled == stopped_at  # nothing more pulled after the consumer stopped


async def test_map_failure_raises_and_submits_nothing_more(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(square, max_sandboxes=2)
    items = [{"i": i, "fail": i == 3} for i in range(100)]
    results = handle.map(items, concurrency=4)
    got = []
    with pytest.raises(minifaas.ActivationError, match="item 3 failed"):
        async for r in results:
            got.append(r["i"])
    assert got == [0, 1, 2]
    await anyio.sleep(0.2)
    submitted = await minifaas_engine.activations.list(cause=results.map_id, limit=200)
    assert len(submitted) <= 3 + 4, f"{len(submitted)} inputs submitted after a failure with a window of 4"
    assert all(a.done for a in submitted)  # every accepted one still ends in its record


async def test_map_return_exceptions_and_async_inputs(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy(square, max_sandboxes=2)

    async def inputs() -> AsyncIterator[dict[str, Any]]:
        for i in range(6):
            await anyio.sleep(0)
            yield {"i": i, "fail": i % 2 == 1}

    out = [r async for r in handle.map(inputs(), return_exceptions=True)]
    assert [r["i"] for r in out[0::2]] == [0, 2, 4]
    errors = out[1::2]
    assert all(isinstance(e, minifaas.ActivationError) for e in errors)
    assert [e.activation.status for e in errors] == ["application_error"] * 3


async def test_map_scales_out_to_max_sandboxes(minifaas_engine: minifaas.Engine) -> None:
    handle = await minifaas_engine.deploy("wide", square, max_sandboxes=4)
    t0 = time.perf_counter()
    out = [r async for r in handle.map([{"i": i, "s": 0.3} for i in range(8)])]
    assert len(out) == 8
    assert time.perf_counter() - t0 < 8 * 0.3 / 2, "eight 0.3 s items did not run on several sandboxes"


# -- numpy payloads -------------------------------------------------------------------------------------------
def normalise(args: dict[str, Any]) -> dict[str, Any]:
    img = args["image"]
    return {"out": (img / 255.0).astype(np.float32), "mean": img.mean(), "shape": list(img.shape)}


async def test_numpy_arrays_cross_without_json_and_records_summarise_them(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, size=(224, 224, 3), dtype=np.uint8)
    async with minifaas.Engine(tmp_path / "state") as engine:
        handle = await engine.deploy(normalise)
        act = assert_success(await handle.call({"image": img}))
        out = act.result["out"]
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (224, 224, 3)
        np.testing.assert_allclose(out, img / 255.0, rtol=1e-6)
        assert act.result["mean"] == pytest.approx(float(img.mean())) and act.result["shape"] == [224, 224, 3]
        stored = engine._store_or_raise().get(act.activation_id)
        assert stored is not None and stored.result["out"] == "ndarray float32 (224, 224, 3)"
        from minifaas._server.app import dumps

        assert b'"out":"ndarray float32 (224, 224, 3)"' in dumps(act.to_openwhisk())


# -- the blocking twin ----------------------------------------------------------------------------------------
def test_sync_engine_handles_and_map() -> None:
    with minifaas.SyncEngine() as engine:
        fn = engine.deploy(triple)
        assert isinstance(fn, minifaas.SyncFunction)
        assert fn.invoke({"x": 1})["y"] == 3
        assert [r["y"] for r in fn.map({"x": i} for i in range(10))] == [3 * i for i in range(10)]
        again = engine.function("triple")
        assert again.call({"x": 2}).result["y"] == 6


def test_sync_engine_inside_a_running_event_loop() -> None:
    """A notebook's kernel runs an event loop: the blocking twin must still work there."""

    async def in_loop() -> int:
        with minifaas.SyncEngine() as engine:
            return int(engine.deploy(triple).invoke({"x": 7})["y"])

    assert asyncio.run(in_loop()) == 21


def test_module_sent_by_value_on_request(tmp_path: Path) -> None:
    """``modules=[...]`` sends a module by value even when the sandbox could import it (the edited copy wins)."""
    pkg = tmp_path / "mylib.py"
    pkg.write_text("def value():\n    return 'installed copy'\n")
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import minifaas
            import mylib

            def use(args):
                return {"v": mylib.value()}

            mylib.value = lambda: "edited in this process"
            with minifaas.SyncEngine() as engine:
                print(engine.deploy("plain", use).invoke()["v"])
                print(engine.deploy("forced", use, modules=[mylib]).invoke()["v"])
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the sandbox can import mylib by name
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["installed copy", "edited in this process"]


def test_progress_bar_in_a_terminal_and_silence_elsewhere(tmp_path: Path) -> None:
    """``progress=True``: a rich bar on a terminal's stderr; nothing at all when stderr is not a terminal."""
    import pty

    script = tmp_path / "bar.py"
    script.write_text(
        textwrap.dedent(
            """
            import minifaas

            def one(args):
                return {"i": args["i"]}

            with minifaas.SyncEngine() as engine:
                out = list(engine.deploy(one).map([{"i": i} for i in range(7)], progress=True))
            print("done", len(out))
            """
        )
    )
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path)
        os.close(slave)
        stdout, _ = proc.communicate(timeout=120)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert stdout.decode().strip() == "done 7"
    assert b"7/7" in seen and b"0 failed" in seen, seen[-500:]
    quiet = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "done 7"
    assert "7/7" not in quiet.stderr and "failed" not in quiet.stderr
