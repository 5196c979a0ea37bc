"""The Ray backend: sandboxes as Ray actors on a two-node cluster, same behaviour as the local backend.

One cluster serves the whole session: a head node (``ray.cluster_utils.Cluster``, 1 CPU, this process its driver)
and a second node that does NOT share the head's view of the disk: ``ray start`` in a mount namespace of its own
(``unshare --mount``, root) with a tmpfs over the engines' state folders (bundles, models, environments) and over the
repository's ``functions`` folder, 1 CPU, one logical GPU and a custom resource naming it. Real actors, real worker
processes, real ``ray.kill``. Tests parametrized over ``backend`` run the same assertions on both backends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

ray = pytest.importorskip("ray")  # an optional extra: pip install 'minifaas[ray]' (CI installs it)

from ray.cluster_utils import Cluster  # noqa: E402

import minifaas  # noqa: E402
from minifaas.testing import assert_status, assert_success  # noqa: E402
from tests.helpers.proc import rss_kb as _rss_kb  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("local", "ray")
NODE_OBJECT_STORE_BYTES = 100 << 20
#: a custom resource only the node without the head's disk has: a function asking for it runs there
ELSEWHERE = "elsewhere"
NODE_JOIN_TIMEOUT_S = 60.0
#: present in the environment the cluster's workers inherit: a sandbox must not see it
SECRET_VAR = "MINIFAAS_TEST_SECRET"
SLEEP = textwrap.dedent("""
    import os, time
    def main(args):
        time.sleep(args.get('s', 0))
        if args.get('die'):
            os._exit(9)
        return {'pid': os.getpid()}
""")
#: reports where it ran (a sandbox process is no Ray worker: the actor tells it its node); with ``dir`` and ``n`` it
#: first waits until ``n`` activations run at once (a barrier)
WHERE = textwrap.dedent("""
    import os, time
    def main(args):
        if args.get('dir'):
            open(os.path.join(args['dir'], str(os.getpid())), 'w').close()
            deadline = time.time() + 30
            while len(os.listdir(args['dir'])) < args['n'] and time.time() < deadline:
                time.sleep(0.01)
        time.sleep(args.get('s', 0))
        return {'node': os.environ.get('MINIFAAS_RAY_NODE_ID'), 'pid': os.getpid()}
""")
Deploy = Callable[..., Awaitable[dict[str, Any]]]
#: what a function may allocate past its memory limit without it touching the host (its RSS, in KiB)
HOST_RSS_SLACK_KB = 64 << 10
ALLOCATIONS = {
    "bytearray-10GB": "def main(args):\n    b = bytearray(10 << 30)\n    return {'n': len(b)}\n",
    "grow-1MB-chunks": "def main(args):\n    keep = []\n    while True:\n        keep.append(bytearray(1 << 20))\n",
}
#: output that bypasses sys.stdout/sys.stderr: raw writes to fd 1/2, and a child process inheriting them
RAW_OUTPUT = textwrap.dedent("""
    import os, subprocess
    def main(args):
        os.write(1, b"straight to fd 1\\n")
        os.write(2, b"straight to fd 2\\n")
        subprocess.run(["echo", "from a child process"], check=True)
        return {}
""")
#: starts a child that would outlive the sandbox, records its pid, then runs past its time limit
SPAWNS_AND_HANGS = textwrap.dedent("""
    import subprocess, time
    def main(args):
        child = subprocess.Popen(["sleep", "60"])
        with open(args["pidfile"], "w") as f:
            f.write(str(child.pid))
        time.sleep(30)
        return {}
""")
#: an application in a process of its own (not connected to the session's cluster) using the engine through Ray
#: Client: prints one JSON line per invocation
CLIENT_APP = textwrap.dedent("""
    import json, sys, anyio, minifaas
    CODE = "import os\\ndef main(args):\\n  os.write(1, b'raw\\\\n')\\n  return {'i': args['i'], 'pid': os.getpid()}"
    async def main():
        async with minifaas.Engine(backend="ray", ray_address=sys.argv[1]) as eng:
            await eng.deploy("hello", code=CODE)
            for i in range(3):
                act = await eng.call("hello", {"i": i})
                print(json.dumps({"status": act.status, "result": act.result, "logs": act.logs,
                                  "node": act.annotations.get("ray_node_id")}), flush=True)
            print(json.dumps({"launcher": eng.stats()["launcher_stats"]}), flush=True)
    anyio.run(main)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


async def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _engine_actor_names() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "minifaas"}


def _client_server_failure(app_stderr: str, server_log: Path) -> str:
    """What a failed Ray Client connection left behind: the application's error, the proxy's log and the logs of
    the per-client server it started (in the cluster's session folder)."""
    parts = [f"application:\n{app_stderr[-3000:]}", f"proxy:\n{server_log.read_text(errors='replace')[-3000:]}"]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for f in sorted(logs.glob("ray_client_server_*")):
        parts.append(f"{f.name}:\n{f.read_text(errors='replace')[-2000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="session")
def head_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the Ray engines of these tests keep their state (bundles, models, environments): the second node sees
    an empty tmpfs there."""
    return tmp_path_factory.mktemp("head-only")


def _start_node_elsewhere(address: str, masked: list[Path], log: Path) -> subprocess.Popen[bytes]:
    """``ray start`` joining ``address`` in a mount namespace of its own, with an empty tmpfs over each of ``masked``
    (it, its raylet and every worker and sandbox process it starts see them empty)."""
    mounts = " && ".join(f"mount -t tmpfs minifaas-test {shlex.quote(str(m))}" for m in masked)
    ray_start = [
        sys.executable,
        "-c",
        "from ray.scripts.scripts import main; main()",
        "start",
        f"--address={address}",
        "--num-cpus=1",
        "--num-gpus=1",
        f"--resources={json.dumps({ELSEWHERE: 100})}",
        f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
        "--block",
    ]
    script = f"{mounts} && exec {shlex.join(ray_start)}"
    with log.open("wb") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, SECRET_VAR: "hunter2"},
            start_new_session=True,
        )


@pytest.fixture(scope="session")
def ray_cluster(head_only: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    os.environ[SECRET_VAR] = "hunter2"  # the raylets, hence every worker, inherit it
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": NODE_OBJECT_STORE_BYTES},
        )
    finally:
        del os.environ[SECRET_VAR]
    log = tmp_path_factory.mktemp("node-elsewhere") / "ray-start.log"
    node = _start_node_elsewhere(cluster.address, [head_only, ROOT / "functions"], log)
    session = cluster.head_node.get_session_dir_path()
    try:
        ray.init(address=cluster.address)
        deadline = time.monotonic() + NODE_JOIN_TIMEOUT_S
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert node.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the second node did not join: {log.read_text()}"
            time.sleep(0.2)
        yield cluster
    finally:
        ray.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)  # ray start --block stops its raylet and workers
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        # Ray keeps a stopped session's folder (logs, sockets) in its temp dir for good: the suite leaves none
        shutil.rmtree(session, ignore_errors=True)


async def _cluster_idle() -> None:
    """Wait until the actors of earlier tests are gone: a placement test needs both nodes empty."""
    await _eventually(lambda: ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"], timeout_s=30)


def _elsewhere_node() -> str:
    [node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and ELSEWHERE in n["Resources"]]
    return str(node)


@pytest.fixture(scope="module")
async def local_engine() -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine() as eng:
        yield eng


@pytest.fixture(scope="module")
async def ray_engine(ray_cluster: Cluster, head_only: Path) -> AsyncIterator[minifaas.Engine]:
    state = head_only / f"ray-state-{time.time_ns()}"
    async with minifaas.Engine(state, backend="ray") as eng:
        yield eng


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def minifaas_engine(backend: str, request: pytest.FixtureRequest) -> minifaas.Engine:
    """The module's engine of ``backend`` (overrides the plugin's, so its ``deploy`` cleans up on this one)."""
    eng: minifaas.Engine = request.getfixturevalue(f"{backend}_engine")
    return eng


@pytest.fixture
async def ray_deploy(ray_engine: minifaas.Engine) -> AsyncIterator[Deploy]:
    """Deploy on the Ray engine; delete at the end so no idle actor holds the small cluster's CPUs."""
    names: list[str] = []

    async def _deploy(name: str, **kwargs: Any) -> dict[str, Any]:
        names.append(name)
        info: dict[str, Any] = await ray_engine.deploy(name, **kwargs)
        return info

    yield _deploy
    for name in names:
        with contextlib.suppress(minifaas.FunctionNotFound):  # the test deleted it already
            await ray_engine.delete(name)


# -- the same behaviour on both backends ------------------------------------------------------------------------
async def test_cold_then_warm_with_logs(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, backend: str
) -> None:
    await minifaas_deploy(
        "hello", code="def main(args):\n    print('hello', args['name'])\n    return {'hi': args['name']}"
    )
    act = assert_success(await minifaas_engine.call("hello", {"name": "Ada"}))
    assert act.result == {"hi": "Ada"}
    assert len(act.logs) == 1 and act.logs[0].endswith("stdout: hello Ada")
    assert act.annotations["cold"] is True and act.init_time is not None
    assert act.annotations["launch"] == ("ray" if backend == "ray" else act.annotations["launch"])
    warm = assert_success(await minifaas_engine.call("hello", {"name": "Bob"}))
    assert warm.annotations["cold"] is False and warm.annotations["sandbox"] == act.annotations["sandbox"]
    if backend == "ray":
        assert warm.annotations["ray_node_id"] == act.annotations["ray_node_id"]


async def test_application_error(minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy) -> None:
    await minifaas_deploy("boom", code="def main(args):\n    raise ValueError('bad input: ' + str(args.get('x')))\n")
    with pytest.raises(minifaas.ActivationError) as info:
        await minifaas_engine.invoke("boom", {"x": 7})
    act = assert_status(info.value.activation, "application_error")
    assert act.result == {"error": "bad input: 7"}
    assert any("ValueError: bad input: 7" in line for line in act.logs)


@pytest.mark.parametrize(
    ("code", "options", "error"),
    [
        ("def main(args):\n    return [1, 2]\n", {}, "did not return a dictionary"),
        ("def main(args):\n    return {'x': object()}\n", {}, "cannot be serialized"),
        ("import sys\ndef main(args):\n    sys.exit(2)\n", {}, "sys.exit(2)"),
        ("def main(args):\n    return {'x': 'y' * 50_000}\n", {"max_result_bytes": 10_000}, "exceeded the allowed"),
    ],
    ids=["non-dict", "unserializable", "sys-exit", "result-too-large"],
)
async def test_developer_errors(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, code: str, options: dict[str, Any], error: str
) -> None:
    await minifaas_deploy("dev", code=code, **options)
    for _ in range(2):  # the sandbox keeps serving after each
        assert_status(await minifaas_engine.call("dev"), "developer_error", error_contains=error)


async def test_timeout_kills_and_replaces(minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy) -> None:
    await minifaas_deploy("slow", code=SLEEP, timeout_s=0.5)
    first = await minifaas_engine.invoke("slow", {"s": 0})
    t0 = time.perf_counter()
    act = await minifaas_engine.call("slow", {"s": 10})
    assert time.perf_counter() - t0 < 3
    assert_status(act, "developer_error", error_contains="exceeded its time limits of 500 milliseconds")
    assert act.annotations["timeout"] is True
    await _eventually(lambda: not _alive(first["pid"]), timeout_s=5)
    again = assert_success(await minifaas_engine.call("slow", {"s": 0}))
    assert again.result["pid"] != first["pid"] and again.annotations["cold"] is True


async def test_crash_ends_only_its_activation(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, backend: str
) -> None:
    await minifaas_deploy("crashy", code=SLEEP, max_sandboxes=1)
    first = await minifaas_engine.submit("crashy", {"s": 0.3, "die": True})
    queued = [await minifaas_engine.submit("crashy", {}) for _ in range(3)]
    crashed = await minifaas_engine.activations.wait(first, timeout_s=30)
    # the sandbox process under the actor crashed: the same record as locally
    assert_status(crashed, "developer_error", error_contains="the sandbox process exited with code 9")
    assert "did not complete" in crashed.result["error"]
    for aid in queued:
        assert_success(await minifaas_engine.activations.wait(aid, timeout_s=30))


async def test_per_sandbox_concurrency(minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy) -> None:
    await minifaas_deploy("multi", code=SLEEP, concurrency=4, max_sandboxes=1)
    await minifaas_engine.invoke("multi")
    t0 = time.perf_counter()
    ids = [await minifaas_engine.submit("multi", {"s": 0.5}) for _ in range(4)]
    acts = [assert_success(await minifaas_engine.activations.wait(i, timeout_s=30)) for i in ids]
    assert len({a.result["pid"] for a in acts}) == 1
    assert time.perf_counter() - t0 < 1.5, "four 0.5 s runs should overlap on one sandbox"


async def test_scrubbed_environment(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_VAR, "hunter2")
    await minifaas_deploy(
        "envfn", code="import os\ndef main(args):\n    return {'env': dict(os.environ)}\n", env={"MY": "on"}
    )
    env = (await minifaas_engine.invoke("envfn"))["env"]
    assert SECRET_VAR not in env
    assert env["MY"] == "on" and env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("alloc", list(ALLOCATIONS), ids=list(ALLOCATIONS))
async def test_memory_limit_ends_only_the_activation(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, alloc: str
) -> None:
    await minifaas_deploy(
        "small", code="def main(args):\n    b = bytearray(args['mb'] << 20)\n    return {'n': len(b)}\n"
    )
    await minifaas_deploy("hog", code=ALLOCATIONS[alloc], memory_mb=128, timeout_s=30)
    rss0 = _rss_kb()
    act = await minifaas_engine.call("hog")
    assert_status(act, "developer_error", error_contains="memory limit exceeded (128 MB)")
    assert any("MemoryError: memory limit exceeded" in line for line in act.logs)
    assert _rss_kb() - rss0 < HOST_RSS_SLACK_KB
    # the limit was the function's, not the host's or the actor's: other functions, and this one, run on
    assert assert_success(await minifaas_engine.call("small", {"mb": 64})).result == {"n": 64 << 20}
    again = await minifaas_engine.call("hog")
    assert_status(again, "developer_error", error_contains="memory limit exceeded (128 MB)")


async def test_timeout_kills_what_the_function_started(
    minifaas_engine: minifaas.Engine, minifaas_deploy: Deploy, tmp_path: Path
) -> None:
    await minifaas_deploy("spawner", code=SPAWNS_AND_HANGS, timeout_s=1)
    pidfile = tmp_path / "child.pid"
    act = await minifaas_engine.call("spawner", {"pidfile": str(pidfile)})
    assert_status(act, "developer_error", error_contains="exceeded its time limits of 1000 milliseconds")
    child = int(pidfile.read_text())
    await _eventually(lambda: not _alive(child), timeout_s=10)


# -- Ray only -----------------------------------------------------------------------------------------------------
async def test_backend_unavailable_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when Ray is not installed
    with pytest.raises(minifaas.BackendUnavailable, match=r"pip install 'minifaas\[ray\]'"):
        minifaas.Engine(backend="ray")


async def test_raw_output_reaches_the_activation_logs(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    # Ray only for now: the local host reads the pipes and the channel in separate tasks, so a line written just
    # before the function returns may be read after its RESULT and land in the next activation's logs (the child
    # process' line was missed that way); the actor waits for its pipes to be drained before answering
    await ray_deploy("raw", code=RAW_OUTPUT)
    for _ in range(2):  # cold, then warm
        act = assert_success(await ray_engine.call("raw"))
        lines = [line.split(" ", 1)[1] for line in act.logs]
        assert sorted(lines) == ["stderr: straight to fd 2", "stdout: from a child process", "stdout: straight to fd 1"]


async def test_cold_starts_fork_from_one_zygote_actor_per_node(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    acts = []
    for name in ("zyg-a", "zyg-b"):
        await ray_deploy(name, code=WHERE, resources={ELSEWHERE: 1})
        acts.append(assert_success(await ray_engine.call(name)))
    started = ray_engine.stats()["launcher_stats"]["node_actors_started"]
    with_init = ray_engine.stats()["launcher_stats"]["starts_with_init"]
    await ray_deploy("zyg-c", code=WHERE, resources={ELSEWHERE: 1})
    acts.append(assert_success(await ray_engine.call("zyg-c")))
    assert ray_engine.stats()["launcher_stats"]["node_actors_started"] == started  # no new Ray actor
    # its INIT went to the node actor with the fork: one call through Ray, not two
    assert ray_engine.stats()["launcher_stats"]["starts_with_init"] == with_init + 1
    for act in acts:
        assert act.annotations["cold"] is True and act.annotations["ray_limits"]["launch"] == "fork"
        assert act.annotations["ray_node_id"] == _elsewhere_node()
    assert len({a.annotations["ray_actor"] for a in acts}) == 1  # the node's zygote actor forked all three
    assert len({a.result["pid"] for a in acts}) == 3


async def _node_calls(engine: minifaas.Engine) -> dict[str, int]:
    """The calls every node actor of ``engine`` served so far, by method, summed over the nodes."""
    launcher: Any = engine._launcher
    total: dict[str, int] = {}
    for actor, _name in list(launcher.nodes.values()):
        for method, n in (await actor.ready.remote())["calls"].items():
            total[method] = total.get(method, 0) + n
    return total


def _calls_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {m: n - before.get(m, 0) for m, n in after.items() if n != before.get(m, 0)}


async def test_cold_activation_is_one_node_actor_call(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    """The fork, the INIT and the first activation's RUN go to the node actor in one call; warm ones in one each."""
    await ray_deploy("one-call", code=WHERE)
    before = await _node_calls(ray_engine)
    act = assert_success(await ray_engine.call("one-call"))
    assert act.annotations["cold"] is True and act.init_time is not None
    assert _calls_since(before, await _node_calls(ray_engine)) == {"start_run": 1}
    before = await _node_calls(ray_engine)
    warm = assert_success(await ray_engine.call("one-call"))
    assert warm.annotations["cold"] is False and warm.result["pid"] == act.result["pid"]
    assert _calls_since(before, await _node_calls(ray_engine)) == {"execute": 1}


@pytest.mark.parametrize("wait_s", [5.0, None], ids=["result-with-the-start", "result-fetched-after"])
async def test_folded_first_run_keeps_init_time_and_duration_apart(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, monkeypatch: pytest.MonkeyPatch, wait_s: float | None
) -> None:
    """A 0.3 s INIT then a 0.4 s run in one call: the record's initTime is the INIT's, its duration both; a run
    that outlasts the call's wait answers it, and its RESULT comes with a second call."""
    from minifaas._backends import ray as ray_backend

    if wait_s is not None:
        monkeypatch.setattr(ray_backend, "RAY_FOLDED_RUN_WAIT_S", wait_s)
    # on the node without the head's disk, whose zygote actor runs already (its start is no sandbox's INIT); half a
    # CPU each, both fit there
    half = {"num_cpus": 0.5, ELSEWHERE: 1}
    await ray_deploy("before-slow-init", code=WHERE, resources=half)
    assert_success(await ray_engine.call("before-slow-init"))
    await ray_deploy("slow-init", code="import time\ntime.sleep(0.3)\n" + SLEEP, resources=half)
    before = await _node_calls(ray_engine)
    act = assert_success(await ray_engine.call("slow-init", {"s": 0.4}))
    calls = _calls_since(before, await _node_calls(ray_engine))
    assert calls == ({"start_run": 1} if wait_s else {"start_run": 1, "result": 1})
    assert act.annotations["cold"] is True and act.init_time is not None and act.duration is not None
    assert 300 <= act.init_time < 650, act.init_time  # the run's 0.4 s is not the INIT's
    assert act.duration - act.init_time >= 400, (act.duration, act.init_time)
    assert act.start - act.init_time >= act.accepted - 5  # its wait, INIT and run follow each other


async def test_init_failure_in_the_folded_call_is_the_functions_error(
    ray_engine: minifaas.Engine, ray_deploy: Deploy
) -> None:
    """An INIT that fails in the one-call cold start: the activation never ran, its record is the function's
    developer_error with what the INIT printed, and no RUN went to the node."""
    await ray_deploy("bad-init", code="print('loading weights')\nraise RuntimeError('no weights')\n" + SLEEP)
    before = await _node_calls(ray_engine)
    act = await ray_engine.call("bad-init")
    assert_status(act, "developer_error", error_contains="no weights")
    assert "failed to initialize" in act.result["error"] and act.annotations["init_failed"] is True
    assert any("loading weights" in line for line in act.logs), act.logs
    assert _calls_since(before, await _node_calls(ray_engine)) == {"start_run": 1}


async def test_sandbox_terminated_before_its_start_arrives_is_not_forked(
    ray_engine: minifaas.Engine, ray_deploy: Deploy
) -> None:
    """A node actor runs terminate in its control group, apart from starts: one that overtakes its sandbox's start
    (a kill while the cold start is on the way) makes that start refuse, no sandbox process left unowned there."""
    await ray_deploy("overtaken", code=WHERE)
    act = assert_success(await ray_engine.call("overtaken"))  # its node actor runs
    launcher: Any = ray_engine._launcher
    node_actor, _name = launcher.nodes[act.annotations["ray_node_id"]]
    config = {
        "model_root": str(launcher.model_root),
        "env": {},
        "env_root": str(launcher.env_root),
        "driver_node": launcher.driver_node,
        "isolation": "process",
    }
    await node_actor.terminate.remote("overtaken-sid")
    with pytest.raises(ray.exceptions.RayTaskError, match="was stopped while it started"):
        await node_actor.start.remote("overtaken-sid", config)
    reply = await node_actor.init.remote("overtaken-sid", {"source": {}})
    assert reply["ok"] is False and "no sandbox overtaken-sid" in reply["error"]


async def test_lost_node_ends_its_activation_and_idle_sandboxes(
    ray_cluster: Cluster, ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    """A node lost with its zygote actor: the activation running there ends (one record), the idle sandbox it held is
    forgotten, and the sandbox processes are gone."""
    node = ray_cluster.add_node(num_cpus=1, resources={"doomed": 10})
    try:
        await _eventually(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 3, timeout_s=60)
        half = {"num_cpus": 0.5, "doomed": 1}
        await ray_deploy("doomed-idle", code=WHERE, resources=half)
        await ray_deploy("doomed-busy", code=WHERE, resources=half)
        idle = assert_success(await ray_engine.call("doomed-idle"))
        barrier = tmp_path / "barrier"
        [busy] = await _together(ray_engine, "doomed-busy", barrier, 1, s=60)
        await _eventually(lambda: len(list(barrier.iterdir())) == 1, timeout_s=60)
        busy_pid = int(next(barrier.iterdir()).name)
        lost_node = idle.annotations["ray_node_id"]
    finally:
        ray_cluster.remove_node(node)
    act = await ray_engine.activations.wait(busy, timeout_s=30)
    assert_status(act, "developer_error", error_contains="died")
    await _eventually(lambda: ray_engine.stats()["functions"]["guest/doomed-idle@1"]["sandboxes"] == 0, timeout_s=15)
    await _eventually(lambda: not _alive(busy_pid) and not _alive(idle.result["pid"]), timeout_s=15)
    assert ray_engine.stats()["launcher_stats"]["node_actors_lost"] >= 1
    # the reservations its sandboxes held are not kept for the next cold start (it would go to a lost node)
    launcher: Any = ray_engine._launcher
    assert not [e for e in launcher.spare_reservations if e[3] == lost_node]


SHADOW = textwrap.dedent("""
    def main(args):
        try:
            return {'read': len(open('/etc/shadow').read()) > 0}
        except OSError as exc:
            return {'read': False, 'denied': str(exc)}
""")


@pytest.mark.parametrize("isolation", ["process", "sandbox"], ids=["process", "sandbox"])
async def test_isolation_sandbox_is_set_up_on_the_node(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, isolation: str
) -> None:
    # on the node without the head's disk: the sandbox binds that node's bundle, environment and model store
    await ray_deploy(f"shadow-{isolation}", code=SHADOW, isolation=isolation, resources={ELSEWHERE: 1})
    act = assert_success(await ray_engine.call(f"shadow-{isolation}"))
    assert act.annotations["ray_node_id"] == _elsewhere_node()
    assert act.annotations["ray_limits"]["isolation"] == isolation
    # root here: unconfined, the function reads the node's /etc/shadow; sandboxed, it is denied
    assert act.result["read"] is (isolation == "process"), act.result
    if isolation == "sandbox":
        assert "Permission denied" in act.result["denied"]


BIG = textwrap.dedent("""
    import hashlib
    def main(args):
        blob = args['blob']
        return {'sha': hashlib.sha256(blob).hexdigest(), 'back': blob[::-1]}
""")


async def test_large_arguments_and_results_go_through_the_object_store(
    ray_engine: minifaas.Engine, ray_deploy: Deploy
) -> None:
    from minifaas._backends.ray import RAY_OBJECT_STORE_MIN_BYTES

    blob = os.urandom(2 * RAY_OBJECT_STORE_MIN_BYTES)
    await ray_deploy("big", code=BIG)
    before = dict(ray_engine.stats()["launcher_stats"])
    act = assert_success(await ray_engine.call("big", {"blob": blob}))
    assert act.result == {"sha": hashlib.sha256(blob).hexdigest(), "back": blob[::-1]}
    assert_success(await ray_engine.call("big", {"blob": b"small"}))  # inline, both ways
    after = ray_engine.stats()["launcher_stats"]
    assert after["large_args_put"] == before["large_args_put"] + 1
    assert after["large_results_got"] == before["large_results_got"] + 1


async def _together(engine: minifaas.Engine, name: str, barrier: Path, n: int, s: float = 0) -> list[str]:
    """Submit ``n`` activations of WHERE that wait for each other, so each runs on its own actor."""
    barrier.mkdir()
    return [await engine.submit(name, {"dir": str(barrier), "n": n, "s": s}) for _ in range(n)]


async def test_invocations_spread_over_both_nodes(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    await ray_deploy("where", code=WHERE, max_sandboxes=2)
    ids = await _together(ray_engine, "where", tmp_path / "barrier", 2)
    acts = [assert_success(await ray_engine.activations.wait(i, timeout_s=60)) for i in ids]
    for act in acts:
        assert act.annotations["ray_node_id"] == act.result["node"]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert {a.result["node"] for a in acts} == nodes
    assert len({a.result["pid"] for a in acts}) == 2


async def test_killed_actor_ends_only_its_activation(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    await ray_deploy("pair", code=WHERE, max_sandboxes=2)
    ids = await _together(ray_engine, "pair", tmp_path / "barrier", 2, s=2)
    await _eventually(lambda: len(list((tmp_path / "barrier").iterdir())) == 2, timeout_s=60)
    # a cold start's first run is reported begun with its start call's answer (up to RAY_FOLDED_RUN_WAIT_S in)
    with anyio.fail_after(10):
        while not all(act.annotations.get("sandbox") for act in [await ray_engine.activations.get(i) for i in ids]):
            await anyio.sleep(0.02)
    victim, survivor = [await ray_engine.activations.get(i) for i in ids]
    sandbox = victim.annotations["sandbox"]
    # each sandbox on a node of its own (1 CPU each): killing the victim's node actor (the zygote that forked it
    # and holds it) ends the victim's activation, not the one on the other node
    assert ray_engine._pool is not None
    [sb] = [s for s in ray_engine._pool.functions["guest/pair@1"].sandboxes if s.id == sandbox]
    name = getattr(sb, "actor_name", "")
    assert name in _engine_actor_names() and "-node-" in name
    ray.kill(ray.get_actor(name, namespace="minifaas"), no_restart=True)
    killed = await ray_engine.activations.wait(victim.activation_id, timeout_s=30)
    assert_status(killed, "developer_error", error_contains=f"the Ray actor {name} died")
    assert "ray.kill" in killed.result["error"]
    assert_success(await ray_engine.activations.wait(survivor.activation_id, timeout_s=30))
    assert name not in _engine_actor_names()
    assert_success(await ray_engine.call("pair"))  # the function keeps serving


async def test_scale_to_zero_frees_the_reservation(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    total_cpus = ray.cluster_resources()["CPU"]
    await ray_deploy("brief", code=WHERE, idle_timeout_s=0.5)
    first = assert_success(await ray_engine.call("brief"))
    assert ray_engine.stats()["functions"]["guest/brief@1"]["pids"] == [first.result["pid"]]
    node_actor = first.annotations["ray_actor"]  # the zygote actor of its node, which forked it
    assert node_actor in _engine_actor_names() and "-node-" in node_actor
    assert ray.available_resources().get("CPU", 0.0) < total_cpus  # its reservation (a placement group)
    await _eventually(lambda: ray_engine.stats()["functions"]["guest/brief@1"]["sandboxes"] == 0)
    assert ray_engine.stats()["expired_idle"] >= 1
    await _eventually(lambda: not _alive(first.result["pid"]))
    assert node_actor in _engine_actor_names()  # the node's zygote stays, for the next cold start
    await _eventually(lambda: ray.available_resources().get("CPU", 0.0) == total_cpus)
    again = assert_success(await ray_engine.call("brief"))
    assert again.annotations["cold"] is True and again.result["pid"] != first.result["pid"]


async def test_kept_reservation_is_reused_without_asking_ray(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reservation of an ended sandbox, kept a moment, goes to the next cold start of its shape as it is: its
    node is known (no placement group table read from the GCS on the cold start's path)."""
    ray_pg = sys.modules["ray.util.placement_group"]  # the module (ray.util.placement_group is also a function)
    launcher: Any = ray_engine._launcher
    monkeypatch.setattr(launcher, "reserve_ahead", lambda demand: None)  # only the kept one, not one made ahead
    half = {"num_cpus": 0.5, ELSEWHERE: 1}
    await ray_deploy("kept-a", code=WHERE, resources=half)
    first = assert_success(await ray_engine.call("kept-a"))
    [sandbox] = [sb for sb in launcher.live if sb.owner is not None and sb.owner.spec.name == "kept-a"]
    pg = sandbox.pg
    sandbox.kill("test")
    # kept from the kill on, not from the terminate call's answer: a cold start right after does not miss it
    assert [e[3] for e in launcher.spare_reservations if e[1] is pg] == [first.annotations["ray_node_id"]]
    await ray_engine.delete("kept-a")
    reads: list[Any] = []
    table = ray_pg.placement_group_table
    monkeypatch.setattr(ray_pg, "placement_group_table", lambda *a, **k: reads.append(a) or table(*a, **k))
    reused = launcher.counters["reservations_reused"]
    await ray_deploy("kept-b", code=WHERE, resources=half)
    act = assert_success(await ray_engine.call("kept-b"))
    assert launcher.counters["reservations_reused"] == reused + 1
    assert act.annotations["ray_node_id"] == first.annotations["ray_node_id"]
    assert reads == []


async def test_reservation_made_ahead_for_the_next_cold_start_then_released_when_idle(
    ray_engine: minifaas.Engine, ray_deploy: Deploy
) -> None:
    """After a cold start, a reservation of its shape is made ahead (placed, its node's zygote actor up): the next
    cold start of that shape, while the first sandbox still runs, makes no placement group of its own. With no more
    cold starts, it is removed after RAY_RESERVATION_KEEP_S: an idle engine holds nothing."""
    ray_pg = sys.modules["ray.util.placement_group"]  # the module (ray.util.placement_group is also a function)
    launcher: Any = ray_engine._launcher
    quarter = {"num_cpus": 0.25, ELSEWHERE: 1}
    made = launcher.counters["reservations_made_ahead"]
    await ray_deploy("ahead-a", code=WHERE, resources=quarter)
    first = assert_success(await ray_engine.call("ahead-a"))  # its sandbox stays (idle)
    await _eventually(lambda: launcher.counters["reservations_made_ahead"] == made + 1)
    [ahead] = [e for e in launcher.spare_reservations if e[0].custom == ((ELSEWHERE, 1.0),) and e[0].num_cpus == 0.25]
    assert ahead[3] in launcher.nodes
    reused = launcher.counters["reservations_reused"]
    await ray_deploy("ahead-b", code=WHERE, resources=quarter)
    second = assert_success(await ray_engine.call("ahead-b"))
    [sandbox] = [sb for sb in launcher.live if sb.owner is not None and sb.owner.spec.name == "ahead-b"]
    assert sandbox.pg is ahead[1] and launcher.counters["reservations_reused"] == reused + 1
    assert second.result["pid"] != first.result["pid"]
    assert second.annotations["ray_node_id"] == ahead[3]
    await ray_engine.delete("ahead-a")
    await ray_engine.delete("ahead-b")
    await _eventually(lambda: not launcher.spare_reservations, timeout_s=10)
    await _eventually(lambda: ray_pg.placement_group_table(ahead[1])["state"] == "REMOVED", timeout_s=10)


async def test_models_fetched_into_each_nodes_store(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    # two sandboxes kept warm, one per node (1 CPU each): two calls at once run on both
    await ray_deploy("crop", path=ROOT / "functions" / "smart_body_crop", max_sandboxes=2, min_sandboxes=2)
    await _eventually(lambda: ray_engine.stats()["functions"]["guest/crop@1"]["idle"] == 2, timeout_s=60)
    image = (ROOT / "tests" / "data" / "images" / "messi5.jpg").read_bytes()
    acts: list[minifaas.Activation] = []

    async def one() -> None:
        acts.append(await ray_engine.call("crop", {"image": image}))

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(one)
    for act in acts:
        assert_success(act)
        assert act.result["person"] is True and isinstance(act.result["crop"], bytes)
        assert act.annotations["model_cache"] == "miss"
    nodes = {a.annotations["ray_node_id"] for a in acts}
    assert len(nodes) == 2
    spec = await ray_engine.get_function("crop")
    digest = spec["params"]["detector_sha256"]
    assert ray_engine.state_dir is not None
    # each node has its own store: the head's is on this disk, the other node's in its own (the head cannot see it)
    head = ray.get_runtime_context().get_node_id()
    for node in nodes:
        visible = (ray_engine.state_dir / "models" / "ray-nodes" / node / "sha256" / digest).is_file()
        assert visible is (node == head)
    assert ray_engine.stats()["launcher_stats"]["shipment_puts"] >= 2  # the two models (and the bundle) shipped
    warm = assert_success(await ray_engine.call("crop", {"image": image}))
    assert warm.annotations["model_cache"] == "hit"
    held = ray_engine.stats()["functions"]["guest/crop@1"]["models"]
    assert any(url.endswith("pose_detection.tflite") for url in held)


async def test_full_cluster_evicts_an_idle_sandbox(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    await _cluster_idle()
    # its own name: a module-scoped engine may hold an earlier test's "hog" (versions are never reused)
    info = await ray_deploy("evict-hog", code=WHERE, max_sandboxes=2)
    key = f"guest/evict-hog@{info['version']}"
    for aid in await _together(ray_engine, "evict-hog", tmp_path / "barrier", 2):
        assert_success(await ray_engine.activations.wait(aid, timeout_s=60))
    assert ray_engine.stats()["functions"][key]["idle"] == 2  # every CPU of the cluster
    evicted = ray_engine.stats()["launcher_stats"]["evictions_for_room"]
    await ray_deploy("late", code=WHERE)
    with anyio.fail_after(30):
        assert_success(await ray_engine.call("late"))
    assert ray_engine.stats()["launcher_stats"]["evictions_for_room"] == evicted + 1
    assert ray_engine.stats()["functions"][key]["sandboxes"] == 1


async def test_prewarmed_actor_and_close_leaves_no_actor(ray_cluster: Cluster) -> None:
    before = _engine_actor_names()
    async with minifaas.Engine(backend="ray", prewarm=1) as eng:
        await _eventually(lambda: eng.stats().get("spawns") == 1, timeout_s=30)  # a generic stem actor, started
        assert len(_engine_actor_names() - before) == 1
        await eng.deploy("hello", code="def main(args):\n    return {'hi': args.get('name')}\n")
        assert await eng.invoke("hello", {"name": "Ada"}) == {"hi": "Ada"}
        assert eng.stats()["prewarmed_specializations"] == 1
        assert eng.stats()["launcher"] == "ray"
        # a new stem, reserving 1 CPU and no GPU: a GPU function does not take it, it gets an actor with its GPU
        await _eventually(lambda: eng.stats().get("spawns") == 2, timeout_s=30)
        await eng.deploy("gpu", code=GPU_VIEW, resources={"num_gpus": 1, "num_cpus": 0.5})
        assert await eng.invoke("gpu") == {"cuda": "0"}
        assert eng.stats()["prewarmed_specializations"] == 1
    await _eventually(lambda: not (_engine_actor_names() - before))


async def _client_app_through_proxy(
    cluster: Cluster, server_log: Path, env: dict[str, str]
) -> tuple[int, subprocess.CompletedProcess[bytes]]:
    """Run CLIENT_APP in a process of its own, connected through a Ray Client proxy (``python -m
    ray.util.client.server``, its output in ``server_log``, ``env`` added to its environment) to ``cluster``."""
    port = _free_port()
    with server_log.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "ray.util.client.server", "--address", cluster.address, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # the proxy forks a server per client while its gRPC threads run; with gRPC's fork handlers on, that
            # child can crash at once (SIGSEGV, empty logs: ray-project/ray#63202, here 1 connection in 3 or so)
            env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false", **env},
        )
    try:
        with anyio.fail_after(90):
            app = await anyio.run_process([sys.executable, "-c", CLIENT_APP, f"ray://127.0.0.1:{port}"], check=False)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return port, app


async def test_remote_address_through_ray_client(ray_cluster: Cluster, tmp_path: Path) -> None:
    """``ray_address="ray://host:port"``: an application on another machine (here: another process, connected to
    the session's cluster only through a Ray Client server) gets the same records."""
    pytest.importorskip("grpc", reason="Ray Client needs pip install 'ray[client]'")
    before = _engine_actor_names()
    server_log = tmp_path / "ray_client_server.log"
    port, app = await _client_app_through_proxy(ray_cluster, server_log, {})
    assert app.returncode == 0, _client_server_failure(app.stderr.decode(), server_log)
    *acts, stats = [json.loads(line) for line in app.stdout.decode().splitlines() if line.startswith("{")]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert [a["result"]["i"] for a in acts] == [0, 1, 2]
    for act in acts:
        assert act["status"] == "success" and act["node"] in nodes
        assert [line.split(" ", 1)[1] for line in act["logs"]] == ["stdout: raw"]
    assert len({a["result"]["pid"] for a in acts}) == 1  # one warm sandbox served all three
    assert stats["launcher"]["address"] == f"ray://127.0.0.1:{port}"
    assert stats["launcher"]["sandboxes_forked"] == 1 and stats["launcher"]["node_actors_started"] == 1
    await _eventually(lambda: not (_engine_actor_names() - before))  # the engine's close removed its actor


#: loaded by the Ray Client proxy through PYTHONPATH: the first per-client server it starts dies in its fork, before
#: exec, as in ray-project/ray#63202 (there a gRPC poller race, here a SIGSEGV on purpose)
CRASH_FIRST_CLIENT_SERVER = textwrap.dedent("""
    import os, signal, subprocess
    _init = subprocess.Popen.__init__
    def _popen(self, args, *a, **kw):
        marker = os.environ["MINIFAAS_TEST_CRASHED_ONCE"]
        if any("--mode=specific-server" in str(x) for x in args) and not os.path.exists(marker):
            open(marker, "w").close()
            kw["preexec_fn"] = lambda: os.kill(os.getpid(), signal.SIGSEGV)
        _init(self, args, *a, **kw)
    subprocess.Popen.__init__ = _popen
""")


async def test_ray_client_server_that_dies_at_birth_is_retried(ray_cluster: Cluster, tmp_path: Path) -> None:
    """The proxy of a Ray Client server may lose the server it forks for a new client; the engine connects again."""
    pytest.importorskip("grpc", reason="Ray Client needs pip install 'ray[client]'")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CRASH_FIRST_CLIENT_SERVER)
    marker = tmp_path / "crashed-once"
    server_log = tmp_path / "ray_client_server.log"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")])),
        "MINIFAAS_TEST_CRASHED_ONCE": str(marker),
    }
    _port, app = await _client_app_through_proxy(ray_cluster, server_log, env)
    assert marker.exists(), server_log.read_text()  # the first server did die
    assert "SpecificServer startup failed" in server_log.read_text()
    assert app.returncode == 0, _client_server_failure(app.stderr.decode(), server_log)
    *acts, stats = [json.loads(line) for line in app.stdout.decode().splitlines() if line.startswith("{")]
    assert [a["result"]["i"] for a in acts] == [0, 1, 2]
    assert stats["launcher"]["client_connect_retries"] == 1


async def test_archives_put_once_per_digest_and_released(ray_cluster: Cluster, tmp_path: Path) -> None:
    from minifaas._backends.rayship import Shipments, unpack_bundle

    folder = tmp_path / f"digest-{os.getpid()}-{time.time_ns()}"
    (folder / "pkg").mkdir(parents=True)
    (folder / "__main__.py").write_text("from pkg.helper import x\ndef main(args):\n    return {'x': x}\n")
    (folder / "pkg" / "helper.py").write_text("x = 42\n")
    ship = Shipments(tmp_path / "models")
    first: list[str] = []
    second: list[str] = []
    source = {"kind": "dir", "path": str(folder / "__main__.py")}
    shipped = await ship.bundle(source, first)
    again = await ship.bundle(source, second)
    assert "path" not in shipped  # no path of the host's disk goes out
    assert ship.puts == 1 and again["archive"] is shipped["archive"] and ship.held() == 1
    entry = Path(unpack_bundle(shipped["digest"], shipped["entry"], ray.get(shipped["archive"])))
    try:
        assert entry.read_text() == (folder / "__main__.py").read_text()
        assert (entry.parent / "pkg" / "helper.py").read_text() == "x = 42\n"
    finally:
        import shutil

        shutil.rmtree(entry.parent, ignore_errors=True)
    ship.release(first)
    assert ship.held() == 1  # the second sandbox still uses it
    ship.release(second)
    assert ship.held() == 0  # no live sandbox of that code: the object store may free it


# -- a real cluster: a node without the head's disk, per-node room, resources, a lost connection -------------------
#: loads a model the bundle names and imports a package only its requirements.txt provides
BUNDLED = textwrap.dedent("""
    import hashlib, os
    import minifaas_demo_pkg
    from minifaas_sandbox import models

    def _read(path):
        with open(path, 'rb') as f:
            return f.read()

    def main(args):
        data = models.load(args.get('url') or args['weights_url'], loader=_read)
        return {'shout': minifaas_demo_pkg.shout('hi'), 'sha': hashlib.sha256(data).hexdigest(),
                'node': os.environ['MINIFAAS_RAY_NODE_ID'], 'pkg': minifaas_demo_pkg.__file__}
""")
GPU_VIEW = "import os\ndef main(args):\n    return {'cuda': os.environ.get('CUDA_VISIBLE_DEVICES')}\n"


@pytest.fixture(scope="module")
def demo_requirements(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo package as a local wheel, in a folder every node sees (like a package index would be)."""
    from test_deps import PKG_DIR, PKG_NAME, build_wheel

    wheel = build_wheel(PKG_DIR, tmp_path_factory.mktemp("wheelhouse"))
    return f"{PKG_NAME} @ {wheel.as_uri()}\n"


async def test_bundle_with_models_and_requirements_runs_on_a_node_without_the_hosts_disk(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, head_only: Path, demo_requirements: str
) -> None:
    folder = head_only / f"bundle-{time.time_ns()}"  # on the head's disk only, as the engine's state is
    folder.mkdir()
    (folder / "__main__.py").write_text(BUNDLED)
    (folder / "requirements.txt").write_text(demo_requirements)
    (folder / "minifaas.json").write_text(json.dumps({"models": {"weights_url": "weights.bin"}}))
    weights = os.urandom(200_000)
    (folder / "weights.bin").write_bytes(weights)
    await ray_deploy("bundled", path=folder, resources={ELSEWHERE: 1})
    node = _elsewhere_node()
    act = assert_success(await ray_engine.call("bundled"))
    assert act.annotations["ray_node_id"] == node == act.result["node"]
    assert act.result["shout"] == "HI!"
    assert act.result["sha"] == hashlib.sha256(weights).hexdigest()  # shipped by content hash
    assert ray_engine.state_dir is not None
    # the node built the environment on its own disk: the head does not see it
    assert act.result["pkg"].startswith(str(ray_engine.state_dir / "envs" / "ray-nodes" / node))
    assert not Path(act.result["pkg"]).exists()
    warm = assert_success(await ray_engine.call("bundled"))
    assert warm.annotations["cold"] is False
    # a model file named only at invoke time is a path of the head's disk: refused loudly, not read as missing
    (folder / "other.bin").write_bytes(weights)
    other = await ray_engine.call("bundled", {"url": (folder / "other.bin").as_uri()})
    assert_status(other, "application_error")
    assert "does not see" in other.result["error"], other.result


@pytest.mark.parametrize(
    ("options", "asked"),
    [
        ({"resources": {"num_cpus": 1.5}}, "1.5 CPU"),
        ({"resources": {"num_gpus": 2}}, "2 GPU"),
        ({"resources": {"num_cpus": 1, ELSEWHERE: 101}}, f"101 {ELSEWHERE}"),
        ({"resources": {"nowhere": 1}}, "1 nowhere"),
    ],
    ids=["cpus-over-each-node", "gpus-over-each-node", "custom-over-its-node", "unknown-resource"],
)
async def test_function_no_node_can_host_is_refused_at_deploy(
    ray_engine: minifaas.Engine, options: dict[str, Any], asked: str
) -> None:
    # the cluster has 2 CPUs and 1 GPU in all, but one CPU per node: 1.5 CPUs fit nowhere
    with pytest.raises(minifaas.DeployError, match="no node of the Ray cluster can host") as info:
        await ray_engine.deploy("huge", code=WHERE, **options)
    assert asked in str(info.value)
    with pytest.raises(minifaas.FunctionNotFound):
        await ray_engine.invoke("huge")


async def test_bad_resources_are_refused(ray_engine: minifaas.Engine, local_engine: minifaas.Engine) -> None:
    with pytest.raises(minifaas.DeployError, match=r"resources\['num_gpus'\] must be a number >= 0"):
        await ray_engine.deploy("bad", code=WHERE, resources={"num_gpus": -1})
    with pytest.raises(minifaas.DeployError, match="'CPU' is Ray's own name"):
        await ray_engine.deploy("bad", code=WHERE, resources={"CPU": 1})
    with pytest.raises(minifaas.DeployError, match="custom resources are placed by the Ray backend only"):
        await local_engine.deploy("bad", code=WHERE, resources={ELSEWHERE: 1})


async def test_local_gpus_shared_out_per_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Locally the host's GPU list (here a logical one in CUDA_VISIBLE_DEVICES) is shared out: each sandbox of a
    GPU function sees its own GPU, the least used first; other sandboxes see none."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    async with minifaas.Engine() as eng:
        with pytest.raises(minifaas.DeployError, match="3 GPU asked for, this host has 2"):
            await eng.deploy("greedy", code=GPU_VIEW, resources={"num_gpus": 3})
        await eng.deploy(
            "gpu",
            code=WHERE.replace("'pid': os.getpid()", "'cuda': os.environ['CUDA_VISIBLE_DEVICES']"),
            resources={"num_gpus": 1},
            max_sandboxes=2,
        )
        ids = await _together(eng, "gpu", tmp_path / "barrier", 2)
        acts = [assert_success(await eng.activations.wait(i, timeout_s=60)) for i in ids]
        assert sorted(a.result["cuda"] for a in acts) == ["3", "5"]
        await eng.deploy("plain", code=GPU_VIEW)
        assert await eng.invoke("plain") == {"cuda": ""}  # not every GPU of the host


async def test_sandboxes_packed_by_default_spread_on_request(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    nodes: dict[str, set[str]] = {}
    for placement in ("pack", "spread"):
        await _cluster_idle()
        await ray_deploy(placement, code=WHERE, resources={"num_cpus": 0.5}, max_sandboxes=2, placement=placement)
        ids = await _together(ray_engine, placement, tmp_path / placement, 2)
        acts = [assert_success(await ray_engine.activations.wait(i, timeout_s=60)) for i in ids]
        assert len({a.result["pid"] for a in acts}) == 2
        nodes[placement] = {a.result["node"] for a in acts}
        await ray_engine.delete(placement)
    assert len(nodes["pack"]) == 1 and len(nodes["spread"]) == 2


async def test_room_is_per_node_half_free_nodes_evict_for_a_whole_cpu(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path
) -> None:
    # two 0.5-CPU sandboxes, one per node: the cluster has 1.0 CPU free in all, but no node has a whole one
    await _cluster_idle()
    await ray_deploy("half", code=WHERE, resources={"num_cpus": 0.5}, max_sandboxes=2, placement="spread")
    ids = await _together(ray_engine, "half", tmp_path / "barrier", 2)
    acts = [assert_success(await ray_engine.activations.wait(i, timeout_s=60)) for i in ids]
    assert len({a.result["node"] for a in acts}) == 2
    evicted = ray_engine.stats()["launcher_stats"]["evictions_for_room"]
    await ray_deploy("whole", code=WHERE)
    with anyio.fail_after(30):
        assert_success(await ray_engine.call("whole"))
    assert ray_engine.stats()["launcher_stats"]["evictions_for_room"] == evicted + 1
    assert ray_engine.stats()["functions"]["guest/half@1"]["sandboxes"] == 1


async def test_no_room_within_the_start_timeout_is_an_internal_error(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import minifaas._backends.ray

    monkeypatch.setattr(minifaas._backends.ray, "RAY_START_TIMEOUT_S", 4.0)
    await _cluster_idle()
    await ray_deploy("busy", code=WHERE, max_sandboxes=2)
    ids = await _together(ray_engine, "busy", tmp_path / "barrier", 2, s=8)  # every CPU busy (not evictable)
    await _eventually(lambda: len(list((tmp_path / "barrier").iterdir())) == 2, timeout_s=60)
    await ray_deploy("late", code=WHERE)
    act = await ray_engine.call("late")
    assert_status(act, "internal_error", error_contains="no node of the Ray cluster had room")
    assert f"{minifaas.Overloaded.__name__}: the Ray sandbox" in act.result["error"]
    for aid in ids:
        assert_success(await ray_engine.activations.wait(aid, timeout_s=60))


async def test_gpu_request_lands_on_the_gpu_node_with_cuda_visible_devices(
    ray_engine: minifaas.Engine, ray_deploy: Deploy
) -> None:
    await ray_deploy("gpu", code=GPU_VIEW, resources={"num_gpus": 1})
    act = assert_success(await ray_engine.call("gpu"))
    assert act.annotations["ray_node_id"] == _elsewhere_node()
    assert act.result == {"cuda": "0"}  # the (logical) GPU Ray assigned, through the scrubbed environment
    limits = act.annotations["ray_limits"]
    assert limits["gpus"] == "0" and limits["memory"] == "rlimit_as" and limits["isolation"] == "process"
    assert limits["pids_cgroup"] is True and limits["network_namespace"] is True  # root here
    await ray_engine.delete("gpu")  # frees the GPU
    # on the same node without asking for a GPU: it sees none, not every GPU of the node
    await ray_deploy("nogpu", code=GPU_VIEW, resources={ELSEWHERE: 1})
    act = assert_success(await ray_engine.call("nogpu"))
    assert act.annotations["ray_node_id"] == _elsewhere_node() and act.result == {"cuda": ""}


async def test_actor_memory_reservation_covers_its_overhead(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    from minifaas._backends.rayplace import RAY_ACTOR_OVERHEAD_MB

    await ray_deploy("mem", code=WHERE, memory_mb=128)
    act = assert_success(await ray_engine.call("mem"))
    node = act.annotations["ray_node_id"]
    from ray._private.state import available_resources_per_node, total_resources_per_node

    used = total_resources_per_node()[node]["memory"] - available_resources_per_node()[node]["memory"]
    assert used >= (128 + RAY_ACTOR_OVERHEAD_MB) << 20


async def test_unavailable_actor_is_killed(ray_engine: minifaas.Engine, ray_deploy: Deploy) -> None:
    """A partition (ActorUnavailableError: the actor may still be alive) kills the actor: it frees its resources and
    cannot finish an activation already recorded as failed. (The error is raised here on a real actor's handle: a
    real partition is not reproducible on one machine.)"""
    from minifaas._backends.ray import RaySandbox

    await ray_deploy("part", code=WHERE)
    assert_success(await ray_engine.call("part"))
    assert ray_engine._pool is not None
    [sb] = ray_engine._pool.functions["guest/part@1"].sandboxes
    assert isinstance(sb, RaySandbox) and sb.actor_name in _engine_actor_names()
    sb._on_call_error(ray.exceptions.ActorUnavailableError("the node is unreachable", None))
    await _eventually(lambda: sb.actor_name not in _engine_actor_names(), timeout_s=15)
    assert_success(await ray_engine.call("part"))  # a new sandbox serves


#: an application connected through Ray Client: an activation runs when the connection is lost, then another one
CLIENT_LOSS_APP = textwrap.dedent("""
    import json, sys, anyio, minifaas
    CODE = ("import time\\ndef main(args):\\n  m = args.get('mark')\\n  m and open(m, 'w').close()\\n"
            "  time.sleep(args.get('s', 0))\\n  return {}")
    async def main():
        async with minifaas.Engine(backend="ray", ray_address=sys.argv[1]) as eng:
            await eng.deploy("slow", code=CODE)
            aid = await eng.submit("slow", {"s": 60, "mark": sys.argv[2]})
            act = await eng.activations.wait(aid, timeout_s=120)
            print(json.dumps({"status": act.status, "error": act.result.get("error")}), flush=True)
            act = await eng.call("slow", {})
            print(json.dumps({"status": act.status, "error": act.result.get("error"),
                              "launcher": eng.stats()["launcher_stats"]}), flush=True)
    anyio.run(main)
""")


def _start_proxy(cluster: Cluster, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ray.util.client.server", "--address", cluster.address, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false"},
            start_new_session=True,  # its per-client servers die with it (killpg): the machine is gone
        )


async def test_lost_ray_client_connection_fails_inflight_work_and_reconnects(
    ray_cluster: Cluster, tmp_path: Path
) -> None:
    pytest.importorskip("grpc", reason="Ray Client needs pip install 'ray[client]'")
    port = _free_port()
    log = tmp_path / "proxy.log"
    mark = tmp_path / "running"
    proxy = _start_proxy(ray_cluster, port, log)
    with (tmp_path / "app.err").open("wb") as err:
        app = subprocess.Popen(
            [sys.executable, "-c", CLIENT_LOSS_APP, f"ray://127.0.0.1:{port}", str(mark)],
            stdout=subprocess.PIPE,
            stderr=err,
            # Ray Client's own wait for the server to come back: short, the test restarts the proxy much later
            env={**os.environ, "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "2"},
        )
    try:
        await _eventually(mark.exists, timeout_s=90)  # the activation runs
        os.killpg(proxy.pid, signal.SIGKILL)  # the connection is killed mid-activation
        proxy.wait()
        assert app.stdout is not None
        line = await anyio.to_thread.run_sync(app.stdout.readline)
        first = json.loads(line or b"null")
        assert first is not None, (tmp_path / "app.err").read_text()[-3000:]
        assert first["status"] == "internal_error", first
        assert "connection to the Ray cluster was lost" in first["error"]
        proxy = _start_proxy(ray_cluster, port, log)  # the cluster is reachable again: the engine reconnects
        second = json.loads(await anyio.to_thread.run_sync(app.stdout.readline) or b"null")
        assert second is not None, (tmp_path / "app.err").read_text()[-3000:]
        assert second["status"] == "success", second
        assert second["launcher"]["connections_lost"] == 1 and second["launcher"]["reconnects"] == 1
        assert await anyio.to_thread.run_sync(lambda: app.wait(timeout=60)) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        assert app.stdout is not None
        app.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait()


async def test_requirements_a_node_cannot_install_fail_loudly(
    ray_engine: minifaas.Engine, ray_deploy: Deploy, head_only: Path, demo_requirements: str
) -> None:
    # the wheel lies on the head's disk only: the head builds the env at deploy, the other node cannot
    wheel = Path(demo_requirements.split(" @ ", 1)[1].strip().removeprefix("file://"))
    private = head_only / f"wheels-{time.time_ns()}"
    private.mkdir()
    (private / wheel.name).write_bytes(wheel.read_bytes())
    folder = head_only / f"needs-{time.time_ns()}"
    folder.mkdir()
    (folder / "__main__.py").write_text("import minifaas_demo_pkg\ndef main(args):\n    return {}\n")
    (folder / "requirements.txt").write_text(f"minifaas-demo-pkg @ {(private / wheel.name).as_uri()}\n")
    await ray_deploy("needs", path=folder, resources={ELSEWHERE: 1})
    act = assert_status(await ray_engine.call("needs"), "developer_error")
    error = act.result["error"]
    assert "failed to initialize" in error and f"on Ray node {_elsewhere_node()}" in error, error
    assert "could not be installed on this node" in error, error


def test_engine_that_started_ray_removes_its_session_folder() -> None:
    # a fresh Ray temp dir: ray.init() without an address would join a cluster it finds in the shared one; short,
    # because Ray's socket paths in it must stay under 108 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="mf-ray-"))
    script = textwrap.dedent(
        """
        import anyio, minifaas, ray

        async def main():
            async with minifaas.Engine(backend="ray") as eng:
                await eng.deploy("hi", code="def main(args):\\n    return {'ok': True}\\n")
                assert await eng.invoke("hi") == {"ok": True}
                print(ray._private.worker._global_node.get_session_dir_path())

        anyio.run(main)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, check=False
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        session = Path(proc.stdout.strip().splitlines()[-1])
        assert session.is_relative_to(ray_tmp) and session.name.startswith("session_")
        assert not session.exists()
        assert not list((ray_tmp / "ray").glob("session_2*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
