"""The Ray backend: ``Engine(backend="ray")`` runs each sandbox as a Ray actor instead of a local process.

Everything above the sandbox handle is shared with the local backend: the scheduler's queues, timeouts and records,
the pool's routing, caps, keep-alive and eviction. Only the handle differs::

    Pool.sandbox_factory ---> RaySandbox (host side, a Sandbox subclass)          SandboxActor (a Ray worker process)
      start()  -------------- actor creation, wait until placed -------------> __init__: Runtime(None), capture,
      init(fields) ---------- actor.init.remote(fields, env) ---------------->   per-node model fetcher
      send(RUN, fields) ----- actor.execute.remote(fields) ------------------> Runtime.execute + result checks
      on_result(sb, fields) <- a task in the engine's task group awaits the ObjectRef (msgpack body, as locally)
      kill(reason) / stop() - ray.kill(actor, no_restart=True) --------------> worker process ends
      on_died(sb, reason) <-- an ActorDiedError on any pending call (killed, crashed, node lost)

Actors are created with the function's ``num_cpus`` (``annotations={"num_cpus": 0.5}``, default 1), ``memory`` =
``memory_mb`` MiB (a scheduling reservation: Ray's memory monitor, not an address-space limit, guards it),
``max_concurrency`` = the function's concurrency, ``max_restarts=0`` and the SPREAD strategy, so a function's
sandboxes land on different nodes. A timeout kills the actor; a dead actor ends only the activations it was running.
A pipelined RUN (queued behind a running one, see the scheduler) works too: Ray runs an actor's calls in order, and a
RESULT that overtakes the one ahead of it on the way back is held until the scheduler has begun its activation.

Requirements and limits of the backend (documented in the README by the lead):

- every node needs minifaas installed: the actor class lives in this module, so a worker imports ``minifaas``
  (about 0.35 s, once per actor) and uses ``minifaas._modelstore`` to fetch models into a store of its own node
  (``<model root>/ray-nodes/<node id>``; the model root is the engine's, created on each node);
- function bundles deployed by path are shipped to nodes that cannot see the host's bundle folder; model URLs
  must be readable from every node (http(s), s3, or a shared file system for ``file://``);
- output a function writes straight to fd 1/2 (C extensions, subprocesses) goes to Ray's worker logs, not to the
  activation's logs; ``print`` and ``sys.stdout``/``sys.stderr`` are captured as locally;
- a pending actor (the cluster has no room) waits up to ``RAY_START_TIMEOUT_S``; meanwhile idle sandboxes of other
  functions are evicted to make room, and the start is abandoned once nothing waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
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

from ._function import FunctionSpec
from ._launch import ENV_ALLOW, Launched, Launcher
from ._pool import FunctionPool, Pool
from ._sandbox import SHUTDOWN_GRACE_S, HostService, Sandbox, SandboxDied

__all__ = ("RayLauncher", "RaySandbox", "SandboxActor", "describe_actor_death")

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
#: environment variables of a Ray worker that the actor keeps besides the sandbox's own (Ray reads them)
RAY_ENV_PREFIXES: Final = ("RAY_",)
BUNDLE_CACHE_DIR: Final = "minifaas-ray-bundles"
_DEATH_CAUSE: Final = re.compile(r"The actor is dead because (.*?)(?:\s+Some common causes|\Z)", re.S)
_EXIT_CODE: Final = re.compile(r"exits? with an exit code (-?\d+)")


# -- inside the actor ---------------------------------------------------------------------------------------------
class _NodeFetcher:
    """``models`` fetcher of an actor: a ModelStore rooted in this node's own directory (once per node)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # a ModelStore's in-flight table is per event loop: one fetch at a time per actor, each in its own loop
        self._lock = threading.Lock()

    def __call__(self, url: str, sha256: str | None) -> str:
        from minifaas_sandbox.models import ModelLoadError

        from ._modelstore import ModelStore

        try:
            with self._lock:
                path = anyio.run(ModelStore(self.root).fetch, url, sha256)
        except Exception as exc:
            raise ModelLoadError(f"the node's model store could not fetch {url}: {exc}") from exc
        return str(path)


def encode_result(out: dict[str, Any], max_result_bytes: int) -> bytes:
    """The RESULT fields as one msgpack body, with ``Runtime.run``'s serializability and result-size checks."""
    try:
        body = p.encode_body(out)
    except (TypeError, ValueError, OverflowError) as exc:
        out["status"] = "developer_error"
        out["result"] = {"error": f"The action returned a result that cannot be serialized: {exc}"}
        body = p.encode_body(out)
    if len(body) > max_result_bytes:
        # the body also carries logs: only the result itself counts against the limit
        size = len(p.encode_body(out["result"]))
        if size > max_result_bytes:
            out["status"] = "developer_error"
            out["result"] = {
                "error": f"The action produced a response that exceeded the allowed length: {size} > "
                f"{max_result_bytes} bytes."
            }
            body = p.encode_body(out)
    return body


def sandbox_env_allowed(key: str) -> bool:
    """True for a variable a sandbox actor may keep from its worker's environment."""
    return key in ENV_ALLOW or key.startswith(RAY_ENV_PREFIXES)


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


class SandboxActor:
    """One sandbox as a Ray actor: a ``minifaas_sandbox`` Runtime hosted in the actor's worker process.

    Wrapped with ``ray.remote`` by :class:`RayLauncher`; the worker imports it from this module.
    """

    def __init__(self, model_root: str) -> None:
        from minifaas_sandbox import models, runtime

        self._node_id = str(ray.get_runtime_context().get_node_id())
        self._rt = runtime.Runtime(None)
        self._max_result_bytes = runtime.DEFAULT_MAX_RESULT_BYTES
        models.set_fetcher(_NodeFetcher(Path(model_root) / "ray-nodes" / self._node_id))
        # what the function prints becomes its activation's logs, exactly as in a local sandbox
        sys.stdout = runtime._Capture("stdout", self._rt, sys.stdout)
        sys.stderr = runtime._Capture("stderr", self._rt, sys.stderr)

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": self._node_id}

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return self._node_id

    def held_models(self) -> list[str]:
        from minifaas_sandbox import models

        return models.held()

    def init(self, fields: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        """Load the function (INIT); the worker's environment is scrubbed to the sandbox's as locally."""
        source = _node_source(dict(fields["source"]))
        if source is None:
            return {"ok": False, "need_bundle": True, "error": "this node cannot see the bundle folder"}
        for key in list(os.environ):
            if not sandbox_env_allowed(key):
                del os.environ[key]
        # the host's sandbox defaults (thread caps, allocator), but this node's own PATH, HOME, ...
        os.environ.update({k: v for k, v in env.items() if k not in ENV_ALLOW})
        os.environ.update({str(k): str(v) for k, v in (fields.get("env") or {}).items()})
        fields = {**fields, "source": source}
        # in_process: the environment is set above; Ray's worker needs its address space, so no RLIMIT_AS
        reply = self._rt.init(fields, in_process=True)
        if reply.get("ok") and fields["source"].get("kind") == "dir":
            with contextlib.suppress(OSError):
                os.chdir(os.path.dirname(str(fields["source"]["path"])))
        self._max_result_bytes = int(fields.get("max_result_bytes") or self._max_result_bytes)
        return reply

    def execute(self, fields: dict[str, Any]) -> bytes:
        """Run one activation (RUN) and return its RESULT fields as a msgpack body."""
        return encode_result(self._rt.execute(fields), self._max_result_bytes)


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
    """``Sandbox.proc`` of a Ray sandbox: the actor's worker process, for ``pid`` in stats and snapshots."""

    how = "ray"

    def __init__(self, pid: int, node_id: str) -> None:
        self.pid = pid
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
    async def start(self, launcher: Launcher, env: dict[str, str], tg: anyio.abc.TaskGroup) -> float:
        """Create the actor and wait until Ray placed and started it; returns the time that took in ms."""
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
        self.actor = self.backend.actor_class.options(**options).remote(str(self.backend.model_root))
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
        self.proc = RayProcess(int(info["pid"]), str(info["node_id"]))  # type: ignore[assignment]
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

    async def init(self, fields: dict[str, Any]) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = await self.actor.init.remote(fields, self._env)
            if reply.get("need_bundle"):
                # a node of another machine: ship the bundle folder (zipped once per digest)
                shipped = {**fields, "source": self.backend.ship(fields["source"])}
                reply = await self.actor.init.remote(shipped, self._env)
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
        with contextlib.suppress(Exception):  # already dead, or the cluster is gone
            ray.kill(self.actor, no_restart=True)
        if not self._reaping and self._tg is not None:
            self._reaping = True
            self.backend.counters["actors_killed"] += 1
            self._tg.start_soon(self._confirm_death)

    async def _confirm_death(self) -> None:
        """``ray.kill`` is asynchronous: ping the actor until Ray reports it dead (a call may still slip in)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(RAY_KILL_CONFIRM_TIMEOUT_S):
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
        }
        self._owns_ray = False
        self._pool: Pool | None = None
        self._archives: dict[str, bytes] = {}

    async def start_in(self, tg: anyio.abc.TaskGroup) -> None:
        """Connect: reuse a ``ray.init`` the application made, else start or join the cluster at ``address``."""
        if not ray.is_initialized():
            # a worker thread: starting a local cluster takes seconds, the event loop keeps running meanwhile
            await anyio.to_thread.run_sync(lambda: ray.init(address=self.address))
            self._owns_ray = True
        self.actor_class = ray.remote(SandboxActor)

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
