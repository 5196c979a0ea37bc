"""``minifaas.testing.call`` behaves like a deployed call: a table of cases, each run both ways, must agree.

Each case runs through ``testing.run`` and through ``Engine.deploy`` + ``Engine.call`` of an engine of its own, and
the two activations must have the same status, result and logs (timestamps and the staging folder aside). Cases a
sandbox enforces and the in-process opt-out cannot (timeout, memory limit, fd 1 output, network isolation) are marked;
the others must also agree with ``in_process=True``.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import minifaas
from minifaas import testing
from minifaas.testing import FakeClock

pytestmark = pytest.mark.anyio

TS = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z ")
STAGED = re.compile(r"\S*/[0-9a-f]{64}/")


def code(src: str) -> Callable[[Path], str]:
    return lambda tmp: textwrap.dedent(src)


def bundle(folder: str, files: dict[str, str]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = tmp / folder
        d.mkdir(exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(textwrap.dedent(text))
        return d

    return make


@dataclass
class Case:
    id: str
    #: (function factory, args) run in turn; each step's activation is compared
    steps: list[tuple[Callable[[Path], Any], dict[str, Any]]]
    options: dict[str, Any] = field(default_factory=dict)
    #: the deployed outcome, so the case cannot pass by both ways being wrong alike: (status, result subset)
    expect: tuple[str, dict[str, Any]] = ("success", {})
    #: the in-process opt-out gives the same (False: a sandbox-only guarantee)
    in_process: bool = True


HELPER_A_FILES = {"__main__.py": "def main(args):\n    import helper\n    return {'who': helper.WHO}\n"}

CASES = [
    Case(
        "set-in-result",
        [(code("def main(args):\n    return {'s': {1, 2}}\n"), {})],
        expect=("developer_error", {"error": "The action returned a result that cannot be serialized: "}),
    ),
    Case(
        "datetime-in-result",
        [(code("import datetime\ndef main(args):\n    return {'t': datetime.datetime(2020, 1, 1)}\n"), {})],
        expect=("developer_error", {"error": "The action returned a result that cannot be serialized: "}),
    ),
    Case(
        "tuple-argument-arrives-as-list",
        [(code("def main(args):\n    return {'type': type(args['x']).__name__, 'x': args['x']}\n"), {"x": (1, 2)})],
        expect=("success", {"type": "list", "x": [1, 2]}),
    ),
    Case(
        "tuple-in-result-becomes-list",
        [(code("def main(args):\n    return {'x': (1, 'a')}\n"), {})],
        expect=("success", {"x": [1, "a"]}),
    ),
    Case(
        "2mb-result",
        [(code("def main(args):\n    return {'blob': 'x' * (2 << 20)}\n"), {})],
        expect=("developer_error", {"error": "The action produced a response that exceeded the allowed length: "}),
    ),
    Case(
        "result-limit-option",
        [(code("def main(args):\n    return {'blob': 'x' * 2000}\n"), {})],
        options={"max_result_bytes": 1000},
        expect=("developer_error", {"error": "The action produced a response that exceeded the allowed length: "}),
    ),
    Case(
        "600mb-under-256mb",
        [(code("def main(args):\n    b = bytearray(600 << 20)\n    return {'n': len(b)}\n"), {})],
        options={"memory_mb": 256},
        expect=("developer_error", {"error": "memory limit exceeded (256 MB)"}),
        in_process=False,
    ),
    Case(
        "raw-fd1-write-in-logs",
        [(code("import os\ndef main(args):\n    os.write(1, b'raw line\\n')\n    return {}\n"), {})],
        in_process=False,
    ),
    Case(
        "timeout-enforced",
        [(code("import time\ndef main(args):\n    time.sleep(5)\n    return {}\n"), {})],
        options={"timeout_s": 0.5},
        expect=("developer_error", {"error": "The action exceeded its time limits of 500 milliseconds."}),
        in_process=False,
    ),
    Case(
        "network-false",
        [
            (
                code(
                    "import socket\ndef main(args):\n"
                    "    return {'interfaces': sorted(n for _, n in socket.if_nameindex())}\n"
                ),
                {},
            )
        ],
        options={"network": False},
        expect=("success", {"interfaces": ["lo"]}),
        in_process=False,
    ),
    Case(
        "relative-open-in-bundle-folder",
        [
            (
                bundle(
                    "reader",
                    {
                        "__main__.py": (
                            "def main(args):\n    with open('data.txt') as f:\n        return {'data': f.read()}\n"
                        ),
                        "data.txt": "42",
                    },
                ),
                {},
            )
        ],
        expect=("success", {"data": "42"}),
    ),
    Case(
        "two-bundles-own-helper",
        [
            (bundle("a", {**HELPER_A_FILES, "helper.py": "WHO = 'a'\n"}), {}),
            (bundle("b", {**HELPER_A_FILES, "helper.py": "WHO = 'b'\n"}), {}),
            (bundle("a", {**HELPER_A_FILES, "helper.py": "WHO = 'a'\n"}), {}),
        ],
        expect=("success", {"who": "a"}),
    ),
    Case(
        "env",
        [(code("import os\ndef main(args):\n    return {'v': os.environ.get('GREETING')}\n"), {})],
        options={"env": {"GREETING": "hello"}},
        expect=("success", {"v": "hello"}),
    ),
    Case(
        "lambda-environment",
        [
            (
                code(
                    "import os\ndef handler(event, context):\n"
                    "    return {k: v for k, v in os.environ.items() if k.startswith('AWS_LAMBDA_')}\n"
                ),
                {},
            )
        ],
        options={"style": "lambda", "main": "handler", "memory_mb": 128},
        expect=(
            "success",
            {"AWS_LAMBDA_FUNCTION_NAME": "lambda-environment", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128"},
        ),
    ),
    Case(
        "params-under-args",
        [(code("def main(args):\n    return dict(args)\n"), {"b": 3})],
        options={"params": {"a": 1, "b": 2}},
        expect=("success", {"a": 1, "b": 3}),
    ),
    Case(
        "prints-in-logs",
        [
            (
                code(
                    "import sys\ndef main(args):\n"
                    "    print('out', 1)\n    print('err', file=sys.stderr)\n    return {}\n"
                ),
                {},
            )
        ],
    ),
    Case(
        "application-error-traceback",
        [(code("def main(args):\n    raise KeyError('nope')\n"), {})],
        expect=("application_error", {"error": "'nope'"}),
    ),
    Case(
        "error-key-is-application-error",
        [(code("def main(args):\n    return {'error': 'bad input'}\n"), {})],
        expect=("application_error", {"error": "bad input"}),
    ),
    Case(
        "not-a-dict",
        [(code("def main(args):\n    return [1]\n"), {})],
        expect=("developer_error", {"error": "The action did not return a dictionary (returned list)."}),
    ),
    Case(
        "sys-exit",
        [(code("import sys\ndef main(args):\n    sys.exit(3)\n"), {})],
        expect=("developer_error", {"error": "The action called sys.exit(3)."}),
    ),
    Case(
        "init-failure",
        [(code("print('loading')\nraise RuntimeError('broken at import')\ndef main(args):\n    return {}\n"), {})],
        expect=("developer_error", {}),
    ),
    Case(
        "ow-variables",
        [(code("import os\ndef main(args):\n    return {'name': os.environ['__OW_ACTION_NAME']}\n"), {})],
        expect=("success", {"name": "/guest/ow-variables"}),
    ),
]


def _logs(act: minifaas.Activation) -> list[str]:
    return [STAGED.sub("<bundle>/", TS.sub("", line)) for line in act.logs]


def _outcome(act: minifaas.Activation) -> tuple[str, dict[str, Any], list[str]]:
    return act.status, act.result, _logs(act)


def _target(made: Any) -> dict[str, Any]:
    return {"path": made} if isinstance(made, Path) else {"code": made}


@pytest.fixture(scope="module")
async def minifaas_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine(state_dir=tmp_path_factory.mktemp("engine"), max_sandboxes=8) as eng:
        yield eng


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_call_matches_a_deployed_call(minifaas_engine: minifaas.Engine, tmp_path: Path, case: Case) -> None:
    deployed, kit, local = [], [], []
    for i, (make, args) in enumerate(case.steps):
        target = make(tmp_path)
        name = f"{case.id}-{i}" if len(case.steps) > 1 else case.id
        await minifaas_engine.deploy(name, **_target(target), **case.options)
        deployed.append(_outcome(await minifaas_engine.call(name, args)))
        kit.append(_outcome(testing.run(target, args, name=name, **case.options)))
        if case.in_process:
            local.append(_outcome(testing.run(target, args, name=name, in_process=True, **case.options)))
    status, subset = case.expect
    for got_status, got_result, _ in deployed[-1:]:
        assert got_status == status
        for k, v in subset.items():
            assert str(got_result.get(k)).startswith(str(v)), (k, got_result)
    assert kit == deployed
    if case.in_process:
        assert local == deployed


async def test_two_bundles_each_get_their_own_helper(tmp_path: Path) -> None:
    a = bundle("a", {**HELPER_A_FILES, "helper.py": "WHO = 'a'\n"})(tmp_path)
    b = bundle("b", {**HELPER_A_FILES, "helper.py": "WHO = 'b'\n"})(tmp_path)
    for in_process in (False, True):
        assert testing.call(a, in_process=in_process) == {"who": "a"}
        assert testing.call(b, in_process=in_process) == {"who": "b"}
        assert testing.call(a, in_process=in_process) == {"who": "a"}


def test_raw_fd1_write_reaches_the_logs() -> None:
    act = testing.run("import os\ndef main(args):\n    os.write(1, b'raw line\\n')\n    return {}\n", name="fd1")
    assert [TS.sub("", line) for line in act.logs] == ["stdout: raw line"]


@pytest.mark.parametrize("in_process", [False, True], ids=["sandbox", "in-process"])
def test_an_edited_file_runs_its_new_code(tmp_path: Path, in_process: bool) -> None:
    f = tmp_path / "fn.py"
    f.write_text("def main(args):\n    return {'v': 1}\n")
    assert testing.call(f, in_process=in_process) == {"v": 1}
    f.write_text("def main(args):\n    return {'v': 2}\n")
    assert testing.call(f, in_process=in_process) == {"v": 2}
    d = tmp_path / "folder"
    d.mkdir()
    (d / "__main__.py").write_text("import helper\ndef main(args):\n    return {'v': helper.V}\n")
    (d / "helper.py").write_text("V = 1\n")
    assert testing.call(d, in_process=in_process) == {"v": 1}
    (d / "helper.py").write_text("V = 2\n")
    assert testing.call(d, in_process=in_process) == {"v": 2}


@pytest.mark.parametrize("in_process", [False, True], ids=["sandbox", "in-process"])
def test_bad_arguments_are_refused_as_on_submit(in_process: bool) -> None:
    fn = "def main(args):\n    return {}\n"
    with pytest.raises(minifaas.InvalidPayload, match=r"args\['s'\]: a set is not a JSON-like value"):
        testing.call(fn, {"s": {1}}, name="bad", in_process=in_process)
    with pytest.raises(minifaas.PayloadTooLarge, match=r"arguments of bad are 2\d\d bytes, over the 100 byte limit"):
        testing.call(fn, {"s": "x" * 200}, name="bad", max_payload_bytes=100, in_process=in_process)


def test_in_process_says_what_it_skips() -> None:
    act = testing.run(
        "import time\ndef main(args):\n    time.sleep(0.3)\n    return {}\n", timeout_s=0.1, in_process=True
    )
    # the opt-out runs to the end: it does not pretend to enforce the timeout, and says so
    assert act.status == "success"
    assert act.annotations["not_enforced"] == list(testing.NOT_ENFORCED)
    assert "timeout" in act.annotations["not_enforced"] and "memory limit" in act.annotations["not_enforced"]
    with pytest.raises(minifaas.DeployError, match="network=False needs a sandbox"):
        testing.run("def main(args):\n    return {}\n", network=False, in_process=True)


def test_in_process_leaves_the_caller_as_it_was(tmp_path: Path) -> None:
    import os
    import sys

    d = bundle("restore", {"__main__.py": "import os, helper\ndef main(args):\n    return {'cwd': os.getcwd()}\n"})(
        tmp_path
    )
    (d / "helper.py").write_text("X = 1\n")
    cwd, path, env = os.getcwd(), list(sys.path), dict(os.environ)
    got = testing.call(d, env={"ONLY_INSIDE": "1"}, in_process=True)
    assert Path(got["cwd"]).name != Path(cwd).name  # it ran in its (staged) bundle folder
    assert os.getcwd() == cwd and sys.path == path and dict(os.environ) == env
    assert "helper" not in sys.modules


# -- FakeClock --------------------------------------------------------------------------------------------------
def test_fake_clock_starts_at_a_realistic_date_with_separate_times() -> None:
    from datetime import UTC, datetime

    clock = FakeClock()
    assert datetime.fromtimestamp(clock.now(), UTC).year >= 2024
    assert clock.time() == clock.now()
    assert clock.monotonic() < clock.now()  # not one value for both
    wall, mono = clock.now(), clock.monotonic()
    clock.advance(90)
    assert (clock.now() - wall, clock.monotonic() - mono) == (90, 90)
    clock.set(wall - 3600)  # wall time goes back (a clock correction); monotonic time does not
    assert clock.now() == wall - 3600 and clock.monotonic() == mono + 90
    clock.set(datetime(2030, 6, 1, tzinfo=UTC))
    assert clock.now() == datetime(2030, 6, 1, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError, match="aware datetime"):
        clock.set(datetime(2030, 6, 1))
    with pytest.raises(ValueError, match="use set"):
        clock.advance(-1)


async def test_fake_clock_sleep_wakes_on_advance_and_on_set() -> None:
    import anyio

    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(tag: str) -> None:
        await clock.sleep(60)
        woke.append(tag)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, "a")
        await anyio.sleep(0.01)
        clock.advance(30)
        await anyio.sleep(0.01)
        assert woke == []
        clock.advance(30)
        await anyio.sleep(0.01)
        assert woke == ["a"]
        tg.start_soon(sleeper, "b")
        await anyio.sleep(0.01)
        clock.set(clock.now() - 100)  # back: not yet
        await anyio.sleep(0.01)
        assert woke == ["a"]
        clock.set(clock.now() + 200)  # a jump past the sleep's end wakes it (a cron minute reached with set())
    assert woke == ["a", "b"]
    assert clock.listeners == 0


async def test_engine_drops_its_clock_listener_and_keepalive_reads_monotonic() -> None:
    clock = FakeClock()
    async with minifaas.Engine(clock=clock) as eng:
        assert clock.listeners == 1
        await eng.deploy("f", code="def main(args):\n    return {}\n", idle_timeout_s=60)
        await eng.invoke("f")
        clock.set(clock.now() + 7200)  # only the wall clock jumps: keep-alive must not expire anything
        import anyio

        await anyio.sleep(0.2)
        assert eng.stats()["functions"]["guest/f@1"]["sandboxes"] == 1
        clock.advance(61)
        with anyio.fail_after(10):
            while eng.stats()["functions"].get("guest/f@1", {}).get("sandboxes", 0):
                await anyio.sleep(0.02)
    assert clock.listeners == 0


async def test_evicting_for_a_new_sandbox_starts_one_sandbox_not_two() -> None:
    # the table above runs many functions through an engine of 8 sandboxes: an eviction used to announce the freed
    # capacity while the scheduler was taking it, so the same request started two sandboxes and the total grew
    async with minifaas.Engine(max_sandboxes=4) as eng:
        for i in range(10):
            await eng.deploy(f"f{i}", code="def main(args):\n    return {}\n")
            await eng.invoke(f"f{i}")
            stats = eng.stats()
            assert stats["sandboxes"] <= 4
        assert stats["cold_starts"] == 10
        assert stats["evictions_capacity"] == 6
