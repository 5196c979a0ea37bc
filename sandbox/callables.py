"""Functions and classes deployed by value (``engine.deploy(name, fn)``): unpickled once per sandbox, then served.

- a function: ``fn(args) -> dict`` per request;
- a class: instantiated once per sandbox; ``setup(self)`` (optional) runs before the first request and counts as the
  cold start's init time; ``__call__(self, args)`` (or ``main``) serves each request; ``teardown(self)``
  (optional) runs when the sandbox is retired (SHUTDOWN). State on the instance survives across warm calls;
- ``async def`` handlers (and async ``setup``/``teardown``) run on one event loop per sandbox, in a thread of its
  own, so with ``concurrency > 1`` the requests of one sandbox share that loop.

The pickle is cloudpickle's: loading it needs ``cloudpickle`` importable in the sandbox (a dependency of minifaas).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import pickle
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = ("ACTIVATION_LOGS", "CLASS_ENTRY_POINTS", "defines_handler", "is_async", "load", "run_on_loop")

#: how a class serves requests, in order of preference
CLASS_ENTRY_POINTS: Final = ("__call__", "main")

#: the log buffer of the activation a coroutine belongs to (prints on the loop's thread are attributed through it)
ACTIVATION_LOGS: contextvars.ContextVar[Any] = contextvars.ContextVar("minifaas_activation_logs", default=None)

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The sandbox's event loop, started on first use in a daemon thread (a sandbox forks no further)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="minifaas-event-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def run_on_loop(fn: Callable[..., Any], *args: Any, logs: Any = None) -> Any:
    """Run ``await fn(*args)`` on the sandbox's loop and wait for it; prints go to ``logs`` (an activation's)."""

    async def bound() -> Any:
        ACTIVATION_LOGS.set(logs)
        return await fn(*args)

    return asyncio.run_coroutine_threadsafe(bound(), _event_loop()).result()


def defines_handler(cls: type, method: str) -> bool:
    """``method`` is defined by the class or a base other than ``object`` (whose ``__call__`` serves nothing)."""
    for klass in cls.__mro__:
        if klass is object:
            return False
        if method in vars(klass) and callable(vars(klass)[method]):
            return True
    return False


def is_async(fn: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def load(
    source: dict[str, Any], current_logs: Callable[[], Any]
) -> tuple[Callable[[dict[str, Any]], Any], Callable[[], None] | None]:
    """(the request handler, the teardown or None) of a pickled callable; runs a class's ``setup``."""
    obj = pickle.loads(source["data"])
    teardown: Callable[[], None] | None = None
    if source.get("callable") == "class":
        instance = obj()
        setup = getattr(instance, "setup", None)
        if callable(setup):
            _call(setup, current_logs)
        entry = next((m for m in CLASS_ENTRY_POINTS if defines_handler(type(instance), m)), None)
        if entry is None:
            raise TypeError(f"class {type(instance).__qualname__} has no __call__(self, args) or main(self, args)")
        handler = getattr(instance, entry)
        end = getattr(instance, "teardown", None)
        if callable(end):

            def teardown() -> None:
                _call(end, current_logs)

    else:
        handler = obj
    if is_async(handler):
        coroutine_fn = handler

        def on_loop(args: dict[str, Any]) -> Any:
            return run_on_loop(coroutine_fn, args, logs=current_logs())

        return on_loop, teardown
    return handler, teardown


def _call(fn: Callable[[], Any], current_logs: Callable[[], Any]) -> Any:
    if is_async(fn):
        return run_on_loop(fn, logs=current_logs())
    return fn()
