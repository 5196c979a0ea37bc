"""The dev server's web UI: a few HTML pages and the small JSON API under ``/ui/api`` that they poll.

Every page is the same static shell (``_ui/index.html``); ``_ui/app.js`` picks what to draw from the URL and
fetches the JSON endpoints here, which read the engine directly (no REST round trip, no auth of their own:
the server's middleware guards them like the rest of the API). The session flow graph is laid out here, in
Python, so its layout is tested without a browser; the page only draws it as SVG.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

# the REST app imports this module only when it builds its routes, so the cycle is harmless
from . import _server as server
from ._activation import Activation
from ._engine import Engine
from ._errors import ActivationNotFound, EngineClosed, MinifaasError
from ._sessions import Session, Step

__all__ = ("UI_DIR", "routes", "session_graph")

UI_DIR: Final = Path(__file__).with_name("_ui")
#: keys of a composition node that hold data, not sub-compositions
DATA_KEYS: Final = ("function", "value", "declarations")
#: a session graph draws at most this many step nodes (a long loop would make an unreadable page anyway)
GRAPH_MAX_STEPS: Final = 300
#: a row of concurrent steps (parallel, map) wraps after this many nodes
GRAPH_MAX_COLUMNS: Final = 8
#: the last path segment of a branch a session may not take (if_, try_, while_)
BRANCH_RE: Final = re.compile(r"\.(consequent|alternate|handler|body)$")
#: which part of a combinator decides against a branch (a ``while_``'s ``body`` is decided by its test)
DECIDED_BY: Final = {"consequent": "test", "alternate": "test", "handler": "body", "body": "test"}
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


def _parent(path: str) -> str:
    return BRANCH_RE.sub("", path)


def _role(path: str) -> str:
    """The last label of a path: ``test``, ``consequent``, ``[2]`` ...; the root is ``root``."""
    m = re.search(r"(\.[A-Za-z_]+|\[\d+\])$", path)
    return m.group(1).lstrip(".") if m else "root"


def _find_node(node: dict[str, Any], path: str) -> dict[str, Any] | None:
    if node.get("path") == path:
        return node
    children = [v for k, v in node.items() if isinstance(v, dict) and k not in DATA_KEYS]
    children += [c for c in node.get("components") or () if isinstance(c, dict)]
    for child in children:
        # a child's path extends its parent's; skip subtrees that cannot hold ``path``
        cpath = child.get("path")
        if isinstance(cpath, str) and path.startswith(cpath):
            found = _find_node(child, path)
            if found is not None:
                return found
    return None


def _describe_untaken(comp: dict[str, Any] | None, path: str) -> tuple[str, str]:
    """Label and kind of an untaken branch: its functions' names when the composition is known."""
    node = _find_node(comp, path) if comp is not None else None
    if node is None:
        return _role(path), "branch"
    names: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop(0)
        if n.get("type") == "action" and isinstance(n.get("name"), str):
            names.append(n["name"])
        stack += [v for k, v in n.items() if isinstance(v, dict) and k not in DATA_KEYS]
        stack += [c for c in n.get("components") or () if isinstance(c, dict)]
    kind = str(node.get("type", "branch"))
    if names:
        label = " → ".join(names[:3]) + (" …" if len(names) > 3 else "")
    elif kind == "empty" or (kind == "sequence" and not node.get("components")):
        label, kind = "(nothing)", "empty"
    else:
        label = kind
    return label, kind


def _step_label(step: Step) -> str:
    if step.kind == "function" and step.name:
        return str(step.name).rpartition(":")[2] or str(step.name)
    if step.name:
        return str(step.name)
    return str(step.kind)


def session_graph(session: Session, composition: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lay out a session's flow graph top-down: ``{"nodes", "edges", "rows", "columns", "truncated"}``.

    Each step is a node in the row after the previous step's; steps that ran concurrently (``parallel``,
    ``map``: a step that started before the previous one ended) share a row. A branch that was not taken sits
    beside the step that follows its test (or the body of its ``try_``), greyed, joined by a dashed edge from
    the last step that ran under the same combinator. Nodes carry ``row``/``col``; the page scales them.
    """
    steps = list(session.steps)[:GRAPH_MAX_STEPS]
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    rows: list[list[int]] = []
    start = {
        "id": "start",
        "kind": "start",
        "label": session.name or "session",
        "status": "start",
        "taken": True,
    }
    nodes.append(start)
    rows.append([0])
    step_row: list[int] = []
    prev_end: float | None = None
    for i, step in enumerate(steps):
        # ``start`` is whole ms and a function step lasts µs: only a full ms of overlap is concurrency
        concurrent = prev_end is not None and step.start <= prev_end - 1
        if not concurrent or len(rows[-1]) >= GRAPH_MAX_COLUMNS:
            rows.append([])
        row = len(rows) - 1
        idx = len(nodes)
        nodes.append(
            {
                "id": f"s{i}",
                "step": i,
                "kind": step.kind,
                "label": _step_label(step),
                "name": step.name,
                "path": step.path,
                "role": _role(step.path),
                "status": step.status,
                "activation_id": step.activation_id,
                "duration_ms": round(float(step.duration_ms), 3),
                "taken": True,
            }
        )
        rows[row].append(idx)
        step_row.append(row)
        end = step.start + step.duration_ms
        prev_end = end if not concurrent or prev_end is None else max(prev_end, end)
    end_node = {
        "id": "end",
        "kind": "end",
        "label": session.status,
        "status": session.status,
        "taken": True,
    }
    # taken edges: consecutive rows, fan-out / fan-in around concurrent rows
    for r in range(len(rows) - 1):
        a, b = rows[r], rows[r + 1]
        pairs = list(zip(a, b, strict=True)) if len(a) == len(b) and len(a) > 1 else [(x, y) for x in a for y in b]
        edges += [{"from": nodes[x]["id"], "to": nodes[y]["id"], "taken": True} for x, y in pairs]
    # untaken branches: beside the row after their anchor (the last step that ran under the same combinator)
    side: dict[int, list[int]] = {}
    for path in session.not_taken:
        anchor = _anchor(steps, path)
        label, kind = _describe_untaken(composition, path)
        idx = len(nodes)
        anchor_id = f"s{anchor}" if anchor is not None else "start"
        row = (step_row[anchor] if anchor is not None else 0) + 1
        while row >= len(rows):
            rows.append([])
        side.setdefault(row, []).append(idx)
        nodes.append(
            {
                "id": f"n{idx}",
                "kind": kind,
                "label": label,
                "path": path,
                "role": _role(path),
                "status": "not_taken",
                "activation_id": None,
                "taken": False,
            }
        )
        edges.append({"from": anchor_id, "to": f"n{idx}", "taken": False})
    last_taken = next((r for r in reversed(rows) if r), [0])
    nodes.append(end_node)
    rows.append([len(nodes) - 1])
    edges += [{"from": nodes[x]["id"], "to": "end", "taken": True} for x in last_taken]
    placed: list[list[int | None]] = [list(r) for r in rows]
    for row, extra in side.items():
        # a row of untaken branches only keeps its middle free for the taken edge passing through it
        placed[row] = [*(placed[row] or [None]), *extra]
    columns = 1
    for r, members in enumerate(placed):
        columns = max(columns, len(members))
        for c, member in enumerate(members):
            if member is not None:
                nodes[member].update(row=r, col=c, cols=len(members))
    return {
        "nodes": nodes,
        "edges": edges,
        "rows": len(placed),
        "columns": columns,
        "truncated": len(session.steps) > len(steps),
    }


def _under(path: str, prefix: str) -> bool:
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] in ".[")


def _anchor(steps: list[Step], untaken: str) -> int | None:
    """The step an untaken branch hangs from: the last one of the part that decided against it.

    That is the ``test`` of an ``if_``/``while_`` and the ``body`` of a ``try_``; without such a step (an
    empty test), the step just before the combinator's first one; None means the session's start.
    """
    parent = _parent(untaken)
    decider = f"{parent}.{DECIDED_BY.get(_role(untaken), 'test')}"
    anchor = None
    first_under = None
    for i, step in enumerate(steps):
        if _under(step.path, decider):
            anchor = i
        if first_under is None and _under(step.path, parent):
            first_under = i
    if anchor is None and first_under is not None and first_under > 0:
        anchor = first_under - 1
    return anchor


# ---------------------------------------------------------------------------------------------- routes


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
