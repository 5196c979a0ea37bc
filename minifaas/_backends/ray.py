"""The Ray backend: ``Engine(backend="ray")`` runs each sandbox on a Ray node instead of the local host.

Two ways a sandbox starts on a node:

- **forked** (the default): one long-lived :class:`~.raynode.NodeActor` per node and engine runs minifaas's own zygote
  there and forks the node's sandboxes from it (a cold start costs a fork and a few Ray calls, not a Ray worker);
  what a sandbox reserves is a placement group of one bundle on that node (no process), so Ray's per-node room stays
  exact. Below, "the actor" is then the node actor, and every call carries the sandbox's id.
- **an actor of its own** (a function asking for GPUs: Ray assigns GPU ids to actors only): a
  :class:`SandboxActor` created for it, which spawns the sandbox process.

Everything above the sandbox handle is shared with the local backend: the scheduler's queues, timeouts and records,
the pool's routing, caps, keep-alive and eviction. Only the handle differs::

    Pool.sandbox_factory -> RaySandbox (host side)          SandboxActor (a Ray worker)       sandbox process
      start() ------------- actor creation, describe() ---> spawns and watches, with the  -> python -m
                                                            local host's Sandbox code,        minifaas_sandbox
      init(fields) -------- actor.init.remote(fields) ----> INIT over the channel ---------> (RLIMIT_AS, pids
      send(RUN, fields) --- actor.execute.remote(fields) -> RUN; RESULT + fd 1/2 output <--   cgroup, network
      on_result(sb, fields) <- msgpack body (or "died": the process' exit, as locally)        as locally)
      kill(reason) / stop() -- actor.terminate (kills its process group), then ray.kill
      on_died(sb, reason) <-- a "died" answer, or an ActorDiedError (killed, worker crashed, node lost)

The actor supervises a real sandbox process exactly as the local host does (same ``Sandbox`` class, on the actor's
event loop), so the memory limit (``memory_mb`` is an RLIMIT_AS in the process: "memory limit exceeded"), crashes
("the sandbox process exited with code 9"), output written straight to fd 1/2 (C code, child processes: in the
activation's logs), network isolation and the pids cgroup behave identically. The sandbox process learns its node
from ``MINIFAAS_RAY_NODE_ID``; it is no Ray worker.

Sandboxes reserve (placement group or actor), on ONE node, the function's ``resources`` (``num_cpus``, default 1,
``num_gpus``, custom Ray resources) and ``memory`` = ``memory_mb`` + ``RAY_ACTOR_OVERHEAD_MB`` (the worker and the
sandbox runtime, so Ray's memory monitor sees what is really used); see :mod:`._rayplace`. Room is per node: a
function no node can ever host is refused at deploy; a new actor is packed onto the fullest node with room
(``placement="spread"``: the emptiest); without room, idle sandboxes of other functions are evicted on the node
where that frees enough, and a start that finds no room within ``RAY_START_TIMEOUT_S`` fails its activation as
``internal_error`` (Ray's fault, not the function's). ``max_concurrency`` = the function's concurrency (plus a small
"control" group, so terminate and pings never wait behind activations), ``max_restarts=0``. The sandbox sees the
GPUs Ray assigned its actor, and only those (``CUDA_VISIBLE_DEVICES``); each record says which limits its node
applied (``ray_limits``). A timeout kills the sandbox (a forked one through its node actor, an actor of its own with
``ray.kill``); a dead actor ends only the activations it was running (a node actor: those of its node, and the idle
sandboxes it held are forgotten); an unreachable one (``ActorUnavailableError``) is killed too. Arguments and
results over ``RAY_OBJECT_STORE_MIN_BYTES`` go through the object store (``ray.put``), not inline in the actor call.
``isolation="sandbox"`` is set up by the sandbox process on its node at INIT (``minifaas_sandbox.isolation``, as
locally), its view made of the node's own bundle, environment and model store; each node is probed at deploy, and a
node that cannot fails the deploy. A pipelined RUN (queued behind a running one, see the scheduler) works too: the
sandbox runs them in order, and a RESULT that overtakes the one ahead of it on the way back is held until the
scheduler has begun it.

No path of the host's disk reaches another node (:mod:`._rayship`): a dir bundle goes out as an object-store
archive (once per digest, held while a sandbox uses it), the models it names by content hash, its
``requirements.txt`` as text (each node builds its environment under ``<env root>/ray-nodes/<node id>``). A file
path a function names only at invoke time fails loudly on another node.

Losing the connection to the cluster (Ray Client's ``ConnectionError``) ends every sandbox of that connection (their
activations: ``internal_error``, one record each), never the engine: the launcher connects again, and requests
queued meanwhile start on the new connection.

Requirements and limits of the backend (documented in the README by the lead):

- every node needs minifaas installed: the actor classes live in this package, so a worker imports ``minifaas``
  (about 0.35 s, once per node actor, or per GPU sandbox's actor); models are kept in a store of the
  actor's node (``<model root>/ray-nodes/<node id>``; the model root is the engine's, created on each node);
- model URLs given at invoke time must be readable from every node (http(s), s3);
- ``ray_address="ray://host:10001"`` (Ray Client) needs ``pip install 'ray[client]'`` (grpcio);
- a pending reservation waits up to ``RAY_START_TIMEOUT_S``, and its start is abandoned once nothing waits for it;
- the node actor reserves no CPU (``num_cpus=0``) or memory of its own: its zygote's memory is outside Ray's
  accounting (each sandbox's ``RAY_ACTOR_OVERHEAD_MB`` covers more than a fork costs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import importlib.util
import math
import os
import re
import secrets
import shutil
import struct
import termios
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import ray
import ray.exceptions
from minifaas_sandbox import protocol as p

from .._core.function import FunctionSpec
from .._core.launch import Launched, Launcher, SpawnLauncher
from .._core.pool import FunctionPool, Pool
from .._core.sandbox import INIT_KILL_GRACE_S, SHUTDOWN_GRACE_S, HostService, Sandbox, SandboxDied
from .._deploy.deps import PIP_TIMEOUT_S, VENV_TIMEOUT_S
from .._environ import ENV_ALLOW
from .._errors import BackendUnavailable, ModelError, Overloaded
from .rayplace import (
    Demand,
    alive_node_totals,
    best_fit_node,
    check_fits_some_node,
    demand_of,
    evictions_for,
    fits,
    forget_connection,
    free_per_node,
    roomiest_node,
)
from .rayship import Shipments, store_model_bytes, unpack_bundle

__all__ = ("RayBackendFailure", "RayLauncher", "RaySandbox", "SandboxActor", "describe_actor_death", "node_sandbox_env")

#: Ray namespace of the named sandbox actors (``ray.util.list_named_actors(all_namespaces=True)`` lists them)
RAY_NAMESPACE: Final = "minifaas"
#: a generic pre-warmed (stem) actor does not know its function yet: this many activations may run on it at once
RAY_STEM_MAX_CONCURRENCY: Final = 8
#: how long an actor may take to be placed and started (worker process, ``import minifaas``) before the start fails
RAY_START_TIMEOUT_S: Final = 60.0
#: how long a placed actor may take to start when it first builds the function's environment on its node (a venv
#: and a pip run: their own time limits, plus the start itself)
RAY_ENV_START_TIMEOUT_S: Final = VENV_TIMEOUT_S + PIP_TIMEOUT_S + RAY_START_TIMEOUT_S
#: an actor not started after this long is probably waiting for room: evict an idle sandbox elsewhere, re-check.
#: Ray tells "waiting for room" and "placed, worker starting" apart only through its dashboard (not in ray core), so
#: this must exceed a worker's start (0.3-2 s on 2 cores), or a placed actor is taken for a pending one
RAY_PLACEMENT_GRACE_S: Final = 3.0
#: after ``ray.kill``, how long to wait for Ray to confirm the actor is dead before treating it as dead anyway
RAY_KILL_CONFIRM_TIMEOUT_S: Final = 5.0
#: after evicting a sandbox to make room, how long Ray gets to free its resources, and the waiting actor to take
#: them and start its worker (up to 5 s seen on a loaded 2-core machine), before another one goes
RAY_EVICTION_SETTLE_S: Final = 10.0
RAY_KILL_POLL_S: Final = 0.02
RAY_STOP_POLL_S: Final = 0.01
#: arguments and results larger than this (packed) go through Ray's object store (``ray.put``), not inline in the
#: actor call and its reply
RAY_OBJECT_STORE_MIN_BYTES: Final = 64 << 10
#: the sandbox's variable naming the Ray node it runs on (also in each activation's ``ray_node_id`` annotation)
RAY_NODE_ENV: Final = "MINIFAAS_RAY_NODE_ID"
#: calls that must not wait behind running activations (terminate, ping) run in this concurrency group of the actor
RAY_CONTROL_GROUP: Final = "control"
RAY_CONTROL_CONCURRENCY: Final = 2
#: before ``ray.kill``, how long the actor gets to kill its sandbox process group (a stuck actor is killed anyway)
RAY_TERMINATE_TIMEOUT_S: Final = 2.0
#: after a RESULT, how long the actor waits at most for fd 1/2 output written before it to be read
RAY_STRAY_DRAIN_S: Final = 0.05
#: how long after an actor started Ray's per-node free resources may still not show its reservation: until then
#: the launcher subtracts it itself, or two actors started together would both be packed onto the same free CPU
RAY_VIEW_LAG_S: Final = 2.0
#: a cold start's call to its node actor carries the first activation's RUN (one call through Ray, not two): its
#: RESULT comes back with the call when the run ends within this; a longer run answers the call then (the sandbox is
#: ready, the host's timeout runs) and its RESULT comes with a second call
RAY_FOLDED_RUN_WAIT_S: Final = 0.05
#: how long a forked sandbox's reservation (placement group) is kept after it ended, for the next cold start of the
#: same shape (a new one made right after a removal waits 0.5-1 s in Ray's scheduler)
RAY_RESERVATION_KEEP_S: Final = 2.0
#: ready reservations made ahead for the next cold starts of a shape: as many as cold starts of that shape came in
#: the last ``RAY_RESERVATION_KEEP_S``, at most this many (each kept ``RAY_RESERVATION_KEEP_S``, then removed)
RAY_RESERVATIONS_AHEAD_MAX: Final = 2
#: after losing the connection to the cluster, the pause between two attempts to connect again
RAY_RECONNECT_PAUSE_S: Final = 1.0
#: the sandbox's view of the GPUs Ray gave its actor ("" when none: it must not see every GPU of its node)
CUDA_ENV: Final = "CUDA_VISIBLE_DEVICES"
#: connections to a Ray Client server (``ray://``) tried before giving up. Its proxy forks a server per client while
#: its gRPC threads run, and that child may crash at birth (ray-project/ray#63202): the next connection gets a new one
RAY_CLIENT_CONNECT_ATTEMPTS: Final = 3
RAY_CLIENT_RETRY_PAUSE_S: Final = 0.5
_CLIENT_SERVER_DIED: Final = "Starting Ray client server failed"
_DEATH_CAUSE: Final = re.compile(r"The actor is dead because (.*?)(?:\s+Some common causes|\Z)", re.S)
_EXIT_CODE: Final = re.compile(r"exits? with an exit code (-?\d+)")


# -- inside the actor ---------------------------------------------------------------------------------------------
class _Died:
    """What an activation's pending call gets when the sandbox process under the actor ends."""

    __slots__ = ("reason", "status")

    def __init__(self, reason: str, status: int | None) -> None:
        self.reason = reason
        self.status = status


def _unread_bytes(fd: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def _session_dir(node: Any) -> Path | None:
    """The Ray session folder of ``node`` (a ``ray._private.node.Node``), None when Ray does not say."""
    try:
        return Path(node.get_session_dir_path())
    except (AttributeError, TypeError):  # a private API: a Ray that changed it costs the clean-up, nothing else
        return None


def node_sandbox_env(host_env: Mapping[str, str], node_id: str) -> dict[str, str]:
    """A sandbox's environment on this node: the host's sandbox defaults, this node's own PATH, HOME, ..."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW}
    env.update({k: v for k, v in host_env.items() if k not in ENV_ALLOW})
    env[RAY_NODE_ENV] = node_id
    return env


def _mark_asyncio() -> None:
    """Name asyncio in this task's context: the sandbox's channel callbacks (``add_reader``) start anyio tasks, and
    anyio tells the event loop library from this context (set by ``anyio.run`` on the host, not by Ray's loop)."""
    with contextlib.suppress(ImportError):
        import sniffio

        sniffio.current_async_library_cvar.set("asyncio")


class RayBackendFailure(SandboxDied):
    """Internal: Ray, not the function, failed a sandbox (no room, connection lost): its records are internal_error."""

    internal = True


def _is_host_path(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _task_cause(exc: BaseException) -> str:
    """The error an actor method raised, without Ray's traceback wrapping."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]


class SandboxActor:
    """One sandbox as a Ray actor: it supervises a real sandbox process on its node, as the local host does.

    The process is ``python -m minifaas_sandbox --fd N`` started and watched by the same :class:`Sandbox` code as
    locally (on the actor's event loop), so the memory limit (RLIMIT_AS), crash isolation, raw fd 1/2 output,
    network isolation and the pids cgroup behave identically. Wrapped with ``ray.remote`` by :class:`RayLauncher`
    (an async actor: every call runs on the event loop of its concurrency group).
    """

    def __init__(self, config: dict[str, Any], launcher: Launcher | None = None) -> None:
        #: how its sandbox process starts: forked by its node's zygote (a :class:`~.raynode.NodeActor` passes it),
        #: else spawned
        self._launcher = launcher
        self._isolation = str(config.get("isolation") or "process")
        self._node_id = str(ray.get_runtime_context().get_node_id())
        #: not the driver's node: no path of the host's disk means anything here
        self._remote = config.get("driver_node") != self._node_id
        self._model_root = Path(config["model_root"]) / "ray-nodes" / self._node_id
        self._env = node_sandbox_env(config["env"], self._node_id)
        # the GPUs Ray assigned this actor, and only those (none: an empty list hides them all)
        self._env[CUDA_ENV] = ",".join(str(g) for g in ray.get_gpu_ids())
        self._requirements: str | None = config.get("requirements")
        env_root = Path(config["env_root"])
        # the driver's node reuses the environment built at deploy; another builds its own, by the same hash
        self._env_root = env_root / "ray-nodes" / self._node_id if self._remote else env_root
        self._index_url: str | None = config.get("index_url")
        self._python: str | None = None
        self._sys_path: list[str] = []
        #: url -> (sha256, object reference) of the models the host shipped
        self._shipped: dict[str, tuple[str, Any]] = {}
        self._sb: Sandbox | None = None
        self._started: asyncio.Future[dict[str, Any]] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._store: Any = None
        self._death: _Died | None = None

    async def describe(self) -> dict[str, Any]:
        """Start the sandbox process (first call only) and wait for its READY."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            # the actor owns its supervisor task; it runs until terminate() or the worker's end
            self._supervisor = asyncio.ensure_future(self._supervise(self._started))
        return await asyncio.shield(self._started)

    async def _supervise(self, started: asyncio.Future[dict[str, Any]]) -> None:
        _mark_asyncio()
        sb = Sandbox("ray-actor", {"model.fetch": self._fetch_model})
        sb.on_result = self._on_result
        sb.on_died = self._on_died
        self._sb = sb
        try:
            if self._requirements:
                await self._build_env(self._requirements)
            async with anyio.create_task_group() as tg:
                # an environment that replaces a preloaded package needs its own interpreter: no zygote fork
                launcher = self._launcher if self._launcher is not None and self._python is None else None
                # forked: INIT (the host's next call) waits for READY, as a local cold start does, so that wait
                # overlaps the round trip through Ray
                forked = launcher is not None
                await sb.start(launcher or SpawnLauncher(python=self._python), self._env, tg, wait_ready=not forked)
                assert sb.proc is not None
                started.set_result(
                    {
                        "pid": sb.proc.pid,
                        "actor_pid": os.getpid(),
                        "node_id": self._node_id,
                        "limits": self._limits(sb),
                    }
                )
                # the supervisor (and its task group) ends with the sandbox process: a crash, or terminate()
                await sb.died.wait()
        except BaseException as exc:
            if not started.done():
                where = f"on Ray node {self._node_id}"
                started.set_exception(RuntimeError(f"the sandbox process did not start {where}: {exc}"))
            if not isinstance(exc, Exception):
                raise

    async def _build_env(self, requirements: str) -> None:
        """The function's requirements as an environment of this node (built once per content hash)."""
        from .._deploy.deps import ensure_env

        try:
            deps = await ensure_env(requirements, root=self._env_root, index_url=self._index_url)
        except Exception as exc:
            raise RuntimeError(f"its requirements could not be installed on this node: {exc}") from exc
        self._sys_path = [str(deps.site_packages)]
        # as on the host: an env that replaces a preloaded package needs its own interpreter
        self._python = str(deps.python) if deps.conflicts_with_preload else None

    def _limits(self, sb: Sandbox) -> dict[str, Any]:
        """Which limits this node could apply to its sandbox (the record says so: ``ray_limits``)."""
        from .._core.launch import PIDS

        return {
            "memory": "rlimit_as",
            "pids_cgroup": getattr(sb.proc, "cgroup", None) is not None,
            "pids_cgroup_error": PIDS.error,
            # unshare(CLONE_NEWNET) for network=False functions needs root (CAP_SYS_ADMIN)
            "network_namespace": os.geteuid() == 0,
            # isolation="sandbox": the sandbox process shuts itself in at INIT (minifaas_sandbox.isolation), as
            # locally; a node that cannot fails that INIT, the function never runs unconfined
            "isolation": self._isolation,
            "launch": getattr(sb.proc, "how", "spawn"),
            "gpus": self._env[CUDA_ENV],
        }

    async def _fetch_model(self, args: dict[str, Any]) -> str:
        """The ``model.fetch`` host service of this node's sandbox: a model store of this node's own, and the
        models the host shipped (by content hash); a path of the host's disk cannot be read from another node."""
        url = str(args["url"])
        if self._store is None:
            from .._deploy.modelstore import ModelStore

            self._store = ModelStore(self._model_root)
        shipped = self._shipped.get(url)
        if shipped is not None:
            sha, ref = shipped
            path = self._store.content_path(sha)
            if not path.is_file():
                data: bytes = await ref
                path = await anyio.to_thread.run_sync(store_model_bytes, self._model_root, sha, data)
            return str(path)
        if self._remote and _is_host_path(url):
            raise ModelError(
                f"{url} is a file of the host's disk, which Ray node {self._node_id} does not see: name the model "
                "in the bundle's minifaas.json or in deploy(models=...), or use a URL every node can read"
            )
        return str(await self._store.fetch(url, sha256=args.get("sha256")))

    def _on_result(self, sb: Sandbox, fields: dict[str, Any]) -> None:
        fut = sb.inflight.get(str(fields.get("aid")))
        if fut is not None and not fut.done():
            fut.set_result(fields)

    def _on_died(self, sb: Sandbox, reason: str, status: int | None) -> None:
        self._death = _Died(reason, status)
        for fut in sb.inflight.values():
            if not fut.done():
                fut.set_result(self._death)

    def _died_body(self, aid: str) -> bytes:
        death = self._death or _Died("the sandbox process is gone", None)
        lines = self._sb.take_stray(aid) if self._sb is not None else []
        return p.encode_body({"aid": aid, "died": death.reason, "exit_status": death.status, "logs": lines})

    async def init(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Load the function (INIT) in the sandbox process."""
        sb = self._sb
        if sb is None:
            return {"ok": False, "error": "the sandbox process was not started"}
        source = dict(fields["source"])
        if "archive" in source:
            archive: bytes = await source["archive"]
            path = await anyio.to_thread.run_sync(unpack_bundle, source["digest"], source["entry"], archive)
            source = {"kind": "dir", "path": path}
        self._shipped.update(fields.pop("ray_models", None) or {})
        view = fields.get("isolation")
        if isinstance(view, dict) and view.pop("node_paths", False):
            # what the sandbox reads of its own on this node (the host's paths mean nothing here): its unpacked
            # bundle, the environment this node built, this node's model store
            own = [os.path.dirname(str(source["path"]))] if source.get("kind") == "dir" else []
            own += [p for p in self._sys_path if os.path.isdir(p)]
            self._model_root.mkdir(parents=True, exist_ok=True)
            fields["isolation"] = {**view, "ro": [*own, str(self._model_root), *view.get("ro", [])]}
        try:
            # the function's environment as this node built it, not the host's paths
            reply = await sb.init({**fields, "source": source, "sys_path": self._sys_path})
        except SandboxDied as exc:
            reply = {"ok": False, "error": exc.reason, "died": True}
        if not reply.get("ok"):
            # what reached fd 1/2 while it failed (an import's C-level complaint, a crash) belongs to its logs
            reply["logs"] = list(reply.get("logs") or []) + [ln for lines in sb.stray.values() for ln in lines]
            sb.stray.clear()
        return reply

    async def execute(self, fields: dict[str, Any]) -> Any:
        """Run one activation (RUN) in the sandbox process; the RESULT fields as a msgpack body, or its death."""
        aid = str(fields["aid"])
        sb = self._sb
        if sb is None or sb.state == "dead":
            return self._died_body(aid)
        # the next RUN comes through Ray a millisecond or more later: polling for it would only take a core
        fields["spin"] = False
        ref = fields.pop("args_ref", None)
        if ref is not None:
            fields["args"] = await ref  # a large payload, through the object store
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sb.inflight[aid] = fut
        try:
            try:
                sb.send(p.RUN, fields)
            except SandboxDied:
                with anyio.move_on_after(SHUTDOWN_GRACE_S):
                    await sb.died.wait()
                return self._died_body(aid)
            out = await fut
            if isinstance(out, _Died):
                return self._died_body(aid)
            await self._drain(sb)
        finally:
            sb.inflight.pop(aid, None)
        stray = sb.take_stray(aid)
        if stray:
            logs = out.get("logs")
            out["logs"] = [*(logs if isinstance(logs, list) else []), *stray]
        body = p.encode_body(out)
        if len(body) > RAY_OBJECT_STORE_MIN_BYTES:
            # a large result goes through the object store, not back inline in the actor call's reply
            return ray.put(body)
        return body

    @staticmethod
    async def _drain(sb: Sandbox) -> None:
        """Let the pipe readers take what the function wrote to fd 1/2 before it returned (it is in the pipes
        already, but the RESULT came through the channel first), so it lands in this activation's logs."""
        proc = sb.proc
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RAY_STRAY_DRAIN_S
        while _unread_bytes(proc.stdout_fd) or _unread_bytes(proc.stderr_fd):
            if loop.time() > deadline:
                return  # something it started keeps writing: the rest goes to the next activation, as locally
            await asyncio.sleep(0)

    @ray.method(concurrency_group=RAY_CONTROL_GROUP)
    async def terminate(self) -> None:
        """Kill the sandbox process and all it started (process group, cgroup), before the host's ``ray.kill``:
        a SIGKILLed worker cannot do it, and its sandbox's children would outlive it."""
        self.kill_process()

    def kill_process(self) -> None:
        sb = self._sb
        if sb is not None and sb.proc is not None:
            sb.proc.kill()

    @ray.method(concurrency_group=RAY_CONTROL_GROUP)
    async def pid(self) -> int:
        return os.getpid()


# -- on the host --------------------------------------------------------------------------------------------------
def _view_shows(room: Mapping[str, float] | None, pg: Any) -> bool:
    """True when Ray's view of a node's room already has placement group ``pg`` in it (its ``CPU_group_<id>``
    resources): its reservation is subtracted there, not to be subtracted twice."""
    if room is None or pg is None:
        return False
    suffix = pg.id.hex()
    return any(name.endswith(suffix) for name in room)


async def _ready(value: Any) -> Any:
    """An answer already in hand, awaited as a pending call's would be."""
    return value


async def _never_placed(_actor: Any) -> bool:
    """A placement group is placed when its ready() returns: until then it waits for room."""
    return False


def describe_actor_death(name: str, exc: BaseException | None) -> tuple[str, int | None]:
    """(reason naming the actor's death, exit code when Ray reports one) from the error a pending call raised."""
    text = str(exc) if exc is not None else ""
    match = _DEATH_CAUSE.search(text)
    if match:
        cause = " ".join(match.group(1).split()).rstrip(".")
    elif exc is not None:
        cause = f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0]}".rstrip(": ")
    else:
        cause = "it was stopped"
    code = _EXIT_CODE.search(text)
    return f"the Ray actor {name} died: {cause}", int(code.group(1)) if code else None


class _AheadReservation:
    """A reservation being made ahead of cold starts (``RayLauncher.reserve_ahead``), planned onto a node as a
    sandbox's is."""

    __slots__ = ("pg",)

    def __init__(self) -> None:
        self.pg: Any = None


class RayProcess:
    """``Sandbox.proc`` of a Ray sandbox: its sandbox process on a node (``pid`` in stats and snapshots), and the
    actor's worker process supervising it."""

    how = "ray"

    def __init__(self, pid: int, actor_pid: int, node_id: str) -> None:
        self.pid = pid
        self.actor_pid = actor_pid
        self.node_id = node_id


class RaySandbox(Sandbox):
    """The host's handle on one sandbox actor, with the interface the pool and the scheduler use."""

    def __init__(self, fn_key: str, services: dict[str, HostService], backend: RayLauncher) -> None:
        super().__init__(fn_key, services)
        self.backend = backend
        self.actor: Any = None
        self.actor_name = f"minifaas-{backend.token}-{self.id}"
        self.node_id = ""
        self.launch_how = "ray"
        #: what the actor reserves on its node (known once it is created)
        self.demand: Demand | None = None
        #: which limits the actor's node could apply (its describe() says)
        self.limits: dict[str, Any] = {}
        #: the connection to the cluster was lost: the records it ends are internal_error, not the function's fault
        self.backend_lost = False
        #: keys of the shipments (bundle archive, models) this sandbox holds in the object store
        self._holds: list[str] = []
        self._reported = False
        self._reaping = False
        #: RESULT fields of pipelined runs that arrived before the run ahead of them ended, by activation id
        self._early: dict[str, dict[str, Any]] = {}
        #: forked by its node's zygote (:class:`~.raynode.NodeActor`): its id there, and the placement group
        #: holding its reservation; None: an actor of its own (a GPU function)
        self.sid: str | None = None
        self.pg: Any = None
        #: a forked sandbox started without waiting for READY: what its node actor needs to fork it, sent with the
        #: INIT (None: started already)
        self._start_config: dict[str, Any] | None = None
        #: the first activation's RUN went with the start: (its id, its RESULT body, None: still running)
        self._folded: tuple[str, Any] | None = None

    def can_serve(self, spec: FunctionSpec) -> bool:
        """Whether this generic pre-warmed (stem) actor may become ``spec``'s sandbox: only with the same CPUs, GPUs
        and custom resources, and no environment to build (its sandbox process already runs without one). Its
        memory reservation stays the stem's (the function's ``memory_mb`` still limits the sandbox process)."""
        mine, theirs = self.demand, demand_of(spec)
        return (
            spec.bundle.requirements is None
            and mine is not None
            and (mine.num_cpus, mine.num_gpus, mine.custom) == (theirs.num_cpus, theirs.num_gpus, theirs.custom)
        )

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(
        self, launcher: Launcher, env: dict[str, str], tg: anyio.abc.TaskGroup, *, wait_ready: bool = True
    ) -> float:
        """Create the actor and wait until Ray placed and started it (whatever ``wait_ready`` says: an actor's
        INIT cannot be sent ahead); returns the time that took in ms."""
        if self.state == "dead":
            raise SandboxDied("the sandbox was stopped before it started", None)
        t0 = anyio.current_time()
        self._tg = tg
        self._env = dict(env)
        fp: FunctionPool | None = self.owner
        spec = fp.spec if fp is not None else None
        demand = self.demand = demand_of(spec)
        backend = self.backend
        await backend.wait_connected()
        backend.live.add(self)
        config = {
            "model_root": str(backend.model_root),
            "env": env,
            "requirements": spec.bundle.requirements if spec is not None else None,
            "env_root": str(backend.env_root),
            "index_url": backend.index_url,
            "driver_node": backend.driver_node,
            "isolation": spec.isolation if spec is not None else "process",
        }
        if backend.node_zygotes and not demand.num_gpus:
            await self._reserve_on_node(demand, spec)
            if wait_ready:
                self._started(await self._start_on_node("start", config, budget_s=self._start_budget_s()))
            else:
                # its INIT goes with the fork, in one call (init()): a cold start crosses Ray once, not twice
                self._start_config = config
            return (anyio.current_time() - t0) * 1000
        try:
            strategy = await backend.placement(self, demand, spec)
        except RayBackendFailure as exc:
            self._report_death(exc.reason, None)
            raise
        options: dict[str, Any] = {
            "name": self.actor_name,
            "namespace": RAY_NAMESPACE,
            "max_concurrency": spec.concurrency if spec is not None else RAY_STEM_MAX_CONCURRENCY,
            "max_restarts": 0,
            "scheduling_strategy": strategy,
            **demand.actor_options(),
        }
        try:
            self.actor = backend.actor_class.options(**options).remote(config)
        except Exception as exc:  # Ray itself is gone
            reason = backend.failed(exc)
            self._report_death(reason, None)
            raise RayBackendFailure(reason, None) from None
        backend.counters["actors_started"] += 1
        try:
            info = await self._wait_started(demand, self.actor.describe.remote, self.backend.is_placed)
        except ray.exceptions.RayTaskError as exc:
            # describe() failed: the sandbox process (or the function's environment) could not be made there
            self._kill_actor()
            reason = _task_cause(exc)
            self._report_death(reason, None)
            raise SandboxDied(reason, None) from None
        except ray.exceptions.RayError as exc:
            reason, status = describe_actor_death(self.actor_name, exc)
            self._report_death(reason, status)
            raise SandboxDied(reason, status) from None
        except RayBackendFailure as exc:
            self._kill_actor()
            self._report_death(exc.reason, None)
            raise
        except BaseException:
            self._kill_actor()
            self._report_death(f"the Ray actor {self.actor_name} did not start", None)
            raise
        self._started(info)
        return (anyio.current_time() - t0) * 1000

    def _started(self, info: dict[str, Any]) -> None:
        if self.state == "dead" or self.state == "closing":
            # stopped (engine closing) while the actor was being placed: it must not outlive us
            self._kill_actor()
            raise SandboxDied("the sandbox was stopped while starting", None)
        self.proc = RayProcess(int(info["pid"]), int(info["actor_pid"]), str(info["node_id"]))  # type: ignore[assignment]
        self.node_id = str(info["node_id"])
        self.limits = dict(info.get("limits") or {})
        self.backend.placed(self, self.node_id)
        if self.sid is not None and self.demand is not None and self.owner is not None and not self.prewarmed:
            # a cold start on demand (not a pre-warm); after its start, not beside it: making one competes for the
            # cores with the start itself
            self.backend.reserve_ahead(self.demand)

    async def _reserve_on_node(self, demand: Demand, spec: FunctionSpec | None) -> None:
        """Reserve ``demand`` on one node (a placement group: no worker process) and find that node's actor, which
        forks the sandbox from its zygote (:meth:`_start_on_node`)."""
        from ray.util.placement_group import placement_group, placement_group_table

        backend = self.backend
        try:
            taken = backend.take_reservation(demand)
            if taken is None:
                node = await backend.choose_node(self, demand, spec)
                if node is None and backend.release_spare_reservations():
                    # reservations kept or made ahead are nobody's: their room goes to this start (Ray places it
                    # once it shows, without waiting out RAY_PLACEMENT_GRACE_S for an eviction)
                    node = await backend.choose_node(self, demand, spec)
                # soft: when that node filled up since we looked, another with room is as good
                target = {"_soft_target_node_id": node} if node is not None else {}
                # a call into Ray's core worker of 1-2 ms: off the event loop, which serves other activations
                make = functools.partial(placement_group, [demand.as_resources()], strategy="STRICT_PACK", **target)
                self.pg = await anyio.to_thread.run_sync(make)
            else:
                # a reservation kept from an ended sandbox: placed, and its node known
                self.pg, self.node_id = taken
        except RayBackendFailure as exc:
            self._report_death(exc.reason, None)
            raise
        except Exception as exc:  # Ray itself is gone
            reason = backend.failed(exc)
            self._report_death(reason, None)
            raise RayBackendFailure(reason, None) from None
        try:
            if taken is None:
                await self._wait_started(demand, self.pg.ready, _never_placed)
                table = await anyio.to_thread.run_sync(placement_group_table, self.pg)
                self.node_id = str(table["bundles_to_node_id"][0])
            self.actor, self.actor_name = await backend.node_actor(self.node_id)
        except RayBackendFailure as exc:
            self._report_death(exc.reason, None)
            raise
        except BaseException:
            self._report_death(f"the sandbox {self.id} was not placed on Ray", None)
            raise
        self.sid = self.id
        backend.counters["sandboxes_forked"] += 1

    async def _start_on_node(self, method: str, *args: Any, budget_s: float) -> dict[str, Any]:
        """Call the node actor's ``start`` (or ``start_init``) for this sandbox: its fork there; its reply."""
        try:
            try:
                with anyio.fail_after(budget_s):
                    reply: dict[str, Any] = await self._call(method, *args)
            except TimeoutError:
                raise RayBackendFailure(
                    f"the sandbox did not start on Ray node {self.node_id} within {budget_s:g} s", None
                ) from None
        except ray.exceptions.RayTaskError as exc:
            self._kill_actor()
            reason = _task_cause(exc)
            self._report_death(reason, None)
            raise SandboxDied(reason, None) from None
        except ray.exceptions.RayError as exc:
            # its node actor died, or is unreachable (a partition): it may hold other sandboxes, which end with it
            reason, status = self._on_call_error(exc)
            raise SandboxDied(reason, status) from None
        except RayBackendFailure as exc:
            self._kill_actor()
            self._report_death(exc.reason, None)
            raise
        except Exception as exc:  # the connection to the cluster, not the actor
            reason = self.backend.failed(exc)
            self._kill_actor()
            self._report_death(reason, None)
            raise RayBackendFailure(reason, None) from None
        except BaseException:
            self._kill_actor()
            self._report_death(f"the sandbox {self.id} did not start on Ray", None)
            raise
        return reply

    async def _wait_started(
        self, demand: Demand, call: Callable[[], Any], is_placed: Callable[[Any], Awaitable[bool]]
    ) -> dict[str, Any]:
        """Wait for ``call()`` (an actor's describe(), a placement group's ready()): evict idle sandboxes elsewhere
        while it waits for room, fail (RayBackendFailure) when no room appears within the start timeout."""
        try:
            fut = asyncio.ensure_future(call())
        except Exception as exc:  # Ray itself is gone
            raise RayBackendFailure(self.backend.failed(exc), None) from None
        evicted_at = -math.inf
        placed = False
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + RAY_START_TIMEOUT_S) as scope:
                while True:
                    with anyio.move_on_after(RAY_PLACEMENT_GRACE_S):
                        try:
                            info: dict[str, Any] = await asyncio.shield(fut)
                        except ray.exceptions.RayError:
                            raise
                        except Exception as exc:  # the connection to the cluster, not the actor
                            raise RayBackendFailure(self.backend.failed(exc), None) from None
                        return info
                    if await is_placed(self.actor):
                        if not placed:
                            # its worker runs on a node: building the function's environment there may take long
                            placed = True
                            scope.deadline = anyio.current_time() + self._start_budget_s()
                        continue
                    if await self.backend.has_room(demand):
                        continue  # the worker process is just slow to start: nothing to evict for it
                    if self._no_longer_needed():
                        self.backend.counters["starts_abandoned"] += 1
                        raise SandboxDied("abandoned: the Ray cluster had no room and nothing waits for it", None)
                    if anyio.current_time() >= evicted_at + RAY_EVICTION_SETTLE_S:
                        evicted_at = anyio.current_time()
                        await self.backend.make_room(self, demand)
        finally:
            if not fut.done():
                fut.cancel()
        assert scope.cancelled_caught
        if placed:
            raise RayBackendFailure(
                f"the Ray actor {self.actor_name} was placed on a node, but its sandbox did not start within "
                f"{self._start_budget_s():g} s",
                None,
            )
        raise RayBackendFailure(
            # capacity, not the function's fault: the record is internal_error and names the error class
            f"{Overloaded.__name__}: the Ray sandbox {self.actor_name} ({demand.describe()}) was not placed and "
            f"started within {RAY_START_TIMEOUT_S:g} s: no node of the Ray cluster had room",
            None,
        )

    def _start_budget_s(self) -> float:
        fp: FunctionPool | None = self.owner
        if fp is not None and fp.spec.bundle.requirements is not None:
            return RAY_ENV_START_TIMEOUT_S
        return RAY_START_TIMEOUT_S

    def _no_longer_needed(self) -> bool:
        fp: FunctionPool | None = self.owner
        if fp is None or self.prewarmed or fp.queue:
            return False
        return any(sb.state == "ready" for sb in fp.sandboxes)

    async def init(self, fields: dict[str, Any], timeout_s: float = math.inf) -> dict[str, Any]:
        # ``timeout_s`` is enforced inside the sandbox (the runtime's init time limit, ``fields["timeout_ms"]``)
        fp: FunctionPool | None = self.owner
        if self.node_id != self.backend.driver_node:
            # another node: the bundle and the models it names go through the object store, not as host paths
            ship = self.backend.shipments
            fields = {**fields, "source": await ship.bundle(dict(fields["source"]), self._holds)}
            if fp is not None:
                urls = [*fp.spec.params.values(), *fp.spec.models]
                try:
                    fields["ray_models"] = await ship.models(urls, self._holds)
                except ModelError as exc:
                    return {"ok": False, "error": f"a model of the function cannot be shipped to its node: {exc}"}
            view = fields.get("isolation")
            if isinstance(view, dict) and fp is not None:
                # its own bundle, environment and models are the node's: the actor adds those; the grants stay
                spec = fp.spec
                fields["isolation"] = {**view, "ro": list(spec.read_paths), "node_paths": True}
        config, self._start_config = self._start_config, None
        if self.state == "dead" or self.state == "closing":
            # stopped while its bundle was shipped: what it took then is released here (its death released the rest)
            self.backend.shipments.release(self._holds)
            self._holds.clear()
            raise SandboxDied("the sandbox was stopped before its INIT", self.exit_status)
        if config is not None:
            # the sandbox's own start budget, then the INIT's time limit (enforced inside the sandbox)
            budget_s = self._start_budget_s() + timeout_s + INIT_KILL_GRACE_S
            self.backend.counters["starts_with_init"] += 1
            run = self.claim_first_run() if self.claim_first_run is not None else None
            if run is None:
                both = await self._start_on_node("start_init", config, fields, budget_s=budget_s)
            else:
                # the request it starts for runs right after its INIT, on the node: a cold activation is one call
                self.backend.counters["starts_with_run"] += 1
                run = self._large_args(run)
                wait_s = RAY_FOLDED_RUN_WAIT_S
                both = await self._start_on_node("start_run", config, fields, run, wait_s, budget_s=budget_s + wait_s)
            self._started(both["info"])
            reply = dict(both["init"])
            if run is not None and reply.get("ok"):
                self._folded = (str(run["aid"]), both.get("run"))
                self.folded_run_ms = float(both.get("run_ms") or 0.0)
        else:
            reply = await self._init_call(fields)
        if reply.get("ok") and fields.get("isolation") is not None:
            # a generic pre-warmed sandbox shut itself in at this INIT: its records say so
            self.limits = {**self.limits, "isolation": "sandbox"}
        if reply.get("ok") and self.state == "starting":
            self.state = "ready"
        return reply

    async def _init_call(self, fields: dict[str, Any]) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = await self._call("init", fields)
        except ray.exceptions.RayError as exc:
            reason, status = self._on_call_error(exc)
            raise SandboxDied(reason, status) from None
        except Exception as exc:  # the connection to the cluster, not the actor
            reason = self.backend.failed(exc)
            raise RayBackendFailure(reason, None) from None
        return reply

    def _call(self, method: str, *args: Any) -> Any:
        """``actor.method.remote(*args)``; on a node actor, for this sandbox (its id first)."""
        bound = getattr(self.actor, method)
        return bound.remote(self.sid, *args) if self.sid is not None else bound.remote(*args)

    def kill(self, reason: str) -> None:
        if self._killed_reason is None:
            self._killed_reason = reason
        if self.state != "dead" and self.actor is not None:
            self._kill_actor()

    async def stop(self) -> None:
        """Let the runs in flight finish (up to the grace period), then kill the actor and wait for its death."""
        if self.state == "dead":
            return
        if self.actor is None:
            self._report_death("the sandbox was stopped before its actor existed", None)
            return
        self.state = "closing"
        with anyio.move_on_after(SHUTDOWN_GRACE_S):
            while self.inflight:
                await anyio.sleep(RAY_STOP_POLL_S)
        self.kill("shutdown")
        await self.died.wait()

    def _kill_actor(self) -> None:
        if self.sid is not None:
            if self.pg is not None and self.node_id:
                # its process ends with the terminate call: its reservation may serve the next cold start already
                # (a function deleted then another deployed and called: that one must not miss it by a round trip)
                pg, self.pg = self.pg, None
                self.backend.release_reservation(pg, self.demand, self.node_id)
            # one of its node actor's sandboxes: terminate it there (the node actor serves the others)
            if not self._reaping and self._tg is not None:
                self._reaping = True
                self.backend.counters["sandboxes_killed"] += 1
                self._tg.start_soon(self._terminate_forked)
            return
        if self.proc is None or self._tg is None:
            # no sandbox process yet (the actor is being placed or started): nothing to terminate first
            with contextlib.suppress(Exception):  # already dead, or the cluster is gone
                ray.kill(self.actor, no_restart=True)
        if not self._reaping and self._tg is not None:
            self._reaping = True
            self.backend.counters["actors_killed"] += 1
            self._tg.start_soon(self._confirm_death)

    async def _confirm_death(self) -> None:
        """Terminate the sandbox process, ``ray.kill`` the actor, and (that is asynchronous) ping the actor until
        Ray reports it dead (a call may still slip in)."""
        with anyio.CancelScope(shield=True):
            if self.proc is not None:
                with anyio.move_on_after(RAY_TERMINATE_TIMEOUT_S), contextlib.suppress(Exception):
                    await self.actor.terminate.remote()
                with contextlib.suppress(Exception):
                    ray.kill(self.actor, no_restart=True)
            with anyio.move_on_after(RAY_KILL_CONFIRM_TIMEOUT_S):
                while not self._reported:
                    try:
                        await self.actor.pid.remote()
                    except ray.exceptions.RayError as exc:
                        self._on_call_error(exc)
                        return
                    except Exception as exc:  # Ray itself is gone (shut down before the engine closed)
                        self._report_death(f"the Ray actor {self.actor_name} is unreachable: {exc}", None)
                        return
                    await anyio.sleep(RAY_KILL_POLL_S)
        self._report_death(f"the Ray actor {self.actor_name} was killed", None)

    async def _terminate_forked(self) -> None:
        """Kill this sandbox's process (and all it started) on its node, then report its death."""
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(RAY_TERMINATE_TIMEOUT_S):
                    await self._call("terminate")
            except ray.exceptions.RayError as exc:
                self._on_call_error(exc)
                return
            except Exception as exc:  # stuck, or the cluster is gone: the node actor cannot be trusted any more
                self.backend.drop_node(self.node_id, kill=True, actor=self.actor)
                self._report_death(f"the Ray node actor {self.actor_name} did not terminate it: {exc!r}", None)
                return
        self._report_death(f"the sandbox {self.id} on Ray node actor {self.actor_name} was killed", None)

    def _on_call_error(self, exc: ray.exceptions.RayError) -> tuple[str, int | None]:
        reason, status = describe_actor_death(self.actor_name, exc)
        if self.sid is not None:
            # dead, or unreachable (a partition): its node actor may still run this sandbox and others; killed,
            # it ends them all (their records say so) and cannot finish a run already recorded as failed
            self.backend.drop_node(self.node_id, kill=True, actor=self.actor)
            self._report_death(reason, status)
            return reason, status
        if not isinstance(exc, ray.exceptions.ActorDiedError):
            # unreachable (ActorUnavailableError: a partition), a lost object, an OOM kill of the worker: the actor
            # may still be alive; killed, it frees its resources and cannot finish a run already recorded as failed
            self._kill_actor()
        self._report_death(reason, status)
        return reason, status

    def _report_death(self, reason: str, status: int | None) -> None:
        if self._reported:
            return
        self._reported = True
        self.backend.live.discard(self)
        self.backend.planned.pop(self, None)
        if self.pg is not None:
            pg, self.pg = self.pg, None
            # kept a moment for the next cold start of the same shape: a placement group made right after one
            # was removed waits 0.5-1 s in Ray's scheduler, one reused costs nothing
            self.backend.release_reservation(pg, self.demand if self.sid is not None else None, self.node_id)
        self.backend.shipments.release(self._holds)
        self._holds.clear()
        if self._killed_reason:
            reason = f"{reason} ({self._killed_reason})"
        self.exit_status = status
        self.state = "dead"
        self._early.clear()
        err = SandboxDied(reason, status)
        self._ready.fail(err)
        self._init.fail(err)
        self.on_died(self, reason, status)
        self.died.set()
        self.closed.set()

    # -- runs ---------------------------------------------------------------------------------------------------
    def send(self, kind: int, fields: dict[str, Any]) -> None:
        if self.state == "dead" or self.actor is None or self._tg is None:
            raise SandboxDied("the sandbox is gone", self.exit_status)
        if kind == p.RUN:
            aid = str(fields["aid"])
            folded, self._folded = self._folded, None
            try:
                if folded is not None and folded[0] == aid:
                    # its start carried this RUN: the RESULT came with it, or comes with a call of its own
                    if folded[1] is None:
                        self.backend.counters["folded_runs_fetched"] += 1
                        ref = self._call("result", aid)
                    else:
                        ref = _ready(folded[1])
                else:
                    ref = self._call("execute", self._large_args(fields))
            except Exception as exc:  # Ray itself is gone
                raise SandboxDied(self.backend.failed(exc), None) from exc
            self._tg.start_soon(self._await_result, aid, ref)
        elif kind == p.SHUTDOWN:
            self._tg.start_soon(self.stop)
        else:
            raise ValueError(f"a Ray sandbox does not take {p.NAMES.get(kind, kind)} messages through send()")

    def _large_args(self, fields: dict[str, Any]) -> dict[str, Any]:
        args = fields.get("args")
        if isinstance(args, bytes) and len(args) > RAY_OBJECT_STORE_MIN_BYTES:
            # a large payload goes to the object store once, the actor call carries only its reference
            self.backend.counters["large_args_put"] += 1
            return {**fields, "args": None, "args_ref": ray.put(args)}
        return fields

    async def _await_result(self, aid: str, ref: Any) -> None:
        try:
            body: bytes = await ref
            if isinstance(body, ray.ObjectRef):
                # a large result: the actor put it into the object store
                self.backend.counters["large_results_got"] += 1
                body = await body
        except ray.exceptions.RayTaskError as exc:
            # the actor method itself failed (not the function: Runtime.execute catches that); the actor lives on
            self.on_result(
                self,
                {
                    "aid": aid,
                    "status": "developer_error",
                    "result": {"error": f"the Ray actor {self.actor_name} failed to run the activation: {exc}"},
                    "logs": [],
                },
            )
            return
        except ray.exceptions.RayError as exc:
            self._on_call_error(exc)
            return
        except Exception as exc:
            # Ray Client's ConnectionError (the connection to the cluster is lost) or another failure of Ray itself:
            # it must end this sandbox's activations, never the engine's task group
            reason = self.backend.failed(exc)
            if not self._reported:
                self.backend_lost = True
                self._kill_actor()
                self._report_death(reason, None)
            return
        fields: dict[str, Any] = p.decode_body(body)
        if "died" in fields:
            # the sandbox process under the actor ended (a crash, the memory killer): the same record as locally
            lines = fields.get("logs")
            if isinstance(lines, list) and lines:
                self.stray.setdefault(aid, []).extend(str(line) for line in lines)
            status = fields.get("exit_status")
            self._kill_actor()
            self._report_death(str(fields["died"]), status if isinstance(status, int) else None)
            return
        models = fields.get("models")
        if models is not None:
            self.models = set(models)
        ann = fields.get("annotations")
        if not isinstance(ann, dict):
            ann = fields["annotations"] = {}
        ann["ray_node_id"] = self.node_id
        ann["ray_actor"] = self.actor_name
        ann["ray_limits"] = self.limits
        if aid not in self.inflight and any(job.act.activation_id == aid for job in self.prefetched):
            # a pipelined RUN (queued behind the current one) whose RESULT overtook the current one's on the way
            # back: the scheduler begins it only when the current one ends, so hold it until then
            self._early[aid] = fields
            return
        self.on_result(self, fields)
        while self._early:
            begun = [a for a in self._early if a in self.inflight]
            if not begun:
                break
            for a in begun:
                self.on_result(self, self._early.pop(a))


class RayLauncher:
    """The Ray backend, in the engine's launcher slot: connects to Ray, makes RaySandbox handles, closes; when the
    connection to the cluster is lost, fails what ran on it and connects again."""

    name = "ray"

    def __init__(
        self,
        address: str | None,
        model_root: Path,
        env_root: Path | None = None,
        index_url: str | None = None,
        *,
        node_zygotes: bool = True,
    ) -> None:
        self.address = address
        self.model_root = model_root
        #: the engine's root of function environments (requirements.txt); other nodes build theirs under it
        self.env_root = env_root if env_root is not None else model_root.parent / "envs"
        self.index_url = index_url
        #: tells this engine's actors apart from other engines' on a shared cluster
        self.token = secrets.token_hex(4)
        self.actor_class: Any = None
        #: the node this process is a driver of (None through Ray Client): only its actors see the host's disk
        self.driver_node: str | None = None
        self.counters: dict[str, int] = {
            "actors_started": 0,
            "actors_killed": 0,
            "starts_abandoned": 0,
            "evictions_for_room": 0,
            "client_connect_retries": 0,
            "connections_lost": 0,
            "reconnects": 0,
            "node_actors_started": 0,
            "node_actors_lost": 0,
            "sandboxes_forked": 0,
            #: forked sandboxes whose INIT went to their node actor with the fork, in one call
            "starts_with_init": 0,
            #: of those, the ones whose call carried their first activation's RUN too; and the runs of them that
            #: outlasted ``RAY_FOLDED_RUN_WAIT_S`` (their RESULT came with a second call)
            "starts_with_run": 0,
            "folded_runs_fetched": 0,
            "sandboxes_killed": 0,
            "reservations_reused": 0,
            #: ready reservations made ahead of cold starts (see ``reserve_ahead``)
            "reservations_made_ahead": 0,
            "large_args_put": 0,
            "large_results_got": 0,
        }
        #: sandboxes are forked by one zygote actor per node (a function asking for GPUs gets an actor of its own)
        self.node_zygotes = node_zygotes
        #: reservations (placement groups) of forked sandboxes that ended, kept ``RAY_RESERVATION_KEEP_S`` for the
        #: next sandbox of the same shape: the Demand, the group, the time it was released
        self.spare_reservations: list[tuple[Demand, Any, float, str]] = []
        self._closed = anyio.Event()
        #: node id -> (node actor, its name), on the current connection
        self.nodes: dict[str, tuple[Any, str]] = {}
        self._node_locks: dict[str, anyio.Lock] = {}
        self.node_actor_class: Any = None
        self._closing = False
        #: sandboxes with an actor (or one being created) on the current connection
        self.live: set[RaySandbox] = set()
        #: actors packed onto a node whose reservation Ray may not show yet: node, demand, time it started (or inf)
        self.planned: dict[RaySandbox | _AheadReservation, tuple[str, Demand, float, dict[str, float]]] = {}
        #: when the recent cold starts of each shape (forked) came, and the reservations being made ahead for it
        self._cold_starts: dict[Demand, collections.deque[float]] = {}
        self._making: dict[Demand, int] = {}
        #: Ray's view of each node's free resources when last asked (what a planned sandbox saw when placed)
        self._last_view: dict[str, dict[str, float]] = {}
        self.shipments = Shipments(model_root)
        self.connected = anyio.Event()
        self.last_error = ""
        self._owns_ray = False
        #: the session folder of the local cluster this launcher started (its head node): removed at close
        self._started_session: Path | None = None
        self._pool: Pool | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def start_in(self, tg: anyio.abc.TaskGroup) -> None:
        """Connect: reuse a ``ray.init`` the application made, else start or join the cluster at ``address``."""
        if self.address and self.address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise BackendUnavailable(f"ray_address={self.address!r} needs Ray Client: pip install 'ray[client]'")
        self._tg = tg
        if not ray.is_initialized():
            await self._connect()
            self._owns_ray = True
            # ray.init() without an address joins a cluster it finds running; only one it started is ours to clean
            node = getattr(ray._private.worker, "_global_node", None)
            if node is not None and getattr(node, "head", False):
                self._started_session = _session_dir(node)
        self._connected()

    async def _connect(self) -> None:
        for attempt in range(1, RAY_CLIENT_CONNECT_ATTEMPTS + 1):
            try:
                # a worker thread: starting a local cluster takes seconds, the event loop keeps running meanwhile
                await anyio.to_thread.run_sync(lambda: ray.init(address=self.address), abandon_on_cancel=True)
                return
            except ConnectionAbortedError as exc:
                if _CLIENT_SERVER_DIED not in str(exc) or attempt == RAY_CLIENT_CONNECT_ATTEMPTS:
                    raise
                self.counters["client_connect_retries"] += 1
                await anyio.sleep(RAY_CLIENT_RETRY_PAUSE_S)

    def _connected(self) -> None:
        groups = {RAY_CONTROL_GROUP: RAY_CONTROL_CONCURRENCY}
        # made again on each connection: a Ray Client class handle belongs to the connection it was made on
        self.actor_class = ray.remote(concurrency_groups=groups)(SandboxActor)  # type: ignore[call-overload]
        from .raynode import NodeActor

        self.node_actor_class = ray.remote(concurrency_groups=groups)(NodeActor)  # type: ignore[call-overload]
        self.nodes.clear()
        forget_connection()
        client = bool(ray.util.client.ray.is_connected())  # type: ignore[no-untyped-call]
        self.driver_node = None if client else str(ray.get_runtime_context().get_node_id())
        self.connected.set()

    async def wait_connected(self) -> None:
        """Wait while the backend reconnects (up to the start timeout): then it failed, as Ray's fault."""
        if self.connected.is_set():
            return
        with anyio.move_on_after(RAY_START_TIMEOUT_S):
            await self.connected.wait()
            return
        raise RayBackendFailure(
            f"the connection to the Ray cluster is lost and was not made again within {RAY_START_TIMEOUT_S:g} s "
            f"({self.last_error})",
            None,
        )

    def failed(self, exc: BaseException) -> str:
        """A Ray call failed outside any actor. A ``ConnectionError`` (Ray Client lost its server) ends every
        sandbox of this connection (their activations: ``internal_error``) and starts connecting again."""
        reason = f"the Ray backend failed: {type(exc).__name__}: {exc}"
        if not isinstance(exc, ConnectionError):
            return reason
        reason = f"the connection to the Ray cluster was lost ({type(exc).__name__}: {exc})"
        if not self.connected.is_set():
            return reason  # already reconnecting
        self.connected = anyio.Event()
        self.last_error = reason
        self.counters["connections_lost"] += 1
        for sb in list(self.live):
            sb.backend_lost = True
            sb._report_death(reason, None)
        self.live.clear()
        self.nodes.clear()
        self.spare_reservations.clear()  # the old connection's job ended: Ray removed them
        if self._tg is not None and self._owns_ray:
            self._tg.start_soon(self._reconnect)
        return reason

    async def _reconnect(self) -> None:
        """Drop the broken connection and connect again until it works (or the engine closes)."""
        while True:
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(ray.shutdown, abandon_on_cancel=True)
            try:
                await self._connect()
                break
            except Exception as exc:
                self.last_error = f"connecting again: {type(exc).__name__}: {exc}"
                await anyio.sleep(RAY_RECONNECT_PAUSE_S)
        self.shipments = Shipments(self.model_root)  # the old connection's object references are gone with it
        self.counters["reconnects"] += 1
        self._connected()
        if self._pool is not None:
            self._pool.on_capacity()  # queued requests: start sandboxes on the new connection

    def attach(self, pool: Pool) -> None:
        """Make ``pool`` create Ray sandboxes (called by the engine once its pool exists)."""
        self._pool = pool
        pool.sandbox_factory = self.make_sandbox

    def make_sandbox(self, fn_key: str, services: dict[str, HostService]) -> Sandbox:
        return RaySandbox(fn_key, services, self)

    async def launch(self, env: Mapping[str, str]) -> Launched:
        raise RuntimeError("the Ray backend starts sandboxes as actors (RaySandbox.start), not as processes")

    async def admit(self, spec: FunctionSpec) -> None:
        """At deploy: refuse (DeployError) a function no node of the cluster could ever host."""
        if not self.connected.is_set():
            return  # reconnecting: its starts fail (internal_error) if the cluster cannot host it
        try:
            demand_of(spec)
        except ValueError as exc:
            from .._errors import DeployError

            raise DeployError(str(exc)) from None
        totals = await anyio.to_thread.run_sync(alive_node_totals)
        check_fits_some_node(spec, totals)
        if spec.isolation == "sandbox":
            await self._admit_isolation(spec, totals)

    async def _admit_isolation(self, spec: FunctionSpec, totals: Mapping[str, Mapping[str, float]]) -> None:
        """``isolation="sandbox"``: every node that could host the function must be able to set the sandbox up
        (its node actor runs the same probe as the host), else DeployError naming the node and what it lacks."""
        from .._errors import DeployError

        demand = demand_of(spec)
        if demand.num_gpus:
            return  # an actor of its own: its INIT sets the sandbox up, or fails saying why
        for node, total in sorted(totals.items()):
            if not fits(demand, total):
                continue
            try:
                actor, _name = await self.node_actor(node)
                missing = await actor.isolation_missing.remote()
            except (RayBackendFailure, ray.exceptions.RayError) as exc:
                raise DeployError(f"isolation='sandbox' could not be checked on Ray node {node}: {exc}") from None
            if missing is not None:
                raise DeployError(f"isolation='sandbox' is not available on Ray node {node}: {missing}")

    async def node_actor(self, node: str) -> tuple[Any, str]:
        """The zygote actor of ``node`` (started on first use and watched): its handle and name."""
        known = self.nodes.get(node)
        if known is not None:
            return known
        if self._closing:
            raise RayBackendFailure("the Ray backend is closing", None)
        lock = self._node_locks.setdefault(node, anyio.Lock())
        async with lock:
            known = self.nodes.get(node)
            if known is not None:
                return known
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from .raynode import NODE_ACTOR_MAX_CONCURRENCY

            name = f"minifaas-{self.token}-node-{node[:12]}"
            try:
                actor = self.node_actor_class.options(
                    name=name,
                    namespace=RAY_NAMESPACE,
                    num_cpus=0,  # its sandboxes reserve theirs (placement groups); the fork server itself idles
                    max_concurrency=NODE_ACTOR_MAX_CONCURRENCY,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                ).remote({"driver_node": self.driver_node})
            except Exception as exc:  # Ray itself is gone
                raise RayBackendFailure(self.failed(exc), None) from None
            self.counters["node_actors_started"] += 1
            try:
                with anyio.fail_after(RAY_START_TIMEOUT_S):
                    await actor.ready.remote()
            except ray.exceptions.RayError as exc:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                raise RayBackendFailure(f"the zygote actor of Ray node {node} did not start: {exc}", None) from None
            except TimeoutError:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                raise RayBackendFailure(
                    f"the zygote actor of Ray node {node} did not start within {RAY_START_TIMEOUT_S:g} s", None
                ) from None
            except Exception as exc:  # the connection to the cluster
                raise RayBackendFailure(self.failed(exc), None) from None
            if self._closing:
                # closed while it started (aclose killed the node actors it knew): this one must not outlive it
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                raise RayBackendFailure("the Ray backend is closing", None)
            self.nodes[node] = (actor, name)
            if self._tg is not None:
                self._tg.start_soon(self._watch_node, node, actor, name)
            return actor, name

    async def _watch_node(self, node: str, actor: Any, name: str) -> None:
        """When a node actor dies (its node lost, killed), end the sandboxes it held, idle ones too."""
        try:
            await actor.watch.remote()
        except ray.exceptions.RayError as exc:
            if self._closing:
                return
            self.counters["node_actors_lost"] += 1
            if self.nodes.get(node, (None, ""))[0] is actor:
                del self.nodes[node]
            reason, status = describe_actor_death(name, exc)
            for sb in list(self.live):
                if sb.actor is actor:
                    sb._report_death(reason, status)
            # reservations kept there are of no use (a lost node's are being moved by Ray)
            for entry in [e for e in self.spare_reservations if e[3] == node]:
                self.spare_reservations.remove(entry)
                self._remove_reservation(entry[1])
        except Exception:
            return  # the connection is gone: failed() ends its sandboxes

    def take_reservation(self, demand: Demand) -> tuple[Any, str] | None:
        """A kept reservation of exactly ``demand`` on a node whose zygote actor lives, and that node (None: make a
        new one). Not asked of Ray (a GCS round trip on every cold start): a lost node's actor dies with it, and its
        kept reservations are dropped then (:meth:`_watch_node`)."""
        for entry in self.spare_reservations:
            if entry[0] == demand and entry[3] in self.nodes:
                self.spare_reservations.remove(entry)
                self.counters["reservations_reused"] += 1
                return entry[1], entry[3]
        return None

    def reserve_ahead(self, demand: Demand) -> None:
        """A cold start of ``demand``'s shape took a reservation: make ready ones ahead for the next (sized from
        recent demand: as many as came in the last ``RAY_RESERVATION_KEEP_S``, at most
        ``RAY_RESERVATIONS_AHEAD_MAX``), so that a cold start finds one placed, on a node whose zygote actor runs,
        and pays neither for a placement group nor for the first start of a node actor. Each is kept as an ended
        sandbox's is, ``RAY_RESERVATION_KEEP_S``: when cold starts stop, nothing stays held."""
        if self._tg is None or self._closing or not self.connected.is_set():
            return
        now = anyio.current_time()
        recent = self._cold_starts.setdefault(demand, collections.deque())
        recent.append(now)
        while recent[0] < now - RAY_RESERVATION_KEEP_S:
            recent.popleft()
        ready = sum(1 for entry in self.spare_reservations if entry[0] == demand)
        making = self._making.get(demand, 0)
        for _ in range(min(len(recent), RAY_RESERVATIONS_AHEAD_MAX) - ready - making):
            self._making[demand] = self._making.get(demand, 0) + 1
            self._tg.start_soon(self._make_ahead, demand)

    async def _make_ahead(self, demand: Demand) -> None:
        from ray.util.placement_group import placement_group, placement_group_table

        ahead = _AheadReservation()
        try:
            # only into room free now: one made ahead never waits for room, nor takes it from a start
            node = best_fit_node(demand, await self._free_now())
            if node is None:
                return
            self.planned[ahead] = (node, demand, math.inf, dict(self._last_view.get(node, {})))
            make = functools.partial(
                placement_group, [demand.as_resources()], strategy="STRICT_PACK", _soft_target_node_id=node
            )
            ahead.pg = await anyio.to_thread.run_sync(make)
            with anyio.fail_after(RAY_PLACEMENT_GRACE_S):
                await ahead.pg.ready()
            table = await anyio.to_thread.run_sync(placement_group_table, ahead.pg)
            node = str(table["bundles_to_node_id"][0])
            self.placed(ahead, node)
            await self.node_actor(node)  # its zygote up before a cold start goes there
        except BaseException as exc:
            self.planned.pop(ahead, None)
            if ahead.pg is not None:
                self._remove_reservation(ahead.pg)
            if not isinstance(exc, Exception):
                raise
            return  # no room after all, or Ray failed: the next cold start makes its own
        finally:
            left = self._making[demand] - 1
            if left:
                self._making[demand] = left
            else:
                del self._making[demand]
        self.counters["reservations_made_ahead"] += 1
        self.release_reservation(ahead.pg, demand, node)

    def release_reservation(self, pg: Any, demand: Demand | None, node: str) -> None:
        """A forked sandbox ended: keep its reservation a moment for the next one of its shape, then remove it."""
        if (
            demand is None
            or node not in self.nodes  # its zygote actor is gone (its node lost?): no sandbox starts there now
            or self._closing
            or not self.connected.is_set()
            or self._tg is None
        ):
            self._remove_reservation(pg)
            return
        entry = (demand, pg, anyio.current_time(), node)
        self.spare_reservations.append(entry)
        self._tg.start_soon(self._expire_reservation, entry)

    async def _expire_reservation(self, entry: tuple[Demand, Any, float, str]) -> None:
        with anyio.move_on_after(RAY_RESERVATION_KEEP_S):
            await self._closed.wait()
        if entry in self.spare_reservations:
            self.spare_reservations.remove(entry)
            self._remove_reservation(entry[1])

    def release_spare_reservations(self) -> int:
        """Remove every kept reservation (a start waits for room); how many there were."""
        spares, self.spare_reservations = self.spare_reservations, []
        for _demand, pg, _t, _node in spares:
            self._remove_reservation(pg)
        return len(spares)

    @staticmethod
    def _remove_reservation(pg: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):  # the connection is gone: the cluster frees it with the job
            remove_placement_group(pg)

    def drop_node(self, node: str, *, kill: bool, actor: Any = None) -> None:
        """Forget ``node``'s actor (its next sandbox starts a new one); ``kill``: end it and what it holds.
        ``actor``: only if that is still the node's actor (not one started since)."""
        known = self.nodes.get(node)
        if known is None or (actor is not None and known[0] is not actor):
            return
        del self.nodes[node]
        if kill:
            with contextlib.suppress(Exception):
                ray.kill(known[0], no_restart=True)

    async def choose_node(self, sb: RaySandbox, demand: Demand, spec: FunctionSpec | None) -> str | None:
        """The node a new sandbox's reservation targets: packed onto the fullest node with room (best fit), or
        with ``placement="spread"`` the emptiest; None when none has room now (Ray places it where room appears,
        make_room helps); RayBackendFailure when no alive node can host it at all."""
        if spec is not None:
            totals = await anyio.to_thread.run_sync(alive_node_totals)
            if not any(fits(demand, t) for t in totals.values()):
                raise RayBackendFailure(
                    f"no alive node of the Ray cluster can host a sandbox asking for {demand.describe()}", None
                )
        spread = spec is not None and getattr(spec, "placement", "pack") == "spread"
        node = (roomiest_node if spread else best_fit_node)(demand, await self._free_now())
        if node is not None:
            self.planned[sb] = (node, demand, math.inf, dict(self._last_view.get(node, {})))
        return node

    async def _free(self) -> dict[str, dict[str, float]]:
        try:
            return await anyio.to_thread.run_sync(free_per_node)
        except Exception as exc:
            raise RayBackendFailure(self.failed(exc), None) from None

    def placed(self, sb: RaySandbox | _AheadReservation, node: str) -> None:
        entry = self.planned.get(sb)
        if entry is not None:
            # placed elsewhere than planned (it spilled): what that node looked like then is unknown
            seen = entry[3] if node == entry[0] else {}
            self.planned[sb] = (node, entry[1], anyio.current_time(), seen)

    async def _free_now(self) -> dict[str, dict[str, float]]:
        """Free resources per node, less the actors this launcher placed that Ray's view may not show yet."""
        view = await self._free()
        self._last_view = view
        free = {node: dict(room) for node, room in view.items()}
        now = anyio.current_time()
        by_node: dict[str, list[tuple[Demand, dict[str, float]]]] = {}
        for sb, (node, demand, started, seen) in list(self.planned.items()):
            if now - started > RAY_VIEW_LAG_S or _view_shows(view.get(node), sb.pg):
                del self.planned[sb]
                continue
            by_node.setdefault(node, []).append((demand, seen))
        for node, entries in by_node.items():
            room = free.get(node)
            if room is None:
                continue
            # Ray's view may show some of them already (a resource dropped since they were planned): subtract the
            # rest only, or two sandboxes packed onto one node would make it look full to the third
            for name in {n for demand, _seen in entries for n in demand.as_resources()}:
                planned = sum(demand.as_resources().get(name, 0.0) for demand, _seen in entries)
                seen_values = [seen[name] for _demand, seen in entries if name in seen]
                shown = max(0.0, max(seen_values) - view[node].get(name, 0.0)) if seen_values else 0.0
                room[name] = room.get(name, 0.0) - max(0.0, planned - shown)
        return free

    async def placement(self, sb: RaySandbox, demand: Demand, spec: FunctionSpec | None) -> Any:
        """Ray's scheduling strategy for a new actor of its own (see :meth:`choose_node`)."""
        # chosen here, not by Ray's SPREAD: that one put two actors started together on one node
        node = await self.choose_node(sb, demand, spec)
        if node is None:
            return "DEFAULT"  # no room now: Ray places it where room appears (make_room helps)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # soft, and spilling when that node is full by the time Ray places it (room taken by another engine or task
        # since we looked): elsewhere beats waiting for that node (a private option of Ray's, stable since 2.7)
        return NodeAffinitySchedulingStrategy(node_id=node, soft=True, _spill_on_unavailable=True)

    async def is_placed(self, actor: Any) -> bool:
        """True when Ray leased the actor a worker on a node (its constructor or describe() runs); False when it
        waits for room, or when that cannot be told (through Ray Client)."""
        if not self.driver_node:
            return False
        actor_id = actor._actor_id.hex()

        def placed() -> bool:
            from ray._private.state import state

            entry = state.actor_table(actor_id)
            return bool(entry and entry.get("Pid"))

        try:
            return await anyio.to_thread.run_sync(placed)
        except Exception:  # a private table of Ray's: without it, evictions decide by room alone
            return False

    async def has_room(self, demand: Demand) -> bool:
        """True when some node has the resources an actor asks for free (per node, never summed)."""
        return any(fits(demand, room) for room in (await self._free()).values())

    async def make_room(self, sb: RaySandbox, demand: Demand) -> None:
        """An actor waits for placement on a full cluster: evict idle sandboxes of other functions on the node where
        that frees enough (the fewest, least recently used first); none when no node would get enough."""
        pool = self._pool
        if pool is None:
            return
        owner: FunctionPool | None = sb.owner
        idle: list[tuple[str, Demand, float, Any]] = []
        for fp in pool.functions.values():
            if fp is owner:
                continue
            for other in fp.idle():
                if isinstance(other, RaySandbox) and other.node_id and other.demand is not None:
                    idle.append((other.node_id, other.demand, other.last_used, (fp, other)))
        for other in pool.stem:
            if isinstance(other, RaySandbox) and other.node_id and other.demand is not None:
                idle.append((other.node_id, other.demand, other.last_used, (None, other)))
        # reservations kept for reuse go first
        idle += [(e[3], e[0], -math.inf, ("spare", e)) for e in self.spare_reservations]
        for fp_, victim in evictions_for(demand, await self._free(), idle):
            if fp_ == "spare":
                if victim in self.spare_reservations:
                    self.spare_reservations.remove(victim)
                    self._remove_reservation(victim[1])
                continue
            self.counters["evictions_for_room"] += 1
            pool.stats["evictions_capacity"] += 1
            if fp_ is None:
                pool.stem.remove(victim)
                pool.tg.start_soon(victim.stop)
            else:
                pool.retire(fp_, victim)

    def stats(self) -> dict[str, Any]:
        return {
            "address": self.address or "local",
            "connected": self.connected.is_set(),
            "shipments_held": self.shipments.held(),
            "shipment_puts": self.shipments.puts,
            **self.counters,
        }

    async def aclose(self) -> None:
        self._pool = None
        self._closing = True
        self._closed.set()
        self.release_spare_reservations()
        for node in list(self.nodes):
            # their sandboxes were stopped with the pool; the zygotes go with them
            self.drop_node(node, kill=True)
        if self._owns_ray:
            self._owns_ray = False
            await anyio.to_thread.run_sync(ray.shutdown)
            session, self._started_session = self._started_session, None
            if session is not None:
                # Ray leaves a stopped session's folder (logs, sockets, unpacked bundles) in its temp dir for good
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(session, ignore_errors=True))
