"""Core engine: deploy, invoke, records, errors, limits, scaling, keep-alive, close. Real sandbox processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import minifaas
from minifaas.testing import assert_status, assert_success

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def shared_engine() -> AsyncIterator[minifaas.Engine]:
    """One engine for the tests of this module that only read their own records (warm sandboxes are reused)."""
    async with minifaas.Engine() as engine:
        yield engine


HELLO = "def main(args):\n    return {'hi': args.get('name')}\n"
SLEEP = (
    "import time\ndef main(args):\n    time.sleep(args.get('s', 0.5))\n    return {'pid': __import__('os').getpid()}\n"
)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (stdout|stderr): ")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


async def test_hello_record_fields(shared_engine: minifaas.Engine) -> None:
    engine = shared_engine
    await engine.deploy(
        "hello", code="def main(args):\n    print('hello', args['name'])\n    return {'hi': args['name']}"
    )
    act = await engine.call("hello", {"name": "Ada"})
    assert_success(act)
    assert act.result == {"hi": "Ada"}
    assert re.fullmatch(r"[0-9a-f]{32}", act.activation_id)
    assert act.name == "hello" and act.version == "1" and act.namespace == "guest"
    assert act.end is not None and act.start <= act.end
    assert act.duration is not None and act.duration >= 0
    assert act.wait_time is not None and act.wait_time >= 0
    assert act.status_code == 0
    assert len(act.logs) == 1 and LOG_LINE.match(act.logs[0]) and act.logs[0].endswith("stdout: hello Ada")
    assert act.annotations["cold"] is True and act.init_time is not None and act.init_time > 0
    assert act.annotations["sandbox"].startswith("sb")
    warm = await engine.call("hello", {"name": "Bob"})
    assert warm.annotations["cold"] is False and warm.init_time is None
    assert warm.annotations["sandbox"] == act.annotations["sandbox"]
    assert await engine.invoke("hello", {"name": "Cy"}) == {"hi": "Cy"}


async def test_submit_wait_get_list(shared_engine: minifaas.Engine) -> None:
    engine = shared_engine
    await engine.deploy("lister", code=HELLO)
    before = int(time.time() * 1000)
    ids = [await engine.submit("lister", {"name": str(i)}) for i in range(5)]
    acts = [await engine.activations.wait(i, timeout_s=30) for i in ids]
    assert [a.result["hi"] for a in acts] == [str(i) for i in range(5)]
    assert (await engine.activations.get(ids[2])).result == {"hi": "2"}
    listed = await engine.activations.list(name="lister", limit=3)
    assert [a.activation_id for a in listed] == ids[::-1][:3]  # newest first
    assert len(await engine.activations.list(name="lister", since=before)) == 5
    assert await engine.activations.list(name="lister", upto=before - 1) == []
    with pytest.raises(minifaas.ActivationNotFound, match="no activation with id"):
        await engine.activations.get("0" * 32)


async def test_default_params_and_ow_variables(shared_engine: minifaas.Engine) -> None:
    engine = shared_engine
    code = textwrap.dedent("""
        import os
        def main(args):
            return {"args": args, "env": {k: v for k, v in os.environ.items() if k.startswith("__OW_")}}
    """)
    await engine.deploy("owvars", code=code, params={"a": 1, "b": 2})
    act = await engine.call("owvars", {"b": 3})
    assert_success(act)
    assert act.result["args"] == {"a": 1, "b": 3}
    env = act.result["env"]
    assert env["__OW_ACTIVATION_ID"] == act.activation_id
    assert env["__OW_ACTION_NAME"] == "/guest/owvars"
    assert env["__OW_ACTION_VERSION"] == "1"
    assert env["__OW_NAMESPACE"] == "guest"
    deadline = int(env["__OW_DEADLINE"])
    assert act.start + 59_000 <= deadline <= act.start + 61_000


async def test_invoke_raises_activation_error(shared_engine: minifaas.Engine) -> None:
    engine = shared_engine
    await engine.deploy("boom", code="def main(args):\n    raise ValueError('bad input: ' + str(args.get('x')))\n")
    with pytest.raises(minifaas.ActivationError) as info:
        await engine.invoke("boom", {"x": 7})
    act = info.value.activation
    assert_status(act, "application_error")
    assert act.result == {"error": "bad input: 7"}
    assert act.status_code == 1
    assert any("Traceback" in line for line in act.logs)
    assert any("ValueError: bad input: 7" in line for line in act.logs)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("def main(args):\n    return [1, 2]\n", "did not return a dictionary"),
        ("def main(args):\n    return {'x': object()}\n", "cannot be serialized"),
        ("import os\ndef main(args):\n    os._exit(3)\n", "exited with code 3"),
        ("import os, signal\ndef main(args):\n    os.kill(os.getpid(), signal.SIGKILL)\n", "SIGKILL"),
        ("import sys\ndef main(args):\n    sys.exit(2)\n", "sys.exit(2)"),
    ],
    ids=["non-dict", "unserializable", "os-exit", "sigkill-self", "sys-exit"],
)
async def test_developer_errors(shared_engine: minifaas.Engine, code: str, error: str) -> None:
    engine = shared_engine
    name = f"dev{abs(hash(code)) % 10**8}"
    await engine.deploy(name, code=code)
    act = await engine.call(name)
    assert_status(act, "developer_error", error_contains=error)
    assert act.status_code == 2
    # the pool keeps serving the function afterwards
    act2 = await engine.call(name)
    assert_status(act2, "developer_error", error_contains=error)


async def test_crash_ends_only_its_activation_and_queue_continues(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    code = textwrap.dedent("""
        import os, time
        def main(args):
            time.sleep(args.get('s', 0))
            if args.get('die'):
                os._exit(9)
            return {'ok': True}
    """)
    await engine.deploy("crashy", code=code, max_sandboxes=1)
    first = await engine.submit("crashy", {"s": 0.3, "die": True})
    queued = [await engine.submit("crashy", {}) for _ in range(3)]
    crashed = await engine.activations.wait(first, timeout_s=30)
    assert_status(crashed, "developer_error", error_contains="exited with code 9")
    for aid in queued:
        assert_success(await engine.activations.wait(aid, timeout_s=30))
    # the replacement is a new sandbox
    stats = engine.stats()
    assert stats["cold_starts"] == 2


async def test_sigkill_from_outside(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy("sleeper", code=SLEEP)
    warm = await engine.invoke("sleeper", {"s": 0})
    aid = await engine.submit("sleeper", {"s": 5})
    await anyio.sleep(0.5)
    os.kill(warm["pid"], signal.SIGKILL)
    act = await engine.activations.wait(aid, timeout_s=30)
    assert_status(act, "developer_error", error_contains="SIGKILL")
    assert act.annotations["exit_status"] == -signal.SIGKILL
    again = await engine.invoke("sleeper", {"s": 0})
    assert again["pid"] != warm["pid"]


async def test_prints_never_reach_the_protocol(shared_engine: minifaas.Engine) -> None:
    engine = shared_engine
    code = textwrap.dedent("""
        import sys, os
        def main(args):
            print("\\x00\\x00\\x00\\x05garbage that looks like a frame header")
            sys.stdout.buffer.write(b"\\x00\\x00\\x00\\x02\\x92\\x05raw bytes\\n")
            sys.stdout.buffer.flush()
            os.write(1, b"straight to fd 1\\n")
            os.write(2, b"straight to fd 2\\n")
            print("to stderr", file=sys.stderr)
            return {"ok": True}
    """)
    await engine.deploy("printer", code=code)
    act = await engine.call("printer")
    assert_success(act)
    assert act.result == {"ok": True}
    await anyio.sleep(0.2)
    act = await engine.call("printer")
    assert_success(act)
    joined = "\n".join(act.logs)
    assert "garbage that looks like a frame header" in joined
    assert "stderr: to stderr" in joined


async def test_raw_output_lands_in_its_own_activation(shared_engine: minifaas.Engine) -> None:
    # fd 1/2 are pipes apart from the channel: a line written just before main returns must still be in this
    # activation's logs, not the next one's, call after call with no pause
    engine = shared_engine
    code = textwrap.dedent("""
        import os, subprocess
        def main(args):
            n = args["n"]
            os.write(1, f"fd1 {n}\\n".encode())
            os.write(2, f"fd2 {n}\\n".encode())
            subprocess.run(["/bin/echo", f"child {n}"], check=True)
            return {"n": n}
    """)
    await engine.deploy("raw", code=code)
    for n in range(20):
        act = await engine.call("raw", {"n": n})
        assert_success(act)
        joined = "\n".join(act.logs)
        for line in (f"stdout: fd1 {n}", f"stderr: fd2 {n}", f"stdout: child {n}"):
            assert line in joined, (n, act.logs)
        assert f"fd1 {n - 1}" not in joined


async def test_bundles_folder_zip_and_file(shared_engine: minifaas.Engine, tmp_path: Path) -> None:
    engine = shared_engine
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "__main__.py").write_text(
        "from helper import double\ndef main(args):\n    return {'y': double(args['x'])}\n"
    )
    (folder / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    (folder / "minifaas.json").write_text('{"params": {"x": 21}}')
    await engine.deploy("folderfn", path=folder)
    assert await engine.invoke("folderfn") == {"y": 42}
    zpath = tmp_path / "fn.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(folder / "__main__.py", "__main__.py")
        zf.write(folder / "helper.py", "helper.py")
    await engine.deploy("zipfn", path=zpath)
    assert await engine.invoke("zipfn", {"x": 5}) == {"y": 10}
    single = tmp_path / "single.py"
    single.write_text(HELLO)
    await engine.deploy("filefn", path=single)
    assert await engine.invoke("filefn", {"name": "f"}) == {"hi": "f"}


def _zip(tmp_path: Path, entries: dict[str, str]) -> Path:
    z = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return z


async def test_deploy_validation(shared_engine: minifaas.Engine, tmp_path: Path) -> None:
    engine = shared_engine
    with pytest.raises(minifaas.DeployError, match=r"syntax error.*<code>, line 2"):
        await engine.deploy("bad", code="def main(args):\n    return {\n")
    with pytest.raises(minifaas.DeployError, match="no top-level function 'main'"):
        await engine.deploy("bad", code="def handler(args):\n    return {}\n")
    with pytest.raises(minifaas.DeployError, match="no top-level function 'handle'"):
        await engine.deploy("bad", code=HELLO, main="handle")
    with pytest.raises(minifaas.DeployError, match="no such file or folder"):
        await engine.deploy("bad", path=tmp_path / "missing.py")
    with pytest.raises(minifaas.DeployError, match="escapes the bundle folder"):
        await engine.deploy("bad", path=_zip(tmp_path, {"__main__.py": HELLO, "../evil.py": "x = 1"}))
    with pytest.raises(minifaas.DeployError, match=r"no __main__.py"):
        await engine.deploy("bad", path=_zip(tmp_path, {"other.py": HELLO}))
    bad_folder = tmp_path / "badfolder"
    bad_folder.mkdir()
    (bad_folder / "__main__.py").write_text(HELLO)
    (bad_folder / "util.py").write_text("def f(:\n")
    with pytest.raises(minifaas.DeployError, match=r"util.py, line 1"):
        await engine.deploy("bad", path=bad_folder)
    with pytest.raises(minifaas.DeployError, match="invalid function name"):
        await engine.deploy("bad/name", code=HELLO)
    with pytest.raises(minifaas.DeployError, match="timeout_s must be"):
        await engine.deploy("bad", code=HELLO, timeout_s=-1)
    with pytest.raises(minifaas.FunctionNotFound):
        await engine.invoke("bad")


async def test_concurrent_scaling_and_cap(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy("sleep", code=SLEEP, max_sandboxes=10)
    # warm the pool first so the figure measures scaling, not ten interpreter starts on two cores
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(engine.invoke, "sleep", {"s": 0.3})
    assert engine.stats()["functions"]["guest/sleep@1"]["sandboxes"] == 10
    t0 = time.perf_counter()
    acts: list[minifaas.Activation] = []

    async def one() -> None:
        acts.append(await engine.call("sleep", {"s": 0.5}))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    elapsed = time.perf_counter() - t0
    assert all(a.status == "success" for a in acts)
    assert elapsed < 2.5, f"10 concurrent 0.5 s invocations took {elapsed:.2f} s"
    assert len({a.result["pid"] for a in acts}) == 10
    # the 11th waits for a free sandbox when the cap is 10
    ids = [await engine.submit("sleep", {"s": 0.5}) for _ in range(11)]
    done = [await engine.activations.wait(i, timeout_s=30) for i in ids]
    assert engine.stats()["functions"]["guest/sleep@1"]["sandboxes"] == 10
    waits = sorted(a.wait_time or 0 for a in done)
    assert waits[-1] >= 400, f"the 11th should wait for a sandbox, waits: {waits}"
    assert waits[-2] < 400


async def test_overloaded_at_once(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy("slowq", code=SLEEP, max_sandboxes=1, max_queue=3)
    ids = [await engine.submit("slowq", {"s": 0.2}) for _ in range(3)]
    t0 = time.perf_counter()
    with pytest.raises(minifaas.Overloaded, match="already queued"):
        await engine.submit("slowq", {"s": 0.2})
    assert time.perf_counter() - t0 < 0.05
    for aid in ids:  # nothing accepted is dropped
        assert_success(await engine.activations.wait(aid, timeout_s=30))


async def test_timeout_kills_and_replaces(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy("slow", code=SLEEP, timeout_s=0.5)
    first = await engine.invoke("slow", {"s": 0})
    t0 = time.perf_counter()
    act = await engine.call("slow", {"s": 10})
    assert time.perf_counter() - t0 < 3
    assert_status(act, "developer_error", error_contains="exceeded its time limits of 500 milliseconds")
    assert act.annotations["timeout"] is True
    await anyio.sleep(0.3)
    assert not _alive(first["pid"])
    again = await engine.call("slow", {"s": 0})
    assert_success(again)
    assert again.result["pid"] != first["pid"] and again.annotations["cold"] is True


async def test_timeout_counts_from_each_activations_start(minifaas_engine: minifaas.Engine) -> None:
    # one deadline timer per sandbox: armed by an earlier activation, it must be re-armed for the one running when
    # it fires, so a later activation still gets its whole time limit, no more and no less
    engine = minifaas_engine
    await engine.deploy("late", code=SLEEP, timeout_s=1.0)
    assert_success(await engine.call("late", {"s": 0}))
    await anyio.sleep(0.6)
    t0 = time.perf_counter()
    act = await engine.call("late", {"s": 5})
    elapsed = time.perf_counter() - t0
    assert_status(act, "developer_error", error_contains="exceeded its time limits of 1000 milliseconds")
    assert 0.95 <= elapsed < 2.0, elapsed


async def test_timeouts_with_concurrency(minifaas_engine: minifaas.Engine) -> None:
    # two activations in one sandbox both past their limit: both are recorded as timed out
    engine = minifaas_engine
    await engine.deploy("both", code=SLEEP, concurrency=2, max_sandboxes=1, timeout_s=0.5)
    acts = await _gather(engine, [("both", {"s": 5}), ("both", {"s": 5})])
    for act in acts:
        assert_status(act, "developer_error", error_contains="exceeded its time limits")
        assert act.annotations["timeout"] is True


async def _gather(engine: minifaas.Engine, calls: list[tuple[str, dict[str, object]]]) -> list[minifaas.Activation]:
    out: list[minifaas.Activation] = []

    async def one(name: str, args: dict[str, object]) -> None:
        out.append(await engine.call(name, args))

    async with anyio.create_task_group() as tg:
        for name, args in calls:
            tg.start_soon(one, name, args)
    return out


async def test_memory_limit(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    code = "def main(args):\n    b = bytearray(args['mb'] << 20)\n    return {'n': len(b)}\n"
    await engine.deploy("mem", code=code, memory_mb=128)
    assert_success(await engine.call("mem", {"mb": 32}))
    act = await engine.call("mem", {"mb": 512})
    assert_status(act, "developer_error", error_contains="memory limit exceeded")
    assert_success(await engine.call("mem", {"mb": 16}))


async def test_payload_result_and_log_limits(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy(
        "echo", code="def main(args):\n    return {'n': len(args.get('data', b''))}\n", max_payload_bytes=1000
    )
    assert (await engine.invoke("echo", {"data": b"x" * 100}))["n"] == 100
    with pytest.raises(minifaas.PayloadTooLarge, match="over the 1000 byte limit"):
        await engine.submit("echo", {"data": b"x" * 2000})
    with pytest.raises(minifaas.InvalidPayload, match="must be a dict"):
        await engine.submit("echo", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(minifaas.InvalidPayload, match="not a JSON-like value"):
        await engine.submit("echo", {"x": {1, 2}})
    with pytest.raises(minifaas.InvalidPayload, match="keys must be str"):
        await engine.submit("echo", {"x": {1: 2}})
    await engine.deploy("big", code="def main(args):\n    return {'x': 'y' * args['n']}\n", max_result_bytes=10_000)
    assert_success(await engine.call("big", {"n": 100}))
    act = await engine.call("big", {"n": 50_000})
    assert_status(act, "developer_error", error_contains="exceeded the allowed length")
    await engine.deploy(
        "chatty",
        code="def main(args):\n    for i in range(10000):\n        print('line', i)\n    return {}\n",
        max_log_bytes=5000,
    )
    act = await engine.call("chatty")
    assert_success(act)
    assert "Logs were truncated" in act.logs[-1]
    assert sum(len(line) for line in act.logs) < 6000


async def test_scrubbed_environment(minifaas_engine: minifaas.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = minifaas_engine
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    code = "import os\ndef main(args):\n    return {'env': dict(os.environ)}\n"
    await engine.deploy("envfn", code=code, env={"MY_SETTING": "on"})
    env = (await engine.invoke("envfn"))["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["MY_SETTING"] == "on"


async def test_idle_sandbox_expires() -> None:
    async with minifaas.Engine() as engine:
        await engine.deploy("brief", code=SLEEP, idle_timeout_s=0.5)
        pid = (await engine.invoke("brief", {"s": 0}))["pid"]
        assert engine.stats()["functions"]["guest/brief@1"]["sandboxes"] == 1
        await anyio.sleep(1.5)
        assert engine.stats()["functions"]["guest/brief@1"]["sandboxes"] == 0
        assert engine.stats()["expired_idle"] == 1
        await anyio.sleep(0.3)
        assert not _alive(pid)
        act = await engine.call("brief", {"s": 0})
        assert act.annotations["cold"] is True


async def test_idle_expiry_on_fake_clock(fake_clock: minifaas.testing.FakeClock) -> None:
    async with minifaas.Engine(clock=fake_clock) as engine:
        await engine.deploy("f", code=HELLO, idle_timeout_s=600)
        await engine.invoke("f")
        fake_clock.advance(599)
        await anyio.sleep(0.1)
        assert engine.stats()["functions"]["guest/f@1"]["sandboxes"] == 1
        fake_clock.advance(2)
        with anyio.fail_after(5):
            while engine.stats()["functions"]["guest/f@1"]["sandboxes"]:
                await anyio.sleep(0.02)


async def test_per_sandbox_concurrency(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    await engine.deploy("multi", code=SLEEP, concurrency=4, max_sandboxes=1)
    t0 = time.perf_counter()
    ids = [await engine.submit("multi", {"s": 0.5}) for _ in range(4)]
    acts = [await engine.activations.wait(i, timeout_s=30) for i in ids]
    assert all(a.status == "success" for a in acts)
    assert len({a.result["pid"] for a in acts}) == 1
    assert time.perf_counter() - t0 < 1.9


async def test_versions(minifaas_engine: minifaas.Engine) -> None:
    engine = minifaas_engine
    v1 = await engine.deploy("ver", code="def main(args):\n    return {'v': 1}\n")
    v2 = await engine.deploy("ver", code="def main(args):\n    return {'v': 2}\n")
    assert (v1["version"], v2["version"]) == ("1", "2")
    assert await engine.invoke("ver") == {"v": 2}
    assert await engine.invoke("ver@1") == {"v": 1}
    with pytest.raises(minifaas.FunctionNotFound, match="no version '9'"):
        await engine.invoke("ver@9")
    await engine.delete("ver")
    with pytest.raises(minifaas.FunctionNotFound):
        await engine.invoke("ver")


async def test_close_finishes_inflight_and_leaves_no_process() -> None:
    async with minifaas.Engine() as engine:
        await engine.deploy("sleep", code=SLEEP)
        pids = [(await engine.invoke("sleep", {"s": 0}))["pid"]]
        aid = await engine.submit("sleep", {"s": 0.5})
        job = engine._sched.jobs[aid]  # type: ignore[union-attr]
    assert job.act.status == "success"  # in flight at close: it finished
    for pid in pids:
        assert not _alive(pid)
    with pytest.raises(minifaas.EngineClosed):
        await engine.invoke("sleep")


async def test_close_records_unfinished_as_failed() -> None:
    engine = minifaas.Engine(close_timeout_s=0.3)
    async with engine:
        await engine.deploy("sleep", code=SLEEP)
        aid = await engine.submit("sleep", {"s": 30})
        job = engine._sched.jobs[aid]  # type: ignore[union-attr]
        await anyio.sleep(0.5)
    assert job.act.status == "internal_error"
    assert "closed before" in job.act.result["error"]


async def test_sqlite_store_survives_restart(tmp_path: Path) -> None:
    async with minifaas.Engine(state_dir=tmp_path) as engine:
        await engine.deploy("hello", code=HELLO)
        act = await engine.call("hello", {"name": "persist"})
    async with minifaas.Engine(state_dir=tmp_path) as engine2:
        again = await engine2.activations.get(act.activation_id)
        assert again.result == {"hi": "persist"} and again.status == "success"
        assert again.logs == act.logs
        assert [a.activation_id for a in await engine2.activations.list(name="hello")] == [act.activation_id]


HOST_SCRIPT = """
import sys, anyio, minifaas
async def main():
    async with minifaas.Engine(state_dir=sys.argv[1]) as engine:
        await engine.deploy("sleep", code="import time\\ndef main(a):\\n    time.sleep(a['s'])\\n    return {}\\n")
        done = await engine.call("sleep", {"s": 0})
        print("done", done.activation_id, flush=True)
        for _ in range(3):
            print("pending", await engine.submit("sleep", {"s": 60}), flush=True)
        await anyio.sleep(60)
anyio.run(main)
"""


async def test_host_killed_records_marked_failed(tmp_path: Path) -> None:
    def run_and_kill() -> list[list[str]]:
        proc = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(4)]
        time.sleep(0.5)
        proc.kill()  # kill -9: no clean-up runs in the host
        proc.wait()
        proc.stdout.close()
        return lines

    lines = await anyio.to_thread.run_sync(run_and_kill)
    done_id = lines[0][1]
    pending_ids = [parts[1] for parts in lines[1:]]
    async with minifaas.Engine(state_dir=tmp_path) as engine:
        assert engine.recovered == 3
        assert (await engine.activations.get(done_id)).status == "success"
        for aid in pending_ids:
            act = await engine.activations.get(aid)
            assert act.status == "internal_error"
            assert "host process ended" in act.result["error"]


def test_sync_engine() -> None:
    with minifaas.SyncEngine() as engine:
        engine.deploy("hello", code=HELLO)
        assert engine.invoke("hello", {"name": "sync"}) == {"hi": "sync"}
        aid = engine.submit("hello", {"name": "later"})
        assert engine.activations is not None
        assert engine.activations.wait(aid).result == {"hi": "later"}
        with pytest.raises(minifaas.ActivationError):
            engine.deploy("bad", code="def main(a):\n    raise RuntimeError('x')\n")
            engine.invoke("bad")


def test_errors_are_public() -> None:
    for name in ("MinifaasError", "DeployError", "ActivationError", "Overloaded", "FunctionNotFound"):
        cls = getattr(minifaas, name)
        assert cls.__module__ == "minifaas"
        assert cls.__doc__ and "raise" in cls.__doc__.lower()
        assert issubclass(cls, minifaas.MinifaasError)


def _descendants() -> set[int]:
    from tests.helpers.proc import descendants, proc_table

    return set(descendants(os.getpid(), proc_table()))


async def _no_descendants(before: set[int]) -> set[int]:
    with anyio.move_on_after(10):
        while _descendants() - before:
            await anyio.sleep(0.05)
    return _descendants() - before


async def test_aclose_inside_a_cancel_scope() -> None:
    """scope.py: a shutdown bounded with fail_after raised "exit a cancel scope that isn't the current one"."""
    before = _descendants()
    engine = minifaas.Engine()
    await engine.__aenter__()
    await engine.deploy("f", code=HELLO)
    await engine.invoke("f", {})
    with anyio.fail_after(30):
        await engine.aclose()
    with pytest.raises(minifaas.EngineClosed):
        await engine.invoke("f")
    await engine.__aexit__(None, None, None)
    assert not await _no_descendants(before)
    async with minifaas.Engine() as again:
        await again.deploy("f", code=HELLO)
        with anyio.fail_after(30):
            await again.aclose()
        await again.aclose()  # twice is fine


async def test_close_inside_a_cancelled_scope_is_bounded() -> None:
    before = _descendants()
    with anyio.fail_after(20):
        with anyio.CancelScope() as outer:
            async with minifaas.Engine(close_timeout_s=1) as engine:
                await engine.deploy("sleep", code=SLEEP)
                await engine.submit("sleep", {"s": 30})
                await anyio.sleep(0.3)
                outer.cancel()
    assert not await _no_descendants(before)


async def test_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    """aenter_leak2.py: a corrupt triggers state file failed __aenter__ and left the zygote and its spare running."""
    before = _descendants()
    (tmp_path / "triggers").mkdir()
    (tmp_path / "triggers" / "state.json").write_text("{not json")
    with pytest.raises(minifaas.TriggerError, match="unreadable"):
        async with minifaas.Engine(tmp_path):
            pass
    await anyio.sleep(2)  # a zygote started in the background would be up by now
    assert not await _no_descendants(before)
    (tmp_path / "triggers" / "state.json").unlink()
    async with minifaas.Engine(tmp_path) as engine:  # the state dir was released too
        await engine.deploy("f", code=HELLO)
        assert await engine.invoke("f", {"name": "x"}) == {"hi": "x"}


async def test_second_engine_on_a_state_dir_is_refused(tmp_path: Path) -> None:
    """twoengines.py: a second engine recovered (ended) the first one's running activation: two final records."""
    async with minifaas.Engine(tmp_path) as first:
        await first.deploy("long", code=SLEEP)
        aid = await first.submit("long", {"s": 1.0})
        await anyio.sleep(0.3)
        with pytest.raises(minifaas.StateDirLocked, match=rf"in use by another engine \(process {os.getpid()}\)"):
            async with minifaas.Engine(tmp_path, launcher="spawn"):
                pass
        # from another process too (a CLI, a second server)
        code = f"import anyio, minifaas\nanyio.run(minifaas.Engine({str(tmp_path)!r}).__aenter__)"
        proc = await anyio.run_process([sys.executable, "-c", code], check=False)
        assert proc.returncode != 0 and b"StateDirLocked" in proc.stderr
        act = await first.activations.wait(aid)
        assert act.status == "success" and not act.annotations.get("recovered")
    async with minifaas.Engine(tmp_path, launcher="spawn") as later:
        assert later.recovered == 0
        stored = await later.activations.get(aid)
        assert stored.status == "success" and not stored.annotations.get("recovered")


async def test_read_only_engine_reads_a_state_dir_another_engine_holds(tmp_path: Path) -> None:
    """The --local CLI's read commands open a held state dir read-only: they read, run nothing, change nothing."""
    async with minifaas.Engine(tmp_path) as first:
        await first.deploy("long", code=SLEEP)
        done = await first.call("long", {"s": 0})
        running = await first.submit("long", {"s": 1.0})
        await anyio.sleep(0.3)
        files = sorted(p.name for p in tmp_path.iterdir())
        async with minifaas.Engine(tmp_path, read_only=True) as reader:
            assert (await reader.activations.get(done.activation_id)).status == "success"
            assert not (await reader.activations.get(running)).done  # not recovered: its owner lives
            assert {a.activation_id for a in await reader.activations.list()} >= {done.activation_id, running}
            with pytest.raises(minifaas.StateDirReadOnly, match="read-only"):
                await reader.submit("long", {"s": 0})
            await reader.deploy("other", code=HELLO)  # in memory only
            with pytest.raises(minifaas.StateDirReadOnly):
                await reader.call("other", {})
            assert reader.stats().get("launcher") == "spawn"  # no zygote was started for it
            # a record the holder ends after the reader opened is seen too, and can be waited for
            assert (await reader.activations.wait(running, timeout_s=10)).status == "success"
            assert (await first.activations.get(running)).status == "success"
        assert sorted(p.name for p in tmp_path.iterdir()) == files
    with pytest.raises(ValueError, match="needs a state_dir"):
        minifaas.Engine(read_only=True)
    async with minifaas.Engine(tmp_path, launcher="spawn") as later:
        assert later.recovered == 0
        assert [f["name"] for f in await later.list_functions()] == []  # the reader's deploy was not kept
