"""The sandbox pool: which sandboxes exist, which are free, when to start, evict and expire them.

The pool knows nothing about queues or activation records (that is the scheduler's job). It answers:
"which free sandbox should serve this request?" (model-affinity routing), "may this function start one more
sandbox?" (per-function and engine-wide caps and the memory budget, evicting idle sandboxes of other functions by
Greedy-Dual priority), and "which idle sandboxes have outlived their keep-alive, and which functions should be
pre-warmed?" (the reaper task, driven by a keep-alive policy: scale to zero, ``min_sandboxes``, stem cells).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio
import anyio.abc

from .._deploy.bundle import check_staged
from .._environ import ISOLATION_ENV
from .._errors import DeployError
from .function import IDLE_TIMEOUT_S, FunctionSpec
from .keepalive import Candidate, FixedPolicy, GreedyDualEvictor, HistogramPolicy, KeepAlivePolicy
from .launch import Launcher, SpawnLauncher, scrubbed_env
from .sandbox import HostService, Sandbox, SandboxDied

__all__ = ("KEEPALIVE_POLICIES", "FunctionPool", "Pool")

MAX_SANDBOXES_TOTAL: Final = 32
#: minifaas_sandbox.runtime.SCRATCH_PREFIX: what a sandbox's working dir is called
SCRATCH_PREFIX: Final = "minifaas-cwd-"
REAP_INTERVAL_MAX_S: Final = 1.0
REAP_INTERVAL_MIN_S: Final = 0.01
KEEPALIVE_POLICIES: Final = ("fixed", "histogram")
#: gains of the run-time averages (TCP's 1/8 and 1/4, RFC 6298)
RUN_AVG_GAIN: Final = 8
RUN_DEV_GAIN: Final = 4
#: a round trip's extra time beyond the run is clamped to this (ms): a stall of the host is not a trend
MAX_TRIP_MS: Final = 5.0
#: after a function's sandbox fails to initialize, no new one starts for this long, doubling with each failure in
#: a row up to the cap; a success resets it (a crash loop costs a few forks a minute, not hundreds a second)
INIT_BACKOFF_FIRST_S: Final = 0.1
INIT_BACKOFF_MAX_S: Final = 30.0


def _last_used(sb: object) -> float:
    assert isinstance(sb, Sandbox)
    return sb.last_used


class FunctionPool:
    """The sandboxes of one function version, and its queue of waiting requests (owned by the scheduler)."""

    def __init__(self, spec: FunctionSpec, policy: KeepAlivePolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.sandboxes: list[Sandbox] = []
        self.starting = 0
        self.queue: collections.deque[Any] = collections.deque()
        self.deleted = False
        #: cost figures for Greedy-Dual eviction: mean cold start and warm run, in ms
        self.cold_ms = 0.0
        self.cold_starts = 0
        self.warm_ms = 0.0
        self.invocations = 0
        self.warm_runs = 0
        #: recent warm run time and its mean deviation, in ms (moving averages, as TCP keeps for round trips):
        #: when the next result is due, for the host's polling
        self.run_avg_ms = 0.0
        self.run_dev_ms = 0.0
        self.trip_avg_ms = 0.0
        #: the keep-alive policy asked for a fresh sandbox at this time (pool clock), kept until ``prewarm_until``
        self.prewarm_at: float | None = None
        self.prewarm_until = 0.0
        #: the last failed start was the backend's (no room on a Ray cluster), not the function's
        self.last_init_internal = False
        #: initializations failed in a row, and until when (``time.monotonic()``) no new sandbox starts
        self.init_failures = 0
        self.backoff_until = 0.0
        #: the last failed initialization's error and logs, for the records failed during the back-off
        self.last_init_error = ""
        self.last_init_logs: list[str] = []

    def backoff_left_s(self) -> float:
        """Seconds until a new sandbox may start after failed initializations (0 when it may now)."""
        if not self.init_failures:
            return 0.0
        return max(0.0, self.backoff_until - time.monotonic())

    def record_run(self, run_ms: float, *, cold: bool = False) -> None:
        self.invocations += 1
        if cold:
            return  # a first run pays for the function's lazy imports and first model loads: not a warm cost
        self.warm_runs += 1
        self.warm_ms += (run_ms - self.warm_ms) / self.warm_runs
        if self.warm_runs == 1:
            self.run_avg_ms, self.run_dev_ms = run_ms, run_ms / 2
        else:
            error = run_ms - self.run_avg_ms
            self.run_avg_ms += error / RUN_AVG_GAIN
            self.run_dev_ms += (abs(error) - self.run_dev_ms) / RUN_DEV_GAIN

    def record_trip(self, extra_ms: float) -> None:
        """What a round trip took beyond the run itself, in ms."""
        extra_ms = min(max(extra_ms, 0.0), MAX_TRIP_MS)
        self.trip_avg_ms += (extra_ms - self.trip_avg_ms) / (RUN_AVG_GAIN if self.trip_avg_ms else 1)

    def free(self) -> list[Sandbox]:
        c = self.spec.concurrency
        return [sb for sb in self.sandboxes if sb.state == "ready" and len(sb.inflight) < c]

    def live_runs(self) -> int:
        """Greedy-Dual's frequency: the calls the function's live sandboxes served (FaasCache counts per live
        container set, so a function hot long ago, all of whose sandboxes have gone, starts again from 0)."""
        return sum(sb.runs for sb in self.sandboxes)

    def idle(self) -> list[Sandbox]:
        return [sb for sb in self.sandboxes if sb.state == "ready" and not sb.inflight]

    @property
    def size(self) -> int:
        return len(self.sandboxes)


class Pool:
    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        launcher: Launcher,
        services: dict[str, HostService],
        *,
        max_total: int = MAX_SANDBOXES_TOTAL,
        memory_budget_mb: int | None = None,
        now: Callable[[], float] = time.monotonic,
        keepalive: str = "fixed",
        idle_timeout_s: float | None = None,
        prewarm: int = 0,
    ) -> None:
        if keepalive not in KEEPALIVE_POLICIES:
            raise ValueError(f"unknown keep-alive policy {keepalive!r}; choose {', '.join(KEEPALIVE_POLICIES)}")
        self.tg = tg
        self.launcher = launcher
        self.services = services
        self.max_total = max_total
        self.memory_budget_mb = memory_budget_mb
        #: memory the launcher holds outside any sandbox (the zygote's idle spares), in MiB
        self.reserved_mb: Callable[[], int] = lambda: 0
        #: the keep-alive clock (seconds); tests pass a fake clock's ``now``
        self.now = now
        fixed = FixedPolicy(idle_timeout_s if idle_timeout_s is not None else IDLE_TIMEOUT_S)
        self.policies: dict[str, KeepAlivePolicy] = {
            "fixed": fixed,
            "histogram": HistogramPolicy(fallback_s=fixed.idle_timeout_s),
        }
        self.default_policy = keepalive
        self.evictor = GreedyDualEvictor()
        self.prewarm = prewarm
        #: stem cells: launched, READY sandboxes not yet bound to a function (OpenWhisk's prewarmed containers)
        self.stem: list[Sandbox] = []
        self._stem_starting = 0
        #: set by the scheduler: start a sandbox for a function with no request waiting (pre-warm, min_sandboxes)
        self.warm_up: Callable[[FunctionPool], None] = lambda fp: None
        self.on_capacity: Callable[[], None] = lambda: None
        #: called when a sandbox starts a run (the engine's CpuKeeper watches busy sandboxes)
        self.on_busy: Callable[[], None] | None = None
        #: makes the host-side handle of a new sandbox; a backend (e.g. Ray) may supply its own with the same interface
        self.sandbox_factory: Callable[[str, dict[str, HostService]], Sandbox] = Sandbox
        self.functions: dict[str, FunctionPool] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        #: every sandbox not yet fully closed, in a pool or not (retired ones still shutting down)
        self.live: set[Sandbox] = set()
        #: sandboxes retired and not gone yet, and the memory they hold (MB)
        self.closing = 0
        self.closing_mb = 0
        self._reaper_wake = anyio.Event()
        #: when the reaper will look next (pool clock); an earlier expiry wakes it
        self._reaper_next = 0.0

    # -- capacity ---------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(fp.size for fp in self.functions.values()) + len(self.stem) + self._stem_starting

    def memory_in_use(self, *, include_reserved: bool = True) -> int:
        """Memory budget taken (MiB): each sandbox's ``memory_mb``, and what the launcher reserves (idle spares)."""
        used = sum(fp.size * fp.spec.memory_mb for fp in self.functions.values())
        return used + (self.reserved_mb() if include_reserved else 0)

    def function(self, spec: FunctionSpec) -> FunctionPool:
        fp = self.functions.get(spec.key)
        if fp is None:
            policy = self.policies[spec.keepalive or self.default_policy]
            configure = getattr(policy, "configure", None)
            if configure is not None:
                configure(spec.key, spec.idle_timeout_s)
            fp = self.functions[spec.key] = FunctionPool(spec, policy)
        return fp

    def route(self, fp: FunctionPool, model: str | None) -> Sandbox | None:
        """Ray Serve's order: a free sandbox holding the model, else the free one holding fewest models."""
        # this runs for every invocation: answer "none free" and "one free" without building a list
        c = fp.spec.concurrency
        first: Sandbox | None = None
        several = False
        for sb in fp.sandboxes:
            if sb.state == "ready" and len(sb.inflight) < c:
                if first is not None:
                    several = True
                    break
                first = sb
        if not several:
            return first
        free = fp.free()
        if model is not None:
            holders = [sb for sb in free if model in sb.models]
            if holders:
                return min(holders, key=lambda sb: len(sb.inflight))
            return min(free, key=lambda sb: (len(sb.models), len(sb.inflight)))
        # most recently used first keeps the hot set small, so idle sandboxes can expire (scale to zero)
        return max(free, key=lambda sb: (not sb.inflight, sb.last_used))

    def may_start(self, fp: FunctionPool, *, evict: bool = True) -> bool:
        """True when ``fp`` may start one more sandbox now, evicting idle ones elsewhere if the engine is full."""
        if fp.size >= fp.spec.max_sandboxes or fp.backoff_left_s() > 0:
            return False
        budget = self.memory_budget_mb
        # a stem cell would be specialized: the count does not grow, the memory of the function does; sandboxes
        # still closing count until they are gone; idle spares only take the budget sandboxes leave free (the
        # launcher sizes them by it) and give way to a launch, so they are not counted
        stem = 1 if self.stem and fp.spec.python is None else 0
        over_count = self.total + self.closing - stem - self.max_total + 1
        used = self.memory_in_use(include_reserved=False) + self.closing_mb
        over_mb = (used + fp.spec.memory_mb - budget) if budget is not None else 0
        if over_count <= 0 and over_mb <= 0:
            return True
        if not evict:
            return False
        need_count, need_mb = over_count - self.closing, over_mb - self.closing_mb
        if need_count > 0 or need_mb > 0:
            self._evict(fp, max(need_count, 0), max(need_mb, 0))
        # the evicted sandboxes count until they are gone: their end calls on_capacity, which starts this one
        return False

    def _evict(self, exclude: FunctionPool, count: int, need_mb: int) -> bool:
        idle = [(fp, sb) for fp in self.functions.values() if fp is not exclude for sb in fp.idle()]
        if self.stem:
            idle += [(None, sb) for sb in self.stem]  # type: ignore[misc]
        if len(idle) < count:
            return False
        owner = {id(sb): fp for fp, sb in idle}
        cands = [
            Candidate(
                fn=sb.fn_key,
                memory_mb=(fp.spec.memory_mb if fp else 0),
                cold_cost_ms=(fp.cold_ms + fp.warm_ms) if fp else 0.0,
                warm_cost_ms=fp.warm_ms if fp else 0.0,
                frequency=fp.live_runs() if fp else 0,
                key=sb,
            )
            for fp, sb in idle
        ]
        if need_mb > 0:
            victims = self.evictor.choose_victims(cands, need_mb)
            if not victims:
                return False
            reason = "evictions_memory"
        else:
            # over the sandbox count only: the least recently used idle ones go
            victims = sorted(cands, key=lambda c: _last_used(c.key))[:count]
            reason = "evictions_capacity"
        for c in victims:
            sb = c.key
            assert isinstance(sb, Sandbox)
            fp = owner[id(sb)]
            self.stats[reason] += 1
            if fp is None:
                self.stem.remove(sb)
                self.tg.start_soon(self._stop_retired, sb, 0)
            else:
                # the caller takes the freed capacity: announcing it would let the scheduler re-enter and start a
                # sandbox for the same request in it (two starts per eviction, the total growing past the cap)
                self.retire(fp, sb, notify=False)
        return True

    # -- lifecycle --------------------------------------------------------------------------------------------
    def reserve(self, fp: FunctionPool) -> Sandbox:
        """Count a new sandbox for ``fp`` at once (so caps hold) before :meth:`boot` starts it."""
        while self.stem and self.stem[-1].gone:
            self.stem.pop()
        # a stem cell is a fork of the preloaded interpreter: not for a function that needs its env's python
        use_stem = bool(self.stem) and fp.spec.python is None
        can_serve = getattr(self.stem[-1], "can_serve", None) if use_stem else None
        if can_serve is not None and not can_serve(fp.spec):
            use_stem = False  # a Ray stem actor reserved other resources, or lacks the function's environment
        sb = self.stem.pop() if use_stem else self.sandbox_factory(fp.spec.key, self.services)
        sb.fn_key = fp.spec.key
        sb.owner = fp
        fp.sandboxes.append(sb)
        fp.starting += 1
        if len(self.live) > 2 * self.max_total:
            self.live = {s for s in self.live if not s.closed.is_set()}
        self.live.add(sb)
        return sb

    async def boot(self, fp: FunctionPool, sb: Sandbox) -> dict[str, Any]:
        """Launch (unless it is a stem cell) and initialize a reserved sandbox; returns the INIT_DONE reply."""
        spec = fp.spec
        t0 = time.perf_counter()
        reply: dict[str, Any]
        try:
            if spec.bundle.root is not None:
                problem = check_staged(spec.bundle.root, spec.bundle.digest)
                if problem is not None:
                    raise DeployError(problem)
            if sb.proc is None:
                # an env that replaces a preloaded package cannot run in a fork of the preloaded interpreter
                launcher = SpawnLauncher(python=spec.python) if spec.python else self.launcher
                extra = {ISOLATION_ENV: "sandbox"} if spec.isolation == "sandbox" else None
                await sb.start(launcher, scrubbed_env(extra), self.tg, wait_ready=False)
                self.stats["forks" if sb.launch_how == "fork" else "spawns"] += 1
            else:
                self.stats["prewarmed_specializations"] += 1
                self.tg.start_soon(self._refill_stem)
            reply = await sb.init(spec.init_fields(), spec.timeout_s)
            scratch = reply.get("scratch")
            if isinstance(scratch, str) and spec.isolation == "process":
                # a sandboxed one's lies in its private /tmp, which ends with it
                self.tg.start_soon(self._remove_scratch, sb, scratch)
        except (Exception, SandboxDied) as exc:
            reply = {"ok": False, "error": f"the sandbox failed to start: {exc}"}
            if getattr(exc, "internal", False):
                reply["internal"] = True  # the backend failed (e.g. a Ray cluster without room), not the function
        finally:
            fp.starting -= 1
        # a first RUN carried by the start (see Sandbox.claim_first_run) ran within that time: it is not the INIT's
        sb.init_ms = max(0.0, (time.perf_counter() - t0) * 1000 - sb.folded_run_ms)
        if not reply.get("ok") and (sb.killed_from_outside or getattr(sb, "backend_lost", False)):
            # SIGKILLed from outside while it started (its import did not fail), or its backend's connection lost
            # (Ray; a cold start's call may have carried its first run): no crash loop of the function, so neither
            # counted toward its back-off nor reset, and the error the back-off reports stays its own
            reply["killed_from_outside"] = True
            self.stats["starts_killed"] += 1
            self.retire(fp, sb)
        elif not reply.get("ok"):
            fp.init_failures += 1
            delay = min(INIT_BACKOFF_FIRST_S * 2 ** (fp.init_failures - 1), INIT_BACKOFF_MAX_S)
            fp.backoff_until = time.monotonic() + delay
            fp.last_init_error = str(reply.get("error"))
            fp.last_init_internal = reply.get("internal") is True
            fp.last_init_logs = list(reply.get("logs") or [])
            self.stats["init_failures"] += 1
            self.retire(fp, sb)
        else:
            fp.init_failures = 0
            sb.last_used = self.now()
            if not math.isfinite(sb.expires):
                # a pre-warm has its expiry already (the policy's keep-alive end); any other sandbox unused after
                # its start (its request went to another one) gets the function's idle window, never for ever
                sb.expires = sb.last_used + fp.spec.idle_timeout_s
            # Greedy-Dual: a loaded sandbox's priority starts from the clock now, frequency 0 until it serves calls
            self.evictor.touch(sb)
            self.stats["cold_starts"] += 1
            # Greedy-Dual's cold cost is this function's mean start (not a mean over the engine's starts)
            fp.cold_starts += 1
            fp.cold_ms += (sb.init_ms - fp.cold_ms) / fp.cold_starts
        # a round of the reaper reads every function: only when this start changed what is due before its next
        # round (a failure's back-off, an expiry sooner), not at every cold start (a burst of them, a busy host)
        if not reply.get("ok") or sb.expires < self._reaper_next:
            self.wake_reaper()
        return reply

    async def _remove_scratch(self, sb: Sandbox, path: str) -> None:
        """Remove a sandbox's working dir once it has ended (a dir the runtime names as its own, under the temp
        dir: nothing else)."""
        await sb.closed.wait()
        if os.path.dirname(path) != tempfile.gettempdir() or not os.path.basename(path).startswith(SCRATCH_PREFIX):
            return
        await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, path, ignore_errors=True))

    async def _refill_stem(self) -> None:
        """Keep ``prewarm`` generic sandboxes launched and READY, without exceeding the engine's cap."""
        while len(self.stem) + self._stem_starting < self.prewarm and self.total < self.max_total:
            self._stem_starting += 1
            sb = self.sandbox_factory("(stem)", self.services)
            self.live.add(sb)
            try:
                await sb.start(self.launcher, scrubbed_env(), self.tg)
                self.stats["forks" if sb.launch_how == "fork" else "spawns"] += 1
            except (Exception, SandboxDied):
                self.tg.start_soon(sb.stop)
                return
            finally:
                self._stem_starting -= 1
            self.stem.append(sb)
            self.on_capacity()

    def retire(self, fp: FunctionPool, sb: Sandbox, *, notify: bool = True) -> None:
        """Take a sandbox out of service and stop it in the background; ``notify``: tell the scheduler."""
        if sb in fp.sandboxes:
            fp.sandboxes.remove(sb)
        self.evictor.forget(sb)
        if sb.state != "dead":
            self.tg.start_soon(self._stop_retired, sb, fp.spec.memory_mb)
        if notify:
            self.on_capacity()

    async def _stop_retired(self, sb: Sandbox, memory_mb: int) -> None:
        """Stop a sandbox taken out of service; it counts against the caps until it is gone."""
        self.closing += 1
        self.closing_mb += memory_mb
        try:
            await sb.stop()
        finally:
            self.closing -= 1
            self.closing_mb -= memory_mb
            self.on_capacity()

    def forget_dead(self, fp: FunctionPool, sb: Sandbox) -> None:
        if sb in fp.sandboxes:
            fp.sandboxes.remove(sb)
            self.evictor.forget(sb)
            self.on_capacity()

    def remove_function(self, key: str) -> FunctionPool | None:
        fp = self.functions.pop(key, None)
        if fp is not None:
            fp.deleted = True
            forget = getattr(fp.policy, "forget", None)
            if forget is not None:
                forget(key)
            for sb in list(fp.sandboxes):
                if not sb.inflight:
                    self.retire(fp, sb)
        return fp

    # -- keep-alive -------------------------------------------------------------------------------------------
    def started_run(self, fp: FunctionPool, sb: Sandbox, now: float) -> None:
        if self.on_busy is not None:
            self.on_busy()
        fp.policy.on_invocation_start(fp.spec.key, now)
        self.evictor.touch(sb)
        sb.expires = math.inf
        fp.prewarm_at = None

    def became_idle(self, fp: FunctionPool, sb: Sandbox, now: float) -> None:
        """Ask the policy how long to keep ``sb`` (and whether to pre-warm later); wake the reaper if sooner."""
        key = fp.spec.key
        fp.policy.on_invocation_end(key, now)
        d = fp.policy.decide(key, now, warm=len(fp.idle()) - 1)
        sb.expires = min(d.unload_at if d.unload_at is not None else math.inf, d.keep_until)
        if d.prewarm_at is not None:
            fp.prewarm_at, fp.prewarm_until = d.prewarm_at, d.keep_until
        if sb.expires < self._reaper_next or (fp.prewarm_at is not None and fp.prewarm_at < self._reaper_next):
            self._reaper_wake.set()

    def wake_reaper(self) -> None:
        self._reaper_wake.set()

    async def reaper(self) -> None:
        """Stop idle sandboxes past their keep-alive, keep ``min_sandboxes`` warm, pre-warm when the policy says."""
        self.tg.start_soon(self._refill_stem)
        while True:
            now = self.now()
            delay = max(self.reap(now), REAP_INTERVAL_MIN_S)
            self._reaper_next = now + delay
            with anyio.move_on_after(delay):
                await self._reaper_wake.wait()
            self._reaper_wake = anyio.Event()

    def reap(
        self, now: float, functions: Iterable[FunctionPool] | None = None, *, max_delay_s: float = REAP_INTERVAL_MAX_S
    ) -> float:
        """One round of the reaper at ``now`` (over ``functions``, default all): expire, top up, pre-warm.

        Returns the seconds until something is due (at most ``max_delay_s``). The reaper task calls it on the
        pool's clock; the keep-alive bench calls it on a fake clock, so the bench runs this very code.
        """
        next_check = max_delay_s
        for fp in list(self.functions.values()) if functions is None else functions:
            spec = fp.spec
            for sb in sorted(fp.idle(), key=lambda s: s.last_used):
                if fp.size <= spec.min_sandboxes:
                    break
                if sb.expires <= now:
                    self.stats["expired_idle"] += 1
                    if sb.prewarmed and not sb.runs:
                        self.stats["prewarms_expired_unused"] += 1
                    self.retire(fp, sb)
                else:
                    next_check = min(next_check, sb.expires - now)
            if fp.deleted:
                continue
            backoff = fp.backoff_left_s()
            if backoff > 0 and fp.size < spec.min_sandboxes:
                next_check = min(next_check, backoff)
            if fp.size < spec.min_sandboxes and self.may_start(fp, evict=False):
                self.stats["min_sandboxes_started"] += 1
                self.warm_up(fp)
            if fp.prewarm_at is not None:
                if fp.prewarm_at <= now:
                    fp.prewarm_at = None
                    if not fp.idle() and not fp.starting and self.may_start(fp, evict=False):
                        self.stats["policy_prewarms"] += 1
                        self.warm_up(fp)
                        if fp.sandboxes:
                            # the pre-warmed sandbox is kept until the policy's keep-alive end, then stopped unused
                            fp.sandboxes[-1].expires = fp.prewarm_until
                            next_check = min(next_check, max(fp.prewarm_until - now, 0.0))
                else:
                    next_check = min(next_check, fp.prewarm_at - now)
        return next_check

    async def close_all(self) -> None:
        """Stop every sandbox this pool ever started and wait until each is reaped and its fds closed."""
        self.prewarm = 0
        async with anyio.create_task_group() as tg:
            for sb in list(self.live):
                tg.start_soon(self._close_one, sb)
        self.live.clear()
        self.stem.clear()

    @staticmethod
    async def _close_one(sb: Sandbox) -> None:
        await sb.stop()
        if sb.proc is not None:
            await sb.closed.wait()

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, fp in self.functions.items():
            out[key] = {
                "sandboxes": fp.size,
                "busy": sum(1 for sb in fp.sandboxes if sb.inflight),
                "idle": len(fp.idle()),
                "starting": fp.starting,
                "queued": len(fp.queue),
                "models": sorted({m for sb in fp.sandboxes for m in sb.models}),
                "pids": [sb.proc.pid for sb in fp.sandboxes if sb.proc is not None],
                "keepalive": getattr(fp.policy, "name", "?"),
                "init_failures": fp.init_failures,
                "init_backoff_s": round(fp.backoff_left_s(), 3),
            }
        return out
