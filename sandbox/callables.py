"""Functions and classes deployed by value (``engine.deploy(name, fn)``): unpickled once per sandbox, then served.

- a function: ``fn(args) -> dict`` per request;
- a class: instantiated once per sandbox; ``setup(self)`` (optional) runs before the first request and counts as the
  cold start's init time; ``__call__(self, args)`` (or ``main``) serves each request; ``teardown(self)``
  (optional) runs when the sandbox is retired (SHUTDOWN). State on the instance survives across warm calls;
- ``async def`` handlers (and async ``setup``/``teardown``) run on the runtime's event loop (one per sandbox; with
  ``concurrency > 1`` the requests of one sandbox share it), exactly as an ``async def main`` deployed as code.

The pickle is cloudpickle's: loading it needs ``cloudpickle`` importable in the sandbox (a dependency of minifaas).
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Awaitable, Callable
from typing import Any, Final

__all__ = ("CLASS_ENTRY_POINTS", "defines_handler", "is_async", "load")

#: how a class serves requests, in order of preference
CLASS_ENTRY_POINTS: Final = ("__call__", "main")


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
    source: dict[str, Any], run: Callable[[Awaitable[Any]], Any]
) -> tuple[Callable[[dict[str, Any]], Any], Callable[[], None] | None]:
    """(the request handler, the teardown or None) of a pickled callable; runs a class's ``setup``.

    ``run`` completes an awaitable on the runtime's event loop (the handler itself may return one: the runtime
    awaits what ``main`` returns).
    """
    obj = pickle.loads(source["data"])
    if source.get("callable") != "class":
        return obj, None
    instance = obj()
    setup = getattr(instance, "setup", None)
    if callable(setup):
        _finish(setup(), run)
    entry = next((m for m in CLASS_ENTRY_POINTS if defines_handler(type(instance), m)), None)
    if entry is None:
        raise TypeError(f"class {type(instance).__qualname__} has no __call__(self, args) or main(self, args)")
    end = getattr(instance, "teardown", None)
    if not callable(end):
        return getattr(instance, entry), None

    def teardown() -> None:
        _finish(end(), run)

    return getattr(instance, entry), teardown


def _finish(value: Any, run: Callable[[Awaitable[Any]], Any]) -> Any:
    return run(value) if inspect.isawaitable(value) else value
