"""SyncEngine: the blocking twin of Engine, for scripts and notebooks without an event loop."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._core.activation import Activation
from ._engine import Engine
from ._handles import Function, SyncFunction

__all__ = ("SyncEngine",)

P = ParamSpec("P")
T = TypeVar("T")


class _SyncActivations:
    def __init__(self, portal: BlockingPortal, engine: Engine) -> None:
        self._portal = portal
        self._engine = engine

    def get(self, activation_id: str) -> Activation:
        return self._portal.call(self._engine.activations.get, activation_id)

    def wait(self, activation_id: str, timeout_s: float | None = 60.0) -> Activation:
        return self._portal.call(self._engine.activations.wait, activation_id, timeout_s)

    def list(self, name: str | None = None, **kwargs: Any) -> list[Activation]:
        return self._portal.call(lambda: self._engine.activations.list(name, **kwargs))


class SyncEngine:
    """``with SyncEngine() as engine: engine.invoke("hello", {...})``: the same methods as Engine, no await.

    The engine runs on an event loop in a background thread owned by this object.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self._engine = Engine(state_dir, **kwargs)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._engine_cm: AbstractContextManager[Engine] | None = None
        self.activations: _SyncActivations | None = None

    @property
    def engine(self) -> Engine:
        """The async Engine behind this twin (for code that mixes both)."""
        return self._engine

    def __enter__(self) -> SyncEngine:
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._engine_cm = self._portal.wrap_async_context_manager(self._engine)
            self._engine_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self.activations = _SyncActivations(self._portal, self._engine)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._engine_cm is not None:
                self._engine_cm.__exit__(exc_type, exc, tb)
        finally:
            if self._portal_cm is not None:
                self._portal_cm.__exit__(None, None, None)
            self._portal = None

    def start(self) -> SyncEngine:
        """Start without a ``with`` block (a notebook keeps its engine across cells); ``close()`` when done."""
        return self.__enter__()

    def close(self) -> None:
        self.__exit__(None, None, None)

    @property
    def sessions(self) -> Any:
        """Composition sessions (``sessions.get(session_id)``): the engine's own store, read directly."""
        return self._engine.sessions

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._portal is None:
            raise RuntimeError("use `with SyncEngine() as engine:`")
        fn = getattr(self._engine, method)
        return self._portal.call(lambda: fn(*args, **kwargs))

    def deploy(
        self, name: str | Callable[..., Any], fn: Callable[..., Any] | None = None, /, **kwargs: Any
    ) -> SyncFunction:
        """``Engine.deploy``, returning a blocking handle (``invoke``, ``call``, ``submit``, ``map`` without await)."""
        args = (name,) if fn is None else (name, fn)
        handle: Function = self._call("deploy", *args, **kwargs)
        assert self._portal is not None
        return SyncFunction(self._portal, self._engine, dict(handle), ref=handle.ref)

    def deploy_composition(self, name: str, composition: Any, **kwargs: Any) -> dict[str, Any]:
        return self._call("deploy_composition", name, composition, **kwargs)  # type: ignore[no-any-return]

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the engine's event loop (an async helper of yours that takes the Engine)."""
        if self._portal is None:
            raise RuntimeError("use `with SyncEngine() as engine:` or `engine.start()`")
        return self._portal.call(fn, *args)

    def function(self, name: str) -> SyncFunction:
        """A blocking handle on a deployed function (``name``, ``name@version`` or ``name@alias``)."""
        info = self.get_function(name)
        assert self._portal is not None
        return SyncFunction(self._portal, self._engine, info, ref=name)

    def invoke(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("invoke", name, args)  # type: ignore[no-any-return]

    def call(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> Activation:
        return self._call("call", name, args, cause=cause)  # type: ignore[no-any-return]

    def submit(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> str:
        return self._call("submit", name, args, cause=cause)  # type: ignore[no-any-return]

    def delete(self, name: str) -> None:
        self._call("delete", name)

    def get_function(self, name: str) -> dict[str, Any]:
        return self._call("get_function", name)  # type: ignore[no-any-return]

    def set_alias(self, name: str, alias: str, target: str | dict[str, float]) -> dict[str, Any]:
        return self._call("set_alias", name, alias, target)  # type: ignore[no-any-return]

    def get_alias(self, name: str, alias: str) -> dict[str, Any]:
        return self._call("get_alias", name, alias)  # type: ignore[no-any-return]

    def delete_alias(self, name: str, alias: str) -> None:
        self._call("delete_alias", name, alias)

    def list_functions(self) -> list[dict[str, Any]]:
        return self._call("list_functions")  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        if self._portal is None:
            raise RuntimeError("use `with SyncEngine() as engine:`")
        return self._portal.call(lambda: _async_value(self._engine.stats()))


async def _async_value(value: T) -> T:
    return value
