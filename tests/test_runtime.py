"""The sandbox runtime: log capture under threads, errors that cannot describe themselves, the init folder,
per-activation __OW_* variables with concurrency > 1, async functions. Real sandbox processes."""

from __future__ import annotations

import collections
import textwrap
import threading
from pathlib import Path

import anyio
import pytest
from minifaas_sandbox.runtime import LogBuffer

import minifaas
from minifaas.testing import assert_success
from minifaas.testing import call as call_in_process

pytestmark = pytest.mark.anyio

THREADS = 5
LINES_PER_THREAD = 4000

THREADED_PRINTS = textwrap.dedent(f"""
    import threading
    def spam():
        for i in range({LINES_PER_THREAD}):
            print("x" * 5, end="")
            print("y")
    def main(args):
        ts = [threading.Thread(target=spam) for _ in range({THREADS} - 1)]
        [t.start() for t in ts]
        spam()
        [t.join() for t in ts]
        return {{"ok": True}}
""")

BAD_STR = textwrap.dedent("""
    class E(Exception):
        def __str__(self):
            raise RuntimeError("no str")
    def main(args):
        if args.get("fail"):
            raise E()
        return {"pid": __import__("os").getpid()}
""")


def _payloads(lines: list[str], stream: str = "stdout") -> collections.Counter[str]:
    return collections.Counter(line.split(f" {stream}: ", 1)[1] for line in lines if f" {stream}: " in line)


def test_log_buffer_keeps_every_line_of_every_thread() -> None:
    buf = LogBuffer(10 << 20)
    errors: list[BaseException] = []

    def spam() -> None:
        try:
            for _ in range(LINES_PER_THREAD):
                buf.write("stdout", "xxxxx")
                buf.write("stdout", "y\n")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spam) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # a thread's pieces of a line stay together: no merged lines, none lost
    assert _payloads(buf.finish()) == {"xxxxxy": THREADS * LINES_PER_THREAD}


def test_log_buffer_refuses_writes_after_finish() -> None:
    buf = LogBuffer(1 << 20)
    assert buf.write("stdout", "a\n")
    assert buf.finish() and not buf.write("stdout", "late\n")


async def test_threaded_prints_all_reach_the_record(minifaas_engine: minifaas.Engine) -> None:
    await minifaas_engine.deploy("race", code=THREADED_PRINTS, timeout_s=60)
    act = await minifaas_engine.call("race")
    assert_success(act)
    assert _payloads(act.logs) == {"xxxxxy": THREADS * LINES_PER_THREAD}


@pytest.mark.parametrize("concurrency", [1, 3], ids=["concurrency1", "concurrency3"])
@pytest.mark.parametrize("style", ["openwhisk", "lambda"])
async def test_exception_whose_str_raises(minifaas_engine: minifaas.Engine, concurrency: int, style: str) -> None:
    code = BAD_STR if style == "openwhisk" else BAD_STR.replace("def main(args):", "def main(args, context):")
    await minifaas_engine.deploy("badstr", code=code, concurrency=concurrency, timeout_s=20, style=style)  # type: ignore[arg-type]
    warm = await minifaas_engine.invoke("badstr", {})
    with anyio.fail_after(10):
        act = await minifaas_engine.call("badstr", {"fail": True})
    assert act.status == "application_error"
    assert act.result["error"] == "<E: str() raised RuntimeError>"
    assert any("RuntimeError" in line or "E" in line for line in act.logs)
    # the sandbox lived through it
    again = await minifaas_engine.call("badstr", {})
    assert_success(again)
    assert again.result["pid"] == warm["pid"]


async def test_init_failure_whose_str_raises(minifaas_engine: minifaas.Engine) -> None:
    code = "class E(Exception):\n    def __str__(self):\n        raise ValueError\n"
    code += "raise E()\ndef main(args):\n    return {}\n"
    await minifaas_engine.deploy("badinit", code=code)
    with anyio.fail_after(10):
        act = await minifaas_engine.call("badinit")
    assert act.status == "developer_error"
    assert "<E: str() raised ValueError>" in act.result["error"]


async def test_module_level_code_runs_in_the_function_folder(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "labels.txt").write_text("cat\ndog\n")
    (folder / "__main__.py").write_text(
        "import os\nLABELS = open('labels.txt').read().split()\nINIT_CWD = os.getcwd()\n"
        "def main(args):\n    return {'labels': LABELS, 'init_cwd': INIT_CWD}\n"
    )
    await minifaas_engine.deploy("labels", path=folder)
    act = await minifaas_engine.call("labels")
    assert_success(act)
    assert act.result["labels"] == ["cat", "dog"]
    assert Path(act.result["init_cwd"]).joinpath("labels.txt").is_file()


OW_VARS = textwrap.dedent("""
    import os, time
    from os import environ
    def main(args):
        time.sleep(args.get("s", 0.3))
        aid = os.environ["__OW_ACTIVATION_ID"]
        return {
            "aid": aid,
            "getenv": os.getenv("__OW_ACTIVATION_ID"),
            "imported": environ.get("__OW_ACTIVATION_ID"),
            "in": "__OW_ACTIVATION_ID" in os.environ,
            "copy": os.environ.copy().get("__OW_ACTIVATION_ID"),
            "listed": sorted(k for k in os.environ if k.startswith("__OW_")),
            "name": os.environ.get("__OW_ACTION_NAME"),
            "deadline": int(os.environ["__OW_DEADLINE"]),
            "path": "PATH" in os.environ,
        }
""")


async def test_ow_variables_per_activation_with_concurrency(minifaas_engine: minifaas.Engine) -> None:
    await minifaas_engine.deploy("owvars", code=OW_VARS, concurrency=4, max_sandboxes=1, timeout_s=30)
    ids = [await minifaas_engine.submit("owvars", {"s": 0.3}) for _ in range(4)]
    acts = [await minifaas_engine.activations.wait(i, timeout_s=30) for i in ids]
    for act in acts:
        assert_success(act)
        r = act.result
        assert r["aid"] == r["getenv"] == r["imported"] == r["copy"] == act.activation_id
        assert r["in"] and r["path"] and r["name"] == "/guest/owvars" and r["deadline"] > act.start
        assert r["listed"] == sorted(
            ["__OW_ACTIVATION_ID", "__OW_DEADLINE", "__OW_ACTION_NAME", "__OW_ACTION_VERSION", "__OW_NAMESPACE"]
        )
    # they ran side by side in one sandbox, each seeing its own id
    assert len({a.annotations["sandbox"] for a in acts}) == 1


ASYNC_MAIN = textwrap.dedent("""
    import asyncio, os
    running = 0
    peak = 0
    async def main(args):
        global running, peak
        running += 1
        peak = max(peak, running)
        print("async start", args["n"])
        await asyncio.sleep(args.get("s", 0))
        running -= 1
        return {"n": args["n"], "aid": os.environ["__OW_ACTIVATION_ID"], "peak": peak}
""")


@pytest.mark.parametrize("concurrency", [1, 4], ids=["concurrency1", "concurrency4"])
async def test_async_main_runs_on_an_event_loop(minifaas_engine: minifaas.Engine, concurrency: int) -> None:
    await minifaas_engine.deploy("amain", code=ASYNC_MAIN, concurrency=concurrency, max_sandboxes=1, timeout_s=30)
    ids = [await minifaas_engine.submit("amain", {"n": n, "s": 0.3}) for n in range(4)]
    acts = [await minifaas_engine.activations.wait(i, timeout_s=30) for i in ids]
    for n, act in enumerate(acts):
        assert_success(act)
        assert act.result["n"] == n and act.result["aid"] == act.activation_id
        assert [line.split(" stdout: ")[1] for line in act.logs] == [f"async start {n}"]
    # with concurrency > 1 the coroutines share one loop and overlap
    assert max(a.result["peak"] for a in acts) == (1 if concurrency == 1 else 4)


async def test_async_main_in_process_under_a_running_loop() -> None:
    assert call_in_process("async def main(args):\n    return {'x': args['x'] + 1}\n", {"x": 1}) == {"x": 2}


CWD = "import os\ndef main(args):\n    return {'cwd': os.getcwd()}\n"


def test_a_sandbox_chooses_its_temp_folder_before_its_request() -> None:
    """tempfile's probe of its folder (a file written and removed, 0.3-0.5 ms) is off a cold start's path: a spare
    takes it in runtime.prepare(), ahead of its request."""
    import subprocess
    import sys

    code = "import tempfile\nfrom minifaas_sandbox import runtime\nruntime.prepare()\nprint(tempfile.tempdir)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() not in ("", "None"), out


async def test_a_functions_own_tmpdir_still_holds_its_working_dir(
    minifaas_engine: minifaas.Engine, tmp_path: Path
) -> None:
    """The folder tempfile chose ahead is forgotten when the function's env names another."""
    await minifaas_engine.deploy("cwd", code=CWD, env={"TMPDIR": str(tmp_path)})
    act = assert_success(await minifaas_engine.call("cwd", {}))
    assert Path(act.result["cwd"]).parent == tmp_path, act.result
