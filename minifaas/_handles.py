"""Handles on deployed functions: what ``engine.deploy`` and ``engine.function(name)`` return.

A handle *is* the deploy's description (a dict: ``name``, ``version``, ``limits``, ``digest``...), so code that read
``info["version"]`` keeps working, and it carries the ways to run the function: ``invoke``, ``call``, ``submit``
and ``map``. A handle from ``deploy`` is pinned to the version it deployed (``name@version``); one from
``engine.function("name")`` follows the name (its latest version, or an alias's routing for ``"name@alias"``).
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._core.activation import Activation
from ._map import MapIterator, default_window

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ._engine import Engine

__all__ = ("FUNCTION_OPTIONS_ATTR", "Function", "SyncFunction", "function")

F = TypeVar("F", bound=Callable[..., Any])

#: where ``@minifaas.function(...)`` records its options on the function or class
FUNCTION_OPTIONS_ATTR: Final = "__minifaas_options__"


def function(**options: Any) -> Callable[[F], F]:
    """``@minifaas.function(memory_mb=512, max_sandboxes=4)``: record deploy options on a function or class.

    The function is unchanged (call it, test it in-process); a later ``engine.deploy(fn)`` uses these options
    where the call leaves an option at its default. ``name="..."`` sets the deployed name.
    """

    def record(fn: F) -> F:
        setattr(fn, FUNCTION_OPTIONS_ATTR, dict(options))
        return fn

    return record


class Function(dict[str, Any]):
    """A deployed function: its description (this mapping) and ``invoke`` / ``call`` / ``submit`` / ``map``."""

    def __init__(self, engine: Engine, info: dict[str, Any], *, ref: str) -> None:
        super().__init__(info)
        self._engine = engine
        #: what invocations name: ``name@version`` for a deploy's handle, the name (or alias) otherwise
        self.ref = ref

    @property
    def name(self) -> str:
        return str(self["name"])

    @property
    def version(self) -> str:
        return str(self.get("version", ""))

    @property
    def info(self) -> dict[str, Any]:
        """The deploy's description as a plain dict."""
        return dict(self)

    async def invoke(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result; raises :class:`minifaas.ActivationError` unless the activation succeeded."""
        return await self._engine.invoke(self.ref, args)

    async def call(self, args: dict[str, Any] | None = None, *, cause: str | None = None) -> Activation:
        """The ended activation record, whatever its status."""
        return await self._engine.call(self.ref, args, cause=cause)

    async def submit(self, args: dict[str, Any] | None = None, *, cause: str | None = None) -> str:
        """Accept the invocation and return its activation id at once."""
        return await self._engine.submit(self.ref, args, cause=cause)

    def map(
        self,
        items: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
        *,
        ordered: bool = True,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        progress: bool = False,
    ) -> MapIterator:
        """``async for result in fn.map(inputs)``: one activation per input, streamed through a bounded window.

        ``ordered=False`` yields results as they finish. ``concurrency`` caps the inputs in flight (default: two per
        sandbox slot the function may use). A failed input raises its :class:`ActivationError` after submitting
        nothing more, or with ``return_exceptions=True`` is yielded in its place. ``progress=True`` shows a bar in
        a terminal or a notebook. The activations share ``cause`` = the iterator's ``map_id``.
        """
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        return MapIterator(
            self._engine,
            self.ref,
            items,
            ordered=ordered,
            window=concurrency if concurrency is not None else default_window(self),
            return_exceptions=return_exceptions,
            progress=progress,
            total=total,
        )

    def __repr__(self) -> str:
        return f"<minifaas.Function {self.ref} version={self.version} origin={self.get('origin')!r}>"

    def _repr_html_(self) -> str:
        limits = self.get("limits") or {}
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in (
                ("version", self.version),
                ("origin", self.get("origin")),
                ("digest", str(self.get("digest", ""))[:12]),
                ("timeout", f"{limits.get('timeout_s')} s"),
                ("memory", f"{limits.get('memory_mb')} MB"),
                ("sandboxes", f"up to {limits.get('max_sandboxes')}, concurrency {limits.get('concurrency')}"),
            )
        )
        return f"<div><b>minifaas function {html.escape(self.ref)}</b><table>{rows}</table></div>"


class SyncFunction(Function):
    """The blocking twin of :class:`Function` (what ``SyncEngine.deploy`` returns): the same methods, no await."""

    def __init__(self, portal: BlockingPortal, engine: Engine, info: dict[str, Any], *, ref: str) -> None:
        super().__init__(engine, info, ref=ref)
        self._portal = portal

    def invoke(self, args: dict[str, Any] | None = None) -> dict[str, Any]:  # type: ignore[override]
        return self._portal.call(self._engine.invoke, self.ref, args)

    def call(  # type: ignore[override]
        self, args: dict[str, Any] | None = None, *, cause: str | None = None
    ) -> Activation:
        return self._portal.call(lambda: self._engine.call(self.ref, args, cause=cause))

    def submit(  # type: ignore[override]
        self, args: dict[str, Any] | None = None, *, cause: str | None = None
    ) -> str:
        return self._portal.call(lambda: self._engine.submit(self.ref, args, cause=cause))

    def map(  # type: ignore[override]
        self,
        items: Iterable[dict[str, Any]],
        *,
        ordered: bool = True,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        progress: bool = False,
    ) -> Iterator[Any]:
        """A plain iterator over results; see :meth:`Function.map`."""
        it = self._portal.call(
            lambda: _make_map(
                super(SyncFunction, self),
                items,
                ordered=ordered,
                concurrency=concurrency,
                return_exceptions=return_exceptions,
                progress=progress,
            )
        )
        return _SyncMap(self._portal, it)


async def _make_map(fn: Any, items: Iterable[dict[str, Any]], **kwargs: Any) -> MapIterator:
    return fn.map(items, **kwargs)  # type: ignore[no-any-return]


class _SyncMap(Iterator[Any]):
    def __init__(self, portal: BlockingPortal, it: MapIterator) -> None:
        self._portal = portal
        self._it = it
        self.map_id = it.map_id

    def __iter__(self) -> _SyncMap:
        return self

    def __next__(self) -> Any:
        try:
            return self._portal.call(self._it.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self._it.aclose)

    def __enter__(self) -> _SyncMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
