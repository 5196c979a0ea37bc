"""Functions and classes deployed by value: pickled with cloudpickle at deploy, unpickled once per sandbox.

What travels is what Ray, Dask and joblib send: the function's code, its closure, the globals it names and the
helper functions those name, all by value when they were defined in ``__main__`` (a script, a notebook cell) or in a
module the sandbox could not import; modules the sandbox can import (the standard library, installed packages,
anything on its ``PYTHONPATH``) are imported there by name. ``modules=[...]`` sends a module by value even when the
sandbox could import it (a package being edited).

Whatever cannot be pickled (a lock, a socket, an open file, a database connection) is a :class:`DeployError` at
deploy that names the object and the global or closure variable holding it: never a failure at the first call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.machinery
import inspect
import json
import os
import pickletools
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from minifaas_sandbox.callables import CLASS_ENTRY_POINTS, defines_handler, is_async

from .._errors import DeployError
from .bundle import Bundle

__all__ = (
    "PICKLE_PROTOCOL",
    "PickledCallable",
    "callable_bundle",
    "callable_kind",
    "pickle_callable",
    "sandbox_sys_path",
)

PICKLE_PROTOCOL: Final = 5
#: how deep the search for an unpicklable object goes through helper functions and classes
MAX_CULPRIT_DEPTH: Final = 6
#: a module the sandbox cannot import is sent by value; pickling again after registering it may name more
MAX_BY_VALUE_PASSES: Final = 8


@dataclasses.dataclass(frozen=True, slots=True)
class PickledCallable:
    """A callable ready for the INIT frame: its pickle, what it is, and a digest that names its version."""

    data: bytes
    #: "function" (``fn(args)``), "async" (``async def fn(args)``) or "class" (instantiated once per sandbox)
    kind: str
    digest: str
    qualname: str
    module: str
    #: modules sent by value (the user's ``modules=`` and the ones the sandbox could not import)
    by_value: tuple[str, ...]


def callable_kind(fn: Any) -> str:
    """``function``, ``async`` or ``class``; raises DeployError for what cannot serve requests."""
    if inspect.isclass(fn):
        entry = next((m for m in CLASS_ENTRY_POINTS if defines_handler(fn, m)), None)
        if entry is None:
            raise DeployError(
                f"class {fn.__qualname__} has no __call__(self, args) or main(self, args) method to serve requests"
            )
        return "class"
    if not callable(fn):
        raise DeployError(f"cannot deploy {type(fn).__name__} object {fn!r}: it is not callable")
    target = fn.func if isinstance(fn, functools.partial) else fn
    if is_async(target):
        return "async"
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise DeployError(f"cannot deploy generator function {_qualname(fn)}: main(args) must return a dict")
    return "function"


def _qualname(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__)


def pickle_callable(fn: Any, *, modules: Iterable[Any] = (), sandbox_path: list[str] | None = None) -> PickledCallable:
    """Pickle ``fn`` for a sandbox; raises DeployError naming what cannot travel."""
    import cloudpickle

    kind = callable_kind(fn)
    forced = [_module_of(m) for m in modules]
    path = sandbox_path if sandbox_path is not None else sandbox_sys_path()
    registered: list[types.ModuleType] = []
    try:
        for module in forced:
            _register(cloudpickle, module, registered)
        for _ in range(MAX_BY_VALUE_PASSES):
            try:
                data = cloudpickle.dumps(fn, protocol=PICKLE_PROTOCOL)
            except Exception as exc:
                raise DeployError(f"cannot deploy {_qualname(fn)}: {_explain(fn, exc)}") from None
            missing = [m for m in _referenced_modules(data) if not _importable(m, path)]
            local = [sys.modules[m] for m in missing if m in sys.modules and sys.modules[m] not in registered]
            if not local:
                break
            for module in local:
                _register(cloudpickle, module, registered)
        else:  # pragma: no cover - a chain of more than MAX_BY_VALUE_PASSES local modules
            raise DeployError(f"cannot deploy {_qualname(fn)}: too many local modules to send by value")
    finally:
        for module in registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
    return PickledCallable(
        data=data,
        kind=kind,
        digest=hashlib.sha256(data).hexdigest(),
        qualname=_qualname(fn),
        module=str(getattr(fn, "__module__", "") or ""),
        by_value=tuple(m.__name__ for m in registered),
    )


def _module_of(m: Any) -> types.ModuleType:
    if isinstance(m, types.ModuleType):
        return m
    if isinstance(m, str):
        module = sys.modules.get(m)
        if module is None:
            try:
                module = __import__(m, fromlist=["_"])
            except ImportError as exc:
                raise DeployError(f"modules=[...]: cannot import {m!r} to send it by value: {exc}") from None
        return module
    raise DeployError(f"modules=[...] takes modules or module names, not {type(m).__name__}")


def _register(cloudpickle: Any, module: types.ModuleType, registered: list[types.ModuleType]) -> None:
    if module in registered or module.__name__ == "__main__":
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError as exc:  # not in sys.modules, or a submodule whose package is not
        raise DeployError(f"cannot send module {module.__name__!r} by value: {exc}") from None
    registered.append(module)


# -- which modules the sandbox can import ------------------------------------------------------------------------
@functools.cache
def _default_sandbox_path(executable: str, pythonpath: str) -> tuple[str, ...]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": pythonpath} if pythonpath else None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            [executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=True,
        ).stdout
        return tuple(str(p) for p in json.loads(out))
    # no answer: trust the site-packages and standard library folders this interpreter has
    return tuple(p for p in sys.path[1:] if p)


def sandbox_sys_path(extra: Iterable[str] = ()) -> list[str]:
    """What ``sys.path`` a sandbox started from this interpreter has (its default, the inherited PYTHONPATH, and the
    function's own environment): the script's folder or a notebook's working directory is not on it."""
    return [*extra, *_default_sandbox_path(sys.executable, os.environ.get("PYTHONPATH", ""))]


_STRING_OPS: Final = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING", "BINSTRING"})
_GET_OPS: Final = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NO_PUSH_OPS: Final = frozenset({"MEMOIZE", "FRAME", "PROTO", "PUT", "BINPUT", "LONG_BINPUT", "STOP", "MARK"})


def _referenced_modules(data: bytes) -> list[str]:
    """Modules a pickle imports by name (GLOBAL / STACK_GLOBAL opcodes), as far as this process has them loaded.

    A by-reference global is only ever written for an object the pickler found in its module, so a name that is
    not in ``sys.modules`` here means this walk lost track of the stack, and is left out.
    """
    found: dict[str, None] = {}
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what each pushing opcode put on the stack, when it was a string; None otherwise
    subimport = False  # the last global was cloudpickle's subimport: the next string is a module imported by name
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS or name in _GET_OPS:
            value = arg if name in _STRING_OPS else (memo.get(int(arg)) if arg is not None else None)
            pushed.append(value)
            if subimport and isinstance(value, str):
                found[value] = None
                subimport = False
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            if isinstance(module, str):
                found[module] = None
                subimport = module.startswith("cloudpickle") and attr == "subimport"
            pushed.append(None)
        elif name == "GLOBAL" and isinstance(arg, str):
            found[arg.split(" ", 1)[0]] = None
            pushed.append(None)
        elif name not in _NO_PUSH_OPS:
            pushed.append(None)
    return [m for m in found if m in sys.modules]


def _importable(module: str, path: list[str]) -> bool:
    top = module.split(".", 1)[0]
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    try:
        return importlib.machinery.PathFinder.find_spec(top, path) is not None
    except (ImportError, ValueError):
        return False


# -- naming what cannot be pickled -------------------------------------------------------------------------------
def _explain(fn: Any, exc: Exception) -> str:
    culprit = _find_culprit(fn, set(), 0)
    reason = f"{type(exc).__name__}: {exc}"
    if culprit is None:
        return f"it cannot be pickled ({reason})"
    return f"{culprit} cannot be pickled ({reason}); create it inside the function (or setup() of a class) instead"


def _find_culprit(obj: Any, seen: set[int], depth: int) -> str | None:
    if depth > MAX_CULPRIT_DEPTH or id(obj) in seen:
        return None
    seen.add(id(obj))
    for where, value in _references(obj):
        if _pickles(value):
            continue
        if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismethod(value):
            deeper = _find_culprit(value, seen, depth + 1)
            if deeper is not None:
                return deeper
        return f"{where} (a {type(value).__module__}.{type(value).__qualname__} object)"
    return None


def _references(obj: Any) -> Iterator[tuple[str, Any]]:
    """(description, value) of what pickling ``obj`` by value would take with it."""
    if isinstance(obj, functools.partial):
        yield f"the partial's function {_qualname(obj.func)}", obj.func
        for i, a in enumerate(obj.args):
            yield f"argument {i} of the partial", a
        for k, v in obj.keywords.items():
            yield f"keyword {k!r} of the partial", v
        return
    if inspect.ismethod(obj):
        yield f"the instance {_qualname(obj)} is bound to", obj.__self__
        obj = obj.__func__
    if inspect.isfunction(obj):
        name = obj.__qualname__
        code = obj.__code__
        for var, cell in zip(code.co_freevars, obj.__closure__ or (), strict=False):
            with contextlib.suppress(ValueError):  # an empty cell
                yield f"closure variable {var!r} of {name}", cell.cell_contents
        for var in _global_names(code):
            if var in obj.__globals__:
                yield f"global {var!r} of {name}", obj.__globals__[var]
        for i, default in enumerate(obj.__defaults__ or ()):
            yield f"default {i} of {name}", default
        return
    if inspect.isclass(obj):
        for attr, value in vars(obj).items():
            if attr.startswith("__") and attr.endswith("__") and not inspect.isfunction(value):
                continue
            yield f"attribute {attr!r} of class {obj.__qualname__}", value
        return
    if callable(obj) and not isinstance(obj, type):
        yield f"the callable {type(obj).__qualname__} instance", obj
        for attr, value in getattr(obj, "__dict__", {}).items():
            yield f"attribute {attr!r} of {type(obj).__qualname__}", value


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _pickles(value: Any) -> bool:
    if isinstance(value, types.ModuleType):
        return True  # imported by name in the sandbox
    import cloudpickle

    try:
        cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception:
        return False
    return True


def callable_bundle(pickled: PickledCallable, fn: Callable[..., Any] | type) -> Bundle:
    """The bundle a sandbox loads: the INIT frame's ``source`` is ``{kind: "pickle", data, callable, qualname}``."""
    source = {"kind": "pickle", "data": pickled.data, "callable": pickled.kind, "qualname": pickled.qualname}
    origin = f"callable {getattr(fn, '__module__', '?')}.{pickled.qualname}"
    return Bundle(source, pickled.digest, {}, {}, origin)
