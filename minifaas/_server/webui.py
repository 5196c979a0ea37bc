"""The dev server's web UI: a few HTML pages and the small JSON API under ``/ui/api`` that they poll.

Every page is the same static shell (``ui/index.html``); ``ui/app.js`` picks what to draw from the URL and
fetches the JSON endpoints here, which read the engine directly (no REST round trip, no auth of their own:
the server's middleware guards them like the rest of the API). The session flow graph is laid out in
``minifaas._workflows.graph`` (tested without a browser); the page only draws it as SVG.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .._core.activation import Activation
from .._engine import Engine
from .._errors import ActivationNotFound, EngineClosed, MinifaasError
from .._workflows.graph import GRAPH_MAX_COLUMNS, session_graph
from .._workflows.sessions import Session

# the REST app imports this module only when it builds its routes, so the cycle is harmless
from . import app as server

__all__ = ("GRAPH_MAX_COLUMNS", "UI_DIR", "routes", "session_graph")

UI_DIR: Final = Path(__file__).with_name("ui")
ID_RE: Final = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
NO_STORE: Final = {"cache-control": "no-store"}

# ---------------------------------------------------------------------------------------------- JSON


def _json(data: Any, status_code: int = 200) -> Response:
    # the REST API's encoder: NaN and infinities become null, bytes base64, as in ``GET /activations/{id}``
    return server.json_response(data, status_code, NO_STORE)


def _error(status_code: int, message: str) -> Response:
    return server.error_response(status_code, message, NO_STORE)


# ---------------------------------------------------------------------------------------------- records


def _summary(act: Activation) -> dict[str, Any]:
    """What the live list needs of an activation (no result, no logs: it is polled every second)."""
    ann = act.annotations
    return {
        "activation_id": act.activation_id,
        "name": act.name,
        "version": act.version,
        "status": act.status,
        "accepted": act.accepted,
        "start": act.start,
        "end": act.end,
        "duration": act.duration,
        "wait_time": act.wait_time,
        "init_time": act.init_time,
        "cold": ann.get("cold"),
        "conductor": bool(ann.get("conductor")),
        "cause": act.cause,
    }


def _session_or_none(engine: Engine, session_id: str | None) -> Session | None:
    if not session_id:
        return None
    try:
        return engine.sessions.get(session_id)
    except (ActivationNotFound, KeyError):
        return None


async def _composition_json(engine: Engine, name: str) -> dict[str, Any] | None:
    """The deployed composition's JSON IR, when the engine describes it (used to label untaken branches)."""
    if not name:
        return None
    try:
        info = await engine.get_function(name)
    except (MinifaasError, KeyError, ValueError):
        return None
    comp = info.get("composition")
    if isinstance(comp, dict):
        node = comp.get("composition", comp)
        return node if isinstance(node, dict) else None
    return None


# ---------------------------------------------------------------------------------------------- flow graph


def routes(engine: Engine, *, namespace: str | None = None) -> list[BaseRoute]:
    """The UI's routes, to mount at ``/`` of the dev server: pages under ``/ui``, JSON under ``/ui/api``.

    Records are read in ``namespace`` only (the server's; the engine's by default), as the REST API reads them.
    """
    ns = namespace or engine.namespace
    shell = (UI_DIR / "index.html").read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return Response(shell.replace("{{ROOT}}", root), media_type="text/html; charset=utf-8")

    async def home(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{root}/ui/", status_code=307)

    async def api_overview(request: Request) -> Response:
        try:
            stats = engine.stats()
        except EngineClosed as e:
            return _error(503, str(e))
        counters = {k: v for k, v in stats.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
        return _json(
            {
                "namespace": ns,
                "backend": engine.backend,
                "started_at": engine.started_at,
                "stats": counters,
            }
        )

    async def api_functions(request: Request) -> Response:
        try:
            listed = await engine.list_functions()
            pools: dict[str, dict[str, Any]] = engine.stats()["functions"]
        except EngineClosed as e:
            return _error(503, str(e))
        out = []
        for fn in sorted(listed, key=lambda f: str(f.get("name"))):
            prefix = f"{fn.get('namespace', engine.namespace)}/{fn.get('name')}@"
            versions = []
            total = {"sandboxes": 0, "busy": 0, "idle": 0, "starting": 0, "queued": 0}
            models: set[str] = set()
            for key, pool in sorted(pools.items()):
                if not key.startswith(prefix):
                    continue
                versions.append({"version": key[len(prefix) :], **pool})
                for k in total:
                    total[k] += int(pool.get(k, 0))
                models.update(pool.get("models") or ())
            out.append({**fn, "pool": {**total, "models": sorted(models)}, "pools": versions})
        return _json({"functions": out})

    async def api_activations(request: Request) -> Response:
        name = request.query_params.get("name") or None
        # the REST API's limits: a bad or out-of-range value is a 400 there and here
        limit, since = server.list_limit(request), server.int_arg(request, "since", None)
        try:
            acts = await engine.activations.list(name, limit=limit, since=since, namespace=ns)
        except EngineClosed as e:
            return _error(503, str(e))
        return _json({"activations": [_summary(a) for a in acts]})

    async def api_activation(request: Request) -> Response:
        aid = request.path_params["activation_id"]
        if not ID_RE.match(aid):
            return _error(404, "no such activation")
        try:
            act = await engine.activations.get(aid, namespace=ns)
        except ActivationNotFound as e:
            return _error(404, str(e))
        except EngineClosed as e:
            return _error(503, str(e))
        data = act.to_dict()
        data["cold"] = act.annotations.get("cold")
        data["done"] = act.done
        # the engine does not keep an activation's params; a composition step's input is them
        params: Any = act.annotations.get("params")
        session = _session_or_none(engine, act.cause)
        step_info = None
        if session is not None:
            for step in session.steps:
                if step.activation_id == aid:
                    step_info = {"path": step.path, "kind": step.kind}
                    if params is None:
                        params = step.input
                    break
        data["params"] = params
        data["session"] = (
            {"session_id": session.session_id, "name": session.name, "step": step_info} if session else None
        )
        data["is_session"] = _session_or_none(engine, aid) is not None
        return _json(data)

    async def api_sessions(request: Request) -> Response:
        store = engine.sessions
        name = request.query_params.get("name") or None
        listed = store.list(name, limit=server.list_limit(request))
        found = [s for s in listed if await server.in_namespace(engine, s.session_id, ns)]
        return _json(
            {
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "name": s.name,
                        "status": s.status,
                        "start": s.start,
                        "duration": s.duration,
                        "steps": len(s.steps),
                        "not_taken": len(s.not_taken),
                        "failed": sum(1 for st in s.steps if st.status not in ("success", "running")),
                    }
                    for s in found
                ],
            }
        )

    async def api_session(request: Request) -> Response:
        sid = request.path_params["session_id"]
        session = _session_or_none(engine, sid) if ID_RE.match(sid) else None
        if session is not None and not await server.in_namespace(engine, sid, ns):
            session = None
        if session is None:
            return _error(404, f"no session {sid!r}")
        comp = await _composition_json(engine, session.name)
        return _json({"session": session.to_dict(), "graph": session_graph(session, comp)})

    page_paths = (
        "/ui",
        "/ui/",
        "/ui/functions",
        "/ui/activations",
        "/ui/activations/{activation_id}",
        "/ui/sessions",
        "/ui/sessions/{session_id}",
    )
    out: list[BaseRoute] = [Route(p, page, methods=["GET"]) for p in page_paths]
    out += [
        Route("/", home, methods=["GET"]),
        Route("/ui/api/overview", api_overview, methods=["GET"]),
        Route("/ui/api/functions", api_functions, methods=["GET"]),
        Route("/ui/api/activations", api_activations, methods=["GET"]),
        Route("/ui/api/activations/{activation_id}", api_activation, methods=["GET"]),
        Route("/ui/api/sessions", api_sessions, methods=["GET"]),
        Route("/ui/api/sessions/{session_id}", api_session, methods=["GET"]),
        Mount("/ui/static", app=StaticFiles(directory=UI_DIR), name="ui-static"),
    ]
    return out
