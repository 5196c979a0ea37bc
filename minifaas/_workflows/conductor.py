"""The conductor: runs a composition inside the host, one step at a time, and records the session.

OpenWhisk runs a composition as a conductor action that is re-invoked between steps; here the walk over the
tree happens in the host's event loop, so a step costs one activation of its function and nothing else.
Semantics are openwhisk-composer's (docs/COMBINATORS.md, conductor.js):

* every output is a JSON dict; a non-dict ``v`` becomes ``{"value": v}``;
* an output with an ``error`` key is an *error object*: it is stripped to ``{"error": ...}`` and skips
  everything up to the nearest enclosing ``try_`` handler or ``finally_`` finalizer, else it ends the session;
* an input with an ``error`` key ends the session at once (Composer inspects the input when it resumes);
* a condition takes its branch on the JavaScript truthiness of its output's ``value``, as conductor.js does
  (``p.params.value ? then : else``): ``None``/missing, ``False``, ``0``, ``NaN`` and ``""`` are false,
  anything else (``1``, ``"no"``, ``[]``, ``{}``) is true. ``conditions="strict"`` takes the branch only on
  exactly ``True`` (a stricter rule that catches a condition returning the wrong thing);
* ``parallel``/``map`` branches run concurrently, each with a copy of the ``let`` variables; a branch's error
  is an entry of the output array and cancels nothing.

Step limit: as in OpenWhisk, where a conductor action may run at most 50 component activations and every
parallel branch is a conductor activation of its own, ``max_steps`` bounds the component activations (action,
dynamic and async steps; function and literal steps run inside the conductor and do not count) of each thread
of control: the session's top level and each ``parallel``/``map`` branch. A composition invoked by an action
step shares the budget of the thread that invoked it, and compositions nest at most ``MAX_NESTING_DEPTH``
deep (a composition calling itself ends with a clear error, not a RecursionError). Exceeding the limit at the
top level ends the session (application_error, the error names the limit); in a branch it becomes that
branch's error entry. ``MAX_SESSION_STEPS`` bounds the steps of every kind of the whole session regardless.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeAlias

import anyio

from .._core.activation import FINAL_STATUSES, Activation, new_activation_id, now_ms
from .._errors import CompositionError, EngineClosed
from ..composer import Composition
from .sessions import Session, SessionStatus, SessionStore, Step, StepKind, StepStatus

__all__ = (
    "CONDITIONS",
    "DEFAULT_MAX_STEPS",
    "MAX_NESTING_DEPTH",
    "MAX_SESSION_STEPS",
    "SESSION_ABORTED_MESSAGE",
    "SESSION_TRACE_MAX_BYTES",
    "StepInvoker",
    "StepSubmitter",
    "call_composition",
    "current_session_id",
    "run_as_activation",
    "run_composition",
    "run_session",
    "session_activation",
)

#: leaf steps per thread of control (OpenWhisk's sequence/conductor limit)
DEFAULT_MAX_STEPS: Final[int] = 50
#: leaf steps of a whole session, all branches together
MAX_SESSION_STEPS: Final[int] = 10_000
#: compositions invoked from compositions (a composition calling itself stops here)
MAX_NESTING_DEPTH: Final[int] = 16
#: how a condition's ``value`` is read: JavaScript truthiness (Composer's) or exactly ``True``
CONDITIONS: Final = ("js", "strict")
#: step invocations of one session in flight at once (a map over 10k items must not flood the engine's queues)
MAX_CONCURRENT_STEPS: Final[int] = 64
#: step inputs/outputs larger than this are not kept in the trace
TRACE_MAX_BYTES: Final[int] = 64 * 1024
#: step inputs/outputs a session's trace keeps in all (a 2,000-item map of 60 KB outputs would hold 120 MB)
SESSION_TRACE_MAX_BYTES: Final[int] = 4 * 1024 * 1024
#: the result of a session that a closing engine stopped between steps (it did not fail: it did not finish)
SESSION_ABORTED_MESSAGE: Final[str] = "the engine closed before this session finished"

#: the session whose conductor runs the current task (inherited by parallel branches and by steps)
_CURRENT_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("minifaas_session", default=None)
#: set by an action step while it runs: the budget and nesting depth a composition it invokes inherits
_NESTING: contextvars.ContextVar[tuple[_Budget, int] | None] = contextvars.ContextVar("minifaas_nesting", default=None)


def current_session_id() -> str | None:
    """The id of the composition session running the caller (a host function step), or None outside one."""
    return _CURRENT_SESSION.get()


#: ``(function name, params, cause=session id) -> ended Activation`` (``engine.call``)
StepInvoker: TypeAlias = Callable[[str, dict[str, Any], str], Awaitable[Activation]]
#: ``(function name, params, cause=session id) -> activation id``, returning at once (``engine.submit``)
StepSubmitter: TypeAlias = Callable[[str, dict[str, Any], str], Awaitable[str]]

Params: TypeAlias = dict[str, Any]
#: the ``let`` scope, innermost first: a dict per ``let``, ``None`` per ``mask``
Stack: TypeAlias = tuple[dict[str, Any] | None, ...]


class _StepLimit(CompositionError):
    """Raised by the conductor when a thread of control exceeds max_steps; run_composition catches it."""


class _SessionLimit(CompositionError):
    """Raised inside the conductor when a session exceeds MAX_SESSION_STEPS; never escapes run_composition."""


class _NotJSON(TypeError):
    """Raised by _clone on a value a JSON document cannot hold."""


class _TooBig(Exception):
    """Raised by _scan when a traced value exceeds TRACE_MAX_BYTES."""


class _Budget:
    """Steps used by one thread of control."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = 0


# ---------------------------------------------------------------------------------------------- values


def _clone(v: Any) -> Any:
    """A deep copy of a JSON-like value (bytes allowed, tuples become lists); raises _NotJSON otherwise."""
    if v is None or isinstance(v, str | int | float | bool | bytes):
        return v
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise _NotJSON(f"dict key {k!r} is not a string")
            out[k] = _clone(x)
        return out
    if isinstance(v, list | tuple):
        return [_clone(x) for x in v]
    raise _NotJSON(f"{type(v).__name__} is not a JSON value")


def _inspect(out: Any) -> Params:
    """Composer's inspect: lift a non-dict to ``{"value": v}``, strip an error object to its error field."""
    if not isinstance(out, dict):
        return {"value": out}
    if "error" in out and len(out) > 1:
        return {"error": out["error"]}
    return out


def _js_truthy(v: Any) -> bool:
    """JavaScript's truthiness of a JSON value (objects and arrays are true, even empty)."""
    if v is None or v is False:
        return False
    if isinstance(v, int | float):
        return v == v and v != 0  # NaN is false
    if isinstance(v, str):
        return v != ""
    return True


def _strict_true(v: Any) -> bool:
    return v is True


def _scan(v: Any, budget: list[int]) -> bool:
    """Charge ``v``'s rough JSON size to ``budget``; True if it holds leaves JSON cannot (bytes, objects)."""
    if isinstance(v, str):
        budget[0] -= len(v) + 2
        odd = False
    elif v is None or isinstance(v, int | float):
        budget[0] -= 8
        odd = False
    elif isinstance(v, dict):
        budget[0] -= 2
        odd = False
        for k, x in v.items():
            budget[0] -= len(k) + 3 if isinstance(k, str) else 16
            odd = _scan(x, budget) or odd or not isinstance(k, str)
    elif isinstance(v, list | tuple):
        budget[0] -= 2
        odd = False
        for x in v:
            odd = _scan(x, budget) or odd
    else:
        budget[0] -= len(v) if isinstance(v, bytes | bytearray) else 16
        odd = True
    if budget[0] < 0:
        raise _TooBig
    return odd


def _sanitize(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float):
        return v
    if isinstance(v, dict):
        return {str(k): _sanitize(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_sanitize(x) for x in v]
    if isinstance(v, bytes | bytearray | memoryview):
        return {"$bytes": len(v)}
    return {"$repr": repr(v)[:200]}


def _trace(v: Any, left_bytes: int = TRACE_MAX_BYTES) -> tuple[Any, int]:
    """What a step record keeps of a value (the value itself, never mutated later, or a placeholder) and the
    rough bytes that costs; at most ``left_bytes`` of the session's trace budget."""
    limit = min(TRACE_MAX_BYTES, left_bytes)
    budget = [limit]
    try:
        odd = _scan(v, budget)
    except _TooBig:
        if limit < TRACE_MAX_BYTES:
            return {"$truncated": True, "session_limit_bytes": SESSION_TRACE_MAX_BYTES}, 64
        return {"$truncated": True, "limit_bytes": TRACE_MAX_BYTES}, 64
    return (_sanitize(v) if odd else v), limit - budget[0]


def _view(stack: Stack) -> list[dict[str, Any]]:
    """The ``let`` frames visible through the ``mask``s, innermost first (Composer's run())."""
    view: list[dict[str, Any]] = []
    masked = 0
    for frame in stack:
        if frame is None:
            masked += 1
        elif masked == 0:
            view.append(frame)
        else:
            masked -= 1
    return view


def _copy_stack(stack: Stack) -> Stack:
    return tuple(None if f is None else _clone(f) for f in stack)


# ---------------------------------------------------------------------------------------------- the walk


class _Run:
    """The state of one session while it runs."""

    def __init__(
        self,
        session: Session,
        invoke: StepInvoker,
        submit: StepSubmitter,
        max_steps: int,
        *,
        depth: int = 0,
        conditions: str = "js",
    ) -> None:
        self.session = session
        self.invoke = invoke
        self.submit = submit
        self.max_steps = max_steps
        self.depth = depth
        self.truthy = _strict_true if conditions == "strict" else _js_truthy
        self.total = 0
        self.entered: set[str] = set()
        self.limiter = anyio.CapacityLimiter(MAX_CONCURRENT_STEPS)
        # a step's output is usually the next step's input: trace it once (values are never mutated in place)
        self._traced: tuple[Any, Any] = (None, None)
        self.trace_left = SESSION_TRACE_MAX_BYTES
        self.handlers: dict[str, Callable[[Composition, Params, Stack, _Budget], Awaitable[Any]]] = {
            "sequence": self._sequence,
            "empty": self._sequence,
            "action": self._action,
            "function": self._function,
            "literal": self._literal,
            "dynamic": self._dynamic,
            "async": self._async,
            "if": self._if,
            "if_nosave": self._if,
            "while": self._while,
            "while_nosave": self._while_nosave,
            "dowhile": self._dowhile,
            "dowhile_nosave": self._dowhile_nosave,
            "repeat": self._repeat,
            "retry": self._retry,
            "try": self._try,
            "finally": self._finally,
            "let": self._let,
            "mask": self._mask,
            "retain": self._retain,
            "retain_catch": self._retain,
            "merge": self._merge,
            "parallel": self._parallel,
            "map": self._map,
        }

    async def node(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        self.entered.add(n.path)
        return _inspect(await self.handlers[n.type](n, p, stack, budget))

    async def seq(self, comps: Sequence[Composition], p: Params, stack: Stack, budget: _Budget) -> Params:
        for c in comps:
            p = await self.node(c, p, stack, budget)
            if "error" in p:
                break
        return p

    # ------------------------------------------------------------------ steps

    def _begin(self, path: str, kind: StepKind, name: str | None, p: Params, budget: _Budget) -> Step:
        if kind in ("action", "dynamic", "async"):  # component activations; function/literal run in here
            budget.used += 1
            if budget.used > self.max_steps:
                raise _StepLimit(
                    f"composition exceeded its step limit (max_steps={self.max_steps} component activations)"
                    f" at AST node root{path}"
                )
        self.total += 1
        if self.total > MAX_SESSION_STEPS:
            raise _SessionLimit(
                f"composition exceeded the session step limit (MAX_SESSION_STEPS={MAX_SESSION_STEPS}) "
                f"at AST node root{path}"
            )
        step = Step(path=path, kind=kind, name=name, input=self._trace(p), start=now_ms())
        self.session.steps.append(step)
        return step

    def _trace(self, v: Any) -> Any:
        if self._traced[0] is not v:
            kept, cost = _trace(v, self.trace_left)
            self.trace_left -= cost
            self._traced = (v, kept)
        return self._traced[1]

    def _end(self, step: Step, t0: float, out: Params, status: StepStatus) -> Params:
        step.duration_ms = (time.perf_counter() - t0) * 1e3
        step.output = self._trace(out)
        step.status = "application_error" if status == "success" and "error" in out else status
        return out

    async def _call(self, path: str, kind: StepKind, name: str, p: Params, budget: _Budget) -> Params:
        # the step (and its timing) starts once it holds a slot: waiting for one is not the function's time
        async with self.limiter:
            step = self._begin(path, kind, name, p, budget)
            t0 = time.perf_counter()
            # a composition this step invokes shares this thread's budget, one level deeper
            token = _NESTING.set((budget, self.depth))
            try:
                act = await self.invoke(name, p, self.session.session_id)
            except EngineClosed:
                raise  # the session is aborted, not failed: no handler of the composition may see this
            except Exception as e:  # FunctionNotFound, Overloaded ...: an error object the composition may handle
                return self._end(
                    step,
                    t0,
                    {"error": f"cannot invoke {name!r} at AST node root{path}: {type(e).__name__}: {e}"},
                    "internal_error",
                )
            finally:
                _NESTING.reset(token)
        step.activation_id = act.activation_id
        out = act.result if isinstance(act.result, dict) else {"value": act.result}
        if act.status != "success" and "error" not in out:
            out = {"error": f"{name} [{act.activation_id}] ended with status {act.status}"}
        status: StepStatus = act.status if act.status in FINAL_STATUSES else "internal_error"  # type: ignore[assignment]
        return self._end(step, t0, out, status)

    async def _action(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        assert n.name is not None
        return await self._call(n.path, "action", n.name, p, budget)

    async def _dynamic(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        name, params = p.get("name"), p.get("params")
        if p.get("type") == "action" and isinstance(name, str) and isinstance(params, dict):
            return await self._call(n.path, "dynamic", name, params, budget)
        step = self._begin(n.path, "dynamic", None, p, budget)
        err = {"error": f"Incorrect use of the dynamic combinator at AST node root{n.path}"}
        return self._end(step, time.perf_counter(), err, "application_error")

    async def _async(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        target = n.components[0]
        assert target.name is not None
        self.entered.add(target.path)
        step = self._begin(target.path, "async", target.name, p, budget)
        t0 = time.perf_counter()
        sid = self.session.session_id
        token = _NESTING.set(None)  # an async session is a session of its own, with its own budget
        try:
            aid = await self.submit(target.name, p, sid)
        except EngineClosed:
            raise
        except Exception as e:
            err = {
                "error": f"Async combinator failed to invoke {target.name!r} at AST node root{n.path}: "
                f"{type(e).__name__}: {e}"
            }
            return self._end(step, t0, err, "internal_error")
        finally:
            _NESTING.reset(token)
        step.activation_id = aid
        return self._end(step, t0, {"method": "async", "activationId": aid, "sessionId": sid}, "success")

    async def _literal(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        step = self._begin(n.path, "literal", None, p, budget)
        return self._end(step, time.perf_counter(), _inspect(_clone(n.value)), "success")

    async def _function(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        step = self._begin(n.path, "function", n.fn_ref, p, budget)
        t0 = time.perf_counter()
        if n.fn is None:
            err = {"error": f"function {n.fn_ref} at AST node root{n.path} was not loaded"}
            return self._end(step, t0, err, "application_error")
        view = _view(stack) if n.fn_arity == 2 else []
        env: dict[str, Any] = {}
        for frame in reversed(view):
            env.update(frame)
        env = {k: _clone(v) for k, v in env.items()}
        declared = set(env)
        out: Any
        try:
            arg = _clone(p)
            if n.fn_arity == 0:
                r = n.fn()
            elif n.fn_arity == 1:
                r = n.fn(arg)
            else:
                r = n.fn(arg, env)
            if inspect.isawaitable(r):
                r = await r
            try:
                out = _clone(arg if r is None else r)
            except _NotJSON as e:
                raise CompositionError(f"the function returned a value that is not JSON ({e})") from None
            if not isinstance(out, dict):
                out = {"value": out}
            undeclared = set(env) - declared
            if undeclared:
                out = {
                    "error": f"function at AST node root{n.path} assigned undeclared variables "
                    f"{sorted(undeclared)}: declare them with let"
                }
        except Exception as e:
            out = {"error": f"Function combinator threw an exception at AST node root{n.path}: {type(e).__name__}: {e}"}
        finally:
            # like Composer, variable updates stick even when the function fails
            for name in declared:
                if name in env:
                    for frame in view:
                        if name in frame:
                            with contextlib.suppress(_NotJSON):
                                frame[name] = _clone(env[name])
                            break
        return self._end(step, t0, out, "success")

    # ------------------------------------------------------------------ control flow

    async def _sequence(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        return await self.seq(n.components, p, stack, budget)

    async def _if(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        t = await self.node(n.args["test"], p, stack, budget)
        if "error" in t:
            return t
        branch = n.args["consequent"] if self.truthy(t.get("value")) else n.args["alternate"]
        return await self.node(branch, p if n.type == "if" else t, stack, budget)

    async def _while(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        while True:
            t = await self.node(n.args["test"], p, stack, budget)
            if "error" in t:
                return t
            if not self.truthy(t.get("value")):
                return p
            p = await self.node(n.args["body"], p, stack, budget)
            if "error" in p:
                return p

    async def _while_nosave(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        while True:
            t = await self.node(n.args["test"], p, stack, budget)
            if "error" in t or not self.truthy(t.get("value")):
                return t
            p = await self.node(n.args["body"], t, stack, budget)
            if "error" in p:
                return p

    async def _dowhile(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        while True:
            p = await self.node(n.args["body"], p, stack, budget)
            if "error" in p:
                return p
            t = await self.node(n.args["test"], p, stack, budget)
            if "error" in t:
                return t
            if not self.truthy(t.get("value")):
                return p

    async def _dowhile_nosave(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        while True:
            p = await self.node(n.args["body"], p, stack, budget)
            if "error" in p:
                return p
            p = await self.node(n.args["test"], p, stack, budget)
            if "error" in p or not self.truthy(p.get("value")):
                return p

    async def _repeat(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        for _ in range(n.count or 0):
            p = await self.seq(n.components, p, stack, budget)
            if "error" in p:
                break
        return p

    async def _retry(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        left = n.count or 0
        while True:
            r = await self.seq(n.components, p, stack, budget)
            if "error" not in r or left <= 0:
                return r
            left -= 1

    async def _try(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        out = await self.node(n.args["body"], p, stack, budget)
        if "error" in out:
            return await self.node(n.args["handler"], out, stack, budget)
        return out

    async def _finally(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        out = await self.node(n.args["body"], p, stack, budget)
        return await self.node(n.args["finalizer"], out, stack, budget)

    # ------------------------------------------------------------------ data flow

    async def _let(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        frame: dict[str, Any] = _clone(n.declarations or {})
        return await self.seq(n.components, p, (frame, *stack), budget)

    async def _mask(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        return await self.seq(n.components, p, (None, *stack), budget)

    async def _retain(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        r = await self.seq(n.components, p, stack, budget)
        if "error" in r and n.type == "retain":
            return r
        return {"params": p, "result": r}

    async def _merge(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        r = await self.seq(n.components, p, stack, budget)
        return r if "error" in r else {**p, **r}

    # ------------------------------------------------------------------ fan out

    async def _branch(self, comps: Sequence[Composition], p: Params, stack: Stack, out: list[Params], i: int) -> None:
        try:
            out[i] = await self.seq(comps, p, stack, _Budget())
        except _StepLimit as e:
            out[i] = {"error": str(e)}

    async def _fan_out(self, jobs: Sequence[tuple[Sequence[Composition], Params]], stack: Stack) -> Params:
        results: list[Params] = [{} for _ in jobs]
        async with anyio.create_task_group() as tg:
            for i, (comps, p) in enumerate(jobs):
                tg.start_soon(self._branch, comps, p, _copy_stack(stack), results, i)
        return {"value": results}

    async def _parallel(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        return await self._fan_out([((c,), p) for c in n.components], stack)

    async def _map(self, n: Composition, p: Params, stack: Stack, budget: _Budget) -> Params:
        items = p.get("value")
        if items is None:
            items = []
        if not isinstance(items, list | tuple):
            return {"error": f"map at AST node root{n.path} needs a list in field 'value', not {type(items).__name__}"}
        jobs = [(n.components, x if isinstance(x, dict) else {"value": x}) for x in items]
        return await self._fan_out(jobs, stack)


def _not_taken(comp: Composition, entered: set[str]) -> list[str]:
    out: list[str] = []
    for n in comp.walk():
        if n.path not in entered:
            continue
        if n.type in ("if", "if_nosave"):
            branches = [n.args["consequent"], n.args["alternate"]]
        elif n.type == "try":
            branches = [n.args["handler"]]
        elif n.type in ("while", "while_nosave"):
            branches = [n.args["body"]]
        else:
            continue
        out += [b.path for b in branches if b.path not in entered]
    return out


def _first_message(eg: BaseExceptionGroup[Exception]) -> str:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return str(e) or type(e).__name__


async def run_composition(
    comp: Composition,
    args: dict[str, Any],
    *,
    invoke: StepInvoker,
    submit: StepSubmitter,
    session_id: str,
    max_steps: int = DEFAULT_MAX_STEPS,
    name: str = "",
    session: Session | None = None,
    conditions: str = "js",
) -> Session:
    """Run ``comp`` on ``args`` to the end and return its Session (never raises for the composition's errors).

    Each action step is ``await invoke(function_name, params, session_id)``; each ``async_`` step is
    ``await submit(function_name, params, session_id)``. ``status`` is ``success``, ``application_error`` (an
    error object reached the top, or a step limit was exceeded) or ``internal_error`` (a conductor bug).
    ``session``, if given, is the record to fill in as the run goes (readers see its steps live).
    A step raising EngineClosed aborts the session: it ends ``internal_error`` with SESSION_ABORTED_MESSAGE
    (no ``try_`` handler runs) and EngineClosed is raised.
    """
    if max_steps < 1:
        raise CompositionError(f"max_steps must be >= 1, not {max_steps}")
    if conditions not in CONDITIONS:
        raise CompositionError(f"conditions must be one of {', '.join(CONDITIONS)}, not {conditions!r}")
    if session is None:
        session = Session(session_id=session_id, name=name, start=now_ms())
    outer = _NESTING.get()  # set when an action step of another session invoked this composition
    depth = 0 if outer is None else outer[1] + 1
    budget = _Budget() if outer is None else outer[0]
    run = _Run(session, invoke, submit, max_steps, depth=depth, conditions=conditions)
    t0 = time.perf_counter()
    out: Params = {"error": "Internal error: the session did not run"}
    status: SessionStatus = "internal_error"
    aborted = False
    token = _CURRENT_SESSION.set(session_id)
    try:
        p = _inspect(args)
        if depth > MAX_NESTING_DEPTH:
            out = {
                "error": f"composition {name or '?'} is nested {depth} deep, more than MAX_NESTING_DEPTH="
                f"{MAX_NESTING_DEPTH} (does it invoke itself?)"
            }
        else:
            out = p if "error" in p else await run.node(comp, p, (), budget)
        status = "application_error" if "error" in out else "success"
    except* EngineClosed:
        aborted = True
        out, status = {"error": SESSION_ABORTED_MESSAGE}, "internal_error"
    except* (_StepLimit, _SessionLimit) as eg:
        out, status = {"error": _first_message(eg)}, "application_error"
    except* Exception as eg:
        out, status = {"error": f"Internal error: {_first_message(eg)}"}, "internal_error"
    finally:
        _CURRENT_SESSION.reset(token)
    if aborted:
        out, status = {"error": SESSION_ABORTED_MESSAGE}, "internal_error"
        for step in session.steps:
            if step.status == "running":
                step.status = "internal_error"
    session.result = out
    session.duration = round((time.perf_counter() - t0) * 1e3)
    session.end = session.start + session.duration
    session.activation_ids = [s.activation_id for s in session.steps if s.activation_id is not None]
    session.not_taken = _not_taken(comp, run.entered)
    session.trace_bytes = SESSION_TRACE_MAX_BYTES - run.trace_left
    session.status = status  # last: a reader that sees the session done sees all of it
    if aborted:
        raise EngineClosed(SESSION_ABORTED_MESSAGE)
    return session


async def run_session(
    comp: Composition,
    args: dict[str, Any],
    *,
    invoke: StepInvoker,
    submit: StepSubmitter,
    session_id: str,
    max_steps: int = DEFAULT_MAX_STEPS,
    name: str = "",
    session: Session | None = None,
    conditions: str = "js",
) -> Session:
    """The engine's entry point: :func:`run_composition` under the name the engine uses."""
    return await run_composition(
        comp,
        args,
        invoke=invoke,
        submit=submit,
        session_id=session_id,
        max_steps=max_steps,
        name=name,
        session=session,
        conditions=conditions,
    )


def session_activation(session: Session, *, namespace: str = "guest", version: str = "0.0.1") -> Activation:
    """The primary activation of a session, as OpenWhisk records a conductor action's.

    Its id is the session id, ``logs`` are the steps' activation ids in order, and annotations mark it as a
    conductor of kind ``sequence``.
    """
    return Activation(
        activation_id=session.session_id,
        name=session.name,
        version=version,
        namespace=namespace,
        start=session.start,
        end=session.end,
        duration=session.duration,
        status=session.status,
        result=session.result,
        logs=list(session.activation_ids),
        annotations={"conductor": True, "kind": "sequence", "composition": session.name},
        accepted=session.start,
    )


async def run_as_activation(
    comp: Composition,
    name: str,
    args: dict[str, Any],
    *,
    invoke: StepInvoker,
    submit: StepSubmitter,
    session_id: str | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    namespace: str = "guest",
    version: str = "0.0.1",
    session: Session | None = None,
    conditions: str = "js",
) -> tuple[Session, Activation]:
    """Run a composition as one invocation: its Session and its primary Activation (same id)."""
    session = await run_session(
        comp,
        args,
        invoke=invoke,
        submit=submit,
        session_id=session_id or new_activation_id(),
        max_steps=max_steps,
        name=name,
        session=session,
        conditions=conditions,
    )
    return session, session_activation(session, namespace=namespace, version=version)


class _Engine(Protocol):
    """What :func:`call_composition` needs of an engine."""

    async def call(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> Activation: ...

    async def submit(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> str: ...


async def call_composition(
    engine: _Engine,
    name: str,
    comp: Composition,
    args: dict[str, Any],
    *,
    sessions: SessionStore,
    record: Callable[[Activation], None] | None = None,
    params: dict[str, Any] | None = None,
    cause: str | None = None,
    session_id: str | None = None,
    session: Session | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    namespace: str = "guest",
    version: str = "0.0.1",
    conditions: str = "js",
) -> Activation:
    """Engine glue: one invocation of ``comp`` deployed as ``name``; returns the ended primary activation.

    Steps go through ``engine.call``/``engine.submit`` with ``cause`` = the session id. ``params`` are the
    composition's default parameters (the invocation's ``args`` win). ``record(activation)`` is called with a
    ``running`` record when the session starts and with the ended one at the end (the engine's activation
    store ``put``); the Session is put in ``sessions`` at both times too.
    """
    sid = session.session_id if session is not None else session_id or new_activation_id()
    merged = {**params, **args} if params else args
    # one Session object from start to end: what sessions.get returns mid-run is the live record
    running = session if session is not None else Session(session_id=sid, name=name, start=now_ms())
    sessions.put(running)
    if record is not None:
        act = session_activation(running, namespace=namespace, version=version)
        act.cause = cause
        record(act)

    async def invoke(fn: str, p: dict[str, Any], c: str) -> Activation:
        act = await engine.call(fn, p, cause=c)
        if act.status == "internal_error" and getattr(engine, "_closing", False):
            raise EngineClosed(f"the engine closed while step {fn!r} ran")  # not the step's failure
        return act

    async def submit(fn: str, p: dict[str, Any], c: str) -> str:
        return await engine.submit(fn, p, cause=c)

    try:
        ended, act = await run_as_activation(
            comp,
            name,
            merged,
            invoke=invoke,
            submit=submit,
            session_id=sid,
            max_steps=max_steps,
            namespace=namespace,
            version=version,
            session=running,
            conditions=conditions,
        )
    except EngineClosed:
        sessions.put(running)
        if record is not None:
            aborted = session_activation(running, namespace=namespace, version=version)
            aborted.cause = cause
            record(aborted)
        raise
    act.cause = cause
    sessions.put(ended)
    if record is not None:
        record(act)
    return act
