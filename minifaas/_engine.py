"""The Engine: the public, async-first facade over the scheduler, the pool, the store and the launchers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import anyio
import anyio.abc

from ._core.activation import Activation, new_activation_id
from ._core.cpus import CpuKeeper
from ._core.function import DEFAULTS, FunctionSpec
from ._core.gpus import GpuSandbox, GpuShares, host_gpus
from ._core.launch import Launcher, SpawnLauncher
from ._core.poll import HOST_POLL_US
from ._core.poll import install as install_polling
from ._core.poll import uninstall as uninstall_polling
from ._core.pool import KEEPALIVE_POLICIES, MAX_SANDBOXES_TOTAL, Pool
from ._core.readstore import ReadOnlyStore
from ._core.resources import validate_resources
from ._core.sandbox import CALLER_ARG, HostService
from ._core.scheduler import ENGINE_MAX_QUEUED, Scheduler
from ._core.statedir import claim_state_dir, make_private
from ._core.statelock import StateDirLock
from ._core.store import ActivationStore, open_store
from ._deploy.bundle import Bundle, load_bundle
from ._deploy.callables import callable_bundle, pickle_callable, sandbox_sys_path
from ._deploy.deps import default_env_root, ensure_env
from ._deploy.fetchguard import REDIRECT_GUARD, check_allow_list, check_model_url, redirect_checker
from ._deploy.gc import GC_BUDGET_BYTES, EnvHolds, GcReport, Roots, collect, touch
from ._deploy.isolation import (
    Isolation,
    check_grants,
    check_isolation,
    interpreter_paths,
    own_paths,
    require_sandbox,
)
from ._deploy.versions import ALIASES_FILE_NAME, AliasTable, Routing, split_ref
from ._errors import (
    ActivationError,
    ActivationNotFound,
    ActivationTimeout,
    BackendUnavailable,
    CompositionError,
    DeployError,
    EngineClosed,
    FunctionNotFound,
    StateDirReadOnly,
)
from ._events.triggers import TriggerManager
from ._handles import FUNCTION_OPTIONS_ATTR, Function
from ._map import MapIterator
from ._workflows.conductor import CONDITIONS, DEFAULT_MAX_STEPS, SESSION_ABORTED_MESSAGE, call_composition
from ._workflows.saved import COMPOSITIONS_SUBDIR, CompositionFiles, SavedComposition, check_lossless
from ._workflows.sequence import (
    COMPONENT_NOT_FOUND,
    IS_CYCLIC,
    MAX_ATOMIC_ACTIONS,
    NO_COMPONENT,
    TOO_LONG,
    SequenceSpec,
    atomic_count,
    run_sequence,
)
from ._workflows.sessions import Session, SessionStore
from .composer import Composition
from .composer import task as _as_composition

__all__ = ("Activations", "Engine")

CLOSE_TIMEOUT_S: Final = 10.0
#: manifest parameters ending so are model digests, final like the models themselves
SHA256_PARAM_SUFFIX: Final = "_sha256"
#: how often a read-only engine re-reads a record another engine runs, while waiting for its end
READ_ONLY_POLL_S: Final = 0.05
#: a name, or ``package/name`` (the dev server's packages), or ``namespace/package/name`` (its system catalog)
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,255}(/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,255}){0,2}$")
ENGINE_CLOSED_MESSAGE: Final = "the engine closed before this activation finished"
ENGINE_DIED_MESSAGE: Final = "the host stopped before this session finished (recovered at start-up)"
BACKENDS: Final = ("local", "ray")

_logger = logging.getLogger("minifaas.engine")


class Activations:
    """``engine.activations``: read and wait for activation records."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def get(self, activation_id: str, *, namespace: str | None = None) -> Activation:
        """The record; with ``namespace``, one of another namespace is not found (ActivationNotFound), like a
        missing one, so a caller cannot learn that it exists. ``namespace=None`` reads every namespace."""
        job = self._engine._sched.jobs.get(activation_id) if self._engine._sched else None
        if job is not None and (namespace is None or job.act.namespace == namespace):
            return job.act
        act = self._engine._store_or_raise().get(activation_id, namespace=namespace)
        if act is None:
            raise ActivationNotFound(f"no activation with id {activation_id!r}")
        return act

    async def wait(self, activation_id: str, timeout_s: float | None = 60.0) -> Activation:
        session_done = self._engine._session_done.get(activation_id)
        if session_done is not None:
            with anyio.move_on_after(timeout_s) as scope:
                await session_done.wait()
            if scope.cancelled_caught:
                raise ActivationTimeout(f"session {activation_id} has not ended after {timeout_s} s")
            return await self.get(activation_id)
        sched = self._engine._sched
        job = sched.jobs.get(activation_id) if sched else None
        if job is not None:
            with anyio.move_on_after(timeout_s) as scope:
                await job.done.wait()
            if scope.cancelled_caught:
                raise ActivationTimeout(f"activation {activation_id} has not ended after {timeout_s} s")
            return job.act
        act = await self.get(activation_id)
        if not act.done and self._engine.read_only:
            # the engine holding the state dir runs it: its commits show up in the read-only store
            with anyio.move_on_after(timeout_s):
                while not act.done:
                    await anyio.sleep(READ_ONLY_POLL_S)
                    act = await self.get(activation_id)
            if not act.done:
                raise ActivationTimeout(f"activation {activation_id} has not ended after {timeout_s} s")
        if not act.done:
            # a pending record whose job is gone belongs to an earlier host: recover() ends those at start
            raise ActivationTimeout(f"activation {activation_id} is {act.status} and not running here")
        return act

    async def list(
        self,
        name: str | None = None,
        *,
        limit: int = 30,
        skip: int = 0,
        since: int | None = None,
        upto: int | None = None,
        namespace: str | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> list[Activation]:
        """Newest first; ``ended=True`` pages over ended activations only (in the store's query); ``cause``
        selects those of one map (its ``map_id``) or one trigger fire."""
        return self._engine._store_or_raise().list(
            name=name, namespace=namespace, limit=limit, skip=skip, since=since, upto=upto, ended=ended, cause=cause
        )

    async def count(
        self,
        name: str | None = None,
        *,
        since: int | None = None,
        upto: int | None = None,
        namespace: str | None = None,
        ended: bool = False,
    ) -> int:
        """How many records ``list`` finds, counted by the store (no record is decoded)."""
        return self._engine._store_or_raise().count(name=name, namespace=namespace, since=since, upto=upto, ended=ended)


class Engine:
    """An embeddable FaaS runtime: ``async with Engine() as engine: await engine.invoke(...)``.

    ``state_dir=None`` keeps everything in memory; a path keeps activation records (SQLite), unpacked bundles,
    the model store and deployed compositions there, so records survive a restart of the host process and
    compositions are deployed again when an engine starts on it.

    One engine holds a state dir at a time (``engine.lock``; a second gets :class:`StateDirLocked`).
    ``read_only=True`` opens one another engine holds (what the CLI's ``--local`` read commands do while
    ``minifaas serve`` runs): it reads records, sessions, compositions, triggers and rules and keeps deploys in
    memory, writes nothing to the dir, starts no sandbox and raises :class:`StateDirReadOnly` when asked to run a
    function.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        namespace: str = "guest",
        backend: Literal["local", "ray"] = "local",
        launcher: Literal["auto", "spawn", "zygote"] = "auto",
        preload: tuple[str, ...] | None = None,
        max_sandboxes: int = MAX_SANDBOXES_TOTAL,
        memory_budget_mb: int | None = None,
        max_queued: int = ENGINE_MAX_QUEUED,
        idle_timeout_s: float | None = None,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        ray_address: str | None = None,
        clock: Any = None,
        routing_seed: int | None = None,
        pip_index_url: str | None = None,
        pip_allow_index_options: bool = False,
        gc_budget_bytes: int = GC_BUDGET_BYTES,
        keepalive: Literal["fixed", "histogram"] = "fixed",
        prewarm: int = 0,
        poll_us: int = HOST_POLL_US,
        min_spares: int = 1,
        max_spares: int = 8,
        isolation: Isolation = "process",
        read_only: bool = False,
        model_url_allow: Iterable[str] | None = None,
        keep_warm_cores: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "ray":
            try:
                importlib.import_module("ray")
            except ImportError:
                raise BackendUnavailable("backend='ray' needs Ray: pip install 'minifaas[ray]'") from None
        if launcher not in ("auto", "spawn", "zygote"):
            raise ValueError(f"unknown launcher {launcher!r}; choose auto, spawn or zygote")
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        if read_only and self.state_dir is None:
            raise ValueError("read_only=True needs a state_dir to read")
        #: reads a state dir another engine holds: runs nothing, writes nothing (see the class docstring)
        self.read_only = read_only
        self.namespace = namespace
        self.backend = backend
        self.launcher_name = launcher
        #: the isolation of functions deployed without their own (``deploy(..., isolation=...)``)
        self.isolation: Isolation = _engine_isolation(isolation)
        #: the origins the host fetches model URLs from for functions deployed without their own allow-list
        self.model_url_allow = check_allow_list(model_url_allow)
        self.preload = preload
        self.max_sandboxes = max_sandboxes
        self.memory_budget_mb = memory_budget_mb
        self.max_queued = max_queued
        self.idle_timeout_s = idle_timeout_s
        self.close_timeout_s = close_timeout_s
        self.ray_address = ray_address
        #: fake time (e.g. minifaas.testing.FakeClock): keep-alive reads its ``monotonic()`` (else ``now()``), triggers
        #: its wall ``now()`` and ``sleep()``; None = real time
        self.clock = clock
        #: pip's index for functions with a requirements.txt; None = pip's configuration (PIP_INDEX_URL...)
        self.pip_index_url = pip_index_url
        #: let a bundle's requirements.txt choose pip's index (--index-url, --find-links...): off, it is the host's pip
        self.pip_allow_index_options = pip_allow_index_options
        if gc_budget_bytes < 0:
            raise ValueError("gc_budget_bytes must be >= 0")
        #: staged bundles, environments and model files no deployed function uses go beyond this (see gc())
        self.gc_budget_bytes = gc_budget_bytes
        self._env_holds = EnvHolds()
        # seeded, the traffic split of aliases replays the same version sequence (tests, simulations)
        self._aliases = AliasTable(rng=random.Random(routing_seed))
        if keepalive not in KEEPALIVE_POLICIES:
            raise ValueError(f"unknown keep-alive policy {keepalive!r}; choose {', '.join(KEEPALIVE_POLICIES)}")
        self.keepalive = keepalive
        if not 0 <= min_spares <= max_spares:
            raise ValueError(f"spares need 0 <= min_spares <= max_spares, got {min_spares} and {max_spares}")
        #: the zygote keeps between these many children forked ahead, sized by the bursts of cold starts
        self.min_spares, self.max_spares = min_spares, max_spares
        if prewarm < 0:
            raise ValueError("prewarm must be >= 0")
        self.prewarm = prewarm
        #: pin a sandbox running flat out to a core of its own and keep cold starts, spares and the other sandboxes
        #: on the rest (local backend, two cores or more: see minifaas._core.cpus)
        self.keep_warm_cores = keep_warm_cores
        self._cpus: CpuKeeper | None = None
        if poll_us < 0:
            raise ValueError("poll_us must be >= 0")
        #: the event loop polls for a result around when it is due, this long either side (0: never; see _poll)
        self.poll_us = poll_us
        self._polling_loop: asyncio.AbstractEventLoop | None = None
        self.activations = Activations(self)
        self._functions: dict[str, list[FunctionSpec]] = {}
        self._compositions: dict[str, tuple[Composition, dict[str, Any], int]] = {}
        #: composition name -> how its conditions read a value ("js" truthiness unless deployed "strict")
        self._conditions: dict[str, str] = {}
        #: composition name -> its version and deploy record (also what the state dir keeps of it)
        self._composition_records: dict[str, SavedComposition] = {}
        self._saved_compositions = CompositionFiles(None)
        self._session_done: dict[str, anyio.Event] = {}
        #: what a sandbox may ask of the host (``minifaas_sandbox.host_call``), by method name
        self._services: dict[str, HostService] = {}
        #: OpenWhisk sequences (``deploy_sequence``), by name
        self._sequences: dict[str, SequenceSpec] = {}
        #: ``ref -> (name, default parameters)``: the dev server's packages and bindings (see ``set_resolver``)
        self._resolver: Callable[[str], tuple[str, dict[str, Any]]] | None = None
        #: composition sessions (traces of the path taken), by session id = primary activation id
        self.sessions = SessionStore()
        #: triggers, rules and feeds (event-driven invocation); created when the engine starts
        self.triggers: TriggerManager | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: what ``__aenter__`` started, undone in reverse order by ``__aexit__``
        self._stack: contextlib.AsyncExitStack | None = None
        self._store_closed = False
        self._state_lock: StateDirLock | None = None
        self._store: ActivationStore | None = None
        self._sched: Scheduler | None = None
        self._pool: Pool | None = None
        self._launcher: Launcher | None = None
        self._work_dir: Path | None = None
        self._tmp_dir: str | None = None
        self._closing = False
        self._model_store: Any = None
        self._gpu_shares: GpuShares | None = None
        self.started_at = 0.0
        self._end_hooks: list[Callable[[Activation], None]] = []
        #: running maps by id (weakly: a map its consumer dropped goes away with it)
        self._maps: weakref.WeakValueDictionary[str, MapIterator] = weakref.WeakValueDictionary()
        #: the options each callable version was deployed with, to tell an identical re-deploy
        self._options_of: dict[tuple[str, str], str] = {}
        self.recovered = 0
        self._clock_unsubscribe: Any = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        """Start every part in order; a failure on the way closes what was started (nothing is left running)."""
        if self._stack is not None or self._closing:
            raise RuntimeError("the engine is already started (an Engine is started once)")
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.read_only:
                    store = await self._enter_read_only(stack)
                elif self.state_dir is not None:
                    self.state_dir.mkdir(parents=True, exist_ok=True)
                    lock = self._state_lock = StateDirLock(self.state_dir)
                    lock.acquire()  # before recover(): it ends the pending records of any engine but a dead one
                    stack.callback(lock.release)
                    claim_state_dir(self.state_dir, self.namespace)
                    self._work_dir = self.state_dir / "bundles"
                    self._work_dir.mkdir(exist_ok=True)
                else:
                    self._tmp_dir = tmp_dir = tempfile.mkdtemp(prefix="minifaas-")
                    stack.callback(shutil.rmtree, tmp_dir, ignore_errors=True)
                    self._work_dir = Path(tmp_dir) / "bundles"
                    self._work_dir.mkdir()
                if not self.read_only:
                    store = self._store = open_store(self.state_dir)
                    stack.push_async_callback(self._close_store)
                    if self.state_dir is not None:
                        self._aliases = AliasTable(self.state_dir / ALIASES_FILE_NAME, rng=self._aliases.rng)
                    self.recovered = store.recover()
                    # what killed builds and downloads left, and unused things over the budget (nothing deployed yet)
                    await self.gc()
                    if self.state_dir is not None:
                        self.sessions = SessionStore(self.state_dir / "sessions.sqlite3")
                        make_private(self.state_dir)
                        self.sessions.recover(ENGINE_DIED_MESSAGE)
                        self._saved_compositions = CompositionFiles(self.state_dir / COMPOSITIONS_SUBDIR)
                        # before the feeds resume: a rule targeting a composition finds it without a redeploy
                        self._restore_compositions(self._saved_compositions)
                stack.callback(self.sessions.close)
                # a read-only engine's launcher is never asked to launch (nothing runs), and starts no zygote
                self._launcher = SpawnLauncher(()) if self.read_only else self._make_launcher()
                # the task group lives exactly as long as the engine's ``async with``; everything registered after it
                # is undone before it exits (its tasks are cancelled then)
                tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(tg.cancel_scope.cancel)
                start_in = getattr(self._launcher, "start_in", None)
                if start_in is not None:
                    await start_in(tg)
                stack.push_async_callback(self._close_launcher)
                services = self._services
                services["model.fetch"] = self._svc_model_fetch
                self._pool = Pool(
                    tg,
                    self._launcher,
                    services,
                    max_total=self.max_sandboxes,
                    memory_budget_mb=self.memory_budget_mb,
                    now=_monotonic_of(self.clock),
                    keepalive=self.keepalive,
                    idle_timeout_s=self.idle_timeout_s,
                    prewarm=self.prewarm,
                )
                stack.push_async_callback(self._close_pool)
                spares_mb = getattr(self._launcher, "spares_mb", None)
                if spares_mb is not None:
                    self._pool.reserved_mb = spares_mb  # idle spares are reported against the memory budget
                attach = getattr(self._launcher, "attach", None)
                if attach is not None:
                    attach(self._pool)  # a backend (Ray) makes its own sandbox handles: pool.sandbox_factory
                else:
                    self._share_gpus(self._pool, await anyio.to_thread.run_sync(host_gpus))
                if self.clock is not None and hasattr(self.clock, "on_advance"):
                    # the clock may outlive this engine (a session fixture): the engine drops its listener on close
                    self._clock_unsubscribe = self.clock.on_advance(self._pool.wake_reaper)
                    stack.callback(self._drop_clock_listener)
                polling = self.backend == "local" and self.poll_us > 0
                self._sched = Scheduler(
                    tg,
                    self._pool,
                    store,
                    max_queued=self.max_queued,
                    on_end=self._on_end,
                    poll_us=self.poll_us if polling else 0,
                )
                tg.start_soon(self._pool.reaper, name="minifaas-reaper")
                if self.keep_warm_cores and self.backend == "local" and not self.read_only:
                    zygote_pids = getattr(self._launcher, "zygote_pids", None)
                    keeper = CpuKeeper(self._pool, zygote_pids if callable(zygote_pids) else list)
                    if keeper.enabled:
                        self._cpus = keeper
                        self._pool.on_busy = keeper.wake
                        tg.start_soon(keeper.run, name="minifaas-cpus")
                loop = asyncio.get_running_loop()
                if polling and install_polling(loop, id(self), self._sched.poll_window):
                    self._polling_loop = loop
                    stack.callback(self._uninstall_polling)
                self.triggers = TriggerManager(
                    self.submit,
                    state_dir=self.state_dir,
                    task_group=tg,
                    clock=self.clock,
                    wait=self._await_end,
                    # read-only: the triggers and rules are listed, their feeds never start (the holder runs them)
                    exists=(lambda name: False) if self.read_only else self._target_exists,
                )
                # a clean close drains first (aclose); a failed start skips that and only undoes what was started
                stack.push_async_callback(self.aclose)
                self._stack = stack.pop_all()
        except BaseExceptionGroup as group:
            # the task group wraps a start-up error: the caller wants the error itself (a TriggerError...)
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
        self.started_at = time.time()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # the task group wraps the error of the ``async with`` body on its way out: the caller gets it as it
            # raised it (returning lets it propagate unchanged); anything else the close raised is raised
            if exc is None or _leaves(group) != [exc]:
                raise
        finally:
            self._tg = None

    async def _enter_read_only(self, stack: contextlib.AsyncExitStack) -> ActivationStore:
        """The read-only start: no lock, no recovery, no clean-up; bundles of in-memory deploys go to a temporary
        folder, and versions continue from the dir's without being saved."""
        assert self.state_dir is not None
        if not self.state_dir.is_dir():
            raise StateDirReadOnly(f"cannot open {self.state_dir} read-only: no such state dir")
        self._tmp_dir = tmp_dir = tempfile.mkdtemp(prefix="minifaas-ro-")
        stack.callback(shutil.rmtree, tmp_dir, ignore_errors=True)
        self._work_dir = Path(tmp_dir) / "bundles"
        self._work_dir.mkdir()
        store = self._store = ReadOnlyStore(self.state_dir)
        stack.push_async_callback(self._close_store)
        self._aliases = AliasTable(self.state_dir / ALIASES_FILE_NAME, rng=self._aliases.rng).detached()
        sessions_db = self.state_dir / "sessions.sqlite3"
        if sessions_db.exists():
            self.sessions = SessionStore(sessions_db)
        # read, never written: a composition deployed to this engine stays in memory (_saved_compositions has no dir)
        self._restore_compositions(CompositionFiles(self.state_dir / COMPOSITIONS_SUBDIR))
        return store

    def _require_writable(self) -> None:
        if self.read_only:
            raise StateDirReadOnly(
                f"this engine opened {self.state_dir} read-only (another engine holds it): it reads records but "
                "runs no function; invoke through the engine that holds the dir (e.g. the running minifaas serve)"
            )

    def _spare_room(self, spare_mb: float) -> int | None:
        """How many spares the memory budget leaves room for (None: no budget)."""
        pool = self._pool
        if pool is None or pool.memory_budget_mb is None:
            return None
        free = pool.memory_budget_mb - pool.memory_in_use(include_reserved=False)
        return max(0, int(free // max(spare_mb, 1e-3)))

    def _share_gpus(self, pool: Pool, gpus: list[str]) -> None:
        """Local sandboxes see the host's GPUs their function asked for (``resources={"num_gpus": n}``), and only
        those (Ray assigns them on the Ray backend)."""
        shares = self._gpu_shares = GpuShares(gpus)
        pool.sandbox_factory = lambda key, services: GpuSandbox(key, services, shares)

    def _make_launcher(self) -> Launcher:
        if self.backend == "ray":
            from ._backends.ray import RayLauncher

            root = (self.state_dir / "models") if self.state_dir is not None else _user_model_cache()
            return RayLauncher(self.ray_address, root, self._env_root(), self.pip_index_url)
        name = self.launcher_name
        if name in ("auto", "zygote"):
            from ._core.zygote import DEFAULT_PRELOAD, FORK_AVAILABLE, ZygoteLauncher

            if FORK_AVAILABLE or name == "zygote":
                return ZygoteLauncher(
                    preload=self.preload if self.preload is not None else DEFAULT_PRELOAD,
                    min_spares=self.min_spares,
                    max_spares=self.max_spares,
                    room=self._spare_room,
                )
        return SpawnLauncher(self.preload or ())

    async def aclose(self) -> None:
        """Finish in-flight work (up to ``close_timeout_s``), record the rest as failed, stop every sandbox, the
        launcher and the store. Safe inside any cancel scope (``with fail_after(...): await engine.aclose()``)
        and more than once; the engine's task group itself ends with its ``async with`` block."""
        sched, pool = self._sched, self._pool
        if sched is None or pool is None or self._closing:
            return
        if self.triggers is not None:
            # feeds fire nothing more, but keep waiting for their sessions: one that ends while the engine
            # drains marks its file handled, one that the close aborts leaves it in flight for the next run
            self.triggers.stop_polling()
        self._closing = True
        try:
            with anyio.move_on_after(self.close_timeout_s):
                for job in list(sched.jobs.values()):
                    await job.done.wait()
                for done in list(self._session_done.values()):
                    await done.wait()
            for fp in list(pool.functions.values()):
                sched.fail_queued(fp, ENGINE_CLOSED_MESSAGE, status="internal_error")
            sched.fail_running(ENGINE_CLOSED_MESSAGE)
            self._fail_sessions()
        finally:
            if self.triggers is not None:
                with anyio.CancelScope(shield=True):
                    await self.triggers.aclose()
            await self._close_pool()
            await self._close_launcher()
            self._uninstall_polling()
            self._drop_clock_listener()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await self._close_store()
            self.sessions.close()
            self._env_holds.close()
            if self._tmp_dir is not None:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
            if self._state_lock is not None:
                self._state_lock.release()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            with anyio.CancelScope(shield=True):
                await self._pool.close_all()

    async def _close_launcher(self) -> None:
        launcher = self._launcher
        if launcher is not None:
            with anyio.CancelScope(shield=True):
                await launcher.aclose()

    async def _close_store(self) -> None:
        store = self._store
        if store is not None and not self._store_closed:
            self._store_closed = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close)

    def _drop_clock_listener(self) -> None:
        unsubscribe, self._clock_unsubscribe = self._clock_unsubscribe, None
        if callable(unsubscribe):
            unsubscribe()

    def _uninstall_polling(self) -> None:
        if self._polling_loop is not None:
            uninstall_polling(self._polling_loop, id(self))
            self._polling_loop = None

    def _require(self) -> Scheduler:
        if self._sched is None or self._closing:
            raise EngineClosed("the engine is not running: use `async with Engine() as engine:`")
        return self._sched

    def _store_or_raise(self) -> ActivationStore:
        if self._store is None:
            raise EngineClosed("the engine is not running")
        return self._store

    # -- functions --------------------------------------------------------------------------------------------
    async def deploy(
        self,
        name: str | Callable[..., Any],
        fn: Callable[..., Any] | None = None,
        /,
        *,
        code: str | None = None,
        path: str | os.PathLike[str] | None = None,
        main: str = "main",
        params: dict[str, Any] | None = None,
        annotations: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        concurrency: int | None = None,
        max_sandboxes: int | None = None,
        min_sandboxes: int = 0,
        idle_timeout_s: float | None = None,
        max_payload_bytes: int | None = None,
        max_result_bytes: int | None = None,
        max_log_bytes: int | None = None,
        max_queue: int | None = None,
        max_queue_wait_s: float | None = None,
        keepalive: Literal["fixed", "histogram"] | None = None,
        style: Literal["openwhisk", "lambda"] = "openwhisk",
        model_param: str | None = None,
        models: tuple[str, ...] | list[str] = (),
        preload: tuple[str, ...] | None = None,
        network: bool = True,
        isolation: Isolation | None = None,
        model_url_allow: Iterable[str] | None = None,
        read_paths: Iterable[str | os.PathLike[str]] = (),
        write_paths: Iterable[str | os.PathLike[str]] = (),
        modules: Iterable[Any] = (),
        origin: str | None = None,
        resources: dict[str, float] | None = None,
        placement: Literal["pack", "spread"] = "pack",
        _bundle: Bundle | None = None,
    ) -> Function:
        """Validate and register a new version; returns a :class:`Function` handle (also its description dict).

        What runs: ``code=`` (source text), ``path=`` (a .py file, a folder with ``__main__.py``, a zip), or a
        Python callable given by value: ``deploy("name", fn)`` or ``deploy(fn)`` (the name is ``fn.__name__``), a
        function ``fn(args) -> dict`` (``async def`` too) or a class (see ``minifaas_sandbox.callables``), pickled
        with cloudpickle; ``modules=[...]`` sends those modules by value too. Options recorded by
        ``@minifaas.function(...)`` apply where this call leaves an option at its default. Re-deploying the
        identical callable with the same options returns the existing version.

        ``origin`` says where the code came from (the web UI shows it); by default the path, or ``"code"``.
        ``resources`` (Ray backend): ``num_cpus``, ``num_gpus`` and custom Ray resources of each sandbox;
        ``placement``: pack the sandboxes onto few nodes, or spread them over the nodes.
        """
        self._require()
        if fn is None and not isinstance(name, str):
            recorded = getattr(name, FUNCTION_OPTIONS_ATTR, None) or {}
            fn = name
            name = str(recorded.get("name") or getattr(fn, "__name__", ""))
        if fn is not None:
            given = {k: v for k, v in locals().items() if k in DEPLOY_OPTION_DEFAULTS}
            return await self._deploy_callable(str(name), fn, given)
        if modules:
            raise DeployError("modules=[...] goes with a callable: deploy(name, fn, modules=[...])")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DeployError(
                f"invalid function name {name!r}: use letters, digits, '_', '-', '.' ('/' only after a package name)"
            )
        if name in self._compositions:
            # a composition wins every invocation of its name: the function would never run
            raise DeployError(f"{name!r} is already a deployed composition; delete it first")
        if not isinstance(main, str) or not main.isidentifier():
            raise DeployError(f"invalid main {main!r}: it must be a Python identifier")
        if style not in ("openwhisk", "lambda"):
            raise DeployError(f"invalid style {style!r}: use 'openwhisk' or 'lambda'")
        if keepalive is not None and keepalive not in KEEPALIVE_POLICIES:
            raise DeployError(f"invalid keepalive {keepalive!r}: use {' or '.join(KEEPALIVE_POLICIES)}")
        if not isinstance(network, bool):
            raise DeployError(f"network must be True or False, not {network!r}")
        if params is not None and not isinstance(params, dict):
            raise DeployError(f"params must be a dict, not {type(params).__name__}")
        if placement not in ("pack", "spread"):
            raise DeployError(f"invalid placement {placement!r}: use 'pack' or 'spread'")
        checked_resources = _check_resources(resources, self.backend)
        wanted_gpus = checked_resources.get("num_gpus", 0.0)
        if self._gpu_shares is not None and wanted_gpus > len(self._gpu_shares.gpus):
            raise DeployError(
                f"resources: {wanted_gpus:g} GPU asked for, this host has {len(self._gpu_shares.gpus)} "
                "(its CUDA_VISIBLE_DEVICES, else nvidia-smi)"
            )
        mode = check_isolation(self.isolation if isolation is None else isolation)
        try:
            allow = check_allow_list(model_url_allow) if model_url_allow is not None else self.model_url_allow
        except ValueError as exc:
            raise DeployError(str(exc)) from None
        grants_ro = check_grants("read_paths", read_paths)
        grants_rw = check_grants("write_paths", write_paths)
        if mode == "sandbox":
            # never silently unconfined: a machine that cannot set a sandbox up fails the deploy, saying why
            await anyio.to_thread.run_sync(require_sandbox)
        limits = _limits(
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            concurrency=concurrency,
            max_sandboxes=max_sandboxes,
            idle_timeout_s=idle_timeout_s if idle_timeout_s is not None else self.idle_timeout_s,
            max_payload_bytes=max_payload_bytes,
            max_result_bytes=max_result_bytes,
            max_log_bytes=max_log_bytes,
            max_queue=max_queue,
            max_queue_wait_s=max_queue_wait_s,
        )
        budget = self.memory_budget_mb
        if budget is not None and limits["memory_mb"] > budget:
            raise DeployError(
                f"memory_mb={limits['memory_mb']} is over the engine's memory_budget_mb={budget}: "
                "no sandbox of it could ever start"
            )
        if min_sandboxes < 0 or min_sandboxes > limits["max_sandboxes"]:
            raise DeployError(f"min_sandboxes must be between 0 and max_sandboxes ({limits['max_sandboxes']})")
        assert self._work_dir is not None
        work_dir = self._work_dir
        if _bundle is not None:
            bundle = _bundle
        else:
            bundle = await anyio.to_thread.run_sync(
                lambda: load_bundle(code=code, path=path, main=main, work_dir=work_dir)
            )
        if origin is not None:
            if not isinstance(origin, str):
                raise DeployError(f"origin must be a str, not {type(origin).__name__}")
            bundle = dataclasses.replace(bundle, origin=origin)
        sys_path: tuple[str, ...] = ()
        python: str | None = None
        if bundle.requirements is not None and not self.read_only:  # read-only: described, never run
            deps = await ensure_env(
                bundle.requirements,
                root=self._env_root(),
                index_url=self.pip_index_url,
                allow_index_options=self.pip_allow_index_options,
            )
            sys_path = (str(deps.site_packages),)
            touch(deps.path)
            # a fork of the preloaded zygote may hold the host's version of a package the env replaces
            python = str(deps.python) if deps.conflicts_with_preload else None
        versions = self._functions.get(name) or []
        # persisted and never reused: `f@3` names the same code for as long as the state dir lives
        version, persist = self._aliases.reserve_version(name, [s.version for s in versions])
        # its fsync off the event loop: a deploy must not stall the activations running meanwhile
        await anyio.to_thread.run_sync(persist)
        if self.read_only and not versions:
            # the holder gave the saved action the dir's last number when it deployed it (a detached table: unsaved)
            version = str(max(1, int(version) - 1))
        spec = FunctionSpec(
            name=name,
            version=version,
            namespace=self.namespace,
            bundle=bundle,
            main=main,
            params={**bundle.params, **(params or {})},
            annotations=dict(annotations or {}),
            env={str(k): str(v) for k, v in (env or {}).items()},
            min_sandboxes=min_sandboxes,
            style=style,
            model_param=model_param,
            models=tuple(bundle.models.get(m, m) for m in models),
            preload=preload,
            keepalive=keepalive,
            sys_path=sys_path,
            python=python,
            created=int(time.time() * 1000),
            network=network,
            isolation=mode,
            # a caller replacing detector_url (or its sha256) would make the host fetch, and the function load,
            # whatever it names
            final_params=(*bundle.models, *(k for k in bundle.params if k.endswith(SHA256_PARAM_SUFFIX))),
            read_paths=grants_ro,
            write_paths=grants_rw,
            model_url_allow=allow,
            resources=checked_resources,
            placement=placement,
            **limits,
        )
        if mode == "sandbox":
            model_root = Path(self.model_store.root)
            model_root.mkdir(parents=True, exist_ok=True)
            spec.own_paths = own_paths(bundle.source, sys_path, model_root)
            spec.hidden_paths = self._hidden_paths()
        admit = getattr(self._launcher, "admit", None)
        if admit is not None:
            await admit(spec)  # Ray: no node of the cluster could ever host it
        return await self._register(spec)

    def _hidden_paths(self) -> tuple[str, ...]:
        """The engine's own files, which no sandbox may see: records, bundles, environments."""
        out = [str(p) for p in (self.state_dir, self._tmp_dir, self._work_dir, self._env_root()) if p is not None]
        return tuple(os.path.abspath(p) for p in out)

    async def _register(self, spec: FunctionSpec) -> Function:
        await self._preload_models(spec)
        if spec.bundle.root is not None:
            touch(spec.bundle.root)
        self._functions.setdefault(spec.name, []).append(spec)
        self._env_holds.update(self._envs_in_use())
        if spec.min_sandboxes and self._pool is not None and not self.read_only:
            # provisioned concurrency: warm them now, not at the first request
            self._pool.function(spec)
            self._pool.wake_reaper()
        if self.triggers is not None:
            self.triggers.targets_changed()
        return Function(self, spec.describe(), ref=f"{spec.name}@{spec.version}")

    async def _deploy_callable(self, name: str, fn: Callable[..., Any], given: dict[str, Any]) -> Function:
        """``deploy(name, fn)``: the callable by value, with the decorator's options under the call's."""
        recorded = getattr(fn, FUNCTION_OPTIONS_ATTR, None) or {}
        options = {k: v for k, v in recorded.items() if k != "name"}
        unknown = sorted(set(options) - set(DEPLOY_OPTION_DEFAULTS))
        if unknown:
            raise DeployError(f"@minifaas.function() got unknown option(s): {', '.join(unknown)}")
        for key, value in given.items():
            if key not in options or value != DEPLOY_OPTION_DEFAULTS[key]:
                options[key] = value
        if options.get("code") is not None or options.get("path") is not None:
            raise DeployError("deploy(name, fn) takes the callable instead of code= or path=, not with them")
        if not name or not NAME_RE.match(name):
            raise DeployError(
                f"invalid function name {name!r}: use letters, digits, '_', '-', '.' (a lambda needs an explicit name)"
            )
        sandbox_path = sandbox_sys_path()
        pickled = await anyio.to_thread.run_sync(
            lambda: pickle_callable(fn, modules=options.get("modules") or (), sandbox_path=sandbox_path)
        )
        bundle = callable_bundle(pickled, fn)
        versions = self._functions.get(name) or []
        latest = versions[-1] if versions else None
        rest = {k: v for k, v in options.items() if k not in ("modules", "code", "path")}
        same = _comparable(rest)
        if (
            latest is not None
            and latest.bundle.digest == bundle.digest
            and self._options_of.get((name, latest.version)) == same
        ):
            # the identical callable with the same options: the same version, warm sandboxes and all
            return Function(self, latest.describe(), ref=f"{name}@{latest.version}")
        info = await self.deploy(name, **rest, _bundle=bundle)
        self._options_of[(name, info.version)] = same
        return info

    async def deploy_composition(
        self,
        name: str,
        composition: Any,
        *,
        params: dict[str, Any] | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        conditions: Literal["js", "strict"] = "js",
        persist: bool = True,
    ) -> dict[str, Any]:
        """Register a composition (a combinator tree, or its JSON IR) under ``name``; invoke it like a function.

        ``conditions="js"`` takes a branch on the JavaScript truthiness of the condition's ``value``, as
        openwhisk-composer does; ``"strict"`` only on exactly ``True``.

        Each deploy that changes it gives it a new version number (never reused, as functions'); deploying the
        same composition again keeps its version. With a state dir, the composition's JSON IR is kept there and
        an engine restarted on it deploys it again at start. A composition whose IR would not read back as
        itself (a function step that is a lambda, a nested function, a bound method ...) is refused with
        CompositionError; ``persist=False`` keeps it in memory only (the application deploys it at each start).
        """
        self._require()
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DeployError(f"invalid composition name {name!r}: use letters, digits, '_', '-', '.'")
        if name in self._functions or name in self._sequences:
            raise DeployError(f"{name!r} is already a deployed function; delete it first")
        comp = Composition.from_json(composition) if isinstance(composition, dict) else _as_composition(composition)
        if conditions not in CONDITIONS:
            raise DeployError(f"conditions must be one of {', '.join(CONDITIONS)}, not {conditions!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise DeployError(f"max_steps must be an int >= 1, not {max_steps!r}")
        if params is not None and not isinstance(params, dict):
            raise DeployError(f"params must be a dict, not {type(params).__name__}")
        keep = persist and self.state_dir is not None
        if keep:
            try:
                ir = check_lossless(comp)
            except CompositionError as exc:
                raise CompositionError(
                    f"composition {name!r} cannot be kept in the state dir {self.state_dir}: {exc}, or deploy it "
                    "with persist=False to keep it in memory only (deployed again by the application at each start)"
                ) from None
        else:
            ir = comp.to_json()
        defaults = dict(params or {})
        old = self._composition_records.get(name)
        dep = self._compositions.get(name)
        same = (
            old is not None
            and dep is not None
            and dep[0] == comp
            and (old.params, old.max_steps, old.conditions) == (defaults, max_steps, conditions)
        )
        if old is not None and same:
            record = old
        else:
            version = self._aliases.next_version(name, [old.version] if old is not None else [])
            record = SavedComposition(name, version, ir, defaults, max_steps, conditions, int(time.time() * 1000))
        if keep:
            await anyio.to_thread.run_sync(self._saved_compositions.save, record)
        else:
            # a restart must not bring back an earlier version kept on disk
            await anyio.to_thread.run_sync(self._saved_compositions.forget, name)
        self._compositions[name] = (comp, defaults, max_steps)
        self._conditions[name] = conditions
        self._composition_records[name] = record
        if self.triggers is not None:
            self.triggers.targets_changed()
        return self._describe_composition(name)

    def _describe_composition(self, name: str) -> dict[str, Any]:
        comp, params, max_steps = self._compositions[name]
        record = self._composition_records.get(name)
        return {
            "name": name,
            "kind": "composition",
            "version": record.version if record is not None else "1",
            "actions": comp.actions(),
            "composition": comp.to_json(),
            "params": dict(params),
            "max_steps": max_steps,
            "conditions": self._conditions.get(name, "js"),
            "created": record.created if record is not None else 0,
        }

    def _restore_compositions(self, saved: CompositionFiles) -> None:
        """Deploy the compositions kept in the state dir; one that cannot be read back is logged and skipped
        (its rules wait until the application deploys it)."""
        for record in saved.load():
            try:
                comp = Composition.from_json(record.ir)
            except CompositionError as exc:
                _logger.error("cannot restore composition %s from the state dir: %s", record.name, exc)
                continue
            self._compositions[record.name] = (comp, dict(record.params), record.max_steps)
            self._conditions[record.name] = record.conditions
            self._composition_records[record.name] = record

    def set_resolver(self, resolver: Callable[[str], tuple[str, dict[str, Any]]] | None) -> None:
        """Install ``resolver(ref) -> (name, defaults)``, asked for every name invoked, called or fired: the dev
        server's packages (``pkg/action`` with the package's parameters) and bindings (``binding/action`` is the
        bound package's action with the binding's parameters too). The defaults go under the target's own
        parameters and the invocation's; a ref the resolver does not know it returns unchanged, with ``{}``."""
        self._resolver = resolver

    def _resolve_ref(self, name: str) -> tuple[str, dict[str, Any]]:
        if self._resolver is None:
            return name, {}
        return self._resolver(name)

    def sequence_of(self, ref: str) -> tuple[SequenceSpec, dict[str, Any]] | None:
        """The sequence ``ref`` names (through the resolver) and its package's defaults, else None."""
        name, defaults = self._resolve_ref(ref)
        spec = self._sequences.get(name)
        return None if spec is None else (spec, defaults)

    def _ref_exists(self, ref: str) -> bool:
        name = self._resolve_ref(ref)[0]
        return name in self._sequences or name in self._compositions or split_ref(name)[0] in self._functions

    async def deploy_sequence(
        self,
        name: str,
        components: Iterable[str],
        *,
        params: dict[str, Any] | None = None,
        annotations: dict[str, Any] | None = None,
        check_components: bool = True,
    ) -> dict[str, Any]:
        """Register (or replace) an OpenWhisk sequence: invoking it runs ``components`` in order, each an activation
        of its own (see ``_workflows.sequence``). Each component must exist now; deleting one later is allowed
        (the sequence then fails when it reaches it). ``check_components=False`` registers a sequence saved
        earlier as it was (its components may be gone, or not be deployed again yet)."""
        self._require()
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DeployError(f"invalid sequence name {name!r}: use letters, digits, '_', '-', '.'")
        if name in self._functions or name in self._compositions:
            raise DeployError(f"{name!r} is already a deployed function or composition; delete it first")
        if params is not None and not isinstance(params, dict):
            raise DeployError(f"params must be a dict, not {type(params).__name__}")
        comps = tuple(components)
        if not comps:
            raise DeployError(NO_COMPONENT)
        for ref in comps:
            if not isinstance(ref, str) or not ref:
                raise DeployError(f"sequence components must be names, got {ref!r}")
            if self._resolve_ref(ref)[0] == name:
                raise DeployError(IS_CYCLIC)
            if check_components and not self._ref_exists(ref):
                raise DeployError(f"{COMPONENT_NOT_FOUND} ({ref})")

        def lookup(ref: str) -> SequenceSpec | None:
            found = self.sequence_of(ref)
            return None if found is None else found[0]

        try:
            atomic = atomic_count(comps, lookup, root=name) if check_components else 0
        except ValueError as exc:
            raise DeployError(str(exc)) from None
        if atomic > MAX_ATOMIC_ACTIONS:
            raise DeployError(f"{TOO_LONG} ({atomic} actions, at most {MAX_ATOMIC_ACTIONS})")
        old = self._sequences.get(name)
        spec = SequenceSpec(
            name=name,
            components=comps,
            params=dict(params or {}),
            annotations=dict(annotations or {}),
            version=str(int(old.version) + 1) if old is not None else "1",
            namespace=self.namespace,
            created=int(time.time() * 1000),
        )
        self._sequences[name] = spec
        if self.triggers is not None:
            self.triggers.targets_changed()
        return spec.describe()

    def _sequence_record(self, spec: SequenceSpec, cause: str | None) -> Activation:
        return Activation(
            activation_id=new_activation_id(),
            name=spec.name,
            version=spec.version,
            namespace=spec.namespace,
            accepted=int(time.time() * 1000),
            cause=cause,
        )

    def _record_sequence(self, act: Activation) -> None:
        self._store_or_raise().put(act)
        if act.done:
            self._on_end(act)

    async def _call_sequence(
        self, spec: SequenceSpec, defaults: dict[str, Any], args: dict[str, Any] | None, cause: str | None
    ) -> Activation:
        act = self._sequence_record(spec, cause)
        return await run_sequence(self, spec, args or {}, act=act, record=self._record_sequence, defaults=defaults)

    async def _submit_sequence(
        self, name: str, defaults: dict[str, Any], args: dict[str, Any] | None, cause: str | None
    ) -> str:
        assert self._tg is not None
        spec = self._sequences[name]
        act = self._sequence_record(spec, cause)
        stored = anyio.Event()
        # the promise: an id handed out is an id on record (a record put with nobody waiting for it would be
        # written only at its end or its turn: see the store's LAZY_ROW_DELAY_S)
        self._store_or_raise().put(act, stored.set)
        done = self._session_done[act.activation_id] = anyio.Event()

        async def run() -> None:
            try:
                await run_sequence(self, spec, args or {}, act=act, record=self._record_sequence, defaults=defaults)
            except EngineClosed:
                pass  # the record is ended as aborted by the engine's close (_fail_sessions)
            finally:
                done.set()
                self._session_done.pop(act.activation_id, None)

        self._tg.start_soon(run, name=f"sequence-{act.activation_id}")
        if not stored.is_set():
            await stored.wait()
        return act.activation_id

    async def _preload_models(self, spec: FunctionSpec) -> None:
        """Fetch the function's named models into the store and load their bytes into the zygote, so every
        sandbox forked afterwards shares those pages copy-on-write (the path is the one sandboxes will ask for)."""
        load = getattr(self._launcher, "load_models", None)
        if not spec.models or load is None:
            return
        sandboxed = spec.isolation == "sandbox"
        paths = []
        for url in spec.models:
            # the deployer named these (a local file anywhere is its own business); a URL passes the same guard as
            # a function's own fetch, redirects included: the deploy may have come over HTTP
            await anyio.to_thread.run_sync(
                functools.partial(
                    check_model_url,
                    url,
                    network=spec.network,
                    sandboxed=sandboxed,
                    readable=[Path("/")],
                    allow=spec.model_url_allow,
                )
            )
            token = REDIRECT_GUARD.set(
                redirect_checker(network=spec.network, sandboxed=sandboxed, allow=spec.model_url_allow)
            )
            try:
                paths.append(str(await self.model_store.fetch(url)))
            finally:
                REDIRECT_GUARD.reset(token)
        # the urls too: the zygote pre-builds each model's interpreter for the url sandboxes will load it by
        await load(paths, urls=list(spec.models))

    def _env_root(self) -> Path:
        return self.state_dir / "envs" if self.state_dir is not None else default_env_root()

    def _route(self, name: str) -> tuple[FunctionSpec, str | None]:
        """The version ``name``, ``name@3`` or ``name@alias`` runs now, and the alias it went through."""
        if "@" not in name:
            latest = self._functions.get(name)
            if latest:
                return latest[-1], None  # the hot path: a plain name runs the latest version
        specs = self._functions.get(split_ref(name)[0]) or []
        # only an alias compares digests: a plain invocation (the hot path) builds nothing
        digests = {s.version: s.bundle.digest for s in specs} if "@" in name else None
        version, alias = self._aliases.resolve(name, [s.version for s in specs], digests=digests)
        return next(s for s in specs if s.version == version), alias

    def _resolve(self, name: str) -> FunctionSpec:
        return self._route(name)[0]

    async def get_function(self, name: str) -> dict[str, Any]:
        self._require()
        seq = self._sequences.get(name)
        if seq is not None:
            return seq.describe()
        if name in self._compositions:
            return self._describe_composition(name)
        spec = self._resolve(name)
        info = spec.describe()
        info["versions"] = [s.version for s in self._functions[spec.name]]
        info["aliases"] = self._aliases.aliases(spec.name)
        return info

    async def list_functions(self) -> list[dict[str, Any]]:
        self._require()
        out = [versions[-1].describe() for versions in self._functions.values() if versions]
        for n in self._compositions:
            info = self._describe_composition(n)
            del info["composition"]
            out.append(info)
        out += [s.describe() for s in self._sequences.values()]
        return out

    async def delete(self, name: str) -> None:
        """Remove a function (every version, or one with ``name@version``); its queued requests fail."""
        sched = self._require()
        assert self._pool is not None
        if name in self._compositions:
            del self._compositions[name]
            self._conditions.pop(name, None)
            self._composition_records.pop(name, None)
            await anyio.to_thread.run_sync(self._saved_compositions.forget, name)
            return
        if name in self._sequences:
            del self._sequences[name]  # sequences naming it stay, and fail when they reach it (as OpenWhisk's)
            return
        base, _, version = name.partition("@")
        versions = self._functions.get(base)
        if not versions:
            raise FunctionNotFound(f"no function named {base!r} is deployed")
        doomed = [s for s in versions if not version or s.version == version]
        if not doomed:
            raise FunctionNotFound(f"function {base!r} has no version {version!r}")
        if version:
            self._aliases.check_deletable(base, version)
        else:
            self._aliases.drop_function(base)
        for spec in doomed:
            versions.remove(spec)
            fp = self._pool.remove_function(spec.key)
            if fp is not None:
                sched.fail_queued(fp, f"function {spec.name} was deleted before this activation ran")
        if not versions:
            del self._functions[base]
        if not self.read_only:  # its files are the holder's
            await self.gc()

    async def gc(self, budget_bytes: int | None = None) -> dict[str, Any]:
        """Remove leftovers of killed builds and downloads, then the staged bundles, environments and model files
        no deployed function uses, least recently used first, while they take more than ``budget_bytes``
        (default ``gc_budget_bytes``). Runs on start and after each delete; returns what it removed."""
        if self.read_only:
            self._require_writable()
        if self._work_dir is None:
            raise EngineClosed("the engine is not running: use `async with Engine() as engine:`")
        roots = Roots(self._work_dir, self._env_root(), self._model_root())
        envs = self._envs_in_use()
        self._env_holds.update(envs)
        in_use: list[Path] = list(envs)
        for specs in self._functions.values():
            for spec in specs:
                if spec.bundle.root is not None:
                    in_use.append(spec.bundle.root)
                if self._model_store is not None:
                    in_use += [p for p in map(self._model_store.known_path, spec.models) if p is not None]
        budget = self.gc_budget_bytes if budget_bytes is None else budget_bytes
        report: GcReport = await anyio.to_thread.run_sync(lambda: collect(roots, in_use, budget_bytes=budget))
        return report.as_dict()

    def _envs_in_use(self) -> set[Path]:
        # sys_path holds <venv>/lib/pythonX.Y/site-packages
        return {Path(p).parents[2] for specs in self._functions.values() for s in specs for p in s.sys_path}

    def _model_root(self) -> Path:
        return (self.state_dir / "models") if self.state_dir is not None else _user_model_cache()

    # -- aliases ----------------------------------------------------------------------------------------------
    async def set_alias(self, name: str, alias: str, target: Routing) -> dict[str, Any]:
        """Point ``name@alias`` at a version (``"2"``) or split traffic by weight (``{"2": 90, "3": 10}``)."""
        self._require()
        versions = self._functions.get(name)
        if not versions:
            raise FunctionNotFound(f"no function named {name!r} is deployed")
        routing = self._aliases.set_alias(
            name,
            alias,
            target,
            versions=[s.version for s in versions],
            digests={s.version: s.bundle.digest for s in versions},
        )
        return {"name": name, "alias": alias, "routing": routing}

    async def get_alias(self, name: str, alias: str) -> dict[str, Any]:
        self._require()
        return {"name": name, "alias": alias, "routing": self._aliases.get_alias(name, alias)}

    async def delete_alias(self, name: str, alias: str) -> None:
        self._require()
        self._aliases.delete_alias(name, alias)

    # -- invocation -------------------------------------------------------------------------------------------
    async def submit(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> str:
        """Accept an invocation and return its activation id at once."""
        sched = self._require()
        self._require_writable()
        name, defaults = self._resolve_ref(name)
        if name in self._compositions:
            return self._submit_session(name, args, cause)
        if name in self._sequences:
            return await self._submit_sequence(name, defaults, args, cause)
        spec, alias = self._route(name)
        annotations = {"alias": alias} if alias else None
        args = _under(defaults, spec.params, args)
        job = sched.submit(spec, args, cause=cause, annotations=annotations, durable=True)
        accepted = job.accepted
        if accepted is not None and not accepted.is_set():
            await accepted.wait()  # the promise: an id handed out is an id on record
        return job.act.activation_id

    async def call(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        cause: str | None = None,
        session_id: str | None = None,
        session: Session | None = None,
    ) -> Activation:
        """Invoke and wait; returns the ended Activation whatever its status."""
        sched = self._require()
        self._require_writable()
        name, defaults = self._resolve_ref(name)
        seq = self._sequences.get(name)
        if seq is not None:
            return await self._call_sequence(seq, defaults, args, cause)
        dep = self._compositions.get(name)
        if dep is not None:
            comp, params, max_steps = dep
            return await call_composition(
                self,
                name,
                comp,
                {} if args is None else args,
                sessions=self.sessions,
                record=self._store_or_raise().put,
                params=params,
                cause=cause,
                session_id=session_id,
                session=session,
                max_steps=max_steps,
                namespace=self.namespace,
                conditions=self._conditions.get(name, "js"),
            )
        spec, alias = self._route(name)
        annotations = {"alias": alias} if alias else None
        job = sched.submit(spec, _under(defaults, spec.params, args), cause=cause, annotations=annotations)
        await job.done.wait()
        return job.act

    async def invoke(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Invoke and wait; returns the result dict, raises :class:`ActivationError` unless it succeeded."""
        act = await self.call(name, args)
        if act.status != "success":
            raise ActivationError(act)
        return act.result

    def _fail_sessions(self) -> None:
        """Sessions still running at close end as failed records, like activations."""
        store = self._store
        for sid in list(self._session_done):
            act = store.get(sid) if store is not None else None
            if act is not None and not act.done:
                act.status = "internal_error"
                act.result = {"error": ENGINE_CLOSED_MESSAGE}
                act.end = act.end or int(time.time() * 1000)
                if store is not None:
                    store.put(act)
            with contextlib.suppress(ActivationNotFound):
                session = self.sessions.get(sid)
                if not session.done:
                    session.status = "internal_error"
                    session.result = {"error": ENGINE_CLOSED_MESSAGE}
                    session.end = session.end or int(time.time() * 1000)
                    session.duration = session.end - session.start
                    self.sessions.put(session)

    def _submit_session(self, name: str, args: dict[str, Any] | None, cause: str | None) -> str:
        assert self._tg is not None
        sid = new_activation_id()
        done = self._session_done[sid] = anyio.Event()
        # the one Session object of this run, readable by its id before submit returns
        session = Session(session_id=sid, name=name, start=int(time.time() * 1000))
        self.sessions.put(session)

        async def run() -> None:
            act: Activation | None = None
            try:
                act = await self.call(name, args, cause=cause, session_id=sid, session=session)
            except EngineClosed:
                pass  # the session record says it was aborted; the engine is going away
            finally:
                done.set()
                self._session_done.pop(sid, None)
            it = self._maps.get(cause) if cause is not None else None
            if it is not None and act is not None:  # a map over a composition: its items are sessions
                it._on_end(act)

        self._tg.start_soon(run, name=f"session-{sid}")
        return sid

    def _target_exists(self, name: str, _depth: int = 0) -> bool:
        """A rule's target is deployed: a function, or a composition whose named functions all are."""
        if self._resolver is not None:
            name = self._resolver(name)[0]
        if name in self._sequences:
            return True  # its components are looked up when it runs, as OpenWhisk does
        dep = self._compositions.get(name)
        if dep is None:
            return split_ref(name)[0] in self._functions
        # a composition deployed before its functions would fail each photo's first step
        return _depth < 8 and all(self._target_exists(a, _depth + 1) for a in dep[0].actions() if a != name)

    async def _await_end(self, activation_id: str) -> bool:
        """Wait until an activation (or session) ends; False if the engine's close aborted it."""
        done = self._session_done.get(activation_id)
        if done is not None:
            await done.wait()
        else:
            job = self._sched.jobs.get(activation_id) if self._sched is not None else None
            if job is not None:
                await job.done.wait()
        store = self._store
        act = store.get(activation_id) if store is not None else None
        if act is None:
            return True  # dropped from a bounded in-memory store: it ended long ago
        if not act.done:
            return False
        error = act.result.get("error") if isinstance(act.result, dict) else None
        return not (act.status == "internal_error" and error in (ENGINE_CLOSED_MESSAGE, SESSION_ABORTED_MESSAGE))

    # -- services and observability ---------------------------------------------------------------------------
    async def _svc_model_fetch(self, args: dict[str, Any]) -> str:
        store = self.model_store
        url = str(args["url"])
        spec = self._caller_spec(args.get(CALLER_ARG))
        if spec is None:
            # not asked by one of this engine's functions (e.g. a backend's node): nothing to check against
            return str(await store.fetch(url, sha256=args.get("sha256")))
        sandboxed = spec.isolation == "sandbox"
        readable = [Path(p) for p in (*spec.own_paths, *spec.read_paths, *interpreter_paths())]
        if url in spec.models or url in spec.params.values():
            readable = [Path("/")]  # a model the deploy named: the host fetched it for the zygote already
        await anyio.to_thread.run_sync(
            lambda: check_model_url(
                url, network=spec.network, sandboxed=sandboxed, readable=readable, allow=spec.model_url_allow
            )
        )
        token = REDIRECT_GUARD.set(
            redirect_checker(network=spec.network, sandboxed=sandboxed, allow=spec.model_url_allow)
        )
        try:
            path = await store.fetch(url, sha256=args.get("sha256"))
        finally:
            REDIRECT_GUARD.reset(token)
        return str(path)

    def _caller_spec(self, key: Any) -> FunctionSpec | None:
        """The deployed version a sandbox's host call came from (its key is set by the host, not the sandbox)."""
        if not isinstance(key, str):
            return None
        for specs in self._functions.values():
            for spec in specs:
                if spec.key == key:
                    return spec
        return None

    @property
    def model_store(self) -> Any:
        """The host's content-addressed model store (created on first use)."""
        if self._model_store is None:
            from ._deploy.modelstore import ModelStore

            self._model_store = ModelStore(self._model_root())
        return self._model_store

    def add_host_service(self, method: str, service: HostService, *, callers: Callable[[str], bool]) -> None:
        """Let sandboxes call ``service(args)`` by ``minifaas_sandbox.host_call(method, args)``; only functions
        whose name ``callers(name)`` accepts may (the host knows which function asks, a sandbox cannot lie)."""

        async def guarded(args: dict[str, Any]) -> Any:
            spec = self._caller_spec(args.get(CALLER_ARG))
            if spec is None or not callers(spec.name):
                raise PermissionError(f"host service {method!r} is not available to this function")
            return await service({k: v for k, v in args.items() if k != CALLER_ARG})

        self._services[method] = guarded

    def add_end_hook(self, hook: Callable[[Activation], None]) -> None:
        """Call ``hook(activation)`` whenever an activation ends (metrics, live UIs)."""
        self._end_hooks.append(hook)

    def _register_map(self, it: MapIterator) -> None:
        self._maps[it.map_id] = it

    def _unregister_map(self, it: MapIterator) -> None:
        self._maps.pop(it.map_id, None)

    async def function(self, name: str) -> Function:
        """A handle on a deployed function (``name``, ``name@version`` or ``name@alias``) for invoke/call/map."""
        return Function(self, await self.get_function(name), ref=name)

    def _on_end(self, act: Activation) -> None:
        if act.cause is not None and self._maps:
            it = self._maps.get(act.cause)
            if it is not None:
                it._on_end(act)
        for hook in self._end_hooks:
            with contextlib.suppress(Exception):
                hook(act)

    def stats(self) -> dict[str, Any]:
        """Counters (cold starts, warm runs, forks, spawns, evictions) and the pool's state per function."""
        if self._pool is None or self._sched is None:
            raise EngineClosed("the engine is not running")
        out: dict[str, Any] = dict(self._pool.stats)
        out["sandboxes"] = self._pool.total
        out["queued"] = self._sched.queued
        out["in_flight"] = len(self._sched.jobs)
        out["functions"] = self._pool.snapshot()
        out["store"] = self._store_or_raise().stats()
        out["launcher"] = getattr(self._launcher, "name", "?")
        launcher_stats = getattr(self._launcher, "stats", None)
        if callable(launcher_stats):
            out["launcher_stats"] = launcher_stats()
        if self._cpus is not None:
            out["cpus"] = self._cpus.stats()
        return out


def _under(defaults: dict[str, Any], params: dict[str, Any], args: dict[str, Any] | None) -> dict[str, Any]:
    """A package's ``defaults`` under the action's own ``params`` (merged in by the scheduler) and ``args``."""
    args = {} if args is None else args
    if not defaults:
        return args
    return {**{k: v for k, v in defaults.items() if k not in params}, **args}


def _check_resources(resources: dict[str, float] | None, backend: str) -> dict[str, float]:
    """A deploy's ``resources``, validated; other than ``num_cpus`` they are Ray's (placement on a node)."""
    if resources is None:
        return {}
    checked = validate_resources(resources)
    custom = set(checked) - {"num_cpus", "num_gpus"}
    if backend != "ray" and custom:
        raise DeployError(
            f"resources {sorted(custom)}: custom resources are placed by the Ray backend only (Engine(backend='ray'))"
        )
    return checked


def _monotonic_of(clock: Any) -> Callable[[], float]:
    """The keep-alive time source of ``clock``: its monotonic time if it has one (FakeClock), else its ``now``."""
    if clock is None:
        return time.monotonic
    source: Callable[[], float] = getattr(clock, "monotonic", clock.now)
    return source


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _engine_isolation(value: Any) -> Isolation:
    if value not in ("process", "sandbox"):
        raise ValueError(f"unknown isolation {value!r}; choose 'process' or 'sandbox'")
    return "sandbox" if value == "sandbox" else "process"


def _user_model_cache() -> Path:
    env = os.environ.get("MINIFAAS_MODEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minifaas" / "models"


def _limits(**given: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bounds: dict[str, tuple[float, float]] = {
        "timeout_s": (0.01, 24 * 3600),
        "memory_mb": (16, 1 << 20),
        "concurrency": (1, 1000),
        "max_sandboxes": (1, 10_000),
        "idle_timeout_s": (0.0, 30 * 24 * 3600),
        "max_payload_bytes": (1, 1 << 30),
        "max_result_bytes": (1, 1 << 30),
        "max_log_bytes": (1, 1 << 30),
        "max_queue": (0, 10_000_000),
        "max_queue_wait_s": (0.01, 30 * 24 * 3600),
    }
    for key, value in given.items():
        if value is None:
            value = DEFAULTS[key]
        lo, hi = bounds[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise DeployError(f"{key} must be a number between {lo:g} and {hi:g}, got {value!r}")
        out[key] = int(value) if isinstance(DEFAULTS[key], int) else float(value)
    return out


#: every option of ``Engine.deploy`` with its default (what ``@minifaas.function(...)`` may record)
DEPLOY_OPTION_DEFAULTS: Final[dict[str, Any]] = {
    n: p.default
    for n, p in inspect.signature(Engine.deploy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and not n.startswith("_")
}


def _comparable(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)
