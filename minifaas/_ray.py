"""The Ray backend: ``Engine(backend="ray")`` runs each sandbox under a Ray actor instead of the local host.

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

Actors are created with the function's ``num_cpus`` (``annotations={"num_cpus": 0.5}``, default 1), ``memory`` =
``memory_mb`` MiB (a scheduling reservation; the actor's own worker comes on top), ``max_concurrency`` = the
function's concurrency (plus a small "control" group, so terminate and pings never wait behind activations),
``max_restarts=0`` and the SPREAD strategy, so a function's sandboxes land on different nodes. A timeout kills the
actor; a dead actor ends only the activations it was running. A pipelined RUN (queued behind a running one, see the
scheduler) works too: the sandbox runs them in order, and a RESULT that overtakes the one ahead of it on the way
back is held until the scheduler has begun its activation.

Requirements and limits of the backend (documented in the README by the lead):

- every node needs minifaas installed: the actor class lives in this module, so a worker imports ``minifaas``
  (about 0.35 s, once per actor), then starts the sandbox process (about 0.1 s); models are fetched into a store of
  the actor's node (``<model root>/ray-nodes/<node id>``; the model root is the engine's, created on each node);
- function bundles deployed by path are shipped to nodes that cannot see the host's bundle folder; model URLs
  must be readable from every node (http(s), s3, or a shared file system for ``file://``);
- ``ray_address="ray://host:10001"`` (Ray Client) needs ``pip install 'ray[client]'`` (grpcio);
- a pending actor (the cluster has no room) waits up to ``RAY_START_TIMEOUT_S``; meanwhile idle sandboxes of other
  functions are evicted to make room, and the start is abandoned once nothing waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import io
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
import termios
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import ray
import ray.exceptions
from minifaas_sandbox import protocol as p

from ._errors import BackendUnavailable
from ._function import FunctionSpec
from ._launch import ENV_ALLOW, Launched, Launcher, SpawnLauncher
from ._pool import FunctionPool, Pool
from ._sandbox import SHUTDOWN_GRACE_S, HostService, Sandbox, SandboxDied

__all__ = ("RayLauncher", "RaySandbox", "SandboxActor", "describe_actor_death", "node_sandbox_env")

#: Ray namespace of the named sandbox actors (``ray.util.list_named_actors(all_namespaces=True)`` lists them)
RAY_NAMESPACE: Final = "minifaas"
RAY_NUM_CPUS: Final = 1.0
#: a generic pre-warmed (stem) actor does not know its function yet: this many activations may run on it at once
RAY_STEM_MAX_CONCURRENCY: Final = 8
#: how long an actor may take to be placed and started (worker process, ``import minifaas``) before the start fails
RAY_START_TIMEOUT_S: Final = 60.0
#: an actor not started after this long is probably waiting for room: evict an idle sandbox elsewhere, re-check.
#: Ray tells "waiting for room" and "placed, worker starting" apart only through its dashboard (not in ray core), so
#: this must exceed a worker's start (0.3-2 s on 2 cores), or a placed actor is taken for a pending one
RAY_PLACEMENT_GRACE_S: Final = 3.0
#: after ``ray.kill``, how long to wait for Ray to confirm the actor is dead before treating it as dead anyway
RAY_KILL_CONFIRM_TIMEOUT_S: Final = 5.0
#: after evicting a sandbox to make room, how long Ray gets to free its resources before another one goes
RAY_EVICTION_SETTLE_S: Final = 5.0
RAY_KILL_POLL_S: Final = 0.02
RAY_STOP_POLL_S: Final = 0.01
#: the sandbox's variable naming the Ray node it runs on (also in each activation's ``ray_node_id`` annotation)
RAY_NODE_ENV: Final = "MINIFAAS_RAY_NODE_ID"
#: calls that must not wait behind running activations (terminate, ping) run in this concurrency group of the actor
RAY_CONTROL_GROUP: Final = "control"
RAY_CONTROL_CONCURRENCY: Final = 2
#: before ``ray.kill``, how long the actor gets to kill its sandbox process group (a stuck actor is killed anyway)
RAY_TERMINATE_TIMEOUT_S: Final = 2.0
#: after a RESULT, how long the actor waits at most for fd 1/2 output written before it to be read
RAY_STRAY_DRAIN_S: Final = 0.05
BUNDLE_CACHE_DIR: Final = "minifaas-ray-bundles"
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


def _node_source(source: dict[str, Any]) -> dict[str, Any] | None:
    """The INIT source as this node sees it; None for a dir bundle it cannot see when no archive came with it."""
    if source.get("kind") != "dir":
        return source
    path = str(source["path"])
    if os.path.isfile(path):
        return {"kind": "dir", "path": path}
    archive = source.get("archive")
    if not isinstance(archive, bytes):
        return None
    root = Path(tempfile.gettempdir()) / BUNDLE_CACHE_DIR
    target = root / str(source["digest"])
    entry = target / os.path.basename(path)
    if not entry.is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            zf.extractall(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another actor of this node unpacked it first
            shutil.rmtree(staging, ignore_errors=True)
    return {"kind": "dir", "path": str(entry)}


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


class SandboxActor:
    """One sandbox as a Ray actor: it supervises a real sandbox process on its node, as the local host does.

    The process is ``python -m minifaas_sandbox --fd N`` started and watched by the same :class:`Sandbox` code as
    locally (on the actor's event loop), so the memory limit (RLIMIT_AS), crash isolation, raw fd 1/2 output,
    network isolation and the pids cgroup behave identically. Wrapped with ``ray.remote`` by :class:`RayLauncher`
    (an async actor: every call runs on the event loop of its concurrency group).
    """

    def __init__(self, model_root: str, env: dict[str, str], python: str | None) -> None:
        self._node_id = str(ray.get_runtime_context().get_node_id())
        self._model_root = Path(model_root) / "ray-nodes" / self._node_id
        self._env = node_sandbox_env(env, self._node_id)
        # a function's own interpreter (its dependencies' venv) where this node has it, else the worker's
        self._python = python if python and os.access(python, os.X_OK) else None
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
            async with anyio.create_task_group() as tg:
                await sb.start(SpawnLauncher(python=self._python), self._env, tg)
                assert sb.proc is not None
                started.set_result({"pid": sb.proc.pid, "actor_pid": os.getpid(), "node_id": self._node_id})
                # the supervisor (and its task group) ends with the sandbox process: a crash, or terminate()
                await sb.died.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(RuntimeError(f"the sandbox process did not start: {exc}"))
            if not isinstance(exc, Exception):
                raise

    async def _fetch_model(self, args: dict[str, Any]) -> str:
        """The ``model.fetch`` host service of this node's sandbox: a model store of this node's own."""
        if self._store is None:
            from ._modelstore import ModelStore

            self._store = ModelStore(self._model_root)
        return str(await self._store.fetch(str(args["url"]), sha256=args.get("sha256")))

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
        source = _node_source(dict(fields["source"]))
        if source is None:
            return {"ok": False, "need_bundle": True, "error": "this node cannot see the bundle folder"}
        try:
            reply = await sb.init({**fields, "source": source})
        except SandboxDied as exc:
            reply = {"ok": False, "error": exc.reason, "died": True}
        if not reply.get("ok"):
            # what reached fd 1/2 while it failed (an import's C-level complaint, a crash) belongs to its logs
            reply["logs"] = list(reply.get("logs") or []) + [ln for lines in sb.stray.values() for ln in lines]
            sb.stray.clear()
        return reply

    async def execute(self, fields: dict[str, Any]) -> bytes:
        """Run one activation (RUN) in the sandbox process; the RESULT fields as a msgpack body, or its death."""
        aid = str(fields["aid"])
        sb = self._sb
        if sb is None or sb.state == "dead":
            return self._died_body(aid)
        # the next RUN comes through Ray a millisecond or more later: polling for it would only take a core
        fields["spin"] = False
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
        return p.encode_body(out)

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
        sb = self._sb
        if sb is not None and sb.proc is not None:
            sb.proc.kill()

    @ray.method(concurrency_group=RAY_CONTROL_GROUP)
    async def pid(self) -> int:
        return os.getpid()


# -- on the host --------------------------------------------------------------------------------------------------
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


def _num_cpus(spec: FunctionSpec | None) -> float:
    if spec is None:
        return RAY_NUM_CPUS
    value = getattr(spec, "num_cpus", None)
    if value is None:
        value = spec.annotations.get("num_cpus", RAY_NUM_CPUS)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"num_cpus must be a positive number (a fraction is fine), got {value!r}")
    return float(value)


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
        self._reported = False
        self._reaping = False
        #: RESULT fields of pipelined runs that arrived before the run ahead of them ended, by activation id
        self._early: dict[str, dict[str, Any]] = {}

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
        num_cpus = _num_cpus(spec)
        memory = (spec.memory_mb if spec is not None else 0) << 20
        total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        if total.get("CPU", 0.0) < num_cpus or total.get("memory", 0.0) < memory:
            raise SandboxDied(
                f"the Ray cluster cannot host this sandbox: it asks for {num_cpus:g} CPU and {memory >> 20} MiB, "
                f"the cluster has {total.get('CPU', 0.0):g} CPU and {int(total.get('memory', 0.0)) >> 20} MiB",
                None,
            )
        options: dict[str, Any] = {
            "name": self.actor_name,
            "namespace": RAY_NAMESPACE,
            "num_cpus": num_cpus,
            "max_concurrency": spec.concurrency if spec is not None else RAY_STEM_MAX_CONCURRENCY,
            "max_restarts": 0,
            "scheduling_strategy": "SPREAD",
        }
        if memory:
            options["memory"] = memory
        python = spec.python if spec is not None else None
        self.actor = self.backend.actor_class.options(**options).remote(str(self.backend.model_root), env, python)
        self.backend.counters["actors_started"] += 1
        try:
            info = await self._wait_started(num_cpus, memory)
        except ray.exceptions.RayError as exc:
            reason, status = describe_actor_death(self.actor_name, exc)
            self._report_death(reason, status)
            raise SandboxDied(reason, status) from None
        except BaseException:
            self._kill_actor()
            self._report_death(f"the Ray actor {self.actor_name} did not start", None)
            raise
        if self.state == "dead" or self.state == "closing":
            # stopped (engine closing) while the actor was being placed: it must not outlive us
            self._kill_actor()
            raise SandboxDied("the sandbox was stopped while starting", None)
        self.proc = RayProcess(int(info["pid"]), int(info["actor_pid"]), str(info["node_id"]))  # type: ignore[assignment]
        self.node_id = str(info["node_id"])
        return (anyio.current_time() - t0) * 1000

    async def _wait_started(self, num_cpus: float, memory: int) -> dict[str, Any]:
        fut = asyncio.ensure_future(self.actor.describe.remote())
        evicted_at = -math.inf
        try:
            with anyio.fail_after(RAY_START_TIMEOUT_S):
                while True:
                    with anyio.move_on_after(RAY_PLACEMENT_GRACE_S):
                        info: dict[str, Any] = await asyncio.shield(fut)
                        return info
                    if await self.backend.has_room(num_cpus, memory):
                        continue  # the worker process is just slow to start
                    if self._no_longer_needed():
                        self.backend.counters["starts_abandoned"] += 1
                        raise SandboxDied("abandoned: the Ray cluster had no room and nothing waits for it", None)
                    if anyio.current_time() >= evicted_at + RAY_EVICTION_SETTLE_S:
                        evicted_at = anyio.current_time()
                        self.backend.make_room(self)
        except TimeoutError:
            raise SandboxDied(
                f"the Ray actor {self.actor_name} did not start within {RAY_START_TIMEOUT_S:g} s "
                "(is the cluster full?)",
                None,
            ) from None
        finally:
            if not fut.done():
                fut.cancel()

    def _no_longer_needed(self) -> bool:
        fp: FunctionPool | None = self.owner
        if fp is None or self.prewarmed or fp.queue:
            return False
        return any(sb.state == "ready" for sb in fp.sandboxes)

    async def init(self, fields: dict[str, Any], timeout_s: float = math.inf) -> dict[str, Any]:
        # ``timeout_s`` is enforced inside the sandbox (the runtime's init time limit, ``fields["timeout_ms"]``)
        try:
            reply: dict[str, Any] = await self.actor.init.remote(fields)
            if reply.get("need_bundle"):
                # a node of another machine: ship the bundle folder (zipped once per digest)
                shipped = {**fields, "source": self.backend.ship(fields["source"])}
                reply = await self.actor.init.remote(shipped)
        except ray.exceptions.RayError as exc:
            reason, status = self._on_call_error(exc)
            raise SandboxDied(reason, status) from None
        if reply.get("ok") and self.state == "starting":
            self.state = "ready"
        return reply

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

    def _on_call_error(self, exc: ray.exceptions.RayError) -> tuple[str, int | None]:
        reason, status = describe_actor_death(self.actor_name, exc)
        if not isinstance(exc, ray.exceptions.RayActorError):
            # a lost object or an OOM kill of the worker: the actor cannot be trusted with another run
            self._kill_actor()
        self._report_death(reason, status)
        return reason, status

    def _report_death(self, reason: str, status: int | None) -> None:
        if self._reported:
            return
        self._reported = True
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
            try:
                ref = self.actor.execute.remote(fields)
            except Exception as exc:  # Ray itself is gone
                raise SandboxDied(f"the Ray actor {self.actor_name} is unreachable: {exc}", None) from exc
            self._tg.start_soon(self._await_result, str(fields["aid"]), ref)
        elif kind == p.SHUTDOWN:
            self._tg.start_soon(self.stop)
        else:
            raise ValueError(f"a Ray sandbox does not take {p.NAMES.get(kind, kind)} messages through send()")

    async def _await_result(self, aid: str, ref: Any) -> None:
        try:
            body: bytes = await ref
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
    """The Ray backend, in the engine's launcher slot: connects to Ray, makes RaySandbox handles, closes."""

    name = "ray"

    def __init__(self, address: str | None, model_root: Path) -> None:
        self.address = address
        self.model_root = model_root
        #: tells this engine's actors apart from other engines' on a shared cluster
        self.token = secrets.token_hex(4)
        self.actor_class: Any = None
        self.counters: dict[str, int] = {
            "actors_started": 0,
            "actors_killed": 0,
            "starts_abandoned": 0,
            "evictions_for_room": 0,
            "client_connect_retries": 0,
        }
        self._owns_ray = False
        self._pool: Pool | None = None
        self._archives: dict[str, bytes] = {}

    async def start_in(self, tg: anyio.abc.TaskGroup) -> None:
        """Connect: reuse a ``ray.init`` the application made, else start or join the cluster at ``address``."""
        if self.address and self.address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise BackendUnavailable(f"ray_address={self.address!r} needs Ray Client: pip install 'ray[client]'")
        if not ray.is_initialized():
            for attempt in range(1, RAY_CLIENT_CONNECT_ATTEMPTS + 1):
                try:
                    # a worker thread: starting a local cluster takes seconds, the event loop keeps running meanwhile
                    await anyio.to_thread.run_sync(lambda: ray.init(address=self.address))
                    break
                except ConnectionAbortedError as exc:
                    if _CLIENT_SERVER_DIED not in str(exc) or attempt == RAY_CLIENT_CONNECT_ATTEMPTS:
                        raise
                    self.counters["client_connect_retries"] += 1
                    await anyio.sleep(RAY_CLIENT_RETRY_PAUSE_S)
            self._owns_ray = True
        groups = {RAY_CONTROL_GROUP: RAY_CONTROL_CONCURRENCY}
        self.actor_class = ray.remote(concurrency_groups=groups)(SandboxActor)  # type: ignore[call-overload]

    def attach(self, pool: Pool) -> None:
        """Make ``pool`` create Ray sandboxes (called by the engine once its pool exists)."""
        self._pool = pool
        pool.sandbox_factory = self.make_sandbox

    def make_sandbox(self, fn_key: str, services: dict[str, HostService]) -> Sandbox:
        return RaySandbox(fn_key, services, self)

    async def launch(self, env: Mapping[str, str]) -> Launched:
        raise RuntimeError("the Ray backend starts sandboxes as actors (RaySandbox.start), not as processes")

    @staticmethod
    async def has_room(num_cpus: float, memory: int) -> bool:
        """True when the cluster has the CPUs and memory an actor asks for free (summed over nodes)."""
        free = await anyio.to_thread.run_sync(ray.available_resources)
        return bool(free.get("CPU", 0.0) >= num_cpus and free.get("memory", 0.0) >= memory)

    def make_room(self, sb: RaySandbox) -> None:
        """An actor waits for placement on a full cluster: evict one idle sandbox of another function."""
        fp: FunctionPool | None = sb.owner
        if self._pool is not None and fp is not None and self._pool._evict(fp, 1, 0):
            self.counters["evictions_for_room"] += 1

    def ship(self, source: dict[str, Any]) -> dict[str, Any]:
        """Attach a zip of a dir bundle, for nodes that cannot see the host's bundle folder (one zip per digest)."""
        if source.get("kind") != "dir":
            return source
        folder = Path(str(source["path"])).parent
        digest = folder.name
        archive = self._archives.get(digest)
        if archive is None:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(folder.rglob("*")):
                    if f.is_file() and "__pycache__" not in f.parts:
                        zf.write(f, f.relative_to(folder).as_posix())
            archive = self._archives[digest] = buf.getvalue()
        return {**source, "archive": archive, "digest": digest}

    def stats(self) -> dict[str, Any]:
        return {"address": self.address or "local", **self.counters}

    async def aclose(self) -> None:
        self._pool = None
        if self._owns_ray:
            self._owns_ray = False
            await anyio.to_thread.run_sync(ray.shutdown)
