"""The scheduler: admission, per-function queues, dispatch to sandboxes, and the end of every activation.

Flow of one invocation::

    submit() --admit--> Activation(pending) in store --> FunctionPool.queue --pump--> free sandbox?
                                                                   |  no: start a sandbox (cold) if the caps allow
                                                                   v
                                 execute(): RUN -> RESULT | timeout (kill) | sandbox death --> Activation(ended)

Every accepted invocation ends in exactly one final record: the execute step records whatever happened, and the
engine's close records the ones that never ran.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel
from minifaas_sandbox import protocol as p

from .._errors import InvalidPayload, Overloaded, PayloadTooLarge
from .activation import Activation, log_line, new_activation_id, now_ms
from .function import FunctionSpec
from .poll import PollWindow
from .pool import FunctionPool, Pool
from .sandbox import Sandbox, SandboxDied
from .store import ActivationStore

__all__ = ("Job", "Scheduler", "validate_args")

MAX_PAYLOAD_DEPTH: Final = 64
ENGINE_MAX_QUEUED: Final = 100_000
#: a function whose recent warm runs predict a wait under this may get one RUN queued inside a busy sandbox
#: (pipelining, as ProcessPoolExecutor's call queue does): its next request starts the moment the current one
#: ends, with no round trip through the host; slower functions scale out to new sandboxes instead
PREFETCH_MAX_RUN_MS: Final = 2.0
#: warm runs observed before pipelining is considered
PREFETCH_MIN_SAMPLES: Final = 20
#: functions whose warm runs take longer than this are not polled for (see ``_poll``): waking the host costs them
#: 0.2-0.6 ms, a small share, while a polling host slows a busy sandbox next to it (measured here, where the two
#: cores share a physical one: pose crop, 33 ms a run, ran 13% slower with polling, the 14 ms classifier no faster)
POLL_MAX_RUN_MS: Final = 5.0
#: a poll window is at most this wide, whatever the spread of the function's run times, bounding its CPU cost
MAX_POLL_WINDOW_MS: Final = 3.0
_JSON_SCALARS: Final = (str, int, float, bool, type(None), bytes)
#: the packed arguments of a call with none (most warm calls of a no-op, and many others)
_EMPTY_ARGS: Final = p.encode_body({})
_RESULT_STATUSES: Final = frozenset({"success", "application_error", "developer_error"})
#: how long the host polls for the store's word that a final record is written (a durable store's writer thread
#: commits it; waking a sleeping host for that callback costs as much as the commit): past it, the loop sleeps
STORE_POLL_S: Final = 0.0005
#: a sandbox polls this long for the next RUN after a result (the sandbox's own SPIN_BEFORE_BLOCK_S); with a durable
#: store the caller sees a result only once its record is written, so the next RUN of a caller in a loop comes that
#: much later: the RUN asks the sandbox to poll longer by the store's recent wait (capped), or it is found asleep and
#: waking it costs 0.1-0.2 ms on a VM
SANDBOX_SPIN_US: Final = 100
STORE_WAIT_MAX_US: Final = 400
STORE_WAIT_GAIN: Final = 8
#: a run time reported beyond this (a day) is garbage, kept out of the pool's cost figures
_MAX_RUN_MS: Final = 86_400_000.0


class Done:
    """Set once when an activation ends. One is made per invocation, on the hot path: a bare future per waiter is
    a fraction of the cost of an ``anyio.Event`` (the engine runs on asyncio only)."""

    __slots__ = ("_loop", "_set", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None
        #: the loop its waiters run on (the scheduler's), or None to look it up at each wait
        self._loop = loop

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    async def wait(self) -> None:
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        fut = (self._loop or asyncio.get_running_loop()).create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if not self._set and self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)


class Job:
    __slots__ = (
        "accepted",
        "act",
        "args_packed",
        "begun",
        "deadline",
        "done",
        "ended",
        "ended_at",
        "fp",
        "model",
        "poll",
        "queued_at",
    )

    def __init__(
        self,
        act: Activation,
        args_packed: bytes,
        fp: FunctionPool,
        model: str | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.act = act
        self.args_packed = args_packed
        self.fp = fp
        self.model = model
        #: set once the activation has ended and its final record is stored (or the store reported it could not)
        self.done = Done(loop)
        #: the activation has ended in memory (its final record may still be on its way to the store)
        self.ended = False
        #: ``time.perf_counter()`` when it ended in memory, with a store that writes later
        self.ended_at = 0.0
        #: set once the accepted record is stored (when the submitter asked to wait for that)
        self.accepted: Done | None = None
        #: event-loop time at which it was queued (first), for ``max_queue_wait_s``
        self.queued_at = 0.0
        #: event-loop time at which the activation times out (set when it starts)
        self.deadline = math.inf
        #: ``time.perf_counter()`` when it started on a sandbox
        self.begun = 0.0
        #: when the host polls for its result (see ``Scheduler.poll_window``), while it runs
        self.poll: PollWindow | None = None


def validate_args(args: Any, *, max_depth: int = MAX_PAYLOAD_DEPTH) -> dict[str, Any]:
    """Arguments must be a dict with str keys holding JSON-like values (plus bytes and numpy arrays)."""
    if not isinstance(args, dict):
        raise InvalidPayload(f"arguments must be a dict, not {type(args).__name__}")
    stack: list[tuple[Any, int, str]] = [(args, 0, "args")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict):
            if depth >= max_depth:
                raise InvalidPayload(f"{where}: nested deeper than {max_depth} levels")
            for k, v in value.items():
                if not isinstance(k, str):
                    raise InvalidPayload(f"{where}: key {k!r} is a {type(k).__name__}, keys must be str")
                if not isinstance(v, _JSON_SCALARS):
                    stack.append((v, depth + 1, f"{where}[{k!r}]"))
        elif isinstance(value, list | tuple):
            if depth >= max_depth:
                raise InvalidPayload(f"{where}: nested deeper than {max_depth} levels")
            for i, v in enumerate(value):
                if not isinstance(v, _JSON_SCALARS):
                    stack.append((v, depth + 1, f"{where}[{i}]"))
        elif isinstance(value, float) and value != value:
            continue
        elif type(value).__module__ == "numpy" and not getattr(getattr(value, "dtype", None), "hasobject", True):
            continue  # an array or scalar of numbers or strings: it crosses as itself (protocol NDARRAY_EXT)
        elif not isinstance(value, _JSON_SCALARS):
            raise InvalidPayload(f"{where}: a {type(value).__name__} is not a JSON-like value")
    return args


class Scheduler:
    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        pool: Pool,
        store: ActivationStore,
        *,
        max_queued: int = ENGINE_MAX_QUEUED,
        on_end: Callable[[Activation], None] = lambda act: None,
        poll_us: int = 0,
    ) -> None:
        self.tg = tg
        self.pool = pool
        self.store = store
        #: the store calls ``put``'s callback later, from its writer (a durable store), not at once
        self._store_writes_later = bool(getattr(store, "writes_later", False))
        self.max_queued = max_queued
        self.on_end = on_end
        self.jobs: dict[str, Job] = {}
        self.queued = 0
        #: margin of the poll windows around a predicted result, 0 for none (see ``_poll``)
        self.poll_us = poll_us
        #: running activations with a poll window
        self.polled: set[Job] = set()
        #: moving average of the wait for a durable store's word that a final record is written (microseconds)
        self.store_wait_us = 0.0
        self.poll_max_run_ms = POLL_MAX_RUN_MS
        self._loop = asyncio.get_running_loop()
        #: one timer per function with requests queued: it ends those that waited longer than max_queue_wait_s
        self._queue_timers: dict[FunctionPool, asyncio.TimerHandle] = {}
        #: requests taken off their queue by a starting sandbox whose start carries their RUN (Ray), by sandbox, and
        #: how many each function has so
        self._claimed: dict[Sandbox, Job] = {}
        self._claims: dict[FunctionPool, int] = {}
        pool.on_capacity = self.pump_all
        pool.warm_up = self._warm_up

    # -- admission --------------------------------------------------------------------------------------------
    def submit(
        self,
        spec: FunctionSpec,
        args: dict[str, Any],
        *,
        cause: str | None = None,
        activation_id: str | None = None,
        annotations: dict[str, Any] | None = None,
        durable: bool = False,
    ) -> Job:
        """Admit an invocation; with ``durable``, ``job.accepted`` is set once its accepted record is stored."""
        validate_args(args)
        for key in spec.final_params:
            if key in args and args[key] != spec.params.get(key):
                raise InvalidPayload(
                    f"parameter {key!r} of {spec.name} is fixed by its manifest: a caller cannot set it"
                )
        merged = {**spec.params, **args} if spec.params else args
        try:
            packed = p.encode_body(merged) if merged else _EMPTY_ARGS
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidPayload(f"arguments cannot be encoded: {exc}") from None
        if len(packed) > spec.max_payload_bytes:
            raise PayloadTooLarge(
                f"arguments of {spec.name} are {len(packed)} bytes, over the {spec.max_payload_bytes} byte limit"
            )
        fp = self.pool.function(spec)
        if fp.deleted:
            fp = self.pool.function(spec)
        if len(fp.queue) >= spec.max_queue or self.queued >= self.max_queued:
            raise Overloaded(
                f"{spec.name}: {len(fp.queue)} invocations already queued "
                f"(limit {spec.max_queue} per function, {self.max_queued} per engine)"
            )
        model = merged.get(spec.model_param) if spec.model_param else None
        act = Activation(
            activation_id=activation_id or new_activation_id(),
            name=spec.name,
            version=spec.version,
            namespace=spec.namespace,
            accepted=now_ms(),
            cause=cause,
            annotations=(
                {"kind": "python:3", "limits": spec.limits_annotation, **annotations}
                if annotations
                else {"kind": "python:3", "limits": spec.limits_annotation}
            ),
        )
        loop = self._loop
        job = Job(act, packed, fp, model if isinstance(model, str) else None, loop)
        if durable:
            accepted = job.accepted = Done(loop)
            self.store.put(act, accepted.set)
        else:
            self.store.put(act)
        self.jobs[act.activation_id] = job
        job.queued_at = loop.time()
        fp.queue.append(job)
        self.queued += 1
        self.pump(fp)
        # a warm call leaves the queue at once: only one that waits needs the queue's timer
        if fp.queue and fp not in self._queue_timers:
            self._arm_queue_timer(fp)
        return job

    def _requeue(self, fp: FunctionPool, job: Job) -> None:
        """Give a request that never ran back to the front of its queue."""
        job.act.status = "pending"
        fp.queue.appendleft(job)
        self.queued += 1
        if fp not in self._queue_timers:
            self._arm_queue_timer(fp)

    def _arm_queue_timer(self, fp: FunctionPool) -> None:
        oldest = min(job.queued_at for job in fp.queue)
        self._queue_timers[fp] = self._loop.call_at(oldest + fp.spec.max_queue_wait_s, self._expire_queued, fp)

    def _expire_queued(self, fp: FunctionPool) -> None:
        del self._queue_timers[fp]
        limit = fp.spec.max_queue_wait_s
        now = self._loop.time()
        expired = [job for job in fp.queue if job.queued_at + limit <= now]
        for job in expired:
            fp.queue.remove(job)
            self.queued -= 1
            message = (
                f"{fp.spec.name} waited {limit:g} s in its queue and no sandbox took it "
                f"(the function's max_queue_wait_s is {limit:g} s)"
            )
            self._finish(job, "internal_error", {"error": message}, [], {"queue_timeout": True})
        if fp.queue:
            self._arm_queue_timer(fp)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def pump_all(self) -> None:
        for fp in list(self.pool.functions.values()):
            if fp.queue:
                self.pump(fp)

    def pump(self, fp: FunctionPool) -> None:
        queue = fp.queue
        while queue:
            job = queue[0]
            sb = self.pool.route(fp, job.model)
            if sb is not None:
                queue.popleft()
                self.queued -= 1
                self._dispatch(fp, sb, job)
                continue
            if fp.warm_runs >= PREFETCH_MIN_SAMPLES and self._pipelining_pays(fp):
                sb = self._prefetch_target(fp)
                if sb is not None:
                    queue.popleft()
                    self.queued -= 1
                    self._prefetch(fp, sb, job)
                    continue
            # every queued request beyond the sandboxes already starting wants a new sandbox (a starting sandbox that
            # carries a request's RUN has that request off the queue already)
            claims = self._claims.get(fp, 0)
            if fp.starting * fp.spec.concurrency < len(queue) + claims and self.pool.may_start(fp):
                self._new_sandbox(fp)
                continue
            if not fp.sandboxes and fp.backoff_left_s() > 0:
                # nothing runs this function and nothing may start for a while: failing now says why, where
                # waiting would only fail later
                self._fail_backing_off(fp)
            break

    def _fail_backing_off(self, fp: FunctionPool) -> None:
        left = fp.backoff_left_s()
        what = "could not start" if fp.last_init_internal else "failed to initialize"
        error = f"The action {what}: {fp.last_init_error}"
        if fp.init_failures > 1:  # one failure is not a crash loop: OpenWhisk's message alone
            error += f" ({fp.init_failures} failed initializations in a row; no new sandbox starts for {left:.1f} s)"
        annotations = {"init_failed": True, "init_failures": fp.init_failures, "init_backoff_s": round(left, 3)}
        while fp.queue:
            job = fp.queue.popleft()
            self.queued -= 1
            status = "internal_error" if fp.last_init_internal else "developer_error"
            self._finish(job, status, {"error": error}, list(fp.last_init_logs), dict(annotations))

    def _pipelining_pays(self, fp: FunctionPool) -> bool:
        """One rule: queue a request behind a busy sandbox's run only when that wait, predicted from the recent
        run times (moving average plus twice their deviation, as TCP bounds a round trip), is shorter than waiting
        for another sandbox. While a sandbox is starting or may start for it, that means a short wait, shorter than
        a cold start (a lifetime mean would keep pipelining long after a function's runs turned slow). When none
        may start (the function's cap, the engine's), the request waits for a busy sandbox whatever its run
        times: queued inside the one whose run started first, it starts the moment that run ends, instead of a
        host round trip later, which a host busy elsewhere (a burst of cold starts on its loop) stretches to
        milliseconds. With several busy sandboxes, only while their run times vary little: the one picked could
        otherwise end last, and the request wait behind a slow run while the others free up."""
        if fp.starting or self.pool.may_start(fp, evict=False):
            predicted_ms = fp.run_avg_ms + 2 * fp.run_dev_ms
            return predicted_ms < PREFETCH_MAX_RUN_MS and predicted_ms < fp.cold_ms
        return len(fp.sandboxes) == 1 or 2 * fp.run_dev_ms < PREFETCH_MAX_RUN_MS

    @staticmethod
    def _prefetch_target(fp: FunctionPool) -> Sandbox | None:
        """The busy sandbox whose run started first (it should free first), if it has nothing queued yet."""
        best: Sandbox | None = None
        best_start = math.inf
        for sb in fp.sandboxes:
            if sb.state == "ready" and not sb.prefetched and len(sb.inflight) == 1 and fp.spec.concurrency == 1:
                start = next(iter(sb.inflight.values())).act.start or 0
                if start < best_start:
                    best, best_start = sb, start
        return best

    def _prefetch(self, fp: FunctionPool, sb: Sandbox, job: Job) -> None:
        """Queue a RUN inside a busy sandbox; it starts (and its clock runs) when the current one's RESULT arrives."""
        spec = fp.spec
        act = job.act
        timeout_ms = int(spec.timeout_s * 1000)
        deadline = now_ms() + timeout_ms + round(2 * fp.warm_ms)
        try:
            sb.send(
                p.RUN,
                {"aid": act.activation_id, "args": job.args_packed, "deadline": deadline, "version": spec.version},
            )
        except SandboxDied:
            self._requeue(fp, job)
            self.pool.forget_dead(fp, sb)
            return
        act.annotations["pipelined"] = True
        sb.prefetched.append(job)

    def _begin(self, fp: FunctionPool, sb: Sandbox, job: Job, cold: bool, ran_ms: float = 0.0) -> None:
        """Stamp the start of an activation on ``sb`` and arm its timeout; ``ran_ms``: it began that long ago (a
        first RUN carried by the sandbox's start)."""
        act = job.act
        act.start = now_ms() - round(ran_ms)
        act.status = "running"
        self.pool.started_run(fp, sb, self.pool.now())
        ann = act.annotations
        ann["sandbox"] = sb.id
        ann["cold"] = cold
        if cold:
            act.init_time = round(sb.init_ms)
            ann["launch"] = sb.launch_how
            if sb.from_spare:
                ann["spare"] = True
        act.wait_time = max(0, act.start - act.accepted - (act.init_time or 0))
        sb.runs += 1
        sb.inflight[act.activation_id] = job
        job.begun = time.perf_counter() - ran_ms / 1000
        # with requests queued behind it the host has work to do when the result comes: polling would only take
        # the core from the sandboxes
        if (
            self.poll_us
            and not fp.queue
            and fp.warm_runs >= PREFETCH_MIN_SAMPLES
            and fp.run_avg_ms <= self.poll_max_run_ms
        ):
            self._plan_poll(fp, job)
        # one timer per sandbox, not per activation: it is armed for the oldest deadline and, when it fires, re-armed
        # for whatever runs then (a sandbox's deadlines only grow: one function version, one timeout)
        job.deadline = self._loop.time() - ran_ms / 1000 + fp.spec.timeout_s
        if sb.timer is None:
            sb.timer = self._loop.call_at(job.deadline, self._check_deadlines, fp, sb)

    def _new_sandbox(self, fp: FunctionPool) -> Sandbox:
        sb = self.pool.reserve(fp)
        sb.on_result = self._on_result
        sb.on_died = self._on_died
        sb.claim_first_run = functools.partial(self._claim_first_run, fp, sb)
        self.tg.start_soon(self._start, fp, sb)
        return sb

    def _claim_first_run(self, fp: FunctionPool, sb: Sandbox) -> dict[str, Any] | None:
        """The RUN fields of the oldest queued request, taken off the queue for a starting sandbox whose start call
        carries it (see ``Sandbox.claim_first_run``); None when none waits, for a pre-warm, or for a function that
        runs several at once (those queued behind it wait for its INIT, not for its first run)."""
        if sb.prewarmed or sb.gone or sb in self._claimed or not fp.queue or fp.spec.concurrency != 1:
            return None
        job: Job = fp.queue.popleft()
        self.queued -= 1
        self._claimed[sb] = job
        self._claims[fp] = self._claims.get(fp, 0) + 1
        act = job.act
        # its deadline is set where it starts (after the INIT), from the time limit
        return {
            "aid": act.activation_id,
            "args": job.args_packed,
            "timeout_ms": int(fp.spec.timeout_s * 1000),
            "version": fp.spec.version,
        }

    def _settle_claim(self, fp: FunctionPool, sb: Sandbox, ok: bool) -> None:
        """After a start that carried a request's RUN: the request began with it (ok), or never ran and goes back
        to the front of the queue (the failed start's record then ends it, or another sandbox runs it)."""
        job = self._claimed.pop(sb, None)
        if job is None:
            return
        left = self._claims[fp] - 1
        if left:
            self._claims[fp] = left
        else:
            del self._claims[fp]
        if job.ended:
            return  # ended meanwhile (the engine closing)
        if ok and not sb.gone:
            self._dispatch(fp, sb, job, ran_ms=sb.folded_run_ms)
        else:
            self._requeue(fp, job)

    def _warm_up(self, fp: FunctionPool) -> None:
        self._new_sandbox(fp).prewarmed = True

    async def _start(self, fp: FunctionPool, sb: Sandbox) -> None:
        reply = await self.pool.boot(fp, sb)
        if sb in self._claimed:
            self._settle_claim(fp, sb, bool(reply.get("ok")))
        if not reply.get("ok") and fp.queue:
            # OpenWhisk fails the activation that caused the cold start; later ones try again
            job = fp.queue.popleft()
            self.queued -= 1
            act = job.act
            act.start = now_ms()
            act.init_time = round(sb.init_ms)
            logs = list(reply.get("logs") or [])
            logs += [line for lines in sb.stray.values() for line in lines]
            internal = reply.get("internal") is True
            what = "could not start" if internal else "failed to initialize"
            left = fp.backoff_left_s()
            self._finish(
                job,
                "internal_error" if internal else "developer_error",
                {
                    "error": f"The action {what}: {reply.get('error')}"
                    + (
                        f" ({fp.init_failures} failed initializations in a row; the next try in {left:.1f} s)"
                        # one failure is not a crash loop: OpenWhisk's message; nor is a kill from outside
                        if left and fp.init_failures > 1 and not reply.get("killed_from_outside")
                        else ""
                    )
                },
                logs,
                {
                    "cold": True,
                    "sandbox": sb.id,
                    "init_failed": True,
                    "init_failures": fp.init_failures,
                    "init_backoff_s": round(left, 3),
                },
            )
        self.pump(fp)

    def _dispatch(self, fp: FunctionPool, sb: Sandbox, job: Job, ran_ms: float = 0.0) -> None:
        """Send the RUN now; the RESULT, the timeout or the sandbox's death ends the activation. ``ran_ms``: the
        sandbox's start carried this RUN, which began that long ago (the sandbox hands over its RESULT)."""
        act = job.act
        spec = fp.spec
        timeout_ms = int(spec.timeout_s * 1000)
        start = now_ms()
        try:
            sb.send(
                p.RUN,
                {
                    "aid": act.activation_id,
                    "args": job.args_packed,
                    "deadline": start + timeout_ms,
                    "version": spec.version,
                    # nothing else waiting: a caller in a loop will send the next one at once, worth polling for
                    "spin": self._spin(fp),
                },
            )
        except SandboxDied:
            # it never ran: give it back to the queue, a healthy sandbox takes it
            self._requeue(fp, job)
            self.pool.forget_dead(fp, sb)
            return
        self._begin(fp, sb, job, cold=sb.runs == 0 and not sb.prewarmed, ran_ms=ran_ms)

    def _spin(self, fp: FunctionPool) -> bool | int:
        """The RUN's ``spin``: whether (or how many microseconds) the sandbox polls for the next RUN."""
        if fp.queue:
            return False
        if self._store_writes_later:
            return SANDBOX_SPIN_US + int(self.store_wait_us)
        return True

    def _on_result(self, sb: Sandbox, fields: dict[str, Any]) -> None:
        job: Job | None = sb.inflight.pop(str(fields.get("aid")), None)
        if job is None:
            return  # already ended (timed out a moment ago)
        fp = job.fp
        # the frame is untrusted (the function's code can write to the channel too): whatever it holds, the
        # activation must still end here, since its timer is cancelled
        result = fields.get("result")
        logs = fields.get("logs")
        if not isinstance(logs, list):
            logs = []
        stray = sb.stray.pop(job.act.activation_id, None)
        if stray:
            logs = [*logs, *stray]
        status = fields.get("status")
        if not isinstance(status, str) or status not in _RESULT_STATUSES:
            status = "developer_error"
        annotations = fields.get("annotations")
        run_ms = fields.get("run_ms")
        if not isinstance(run_ms, int | float) or not 0 <= run_ms < _MAX_RUN_MS:
            run_ms = 0.0
        cold = job.act.annotations.get("cold") is True
        fp.record_run(run_ms, cold=cold)
        if not cold and "pipelined" not in job.act.annotations:
            # what the round trip adds to the run: transport, and waking the sandbox when it slept
            fp.record_trip((time.perf_counter() - job.begun) * 1000 - run_ms)
        self.pool.stats["cold_runs" if job.act.annotations.get("cold") else "warm_runs"] += 1
        if sb.prefetched:
            self._begin(fp, sb, sb.prefetched.popleft(), cold=False)
        self._finish(
            job,
            status,
            result if isinstance(result, dict) else {},
            logs,
            annotations if isinstance(annotations, dict) else {},
        )
        if fields.get("retire") is True and sb.state == "ready":
            # the runtime says its interpreter is not to be trusted (memory exhausted): later activations get a
            # fresh sandbox (retire() pumps the queues); one already sent ahead to it (pipelined) still runs there
            self.pool.retire(fp, sb)
            return
        self._release(fp, sb)

    def _release(self, fp: FunctionPool, sb: Sandbox) -> None:
        now = self.pool.now()
        sb.last_used = now
        if fp.deleted and not sb.inflight:
            self.pool.retire(fp, sb)
        if fp.queue:
            self.pump(fp)
        if not sb.inflight and sb.state == "ready":
            self.pool.became_idle(fp, sb, now)
            if self.queued > len(fp.queue):
                # requests of other functions wait for room: this idle sandbox may be evicted for them
                self.pump_all()

    def _plan_poll(self, fp: FunctionPool, job: Job) -> None:
        """Poll from a little before the result is due to a little after: its mean run time plus the mean time the
        round trip adds, give or take twice the run time's mean deviation plus ``poll_us`` (as TCP times a
        retransmission)."""
        now = job.begun
        due = now + (fp.run_avg_ms + fp.trip_avg_ms) / 1000
        spread = self.poll_us / 1e6 + 2 * fp.run_dev_ms / 1000
        opens, closes = max(now, due - spread), due + spread
        if closes - opens > MAX_POLL_WINDOW_MS / 1000:
            opens = max(now, due - MAX_POLL_WINDOW_MS / 3000)
            closes = opens + MAX_POLL_WINDOW_MS / 1000
        job.poll = (opens, closes)
        self.polled.add(job)

    def poll_window(self) -> PollWindow | None:
        """The earliest window, among running activations, that has not closed yet."""
        if not self.polled:
            return None
        now = time.perf_counter()
        best: PollWindow | None = None
        for job in self.polled:
            window = job.poll
            if window is not None and window[1] > now and (best is None or window[0] < best[0]):
                best = window
        return best

    def _check_deadlines(self, fp: FunctionPool, sb: Sandbox) -> None:
        sb.timer = None
        if not sb.inflight or sb.gone:
            return
        now = self._loop.time()
        expired = [job for job in sb.inflight.values() if job.deadline <= now]
        if not expired:
            first = min(job.deadline for job in sb.inflight.values())
            sb.timer = self._loop.call_at(first, self._check_deadlines, fp, sb)
            return
        timeout_ms = int(fp.spec.timeout_s * 1000)
        sb.kill(f"activation {expired[0].act.activation_id} timed out")
        self.pool.forget_dead(fp, sb)
        for job in expired:
            del sb.inflight[job.act.activation_id]
            self._finish(
                job,
                "developer_error",
                {"error": f"The action exceeded its time limits of {timeout_ms} milliseconds."},
                sb.take_stray(job.act.activation_id),
                {"timeout": True},
            )
        self.pump(fp)

    def _on_died(self, sb: Sandbox, reason: str, status: int | None) -> None:
        fp: FunctionPool | None = sb.owner
        jobs: list[Job] = list(sb.inflight.values())
        sb.inflight.clear()
        if sb.timer is not None:
            sb.timer.cancel()
            sb.timer = None
        if fp is not None:
            # queued inside the sandbox but never started: they go back to the front of the queue
            while sb.prefetched:
                job = sb.prefetched.pop()
                job.act.annotations.pop("pipelined", None)
                self._requeue(fp, job)
        # a backend that lost its connection (Ray) ended the sandbox: not the function's fault
        status_name = "internal_error" if getattr(sb, "backend_lost", False) else "developer_error"
        for job in jobs:
            if fp is not None and job.act.activation_id in sb.unstarted:
                # its RUN was still unread in the channel: the function never started, another sandbox runs it
                self._unstart(job)
                self._requeue(fp, job)
                continue
            logs = sb.take_stray(job.act.activation_id)
            logs.append(log_line("stderr", f"minifaas: {reason}"))
            self._finish(
                job,
                status_name,
                {"error": f"The action did not complete: {reason}."},
                logs,
                {"exit_status": status},
            )
        if fp is not None:
            self.pool.forget_dead(fp, sb)
            self.pump(fp)

    def _unstart(self, job: Job) -> None:
        """Undo ``_begin`` for a request that never started where it was sent."""
        if job.poll is not None:
            job.poll = None
            self.polled.discard(job)
        act = job.act
        act.start = 0
        act.init_time = act.wait_time = None
        for key in ("sandbox", "cold", "launch", "pipelined"):
            act.annotations.pop(key, None)
        act.annotations["resent"] = act.annotations.get("resent", 0) + 1
        job.deadline = math.inf

    def _finish(
        self, job: Job, status: str, result: dict[str, Any], logs: list[str], annotations: dict[str, Any]
    ) -> None:
        if job.ended:
            return  # already ended (by the engine's close): a record ends exactly once
        job.ended = True
        if job.poll is not None:
            job.poll = None
            self.polled.discard(job)
        act = job.act
        act.end = now_ms()
        if not act.start:
            act.start = act.end
        act.duration = act.end - act.start + (act.init_time or 0)
        act.status = status  # type: ignore[assignment]
        act.result = result
        act.logs = logs
        act.annotations.update(annotations)
        if self._store_writes_later:
            job.ended_at = time.perf_counter()
        if self._store_writes_later and self.poll_us and not job.fp.queue:
            # nothing else to do meanwhile: poll for the store's callback rather than sleep through it
            begun = time.perf_counter()
            job.poll = (begun, begun + STORE_POLL_S)
            self.polled.add(job)
        # the caller sees the end once the final record is stored: the store calls back (at once in memory)
        self.store.put(act, functools.partial(self._settle, job))

    def _settle(self, job: Job) -> None:
        if job.ended_at:
            waited_us = min((time.perf_counter() - job.ended_at) * 1e6, STORE_WAIT_MAX_US)
            self.store_wait_us += (waited_us - self.store_wait_us) / STORE_WAIT_GAIN
        if job.poll is not None:
            job.poll = None
            self.polled.discard(job)
        self.jobs.pop(job.act.activation_id, None)
        job.done.set()
        self.on_end(job.act)

    def fail_queued(self, fp: FunctionPool, message: str, status: str = "developer_error") -> None:
        """End every request still waiting in ``fp``'s queue (function deleted, engine closing)."""
        while fp.queue:
            job = fp.queue.popleft()
            self.queued -= 1
            self._finish(job, status, {"error": message}, [], {})

    def fail_running(self, message: str) -> None:
        for job in list(self.jobs.values()):
            if not job.ended:
                self._finish(job, "internal_error", {"error": message}, [], {})
