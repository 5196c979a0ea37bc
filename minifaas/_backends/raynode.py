"""One long-lived Ray actor per node (and engine) that forks that node's sandboxes from minifaas's own zygote.

Starting a Ray actor per sandbox costs a new worker process, ``import minifaas`` and a fresh interpreter for the
sandbox: about a second. A :class:`NodeActor` pays that once per node: it runs a
:class:`~minifaas._core.zygote.ZygoteLauncher` (the same fork server as the local host) and holds the node's
sandboxes, each supervised by a :class:`~.ray.SandboxActor` object living inside it (not an actor of its own). The
host calls it with the sandbox's id::

    RaySandbox --start(sid, config)--> NodeActor --ZygoteLauncher.launch--> zygote --fork--> sandbox
               --init/execute(sid, ..)-->          SandboxActor(sid) ------ channel -------> sandbox
               --terminate(sid)-------->           kills its process group / cgroup

A cold start is one call, ``start_run(sid, config, INIT, RUN)``: the fork, the INIT and (when it succeeded) the
activation that caused the start, whose RESULT comes back with the call (or, for a run longer than the call waits,
with ``result(sid, aid)``).

What a sandbox reserves (CPUs, memory, custom resources) is a placement group of one bundle on that node (see
:class:`~.ray.RaySandbox`): Ray's view of each node's room stays exact while no worker process is started for it. A
function asking for GPUs keeps an actor of its own, which Ray assigns its GPU ids to.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import ray
from minifaas_sandbox import protocol as p

from .._core.zygote import DEFAULT_PRELOAD, ZygoteLauncher
from .._errors import DeployError
from .ray import RAY_CONTROL_GROUP, SandboxActor, _mark_asyncio

__all__ = ("NODE_ACTOR_MAX_CONCURRENCY", "NodeActor")

#: calls one node actor serves at once (activations of all its sandboxes, starts, one watch per host)
NODE_ACTOR_MAX_CONCURRENCY: Final = 1000
#: spares the node's zygote keeps forked ahead (a burst of cold starts beyond them waits for forks)
NODE_MAX_SPARES: Final = 4
#: ids of sandboxes terminated before they started, remembered (so that a late start refuses): the latest this many
NODE_ENDED_KEPT: Final = 10_000


class NodeActor:
    """A node's zygote and the sandboxes it forked (wrapped with ``ray.remote`` by :class:`~.ray.RayLauncher`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        #: what the host passed (its driver node): kept for the record of what this actor serves
        self.config = dict(config)
        self._node_id = str(ray.get_runtime_context().get_node_id())
        self._sandboxes: dict[str, SandboxActor] = {}
        #: sandboxes terminated before their start arrived (a start and a terminate run in different groups)
        self._ended: dict[str, None] = {}
        self._zygote: ZygoteLauncher | None = None
        self._service: asyncio.Task[None] | None = None
        self._up: asyncio.Future[None] | None = None
        self._isolation_missing: str | None = None
        self._probed = False
        #: a sandbox's first activation, run by :meth:`start_run` and not ended within its wait: (its id, its task)
        self._runs: dict[str, tuple[str, asyncio.Task[Any]]] = {}
        #: calls served, by method (a cold start is one call: tests and ``ready()`` read it)
        self.calls: collections.Counter[str] = collections.Counter()

    async def ready(self) -> dict[str, Any]:
        """Start the zygote (first call only) and wait until it can fork; this node actor and its zygote's stats."""
        zygote = await self._zygote_up()
        return {"node_id": self._node_id, "pid": os.getpid(), "zygote": zygote.stats(), "calls": dict(self.calls)}

    async def _zygote_up(self) -> ZygoteLauncher:
        # not ready(): its stats read each spare's smaps (about 0.7 ms a spare), a cold start must not pay that
        if self._up is None:
            self._up = asyncio.get_running_loop().create_future()
            # the actor owns the zygote's task group; it runs until the worker ends
            self._service = asyncio.ensure_future(self._serve(self._up))
        await asyncio.shield(self._up)
        assert self._zygote is not None
        return self._zygote

    async def _serve(self, up: asyncio.Future[None]) -> None:
        _mark_asyncio()
        try:
            async with anyio.create_task_group() as tg:
                zygote = ZygoteLauncher(preload=DEFAULT_PRELOAD, max_spares=NODE_MAX_SPARES)
                await zygote.start_in(tg)
                self._zygote = zygote
                await zygote._ensure_zygote()  # a fork server that cannot start falls back to spawning
                up.set_result(None)
                await anyio.sleep_forever()
        except BaseException as exc:
            if not up.done():
                up.set_exception(RuntimeError(f"the zygote of Ray node {self._node_id} did not start: {exc}"))
            if not isinstance(exc, Exception):
                raise

    async def start(self, sid: str, config: dict[str, Any]) -> dict[str, Any]:
        """Fork sandbox ``sid`` from this node's zygote (as ``SandboxActor.describe``: its INIT waits for READY)."""
        self.calls["start"] += 1
        return await self._start(sid, config)

    async def _start(self, sid: str, config: dict[str, Any]) -> dict[str, Any]:
        zygote = await self._zygote_up()
        if config.get("isolation") == "sandbox":
            missing = await self.isolation_missing()
            if missing is not None:
                raise RuntimeError(f"isolation='sandbox' is not available on Ray node {self._node_id}: {missing}")
        if sid in self._ended:
            # terminated while its start was on the way (the control group runs apart): it must not run unowned
            raise RuntimeError(f"the sandbox {sid} was stopped while it started on Ray node {self._node_id}")
        sandbox = self._sandboxes[sid] = SandboxActor(config, launcher=zygote)
        try:
            info = await sandbox.describe()
        except BaseException:
            self._sandboxes.pop(sid, None)
            raise
        if self._sandboxes.get(sid) is not sandbox:
            # terminated while it was being forked (before it had a process to kill)
            sandbox.kill_process()
            raise RuntimeError(f"the sandbox {sid} was stopped while it started on Ray node {self._node_id}")
        return info

    async def start_init(self, sid: str, config: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """:meth:`start` then :meth:`init` in one call (a cold start: one round trip through Ray, not two; INIT
        goes out right after the fork, as a local cold start's does): ``{"info": describe, "init": INIT reply}``."""
        self.calls["start_init"] += 1
        info = await self._start(sid, config)
        return {"info": info, "init": await self._init(sid, fields)}

    async def start_run(
        self, sid: str, config: dict[str, Any], fields: dict[str, Any], run: dict[str, Any], wait_s: float
    ) -> dict[str, Any]:
        """A cold activation in one call: :meth:`start_init`, then (the INIT done) the activation's RUN, its
        deadline counted from now (``run["timeout_ms"]``). ``"run"``: its RESULT as :meth:`execute` answers, when
        it ends within ``wait_s``; else None and :meth:`result` answers it. ``"run_ms"``: how long it ran here."""
        self.calls["start_run"] += 1
        info = await self._start(sid, config)
        out: dict[str, Any] = {"info": info, "init": await self._init(sid, fields)}
        if not out["init"].get("ok"):
            return out  # an INIT that failed: the activation never ran, the host records that failure
        run = dict(run)
        run["deadline"] = time.time_ns() // 1_000_000 + int(run.pop("timeout_ms"))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # owned by this actor until it ends here or result() hands it over
        task = asyncio.ensure_future(self._execute(sid, run))
        await asyncio.wait({task}, timeout=wait_s)
        out["run_ms"] = (loop.time() - t0) * 1000
        if task.done() and task.exception() is None:
            out["run"] = task.result()
        else:
            # still running (or failed: result() raises it, as execute would have)
            self._runs[sid] = (str(run["aid"]), task)
            out["run"] = None
        return out

    async def result(self, sid: str, aid: str) -> Any:
        """The RESULT of sandbox ``sid``'s first activation, begun by :meth:`start_run`, as :meth:`execute`'s."""
        self.calls["result"] += 1
        pending = self._runs.get(sid)
        if pending is None or pending[0] != aid:
            gone = f"the sandbox process is gone from Ray node {self._node_id}"
            return p.encode_body({"aid": aid, "died": gone, "exit_status": None, "logs": []})
        try:
            return await pending[1]
        finally:
            self._runs.pop(sid, None)

    async def init(self, sid: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.calls["init"] += 1
        return await self._init(sid, fields)

    async def _init(self, sid: str, fields: dict[str, Any]) -> dict[str, Any]:
        sandbox = self._sandboxes.get(sid)
        if sandbox is None:
            return {"ok": False, "error": f"no sandbox {sid} on Ray node {self._node_id}"}
        return await sandbox.init(fields)

    async def execute(self, sid: str, fields: dict[str, Any]) -> Any:
        self.calls["execute"] += 1
        return await self._execute(sid, fields)

    async def _execute(self, sid: str, fields: dict[str, Any]) -> Any:
        sandbox = self._sandboxes.get(sid)
        if sandbox is None:
            gone = f"the sandbox process is gone from Ray node {self._node_id}"
            return p.encode_body({"aid": str(fields["aid"]), "died": gone, "exit_status": None, "logs": []})
        return await sandbox.execute(fields)

    async def isolation_missing(self) -> str | None:
        """What stops ``isolation="sandbox"`` on this node (None: nothing), probed once (the host's own probe,
        ``minifaas_sandbox.isolation --probe``, run here)."""
        if not self._probed:
            from .._deploy.isolation import require_sandbox

            try:
                await anyio.to_thread.run_sync(require_sandbox)
            except DeployError as exc:
                self._isolation_missing = str(exc)
            self._probed = True
        return self._isolation_missing

    async def watch(self) -> None:
        """Never returns: the host's pending call fails when this actor dies (its node lost, killed)."""
        await asyncio.Event().wait()

    @ray.method(concurrency_group=RAY_CONTROL_GROUP)
    async def terminate(self, sid: str) -> None:
        """Kill sandbox ``sid``'s process and all it started; forget it."""
        sandbox = self._sandboxes.pop(sid, None)
        self._runs.pop(sid, None)  # its first run ends with the process (a death answer nobody fetches)
        if sandbox is not None:
            sandbox.kill_process()
        else:
            self._ended[sid] = None  # its start may still be on the way: it refuses
            if len(self._ended) > NODE_ENDED_KEPT:
                self._ended.pop(next(iter(self._ended)), None)

    @ray.method(concurrency_group=RAY_CONTROL_GROUP)
    async def pid(self) -> int:
        return os.getpid()
