"""Limits under attack and isolation: each attack ends as its documented error while a healthy function keeps
succeeding next to it; what a sandbox may see (environment, limits, network, other namespaces' records).

Real sandboxes, real signals, real cgroups (the fork bomb runs only where a pids cgroup caps it: an uncapped one
would take the machine down). The long versions are in ``benches/bench_reliability.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import socket
import struct
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from minifaas_sandbox import protocol as p

import minifaas
from minifaas._core.launch import MAX_PIDS_PER_SANDBOX, PIDS
from minifaas._core.sandbox import MAX_STRAY_BYTES
from minifaas.testing import assert_status, assert_success
from tests.helpers.proc import rss_kb as _rss_kb

pytestmark = pytest.mark.anyio

HEALTHY = "def main(args):\n    return {'i': args['i']}\n"
#: pause between two calls of the healthy function during an attack
HEALTHY_PERIOD_S = 0.05
#: the host's resident memory may grow this much during a flood (the floods are 100 MB)
HOST_RSS_SLACK_KB = 48 << 10
SMALL_LOG_BYTES = 1 << 20
#: the pids.max counts threads too: a sandbox's interpreter has a few before the function forks
SANDBOX_BASE_TASKS_MAX = 8
BOMB_TIMEOUT_S = 2.0
#: how long the kernel may take to finish off a SIGKILLed fork bomb on a loaded machine
BOMB_REAP_S = 15.0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _live_in_session(sid: int) -> list[int]:
    """Processes (not zombies) whose session is ``sid``: a sandbox is a session leader, so this is all it started
    that did not call setsid() itself."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and int(st[3]) == sid and st[0] != "Z":
                out.append(int(entry))
    return out


def _sandbox_pids(engine: minifaas.Engine, name: str) -> list[int]:
    pids: list[int] = engine.stats()["functions"][f"guest/{name}@1"]["pids"]
    return pids


@contextlib.asynccontextmanager
async def healthy_traffic(engine: minifaas.Engine) -> AsyncIterator[list[minifaas.Activation]]:
    """Call the healthy function in a loop for as long as the block runs; yields the activations so far."""
    done: list[minifaas.Activation] = []

    async def loop() -> None:
        while True:
            with anyio.fail_after(30):
                done.append(await engine.call("healthy", {"i": len(done)}))
            await anyio.sleep(HEALTHY_PERIOD_S)

    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        yield done
        tg.cancel_scope.cancel()


def assert_healthy(done: list[minifaas.Activation]) -> None:
    assert done, "the healthy function never completed during the attack"
    for act in done:
        assert_success(act)
    assert [a.result["i"] for a in done] == list(range(len(done)))


@pytest.fixture(scope="module")
async def minifaas_engine() -> AsyncIterator[minifaas.Engine]:
    """One engine for the module (overrides the plugin's), with the healthy neighbour every attack runs beside."""
    async with minifaas.Engine() as engine:
        await engine.deploy("healthy", code=HEALTHY)
        await engine.invoke("healthy", {"i": -1})
        yield engine


# -- attacks --------------------------------------------------------------------------------------------------
ATTACKS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    # id: (code, deploy options, status, fragment of result["error"])
    "infinite-loop": (
        "def main(args):\n    while True:\n        pass\n",
        {"timeout_s": 1},
        "developer_error",
        "exceeded its time limits of 1000 milliseconds",
    ),
    "alloc-10GB": (
        "def main(args):\n    b = bytearray(10 << 30)\n    return {'n': len(b)}\n",
        {"memory_mb": 128},
        "developer_error",
        "memory limit exceeded (128 MB)",
    ),
    "alloc-10GB-numpy": (
        "import numpy as np\ndef main(args):\n    return {'n': int(np.ones(10 << 30, dtype=np.uint8).sum())}\n",
        {"memory_mb": 128},
        "developer_error",
        "memory limit exceeded (128 MB)",
    ),
    "alloc-grow": (
        "def main(args):\n    keep = []\n    while True:\n        keep.append(bytearray(1 << 20))\n",
        {"memory_mb": 128},
        "developer_error",
        "memory limit exceeded (128 MB)",
    ),
    "result-50MB": (
        "def main(args):\n    return {'x': 'y' * (50 << 20)}\n",
        {},
        "developer_error",
        "exceeded the allowed length: 52428808 > 1048576 bytes",
    ),
    # fits in memory once, not twice: the frame is a copy (the sandbox used to die with exit code 70)
    "result-200MB-in-256MB": (
        "def main(args):\n    return {'x': 'y' * (200 << 20)}\n",
        {"memory_mb": 256},
        "developer_error",
        "memory limit exceeded (256 MB) while encoding the result",
    ),
    "recursion": (
        "def f(n):\n    return f(n + 1)\ndef main(args):\n    return {'x': f(0)}\n",
        {},
        "application_error",
        "RecursionError: maximum recursion depth exceeded",
    ),
    # repr() recurses in C: with the interpreter's guard lifted the C stack overflows and the sandbox dies
    "c-stack-overflow": (
        textwrap.dedent("""
            import sys
            sys.setrecursionlimit(10**8)
            def main(args):
                nested = []
                for _ in range(200_000):
                    nested = [nested]
                return {'n': len(repr(nested))}
        """),
        {},
        "developer_error",
        "killed by SIGSEGV (signal 11)",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
async def test_attack_ends_as_documented_and_neighbours_are_unaffected(
    minifaas_engine: minifaas.Engine, attack: str
) -> None:
    code, options, status, error = ATTACKS[attack]
    name = f"attack-{attack}"
    await minifaas_engine.deploy(name, code=code, **options)
    async with healthy_traffic(minifaas_engine) as done:
        await anyio.sleep(2 * HEALTHY_PERIOD_S)
        with anyio.fail_after(60):
            act = await minifaas_engine.call(name)
        await anyio.sleep(2 * HEALTHY_PERIOD_S)
    assert_status(act, status, error_contains=error)
    assert_healthy(done)
    # the function itself keeps being served (by a fresh sandbox where the attack killed its own)
    with anyio.fail_after(60):
        again = await minifaas_engine.call(name)
    assert again.status == status
    if "memory limit" in error:
        # a sandbox that ran out of memory is not trusted again (its function may hold the memory in globals)
        assert again.annotations["sandbox"] != act.annotations["sandbox"]


async def test_deep_python_recursion_to_the_memory_limit(minifaas_engine: minifaas.Engine) -> None:
    # a million Python frames fill the memory limit before any stack: MemoryError with every frame still held
    # (the sandbox used to die with exit code 70 after 12 s and no log), or CPython's own SystemError
    code = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\ndef main(args):\n    f(0)\n"
    await minifaas_engine.deploy("deep-heap", code=code, memory_mb=64, timeout_s=30)
    async with healthy_traffic(minifaas_engine) as done:
        t0 = time.perf_counter()
        acts = [await minifaas_engine.call("deep-heap") for _ in range(2)]
        elapsed = time.perf_counter() - t0
    for act in acts:
        assert act.status in ("application_error", "developer_error"), act
        # neither a dead sandbox: the second used to run in the damaged interpreter of the first and die of SIGSEGV
        assert "did not complete" not in str(act.result.get("error")), act.result
    assert acts[0].annotations["sandbox"] != acts[1].annotations["sandbox"]
    assert elapsed < 30, f"the answers took {elapsed:.1f} s"
    assert_healthy(done)


FLOODS = {
    # 100 MB through print(): the runtime's log cap (here 1 MB) ends the logs with OpenWhisk's truncation line
    "print-lines": (
        "def main(args):\n    line = 'x' * 999\n    for _ in range(100_000):\n        print(line)\n    return {}\n"
    ),
    # 100 MB on one line written in pieces: used to be quadratic in the sandbox (timed out)
    "print-no-newline": (
        "import sys\ndef main(args):\n    piece = 'x' * 1000\n    for _ in range(100_000):\n"
        "        sys.stdout.write(piece)\n    return {}\n"
    ),
}


@pytest.mark.parametrize("flood", list(FLOODS), ids=list(FLOODS))
async def test_log_flood_is_capped(minifaas_engine: minifaas.Engine, flood: str) -> None:
    name = f"flood-{flood}"
    await minifaas_engine.deploy(name, code=FLOODS[flood], max_log_bytes=SMALL_LOG_BYTES, timeout_s=30)
    rss0 = _rss_kb()
    async with healthy_traffic(minifaas_engine) as done:
        t0 = time.perf_counter()
        act = await minifaas_engine.call(name)
        elapsed = time.perf_counter() - t0
    assert_success(act)
    assert "Logs were truncated" in act.logs[-1]
    assert sum(len(line) for line in act.logs) <= SMALL_LOG_BYTES + 200
    assert elapsed < 15, f"100 MB of prints took {elapsed:.1f} s"
    assert _rss_kb() - rss0 < HOST_RSS_SLACK_KB
    assert_healthy(done)


PIPE_FLOODS = {
    # straight to fd 1, bypassing the capture, all on one line: the host used to join it quadratically on its
    # event loop (144 s, +300 MB)
    "fd1-one-line": (
        "import os\ndef main(args):\n    chunk = b'x' * (1 << 20)\n    for _ in range(100):\n"
        "        os.write(1, chunk)\n    return {}\n"
    ),
    # long lines: the host used to keep 1000 lines of any length (100 MB here)
    "fd2-long-lines": (
        "import os\ndef main(args):\n    line = b'y' * (1 << 20) + b'\\n'\n    for _ in range(100):\n"
        "        os.write(2, line)\n    return {}\n"
    ),
}


@pytest.mark.parametrize("flood", list(PIPE_FLOODS), ids=list(PIPE_FLOODS))
async def test_raw_fd_flood_keeps_host_memory_bounded(minifaas_engine: minifaas.Engine, flood: str) -> None:
    name = f"pipe-{flood}"
    await minifaas_engine.deploy(name, code=PIPE_FLOODS[flood], timeout_s=30)
    rss0 = _rss_kb()
    async with healthy_traffic(minifaas_engine) as done:
        t0 = time.perf_counter()
        act = await minifaas_engine.call(name)
        elapsed = time.perf_counter() - t0
        # stray output may still be arriving for the next activation of that sandbox: it stays capped too
        await anyio.sleep(0.3)
    assert_success(act)
    assert elapsed < 15, f"a 100 MB flood took {elapsed:.1f} s"
    assert sum(len(line) for line in act.logs) <= MAX_STRAY_BYTES + (16 << 10)
    assert _rss_kb() - rss0 < HOST_RSS_SLACK_KB
    assert_healthy(done)


FRAMES = {
    # what the function's own code can write to the channel fd it inherited: the host must not trust it
    "fields-not-a-map": [5, 7],
    "result-bad-types": [5, {"aid": "@aid", "status": "pending", "logs": 5, "annotations": 3, "run_ms": "x"}],
    "models-not-a-list": [5, {"aid": "@aid", "status": "success", "result": {}, "models": 5}],
    "call-flood": [6, {"cid": 1, "method": "no.such.service", "args": {}}],
}
FORGE = """
import os, stat, struct, time, msgpack
def channel():
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass  # the listing's own fd, closed by now
def main(args):
    fd = channel()
    msg = args["msg"]
    if isinstance(msg[1], dict) and msg[1].get("aid") == "@aid":
        msg[1]["aid"] = os.environ["__OW_ACTIVATION_ID"]
    body = msgpack.packb(msg, use_bin_type=True)
    for _ in range(args["times"]):
        os.write(fd, struct.pack(">I", len(body)) + body)
    time.sleep(0.5)
    return {"forged": True}
"""


@pytest.mark.parametrize("frame", list(FRAMES), ids=list(FRAMES))
async def test_forged_frames_from_function_code(minifaas_engine: minifaas.Engine, frame: str) -> None:
    name = f"forge-{frame}"
    await minifaas_engine.deploy(name, code=FORGE, timeout_s=20)
    t0 = time.perf_counter()
    with anyio.fail_after(20):
        act = await minifaas_engine.call(name, {"msg": FRAMES[frame], "times": 1000 if frame == "call-flood" else 1})
    # ends at once, not at its timeout (a malformed frame used to raise in the host's reader and lose the RESULT)
    assert time.perf_counter() - t0 < 10
    assert act.done
    if frame == "result-bad-types":
        # its own forged RESULT ended it: as a developer error, whatever status it claimed
        assert act.status == "developer_error" and act.logs == []
    elif frame == "fields-not-a-map":
        assert_status(act, "developer_error", error_contains="protocol error")
    else:
        assert_success(act)
    assert_success(await minifaas_engine.call("healthy", {"i": 0}))


async def test_fork_bomb_is_capped_by_a_pids_cgroup(minifaas_engine: minifaas.Engine) -> None:
    if PIDS.parent is None:
        pytest.skip(f"no writable pids cgroup here ({PIDS.error}): an uncapped fork bomb would take the machine down")
    counted = textwrap.dedent("""
        import os, time
        def main(args):
            n = 0
            try:
                while True:
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    n += 1
            except OSError as exc:
                return {"error": str(exc), "forked": n}
    """)
    await minifaas_engine.deploy("fork-count", code=counted, timeout_s=30)
    act = await minifaas_engine.call("fork-count")
    assert_status(act, "application_error", error_contains="Resource temporarily unavailable")
    assert MAX_PIDS_PER_SANDBOX - SANDBOX_BASE_TASKS_MAX <= act.result["forked"] < MAX_PIDS_PER_SANDBOX
    (pid,) = _sandbox_pids(minifaas_engine, "fork-count")
    cgroup = PIDS.parent / f"sb-{pid}"
    assert (cgroup / "pids.max").read_text().strip() == str(MAX_PIDS_PER_SANDBOX)
    assert str(pid) in (cgroup / "cgroup.procs").read_text().split()
    await minifaas_engine.delete("fork-count")
    # the sleeping children die with their sandbox, although nothing waits for them
    with anyio.fail_after(BOMB_REAP_S):
        while _live_in_session(pid):
            await anyio.sleep(0.1)

    bomb = textwrap.dedent("""
        import os, time
        def main(args):
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
    """)
    await minifaas_engine.deploy("fork-bomb", code=bomb, timeout_s=BOMB_TIMEOUT_S)
    async with healthy_traffic(minifaas_engine) as done:
        aid = await minifaas_engine.submit("fork-bomb")
        await anyio.sleep(BOMB_TIMEOUT_S / 2)
        (pid,) = _sandbox_pids(minifaas_engine, "fork-bomb")
        peak = 0
        while True:
            with contextlib.suppress(OSError):
                peak = max(peak, int((PIDS.parent / f"sb-{pid}" / "pids.current").read_text()))
            if (await minifaas_engine.activations.get(aid)).done:
                break
            await anyio.sleep(0.05)
    act = await minifaas_engine.activations.wait(aid)
    assert_status(act, "developer_error", error_contains=f"exceeded its time limits of {int(BOMB_TIMEOUT_S * 1000)}")
    assert 0 < peak <= MAX_PIDS_PER_SANDBOX
    assert_healthy(done)
    # the timeout's kill reaches every process of the bomb, not only the sandbox's process group
    with anyio.fail_after(BOMB_REAP_S):
        while _live_in_session(pid):
            await anyio.sleep(0.1)
    assert_success(await minifaas_engine.call("healthy", {"i": 0}))


# -- isolation ------------------------------------------------------------------------------------------------
SECRETS = {"AWS_SECRET_ACCESS_KEY": "hunter2", "GITHUB_TOKEN": "ghp_x", "MINIFAAS_AUTH": "u:k", "DB_PASSWORD": "pw"}
ENV_AND_LIMITS = "import os\ndef main(args):\n    return {'env': dict(os.environ), 'pid': os.getpid()}\n"


def _environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def _limits_of(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        for line in f:
            m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if m:
                out[m.group(1)] = (m.group(2), m.group(3))
    return out


@pytest.mark.parametrize("launcher", ["zygote", "spawn"], ids=["zygote", "spawn"])
async def test_secrets_limits_and_processes_seen_from_the_host(launcher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)  # before the engine (and its zygote) start
    async with minifaas.Engine(launcher=launcher) as engine:  # type: ignore[arg-type]
        await engine.deploy("env", code=ENV_AND_LIMITS, memory_mb=200)
        act = await engine.call("env")
        assert_success(act)
        pid = act.result["pid"]
        inside = act.result["env"]
        initial = _environ_of(pid)
        zygote = engine.stats().get("launcher_stats", {}).get("zygote_pid")
        zygote_env = _environ_of(zygote) if zygote else {}
        limits = _limits_of(pid)
        with open(f"/proc/{pid}/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        cgroup_procs = (PIDS.parent / f"sb-{pid}" / "cgroup.procs").read_text() if PIDS.parent else None
    for key in SECRETS:
        assert key not in inside and key not in initial and key not in zygote_env
    assert inside["OMP_NUM_THREADS"] == "1"
    assert limits["Max open files"] == ("1024", "1024")
    assert limits["Max core file size"] == ("0", "0")
    soft, hard = limits["Max address space"]
    assert soft == hard != "unlimited"
    # the cap is what the sandbox used after init plus the function's memory_mb
    assert 200 << 20 <= int(soft) <= (vm_kb << 10) + (200 << 20)
    if cgroup_procs is not None:
        # RLIMIT_NPROC does not bind root: the process cap is the sandbox's own pids cgroup
        assert str(pid) in cgroup_procs.split()


CONNECT = """
import socket
def main(args):
    names = [name for _, name in socket.if_nameindex()]
    try:
        with socket.create_connection(("127.0.0.1", args["port"]), timeout=2) as s:
            s.sendall(b"hello")
        return {"connected": True, "interfaces": names}
    except OSError as exc:
        return {"connected": False, "errno": exc.errno, "interfaces": names}
"""


async def test_network_false_cannot_reach_the_host() -> None:
    if "network" not in inspect.signature(minifaas.Engine.deploy).parameters:
        pytest.skip("Engine.deploy has no network= option yet (runtime support is in; see the reliability report)")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        async with minifaas.Engine() as engine:
            await engine.deploy("open", code=CONNECT)
            await engine.deploy("closed", code=CONNECT, network=False)  # type: ignore[call-arg]
            opened = await engine.invoke("open", {"port": port})
            conn, _ = listener.accept()
            conn.close()
            closed = await engine.invoke("closed", {"port": port})
            with pytest.raises(BlockingIOError):
                listener.accept()  # nothing came from the isolated sandbox
    assert opened["connected"] is True
    assert closed["connected"] is False and closed["interfaces"] == ["lo"], closed


async def test_server_binds_loopback_and_always_has_a_key() -> None:
    from minifaas._server import app as _server

    assert inspect.signature(_server.serve).parameters["host"].default == "127.0.0.1"
    ip = _non_loopback_ip()
    async with minifaas.Engine() as engine, anyio.create_task_group() as tg:
        handle = await tg.start(functools.partial(_server.serve, engine, port=0))
        try:
            assert handle.host == "127.0.0.1"
            user, _, key = handle.auth.partition(":")
            assert user and len(key) >= 32  # auth=None generated a credential: never an open server
            with socket.create_connection(("127.0.0.1", handle.port), timeout=2):
                pass
            if ip is not None:
                with pytest.raises(OSError), socket.create_connection((ip, handle.port), timeout=2):
                    pass
        finally:
            handle.stop()


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing address, sends nothing
        except OSError:
            return None
        ip: str = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def test_namespaces_cannot_read_each_others_activations(tmp_path: Path) -> None:
    if "namespace" not in inspect.signature(minifaas.Activations.get).parameters:
        pytest.skip("activations.get has no namespace= yet (store support is in; see the reliability report)")
    get: Any = minifaas.Activations.get
    async with minifaas.Engine(state_dir=tmp_path, namespace="alice") as alice:
        await alice.deploy("secret", code="import time\ndef main(args):\n    time.sleep(args['s'])\n    return {}\n")
        ended = await alice.call("secret", {"s": 0})
        running = await alice.submit("secret", {"s": 1})
        assert (await get(alice.activations, ended.activation_id, namespace="alice")).status == "success"
        for aid in (ended.activation_id, running):  # ended (from the store) and in flight (from the scheduler)
            with pytest.raises(minifaas.ActivationNotFound, match="no activation with id"):
                await get(alice.activations, aid, namespace="bob")
        await alice.activations.wait(running)
    # alice's state dir is hers: an engine for bob on it does not start (issue 24)
    with pytest.raises(minifaas.StateDirConflict, match="belongs to namespace 'alice'"):
        async with minifaas.Engine(state_dir=tmp_path, namespace="bob"):
            pass
    # and the store itself filters by namespace; without one (the embedding program) it reads every namespace
    from minifaas._core.store import SQLiteStore

    store = SQLiteStore(tmp_path / "activations.sqlite3")
    try:
        assert store.get(ended.activation_id, namespace="bob") is None
        assert store.list(namespace="bob") == [] and store.count(namespace="bob") == 0
        found = store.get(ended.activation_id)
        assert found is not None and found.namespace == "alice"
    finally:
        store.close()


def test_forged_frames_are_well_formed_msgpack() -> None:
    # the forged frames above are real protocol frames (so the tests exercise the host's checks, not the decoder)
    for msg in FRAMES.values():
        body = msgpack.packb(msg, use_bin_type=True)
        ((kind, fields),) = list(p.FrameDecoder().feed(struct.pack(">I", len(body)) + body))
        assert kind == msg[0] and fields == msg[1]
