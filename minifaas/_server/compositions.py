"""Compositions over REST: deploy one from its JSON form, read, list, delete and invoke it (a minifaas extension).

::

    GET|PUT|DELETE|POST  /api/v1/namespaces/{ns}/compositions[/{name}]   list, create/update, get, delete, invoke

The PUT body has the shape a GET answers: ``{"exec": {"kind": "composition", "composition": <JSON>,
"conditions": "js"|"strict"}, "parameters": [{key, value}], "limits": {"steps": n}}``, where ``<JSON>`` is
``minifaas.composer``'s IR (``Composition.to_json()``) or openwhisk-composer's output (``compose flow.js``, whose
``ast`` is read). Only steps naming deployed actions are accepted: a function step (inline code, or a Python
``module:qualname`` reference that the host would import) is refused with 400, since code that arrives over HTTP
never runs in the server's host. Invoking one (here or as an action) starts a session, shown with its graph by
the web UI. With a state dir the engine keeps the composition there, so a restarted server has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._errors import CompositionError, FunctionNotFound
from ..composer import Composition
from .app import (
    API_PREFIX,
    COMPOSITION_KIND,
    ApiError,
    _flag,
    _from_kv,
    _kv,
    _read_json,
    int_arg,
    json_response,
    list_limit,
)

if TYPE_CHECKING:
    from .app import _Api

__all__ = ("routes",)

#: the most component activations a composition deployed over REST may allow per thread of control
MAX_STEPS_LIMIT: Final = 10_000
#: what a composition's versions look like to OpenWhisk clients: its N-th version is 0.0.N
SEMVER_PREFIX: Final = "0.0."
EXAMPLE_BODY: Final = '{"exec": {"kind": "composition", "composition": {...}}}'


class _Compositions:
    """The handlers; every write goes through the engine (which keeps the composition in its state dir)."""

    def __init__(self, api: _Api) -> None:
        self.api = api
        self.engine = api.engine

    async def _info(self, name: str) -> dict[str, Any]:
        """The composition's description; 404 when ``name`` is no composition (an action is none either)."""
        try:
            info: dict[str, Any] = await self.engine.get_function(name)
        except FunctionNotFound:
            info = {}
        if info.get("kind") != COMPOSITION_KIND:
            raise ApiError(404, f"no composition named {name!r} is deployed")
        return info

    def _shape(self, info: dict[str, Any], *, code: bool) -> dict[str, Any]:
        exec_: dict[str, Any] = {
            "kind": COMPOSITION_KIND,
            "binary": False,
            "components": info["actions"],
            "conditions": info["conditions"],
        }
        if code:
            exec_["composition"] = info["composition"]
        return {
            "namespace": self.api.namespace,
            "name": info["name"],
            "version": f"{SEMVER_PREFIX}{info['version']}",
            "publish": False,
            "exec": exec_,
            "annotations": _kv({"exec": COMPOSITION_KIND, "conductor": True}),
            "parameters": _kv(info["params"]),
            "limits": {"steps": info["max_steps"]},
            "updated": info["created"],
        }

    async def put(self, request: Request) -> Response:
        self.api.ns(request)
        name = str(request.path_params["name"])
        doc = await _read_json(request, self.api.budget)
        comp, kwargs = _parse_body(doc)
        async with self.api._locks.hold("action", name):
            self.api._refuse_while_deploying(name)
            try:
                existing = await self.engine.get_function(name)
            except FunctionNotFound:
                existing = None
            if existing is not None and existing.get("kind") != COMPOSITION_KIND:
                raise ApiError(409, f"resource already exists: {name!r} is an action, not a composition")
            if existing is not None and not _flag(request, "overwrite"):
                raise ApiError(409, f"resource already exists: composition {name!r} (use ?overwrite=true to update)")
            await self.engine.deploy_composition(name, comp, **kwargs)
            info = await self._info(name)
        return json_response(self._shape(info, code=True))

    async def get(self, request: Request) -> Response:
        self.api.ns(request)
        info = await self._info(str(request.path_params["name"]))
        return json_response(self._shape(info, code=request.query_params.get("code", "true") != "false"))

    async def delete(self, request: Request) -> Response:
        self.api.ns(request)
        name = str(request.path_params["name"])
        async with self.api._locks.hold("action", name):
            info = await self._info(name)
            await self.engine.delete(name)
        return json_response(self._shape(info, code=False))

    async def list_all(self, request: Request) -> Response:
        self.api.ns(request)
        infos = sorted(
            (i for i in await self.engine.list_functions() if i.get("kind") == COMPOSITION_KIND),
            key=lambda i: str(i["name"]),
        )
        if _flag(request, "count"):
            return json_response({"compositions": len(infos)})
        skip = int_arg(request, "skip", 0) or 0
        page = infos[skip : skip + list_limit(request)]
        return json_response([self._shape(i, code=False) for i in page])

    async def invoke(self, request: Request) -> Response:
        await self._info(str(request.path_params["name"]))
        return await self.api.invoke(request)


def _parse_body(doc: object) -> tuple[Composition, dict[str, Any]]:
    """The composition and the deploy options of a PUT body; 400 naming what is wrong."""
    if not isinstance(doc, dict):
        raise ApiError(400, f"The request content must be a JSON object: {EXAMPLE_BODY}")
    exec_ = doc.get("exec")
    if not isinstance(exec_, dict) or not isinstance(exec_.get("composition"), dict | list):
        raise ApiError(400, f"exec.composition must hold the composition's JSON: {EXAMPLE_BODY}")
    kind = exec_.get("kind", COMPOSITION_KIND)
    if kind != COMPOSITION_KIND:
        raise ApiError(400, f"exec.kind must be {COMPOSITION_KIND!r} here, not {kind!r}")
    raw = exec_["composition"]
    try:
        comp = Composition.from_json(
            raw if isinstance(raw, dict) else {"composition": raw}, load_functions=False, inline_functions=False
        )
    except CompositionError as exc:
        raise ApiError(
            400,
            f"invalid composition: {exc}. Code sent over HTTP never runs in the server's host: deploy each step "
            "as an action and name it in the composition (the minifaas CLI turns a .py file into this JSON).",
        ) from None
    except RecursionError:
        raise ApiError(400, "invalid composition: nested too deeply") from None
    kwargs: dict[str, Any] = {"params": _from_kv(doc.get("parameters"), "parameters")}
    conditions = exec_.get("conditions", "js")
    if conditions not in ("js", "strict"):
        raise ApiError(400, f"exec.conditions must be 'js' or 'strict', not {conditions!r}")
    kwargs["conditions"] = conditions
    limits = doc.get("limits") or {}
    if not isinstance(limits, dict) or set(limits) - {"steps"}:
        raise ApiError(400, "limits must be an object with at most 'steps' (component activations per thread)")
    steps = limits.get("steps")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS_LIMIT:
            raise ApiError(400, f"limits.steps must be an integer between 1 and {MAX_STEPS_LIMIT}, got {steps!r}")
        kwargs["max_steps"] = steps
    return comp, kwargs


def routes(api: _Api) -> list[BaseRoute]:
    """The composition routes, registered by ``create_app`` beside the OpenWhisk ones."""
    handlers = _Compositions(api)
    base = f"{API_PREFIX}/namespaces/{{ns}}/compositions"
    return [
        Route(base, handlers.list_all, methods=["GET"]),
        Route(f"{base}/{{name}}", handlers.get, methods=["GET"]),
        Route(f"{base}/{{name}}", handlers.put, methods=["PUT"]),
        Route(f"{base}/{{name}}", handlers.delete, methods=["DELETE"]),
        Route(f"{base}/{{name}}", handlers.invoke, methods=["POST"]),
    ]
