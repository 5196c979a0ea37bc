"""Compositions: workflows of functions written as Python expressions, after Apache OpenWhisk Composer.

A composition is a tree of :class:`Composition` nodes built by combinators (``sequence``, ``if_``, ``try_``,
``parallel`` ...). Where a composition is expected, a plain string stands for ``action(name)``, a plain
callable for ``function(callable)`` and ``None`` for ``empty()``, as in Composer.

Every node carries its ``path`` inside the root composition, labelled exactly like openwhisk-composer's: the
root is ``""``, a named argument appends ``.name`` (``.test``, ``.consequent``, ``.body``, ``.handler`` ...)
and a component appends ``[i]``; so the alternate of an ``if_`` that is the second step of a sequence is
``"[1].alternate"``. Because a path depends on where a node sits, combinators copy their arguments.

The JSON form (:meth:`Composition.to_json`) has openwhisk-composer's shape:
``{"composition": <node>, "version": ..., "actions": [{"name": ...}, ...]}`` where a node is
``{"type": "if", "test": {...}, "consequent": {...}, "alternate": {...}, "path": "[1]"}``. Inline Python
callables are stored by ``module:qualname`` reference and imported back by :meth:`Composition.from_json`; a
callable that would not come back as itself (a lambda, a nested function, a bound method, a partial, a callable
instance) is written as a ``<...>`` description that ``from_json`` refuses: the round trip is lossless or fails.
Of openwhisk-composer's output, ``from_json`` reads the source tree (``ast``) in preference to the lowered one.

Semantics (run by ``minifaas._workflows.conductor``) follow docs/COMBINATORS.md of openwhisk-composer; see the docstring
of each combinator.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, TypeAlias

from ._errors import CompositionError

__all__ = (
    "IR_VERSION",
    "Composition",
    "Task",
    "action",
    "async_",
    "dowhile",
    "dowhile_nosave",
    "dynamic",
    "empty",
    "finally_",
    "function",
    "if_",
    "if_nosave",
    "let",
    "literal",
    "map",
    "mask",
    "merge",
    "par",
    "parallel",
    "repeat",
    "retain",
    "retain_catch",
    "retry",
    "seq",
    "sequence",
    "task",
    "try_",
    "value",
    "when",
    "while_",
    "while_nosave",
)

#: version written into the JSON form; bumped when the node shapes change incompatibly
IR_VERSION: Final[str] = "1.0"
#: ``exec.kind`` of inline Python functions in the JSON form (Composer writes ``nodejs:default``)
FUNCTION_KIND: Final[str] = "python:3"

#: A function step takes the params (and, optionally, the visible ``let`` variables) and returns a JSON value.
StepFunction: TypeAlias = Callable[..., Any | Awaitable[Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    """The shape of one combinator: named sub-compositions, a component list, scalar fields."""

    args: tuple[str, ...] = ()
    components: bool = False
    scalars: tuple[str, ...] = ()


_SPECS: Final[dict[str, _Spec]] = {
    "sequence": _Spec(components=True),
    "empty": _Spec(),
    "action": _Spec(scalars=("name",)),
    "function": _Spec(scalars=("function",)),
    "literal": _Spec(scalars=("value",)),
    "if": _Spec(args=("test", "consequent", "alternate")),
    "if_nosave": _Spec(args=("test", "consequent", "alternate")),
    "while": _Spec(args=("test", "body")),
    "while_nosave": _Spec(args=("test", "body")),
    "dowhile": _Spec(args=("body", "test")),
    "dowhile_nosave": _Spec(args=("body", "test")),
    "repeat": _Spec(components=True, scalars=("count",)),
    "retry": _Spec(components=True, scalars=("count",)),
    "try": _Spec(args=("body", "handler")),
    "finally": _Spec(args=("body", "finalizer")),
    "let": _Spec(components=True, scalars=("declarations",)),
    "mask": _Spec(components=True),
    "retain": _Spec(components=True),
    "retain_catch": _Spec(components=True),
    "merge": _Spec(components=True),
    "async": _Spec(components=True),
    "parallel": _Spec(components=True),
    "map": _Spec(components=True),
    "dynamic": _Spec(),
}
_MISSING: Final[Any] = object()
#: Composer spellings accepted by ``from_json``
_ALIASES: Final[dict[str, str]] = {
    "seq": "sequence",
    "par": "parallel",
    "value": "literal",
    "task": "sequence",
}


class Composition:
    """One node of a composition tree (and, at the root, the whole composition).

    Built by the combinators of this module, not directly. Attributes: ``type`` (Composer's combinator name:
    ``"sequence"``, ``"if"``, ``"try"`` ...), ``path``, ``args`` (named sub-compositions: ``test``, ``body``
    ...), ``components`` and the scalar fields ``name`` (action), ``value`` (literal), ``count``
    (repeat/retry), ``declarations`` (let), ``fn``/``fn_ref`` (function).
    """

    __slots__ = (
        "args",
        "components",
        "count",
        "declarations",
        "fn",
        "fn_arity",
        "fn_ref",
        "name",
        "path",
        "type",
        "value",
    )

    def __init__(
        self,
        type: str,
        *,
        path: str = "",
        args: Mapping[str, Composition] | None = None,
        components: tuple[Composition, ...] = (),
        name: str | None = None,
        value: Any = None,
        count: int | None = None,
        declarations: dict[str, Any] | None = None,
        fn: StepFunction | None = None,
        fn_ref: str | None = None,
        fn_arity: int = 1,
    ) -> None:
        if type not in _SPECS:
            raise CompositionError(f"unknown combinator type {type!r}")
        self.type = type
        self.path = path
        # children are re-labelled copies: the same sub-composition may be used at several places
        self.args: dict[str, Composition] = {k: v._at(f"{path}.{k}") for k, v in (args or {}).items()}
        self.components: tuple[Composition, ...] = tuple(c._at(f"{path}[{i}]") for i, c in enumerate(components))
        self.name = name
        self.value = value
        self.count = count
        self.declarations = declarations
        self.fn = fn
        self.fn_ref = fn_ref
        self.fn_arity = fn_arity

    def _at(self, path: str) -> Composition:
        """A copy of this subtree labelled as sitting at ``path``."""
        if path == self.path:
            return self
        return Composition(
            self.type,
            path=path,
            args=self.args,
            components=self.components,
            name=self.name,
            value=self.value,
            count=self.count,
            declarations=self.declarations,
            fn=self.fn,
            fn_ref=self.fn_ref,
            fn_arity=self.fn_arity,
        )

    # ------------------------------------------------------------------ inspection

    def walk(self) -> Iterator[Composition]:
        """Every node of the tree, depth first, in evaluation order of the source (args, then components)."""
        yield self
        for child in self.args.values():
            yield from child.walk()
        for child in self.components:
            yield from child.walk()

    def actions(self) -> list[str]:
        """Names of the functions this composition calls by name, first use first, without duplicates."""
        seen: dict[str, None] = {}
        for node in self.walk():
            if node.type == "action" and node.name is not None:
                seen.setdefault(node.name, None)
        return list(seen)

    def find(self, path: str) -> Composition:
        """The node at ``path`` (raises CompositionError when no node has it)."""
        for node in self.walk():
            if node.path == path:
                return node
        raise CompositionError(f"no node at path {path!r}")

    def __repr__(self) -> str:
        return f"<Composition {self.type} at root{self.path}>"

    def _identity(self) -> tuple[Any, ...]:
        """What makes two trees the same: their JSON form, and each function step's callable itself."""
        fns = tuple(n.fn if n.fn is not None else n.fn_ref for n in self.walk() if n.type == "function")
        return (json.dumps(self.to_json(), sort_keys=True, default=repr), fns)

    def __eq__(self, other: object) -> bool:
        # two lambdas share a reference ("mod:<lambda>"): equal only if they are the same callable
        if not isinstance(other, Composition):
            return NotImplemented
        mine, theirs = self._identity(), other._identity()
        return mine[0] == theirs[0] and all(a is b or a == b for a, b in zip(mine[1], theirs[1], strict=True))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True, default=repr))

    # ------------------------------------------------------------------ JSON IR

    def to_json(self) -> dict[str, Any]:
        """The IR: ``{"composition": node, "version": IR_VERSION, "actions": [{"name": n}, ...]}``."""
        return {
            "composition": self._node_json(),
            "version": IR_VERSION,
            "actions": [{"name": n} for n in self.actions()],
        }

    def _node_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "action":
            out["name"] = self.name
        elif self.type == "function":
            out["function"] = {"exec": {"kind": FUNCTION_KIND, "ref": self.fn_ref}}
        elif self.type == "literal":
            out["value"] = self.value
        elif self.type in ("repeat", "retry"):
            out["count"] = self.count
        elif self.type == "let":
            out["declarations"] = self.declarations
        for k, child in self.args.items():
            out[k] = child._node_json()
        if _SPECS[self.type].components:
            out["components"] = [c._node_json() for c in self.components]
        out["path"] = self.path
        return out

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, load_functions: bool = True, inline_functions: bool = True
    ) -> Composition:
        """Rebuild a composition from :meth:`to_json` output, a bare node, or openwhisk-composer JSON.

        Python functions are imported from their ``module:qualname`` reference; a lambda, a nested function or
        a module that cannot be imported raises CompositionError. With ``load_functions=False`` function nodes
        keep only their reference (enough to display a composition; running them fails with an error result).
        ``inline_functions=False`` refuses any function node (CompositionError): only named actions run, as
        for a composition that arrives over HTTP, whose references must not import anything in the host.
        """
        if not isinstance(data, Mapping):
            raise CompositionError(f"a composition must be a JSON object, not {type(data).__name__}")
        node = data.get("composition", data) if "type" not in data else data
        ast = data.get("ast") if "type" not in data else None
        # openwhisk-composer writes the source tree ("ast") beside the lowered one: the source keeps the
        # combinators (retain, merge, if ...) that lowering rewrites into let/mask/finally
        if isinstance(ast, list) or (isinstance(ast, Mapping) and isinstance(ast.get("type"), str)):
            node = ast
        # openwhisk-composer stores a list at the root when several compositions are concatenated
        if isinstance(node, list):
            node = {"type": "sequence", "components": node}
        return _parse(node, load_functions=load_functions, inline_functions=inline_functions)


#: What a combinator accepts where a composition is expected.
Task: TypeAlias = Composition | str | StepFunction | None


def _parse(node: Any, *, load_functions: bool, inline_functions: bool = True) -> Composition:
    if not isinstance(node, Mapping) or not isinstance(node.get("type"), str):
        raise CompositionError(f"invalid composition node {node!r:.200}")
    kind = _ALIASES.get(node["type"], node["type"])
    if kind not in _SPECS:
        raise CompositionError(f"unknown combinator type {node['type']!r} at {node.get('path', '?')!r}")
    spec = _SPECS[kind]
    opts = {"load_functions": load_functions, "inline_functions": inline_functions}
    sub = {k: _parse(node[k], **opts) if node.get(k) is not None else empty() for k in spec.args}
    comps = tuple(_parse(c, **opts) for c in node.get("components") or ())
    if kind == "action":
        name = node.get("name")
        if isinstance(name, str) and name.startswith("/_/"):
            name = name[3:]  # Composer's fully qualified name in the default namespace
        return action(name)  # type: ignore[arg-type]
    if kind == "function":
        exec_ = (node.get("function") or {}).get("exec") or node.get("exec") or {}
        ref = exec_.get("ref")
        if not inline_functions:
            what = ref if isinstance(ref, str) else repr(str(exec_.get("code", "?"))[:60])
            raise CompositionError(
                f"inline function step ({exec_.get('kind')!r}: {what}) at root{node.get('path', '?')}: only "
                "steps naming deployed actions are accepted here"
            )
        if not isinstance(ref, str):
            raise CompositionError(
                f"function node at root{node.get('path', '')} has no Python reference "
                f"(kind {exec_.get('kind')!r}): only Python functions can be loaded"
            )
        if load_functions:
            return function(_import_ref(ref))
        return Composition("function", fn=None, fn_ref=ref)
    if kind == "literal":
        return literal(node.get("value", {}))
    if kind in ("repeat", "retry"):
        return (repeat if kind == "repeat" else retry)(node.get("count"), *comps)  # type: ignore[arg-type]
    if kind == "let":
        return let(node.get("declarations"), *comps)  # type: ignore[arg-type]
    if kind == "async":
        return async_(*comps)
    return Composition(kind, args=sub, components=comps)


def _import_ref(ref: str) -> StepFunction:
    module_name, _, qualname = ref.partition(":")
    if not module_name or not qualname:
        raise CompositionError(f"function reference {ref!r} is not of the form 'module:qualname'")
    if "<" in qualname:
        raise CompositionError(
            f"cannot load function {ref!r}: lambdas and nested functions are not importable, nor are bound"
            " methods, partials and callable instances; define the function at module top level to serialize"
            " the composition"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CompositionError(f"cannot load function {ref!r}: {e}") from e
    if not callable(obj):
        raise CompositionError(f"function reference {ref!r} does not name a callable")
    return obj  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- helpers


def task(t: Task) -> Composition:
    """Coerce a shorthand: a string is an action, a callable a function, None the empty sequence."""
    if isinstance(t, Composition):
        return t
    if t is None:
        return empty()
    if isinstance(t, str):
        return action(t)
    if callable(t):
        return function(t)
    raise CompositionError(f"expected a composition, an action name, a callable or None, not {t!r:.100}")


def _tasks(ts: tuple[Task, ...]) -> tuple[Composition, ...]:
    return tuple(task(t) for t in ts)


def _check_json(v: Any, what: str) -> None:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CompositionError(f"{what} must be a JSON value: {e}") from e


def _check_count(n: object, combinator: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise CompositionError(f"{combinator} count must be an int, not {n!r}")
    return n


def _arity(fn: StepFunction) -> int:
    """How many of (params, env) the callable accepts: 0, 1 or 2."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    positional = 0
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return 2
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return min(positional, 2)


def _resolves_to(module: str, qualname: str, fn: object) -> bool:
    """True if ``module:qualname`` names ``fn`` itself (looked up in the loaded module, nothing imported)."""
    obj: object = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return False
        obj = getattr(obj, part, None)
    return obj is fn


def _ref(fn: StepFunction) -> str:
    """``module:qualname`` when importing that gives ``fn`` back; else a description with ``<...>``, which
    ``from_json`` refuses (a bound method, a partial, a callable instance would come back as something else)."""
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if (
        isinstance(qualname, str)
        and isinstance(module, str)
        and ("<" in qualname or _resolves_to(module, qualname, fn))
    ):
        return f"{module}:{qualname}"  # importable, or a lambda/nested function (refused by the "<")
    if inspect.ismethod(fn):
        return f"{module}:<bound method {qualname}>"
    if isinstance(fn, functools.partial):
        inner = fn.func
        return f"{getattr(inner, '__module__', '?')}:<partial of {getattr(inner, '__qualname__', '?')}>"
    kind = type(fn)
    return f"{kind.__module__}:<{kind.__qualname__} instance>"


# ---------------------------------------------------------------------------------------------- primitives


def action(name: str) -> Composition:
    """Invoke the deployed function ``name`` (``"crop"``, ``"crop@1"``); its result is the output.

    A result with an ``error`` field (or an activation that did not succeed) is an error object.
    """
    if not isinstance(name, str) or not name:
        raise CompositionError(f"action name must be a non-empty string, not {name!r}")
    return Composition("action", name=name)


def function(fn: StepFunction | str) -> Composition:
    """Apply a Python callable, in the host, to the input params (a private copy: it may mutate it).

    It runs on the engine's event loop, like Composer's functions run inside the conductor action: keep it to
    light glue (reshaping params, conditions) and put real work in deployed functions.

    The callable takes ``(params)``, ``(params, env)`` or ``()``; ``env`` is a dict of the ``let`` variables
    in scope, and assignments to its existing keys update those variables. It may be ``async``. Return value:
    a dict is the output; ``None`` means the (possibly mutated) input; any other JSON value ``v`` becomes
    ``{"value": v}`` (so a callable returning a bool is a valid condition). An exception becomes an error
    object. ``fn`` may also be a ``"module:qualname"`` reference, imported now.
    """
    if isinstance(fn, str):
        fn = _import_ref(fn)
    if not callable(fn):
        raise CompositionError(f"function expects a callable, not {fn!r:.100}")
    return Composition("function", fn=fn, fn_ref=_ref(fn), fn_arity=_arity(fn))


def literal(v: Any = _MISSING) -> Composition:
    """Output a constant JSON value (copied each time); a non-dict ``v`` is output as ``{"value": v}``.

    ``literal()`` outputs ``{}``.
    """
    if callable(v):
        raise CompositionError("literal cannot hold a function; use function()")
    v = {} if v is _MISSING else v
    _check_json(v, "literal value")
    return Composition("literal", value=v)


value = literal


def sequence(*components: Task) -> Composition:
    """Run the components one after another, each on the previous one's output; stops at the first error."""
    return Composition("sequence", components=_tasks(components))


seq = sequence


def empty() -> Composition:
    """The empty sequence: outputs its input (an error input stays an error)."""
    return Composition("empty")


def dynamic() -> Composition:
    """Invoke the function the input names: ``{"type": "action", "name": str, "params": dict}``."""
    return Composition("dynamic")


# ---------------------------------------------------------------------------------------------- control flow


def if_(test: Task, consequent: Task, alternate: Task = None) -> Composition:
    """Run ``consequent`` if ``test`` outputs ``{"value": True}`` (exactly ``True``), else ``alternate``.

    Both branches run on the input of the ``if_`` (the output of ``test`` is discarded). If ``test`` fails,
    neither branch runs and the error propagates.
    """
    return Composition("if", args={"test": task(test), "consequent": task(consequent), "alternate": task(alternate)})


when = if_


def if_nosave(test: Task, consequent: Task, alternate: Task = None) -> Composition:
    """Like :func:`if_` but the branch runs on the output of ``test`` (the input is not kept)."""
    return Composition(
        "if_nosave", args={"test": task(test), "consequent": task(consequent), "alternate": task(alternate)}
    )


def while_(test: Task, body: Task) -> Composition:
    """Run ``body`` while ``test`` is true, testing first.

    ``test`` sees the current params and its output is discarded. The output is the last params (the input if
    ``body`` never ran).
    """
    return Composition("while", args={"test": task(test), "body": task(body)})


def while_nosave(test: Task, body: Task) -> Composition:
    """Like :func:`while_` but ``body`` runs on ``test``'s output, which is also the final output."""
    return Composition("while_nosave", args={"test": task(test), "body": task(body)})


def dowhile(body: Task, test: Task) -> Composition:
    """Run ``body`` once, then again while ``test`` (evaluated on ``body``'s output) is true."""
    return Composition("dowhile", args={"body": task(body), "test": task(test)})


def dowhile_nosave(body: Task, test: Task) -> Composition:
    """Like :func:`dowhile` but each round runs on ``test``'s output, which is also the final output."""
    return Composition("dowhile_nosave", args={"body": task(body), "test": task(test)})


def repeat(count: int, *components: Task) -> Composition:
    """Run the sequence of components ``count`` times (zero times if ``count <= 0``)."""
    return Composition("repeat", count=_check_count(count, "repeat"), components=_tasks(components))


def try_(body: Task, handler: Task) -> Composition:
    """Run ``body``; if it fails, run ``handler`` on its error object ``{"error": ...}``."""
    return Composition("try", args={"body": task(body), "handler": task(handler)})


def finally_(body: Task, finalizer: Task) -> Composition:
    """Run ``body``, then always ``finalizer`` on ``body``'s output (error object or not)."""
    return Composition("finally", args={"body": task(body), "finalizer": task(finalizer)})


def retry(count: int, *components: Task) -> Composition:
    """Run the components in sequence; while that fails, re-run it on the same input up to ``count`` times.

    The output is the first success or the last error.
    """
    return Composition("retry", count=_check_count(count, "retry"), components=_tasks(components))


# ---------------------------------------------------------------------------------------------- data flow


def let(declarations: Mapping[str, Any], *components: Task) -> Composition:
    """Declare variables (JSON values, fresh at each entry) visible to functions run by the components."""
    if not isinstance(declarations, Mapping) or not all(isinstance(k, str) for k in declarations):
        raise CompositionError(f"let declarations must be a dict with str keys, not {declarations!r:.100}")
    decl = dict(declarations)
    _check_json(decl, "let declarations")
    return Composition("let", declarations=decl, components=_tasks(components))


def mask(*components: Task) -> Composition:
    """Run the components with the variables of the innermost enclosing ``let`` hidden."""
    return Composition("mask", components=_tasks(components))


def retain(*components: Task) -> Composition:
    """Run the components and output ``{"params": <input>, "result": <output>}``; an error stays an error."""
    return Composition("retain", components=_tasks(components))


def retain_catch(*components: Task) -> Composition:
    """Like :func:`retain` but outputs ``{"params", "result"}`` even when ``result`` is an error object."""
    return Composition("retain_catch", components=_tasks(components))


def merge(*components: Task) -> Composition:
    """Run the components and merge their output into the input (output keys win)."""
    return Composition("merge", components=_tasks(components))


# ---------------------------------------------------------------------------------------------- concurrency


def async_(*components: Task) -> Composition:
    """Submit an action without waiting; output ``{"method": "async", "activationId", "sessionId"}``.

    The body must be a single action (which may itself be a deployed composition): a fire-and-forget body
    outlives its session, so it runs as its own activation, never inside the parent's session.
    """
    comps = _tasks(components)
    if len(comps) != 1 or comps[0].type != "action":
        raise CompositionError(
            "async_ takes exactly one action (a function or composition name); deploy a composition and "
            "pass its name to run a larger body asynchronously"
        )
    return Composition("async", components=comps)


def parallel(*components: Task) -> Composition:
    """Run every component concurrently on the input; output ``{"value": [output_0, output_1, ...]}``.

    A failing branch puts its error object in the array and does not cancel the others. Each branch has its
    own copy of the ``let`` variables.
    """
    return Composition("parallel", components=_tasks(components))


par = parallel


def map(*components: Task) -> Composition:
    """Run the sequence of components once per element of the input's ``value`` list, concurrently.

    A dict element is that branch's input, any other element ``e`` becomes ``{"value": e}``. Output
    ``{"value": [output_0, ...]}`` in element order; branch errors are array entries, as in :func:`parallel`.
    """
    return Composition("map", components=_tasks(components))
