"""Testing helpers: run a function in this process under the sandbox contract, and assert on activations.

``call(path_or_code, args)`` loads the function exactly as a sandbox would (same bundle validation, default params
merged under the call's, ``__OW_*`` variables, the ``minifaas_sandbox.models`` cache, captured logs) but runs it in
the calling process, so function logic can be developed test-first at the speed of a function call.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

from minifaas_sandbox import runtime as _rt

from ._core.activation import Activation, new_activation_id, now_ms
from ._core.function import MAX_LOG_BYTES, MAX_RESULT_BYTES, MEMORY_MB, TIMEOUT_S
from ._deploy.bundle import Bundle, load_bundle
from ._errors import ActivationError

__all__ = ("FakeClock", "assert_status", "assert_success", "call", "run")

_OW_VARS: Final = (
    "__OW_ACTIVATION_ID",
    "__OW_DEADLINE",
    "__OW_ACTION_NAME",
    "__OW_ACTION_VERSION",
    "__OW_NAMESPACE",
)
_work_dir: Path | None = None
_loaded: dict[tuple[str, str, str], tuple[_rt.Runtime, Bundle]] = {}


def _staging_dir() -> Path:
    global _work_dir
    if _work_dir is None:
        _work_dir = Path(tempfile.mkdtemp(prefix="minifaas-testing-"))
        atexit.register(shutil.rmtree, _work_dir, ignore_errors=True)
    return _work_dir


def _is_path(target: str | os.PathLike[str]) -> bool:
    if isinstance(target, os.PathLike):
        return True
    if "\n" in target or "def " in target:
        return False
    return target.endswith((".py", ".zip")) or os.path.exists(target)


@contextlib.contextmanager
def _captured(rt: _rt.Runtime) -> Iterator[None]:
    saved_out, saved_err = sys.stdout, sys.stderr
    saved_env = {k: os.environ.get(k) for k in _OW_VARS}
    sys.stdout = _rt._Capture("stdout", rt, saved_out)
    sys.stderr = _rt._Capture("stderr", rt, saved_err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved_out, saved_err
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(
    path_or_code: str | os.PathLike[str],
    args: dict[str, Any] | None = None,
    *,
    params: dict[str, Any] | None = None,
    main: str = "main",
    name: str = "test",
    style: Literal["openwhisk", "lambda"] = "openwhisk",
    fresh: bool = False,
) -> Activation:
    """Run the function in-process and return its Activation (whatever the status).

    The loaded function is kept between calls (like a warm sandbox) unless ``fresh=True``.
    """
    is_path = _is_path(path_or_code)
    key = (str(path_or_code), main, style)
    loaded = None if fresh else _loaded.get(key)
    init_logs: list[str] = []
    if loaded is None:
        bundle = load_bundle(
            code=None if is_path else str(path_or_code),
            path=path_or_code if is_path else None,
            main=main,
            work_dir=_staging_dir(),
        )
        rt = _rt.Runtime(None)
        fields = {
            "name": name,
            "version": "1",
            "namespace": "guest",
            "main": main,
            "source": bundle.source,
            "env": {},
            "concurrency": 1,
            "memory_mb": MEMORY_MB,
            "max_result_bytes": MAX_RESULT_BYTES,
            "max_log_bytes": MAX_LOG_BYTES,
            "style": style,
        }
        with _captured(rt):
            reply = rt.init(fields, in_process=True)
        if not reply.get("ok"):
            act = Activation(
                new_activation_id(),
                name,
                "1",
                start=now_ms(),
                status="developer_error",
                result={"error": f"The action failed to initialize: {reply.get('error')}"},
                logs=list(reply.get("logs") or []),
            )
            act.end = act.start
            act.duration = 0
            return act
        loaded = (rt, bundle)
        _loaded[key] = loaded
    rt, bundle = loaded
    merged = {**bundle.params, **(params or {}), **(args or {})}
    aid = new_activation_id()
    start = now_ms()
    with _captured(rt):
        out = rt.execute({"aid": aid, "args": merged, "deadline": start + int(TIMEOUT_S * 1000), "version": "1"})
    end = now_ms()
    result = out["result"] if isinstance(out["result"], dict) else {}
    return Activation(
        aid,
        name,
        "1",
        start=start,
        end=end,
        duration=end - start,
        status=out["status"],
        result=result,
        logs=init_logs + list(out["logs"]),
        annotations={**out["annotations"], "in_process": True},
    )


def call(path_or_code: str | os.PathLike[str], args: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the function in-process; return its result, or raise ActivationError as ``Engine.invoke`` would."""
    act = run(path_or_code, args, **kwargs)
    if act.status != "success":
        raise ActivationError(act)
    return act.result


def _describe(act: Activation) -> str:
    logs = "\n".join(f"    {line}" for line in act.logs[-30:]) or "    (no logs)"
    return (
        f"activation {act.activation_id} of {act.name!r}: status {act.status}\n"
        f"  result: {act.result!r}\n  annotations: {act.annotations!r}\n  logs (last 30):\n{logs}"
    )


def assert_success(act: Activation) -> Activation:
    """Fail with the activation's result and logs unless it succeeded."""
    __tracebackhide__ = True
    if act.status != "success":
        raise AssertionError("expected success\n" + _describe(act))
    return act


def assert_status(act: Activation, status: str, *, error_contains: str | None = None) -> Activation:
    """Fail with a readable message unless the activation ended with ``status`` (and an error containing text)."""
    __tracebackhide__ = True
    if act.status != status:
        raise AssertionError(f"expected status {status!r}\n" + _describe(act))
    if error_contains is not None:
        err = str(act.result.get("error", ""))
        if error_contains not in err:
            raise AssertionError(f"expected an error containing {error_contains!r}\n" + _describe(act))
    return act


class FakeClock:
    """A clock tests move by hand: ``now()`` in seconds; ``advance(s)`` wakes whatever sleeps on it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        for cb in list(self._listeners):
            cb()

    def on_advance(self, cb: Callable[[], None]) -> None:
        self._listeners.append(cb)

    async def sleep(self, seconds: float) -> None:
        import anyio

        until = self._now + seconds
        while self._now < until:
            ev = anyio.Event()
            self._listeners.append(ev.set)
            try:
                await ev.wait()
            finally:
                self._listeners.remove(ev.set)
