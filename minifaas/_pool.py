"""The sandbox pool: which sandboxes exist, which are free, when to start, evict and expire them.

The pool knows nothing about queues or activation records (that is the scheduler's job). It answers three
questions: "which free sandbox should serve this request?" (model-affinity routing), "may this function start one
more sandbox?" (per-function and engine-wide caps, evicting an idle sandbox of another function when the engine is
full), and "which idle sandboxes have outlived their keep-alive?" (the reaper task, scale to zero).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
import anyio.abc

from ._function import FunctionSpec
from ._launch import Launcher, scrubbed_env
from ._sandbox import HostService, Sandbox

__all__ = ("FunctionPool", "Pool")

MAX_SANDBOXES_TOTAL: Final = 32
REAP_INTERVAL_MAX_S: Final = 1.0
REAP_INTERVAL_MIN_S: Final = 0.01


class FunctionPool:
    """The sandboxes of one function version, and its queue of waiting requests (owned by the scheduler)."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.sandboxes: list[Sandbox] = []
        self.starting = 0
        self.queue: collections.deque[Any] = collections.deque()
        self.deleted = False
        #: cost figures for Greedy-Dual eviction: mean cold start and warm run, in ms
        self.cold_ms = 0.0
        self.warm_ms = 0.0
        self.invocations = 0

    def free(self) -> list[Sandbox]:
        c = self.spec.concurrency
        return [sb for sb in self.sandboxes if sb.state == "ready" and len(sb.inflight) < c]

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
        on_capacity: Callable[[], None] = lambda: None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tg = tg
        #: the keep-alive clock (seconds); tests pass a fake clock's ``now``
        self.now = now
        self.launcher = launcher
        self.services = services
        self.max_total = max_total
        self.memory_budget_mb = memory_budget_mb
        self.on_capacity = on_capacity
        self.functions: dict[str, FunctionPool] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self._reaper_wake = anyio.Event()

    # -- capacity ---------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(fp.size for fp in self.functions.values())

    def memory_in_use(self) -> int:
        return sum(fp.size * fp.spec.memory_mb for fp in self.functions.values())

    def function(self, spec: FunctionSpec) -> FunctionPool:
        fp = self.functions.get(spec.key)
        if fp is None:
            fp = self.functions[spec.key] = FunctionPool(spec)
        return fp

    def route(self, fp: FunctionPool, model: str | None) -> Sandbox | None:
        """Ray Serve's order: a free sandbox holding the model, else the free one holding fewest models."""
        free = fp.free()
        if not free:
            return None
        if model is not None:
            holders = [sb for sb in free if model in sb.models]
            if holders:
                return min(holders, key=lambda sb: len(sb.inflight))
            return min(free, key=lambda sb: (len(sb.models), len(sb.inflight)))
        # most recently used first keeps the hot set small, so idle sandboxes can expire (scale to zero)
        return max(free, key=lambda sb: (sb.state == "ready" and not sb.inflight, sb.last_used))

    def may_start(self, fp: FunctionPool) -> bool:
        """True when ``fp`` may start one more sandbox now, evicting an idle one elsewhere if the engine is full."""
        if fp.size >= fp.spec.max_sandboxes:
            return False
        need_mb = fp.spec.memory_mb
        while self.total >= self.max_total or (
            self.memory_budget_mb is not None and self.memory_in_use() + need_mb > self.memory_budget_mb
        ):
            if not self._evict_one(exclude=fp):
                return False
        return True

    def _evict_one(self, exclude: FunctionPool) -> bool:
        candidates = [(fp, sb) for fp in self.functions.values() if fp is not exclude for sb in fp.idle()]
        if not candidates:
            return False
        if self.memory_budget_mb is not None:
            # Greedy-Dual (FaasCache): keep what is costly to re-create per MB of memory it holds
            def priority(item: tuple[FunctionPool, Sandbox]) -> float:
                f, sb = item
                return sb.last_used + f.invocations * max(f.cold_ms - f.warm_ms, 1.0) / max(f.spec.memory_mb, 1)

            fp, sb = min(candidates, key=priority)
            self.stats["evictions_memory"] += 1
        else:
            fp, sb = min(candidates, key=lambda item: item[1].last_used)
            self.stats["evictions_capacity"] += 1
        self.retire(fp, sb)
        return True

    # -- lifecycle --------------------------------------------------------------------------------------------
    def reserve(self, fp: FunctionPool) -> Sandbox:
        """Count a new sandbox for ``fp`` at once (so caps hold) before :meth:`boot` starts it."""
        sb = Sandbox(fp.spec.key, self.services)
        fp.sandboxes.append(sb)
        fp.starting += 1
        return sb

    async def boot(self, fp: FunctionPool, sb: Sandbox) -> dict[str, Any]:
        """Launch and initialize a reserved sandbox; returns the INIT_DONE reply (ok or not)."""
        spec = fp.spec
        t0 = time.perf_counter()
        reply: dict[str, Any]
        try:
            env = scrubbed_env({"MALLOC_ARENA_MAX": "2"})
            await sb.start(self.launcher, env, self.tg)
            self.stats["forks" if sb.launch_how == "fork" else "spawns"] += 1
            reply = await sb.init(spec.init_fields())
        except Exception as exc:  # noqa: BLE001 - turned into the cold activation's developer error
            reply = {"ok": False, "error": f"the sandbox failed to start: {exc}"}
        finally:
            fp.starting -= 1
        sb.init_ms = (time.perf_counter() - t0) * 1000
        if not reply.get("ok"):
            self.retire(fp, sb)
        else:
            sb.last_used = self.now()
            n = self.stats["cold_starts"] = self.stats["cold_starts"] + 1
            fp.cold_ms += (sb.init_ms - fp.cold_ms) / n
        self.wake_reaper()
        return reply

    def retire(self, fp: FunctionPool, sb: Sandbox) -> None:
        """Take a sandbox out of service and stop it in the background."""
        if sb in fp.sandboxes:
            fp.sandboxes.remove(sb)
        if sb.state != "dead":
            self.tg.start_soon(sb.stop)
        self.on_capacity()

    def forget_dead(self, fp: FunctionPool, sb: Sandbox) -> None:
        if sb in fp.sandboxes:
            fp.sandboxes.remove(sb)
            self.on_capacity()

    def remove_function(self, key: str) -> FunctionPool | None:
        fp = self.functions.pop(key, None)
        if fp is not None:
            fp.deleted = True
            for sb in list(fp.sandboxes):
                if not sb.inflight:
                    self.retire(fp, sb)
        return fp

    # -- keep-alive -------------------------------------------------------------------------------------------
    def wake_reaper(self) -> None:
        self._reaper_wake.set()

    async def reaper(self) -> None:
        """Stop sandboxes idle past their function's idle timeout, keeping ``min_sandboxes`` warm."""
        while True:
            now = self.now()
            next_check = REAP_INTERVAL_MAX_S
            for fp in list(self.functions.values()):
                spec = fp.spec
                idle = sorted(fp.idle(), key=lambda sb: sb.last_used)
                keep = spec.min_sandboxes
                for sb in idle:
                    if fp.size <= keep:
                        break
                    expires = sb.last_used + spec.idle_timeout_s
                    if expires <= now:
                        self.stats["expired_idle"] += 1
                        self.retire(fp, sb)
                    else:
                        next_check = min(next_check, expires - now)
            with anyio.move_on_after(max(next_check, REAP_INTERVAL_MIN_S)):
                await self._reaper_wake.wait()
            self._reaper_wake = anyio.Event()

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
            }
        return out
