"""``Function.map``: stream inputs through a deployed function with a bounded window, results in order or as done.

No background task: every step happens in the consumer's own ``__anext__`` (submit what the window allows, then
wait for the result it needs), so nothing is left running when the consumer stops, and an input generator of a
million items is never materialised. At most ``window`` inputs are submitted and not yet handed back.

Each item is an ordinary activation whose ``cause`` is the map's id (``engine.activations.list(cause=map_id)``).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._core.activation import Activation
from ._errors import ActivationError

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ("MAX_WINDOW", "MapIterator", "default_window")

#: the most inputs one map keeps submitted and not yet handed back
MAX_WINDOW: Final = 1024
MIN_WINDOW: Final = 32
#: sessions of a composition in flight at once by default (each runs its own steps on their functions' sandboxes)
COMPOSITION_WINDOW: Final = 16
#: in-flight inputs per sandbox slot: a fast function needs dozens queued to keep its sandboxes busy (the host's
#: per-call work is then what limits throughput), and the window still bounds what a map holds
PER_SLOT: Final = 16


def default_window(info: dict[str, Any]) -> int:
    if info.get("kind") == "composition":
        return COMPOSITION_WINDOW
    limits = info.get("limits") or {}
    slots = int(limits.get("max_sandboxes") or 1) * int(limits.get("concurrency") or 1)
    return max(MIN_WINDOW, min(MAX_WINDOW, PER_SLOT * slots))


class MapIterator(AsyncIterator[Any]):
    """``async for result in handle.map(items)``; ``aclose()`` (or ``async with``) stops submitting at once."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        window: int,
        return_exceptions: bool = False,
        progress: bool = False,
        total: int | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"concurrency must be at least 1, not {window}")
        self.map_id = f"map-{uuid.uuid4().hex[:16]}"
        self._engine = engine
        self._name = name
        self._sync_items: Iterator[Any] | None = None
        self._async_items: AsyncIterator[Any] | None = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        else:
            self._sync_items = iter(items)
        self._ordered = ordered
        self._window = window
        self._return_exceptions = return_exceptions
        self._submitted = 0
        self._yielded = 0
        self._pending: dict[str, int] = {}  # activation id -> input index, submitted and not ended
        self._ended: dict[str, Activation] = {}  # ended before this map knew its id (a very fast function)
        self._ready: dict[int, Activation] = {}  # ordered: ended, waiting for their turn
        self._fifo: collections.deque[Activation] = collections.deque()  # unordered: ended, in end order
        self._wakeup = anyio.Event()
        self._exhausted = False
        self._closed = False
        self._progress = _Progress.create(name, total) if progress else None
        engine._register_map(self)

    # -- the engine tells the map when one of its activations ends ------------------------------------------------
    def _on_end(self, act: Activation) -> None:
        index = self._pending.pop(act.activation_id, None)
        if index is None:
            self._ended[act.activation_id] = act
        elif self._ordered:
            self._ready[index] = act
        else:
            self._fifo.append(act)
        self._wakeup.set()

    # -- iteration --------------------------------------------------------------------------------------------------
    def __aiter__(self) -> MapIterator:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            while True:
                await self._top_up()
                act = self._take()
                if act is not None:
                    return self._deliver(act)
                if self._exhausted and not self._pending:
                    await self.aclose()
                    raise StopAsyncIteration
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
        except BaseException:
            await self.aclose()
            raise

    def _take(self) -> Activation | None:
        act: Activation | None
        if self._ordered:
            act = self._ready.pop(self._yielded, None)
        elif self._fifo:
            act = self._fifo.popleft()
        else:
            act = None
        if act is not None:
            self._yielded += 1
            if self._progress is not None:
                self._progress.advance(act.status == "success")
        return act

    def _deliver(self, act: Activation) -> Any:
        if act.status == "success":
            return act.result
        error = ActivationError(act)
        if self._return_exceptions:
            return error
        self._exhausted = True  # cancel what is not started: submit nothing more
        raise error

    async def _next_input(self) -> tuple[bool, Any]:
        if self._async_items is not None:
            try:
                return True, await anext(self._async_items)
            except StopAsyncIteration:
                return False, None
        assert self._sync_items is not None
        try:
            return True, next(self._sync_items)
        except StopIteration:
            return False, None

    async def _top_up(self) -> None:
        while not self._exhausted and self._submitted - self._yielded < self._window:
            more, args = await self._next_input()
            if not more:
                self._exhausted = True
                break
            index = self._submitted
            self._submitted += 1
            aid = await self._engine.submit(self._name, args, cause=self.map_id)
            ended = self._ended.pop(aid, None)
            if ended is None:
                self._pending[aid] = index
            elif self._ordered:
                self._ready[index] = ended
            else:
                self._fifo.append(ended)

    async def aclose(self) -> None:
        """Stop: submit nothing more (what was submitted still ends, each in its record)."""
        if self._closed:
            return
        self._closed = True
        self._exhausted = True
        self._engine._unregister_map(self)
        if self._async_items is not None:
            closer = getattr(self._async_items, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        if self._progress is not None:
            self._progress.close()

    async def __aenter__(self) -> MapIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Progress:
    """A rich progress bar in a terminal, a live HTML line in Jupyter, nothing otherwise."""

    def __init__(self, advance: Callable[[bool], None], close: Callable[[], None]) -> None:
        self.advance = advance
        self.close = close

    @staticmethod
    def create(name: str, total: int | None) -> _Progress | None:
        if _in_jupyter():
            return _Progress.jupyter(name, total)
        if sys.stderr.isatty():
            return _Progress.terminal(name, total)
        return None

    @staticmethod
    def terminal(name: str, total: int | None) -> _Progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeRemainingColumn(),
            console=Console(stderr=True),  # stdout stays the program's own
            transient=False,
        )
        bar.start()
        task = bar.add_task(name, total=total, failed=0)
        failed = 0

        def advance(ok: bool) -> None:
            nonlocal failed
            failed += not ok
            bar.update(task, advance=1, failed=failed)

        return _Progress(advance, bar.stop)

    @staticmethod
    def jupyter(name: str, total: int | None) -> _Progress:
        from IPython.display import HTML, display  # type: ignore[attr-defined]

        state = {"done": 0, "failed": 0}

        def html() -> Any:
            done, failed = state["done"], state["failed"]
            bar = f"<progress value='{done}' max='{total}'></progress> " if total else ""
            of = f"/{total}" if total else ""
            return HTML(f"<div>{bar}<b>{_escape(name)}</b>: {done}{of} done, {failed} failed</div>")  # type: ignore[no-untyped-call]

        handle = display(html(), display_id=True)  # type: ignore[no-untyped-call]

        def advance(ok: bool) -> None:
            state["done"] += 1
            state["failed"] += not ok
            if handle is not None:
                handle.update(html())

        return _Progress(advance, lambda: None)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _in_jupyter() -> bool:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None) if ipython is not None else None
    shell = get() if get is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
