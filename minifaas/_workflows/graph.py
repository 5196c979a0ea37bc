"""A session's flow graph: laid out here (rows and columns of steps, the branches not taken beside them), drawn by
the web UI's page as SVG, and by :func:`to_svg` for a notebook (``Session._repr_html_``).
"""

from __future__ import annotations

import html
import re
from typing import Any, Final

from .sessions import Session, Step

__all__ = ("GRAPH_MAX_COLUMNS", "GRAPH_MAX_STEPS", "session_graph", "to_svg")

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


# -- SVG, for a notebook (the web UI's page draws the same layout in app.js) --------------------------------------
NODE_W: Final = 196
NODE_H: Final = 56
GAP_X: Final = 40
GAP_Y: Final = 44
PAD: Final = 24
KIND_TAG: Final = {
    "action": "ACTION",
    "function": "HOST FN",
    "literal": "LITERAL",
    "dynamic": "DYNAMIC",
    "async": "ASYNC",
}
#: fill, stroke, text colour by how a node ended
COLOURS: Final = {
    "taken": ("#eef4ff", "#3563e9", "#1b1f24"),
    "success": ("#ffffff", "#3563e9", "#1b1f24"),
    "failed": ("#fdecec", "#d12f2f", "#d12f2f"),
    "running": ("#fff6e0", "#c98a00", "#1b1f24"),
    "untaken": ("#f1f2f4", "#9aa1ab", "#9aa1ab"),
}
ERROR_STATUSES: Final = frozenset({"application_error", "developer_error", "internal_error", "failed", "error"})


def _clip(text: Any, n: int) -> str:
    s = str(text if text is not None else "")
    return s if len(s) <= n else s[: n - 1] + "…"


def to_svg(graph: dict[str, Any]) -> str:
    """The graph as a standalone SVG: taken steps outlined, steps not taken grey and dashed, failed steps red."""
    cols = max(1, int(graph["columns"]))
    rows = max(1, int(graph["rows"]))
    width = PAD * 2 + cols * NODE_W + (cols - 1) * GAP_X
    height = PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y
    pos: dict[str, tuple[float, float, dict[str, Any]]] = {}
    for n in graph["nodes"]:
        cx = width / 2 + (n["col"] - (n["cols"] - 1) / 2) * (NODE_W + GAP_X)
        pos[n["id"]] = (cx, PAD + n["row"] * (NODE_H + GAP_Y), n)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="minifaas-graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">',
        '<defs><marker id="mf-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="5" markerHeight="5" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#3563e9"/></marker>'
        '<marker id="mf-arrow-untaken" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa1ab"/></marker></defs>',
    ]
    for e in graph["edges"]:
        if e["from"] not in pos or e["to"] not in pos:
            continue
        x1, y1, _ = pos[e["from"]]
        x2, y2, _ = pos[e["to"]]
        y1, y2 = y1 + NODE_H, y2 - 2
        mid = (y1 + y2) / 2
        style = (
            'stroke="#3563e9" stroke-width="2" marker-end="url(#mf-arrow)"'
            if e["taken"]
            else 'stroke="#9aa1ab" stroke-width="1.5" stroke-dasharray="5 5" marker-end="url(#mf-arrow-untaken)"'
        )
        out.append(
            f'<path class="edge {"taken" if e["taken"] else "untaken"}" fill="none" {style} '
            f'd="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"/>'
        )
    for cx, y, n in pos.values():
        terminal = n["kind"] in ("start", "end")
        status = str(n.get("status", ""))
        if n.get("taken") is False:
            state = "untaken"
        elif status in ERROR_STATUSES:
            state = "failed"
        elif status in ("success", "start"):
            state = "success"
        elif status == "running":
            state = "running"
        else:
            state = "taken"
        fill, stroke, ink = COLOURS[state]
        x = cx - NODE_W / 2
        title = html.escape(f"{n.get('label', '')} · {n.get('path') or 'root'} · {state}")
        out.append(
            f'<g class="node {state}" data-node="{html.escape(n["id"])}" transform="translate({x:.1f},{y:.1f})">'
        )
        out.append(f"<title>{title}</title>")
        dash = ' stroke-dasharray="5 4"' if state == "untaken" else ""
        if terminal:
            label = f"▶ {n['label']}" if n["kind"] == "start" else str(n["label"]).replace("_", " ")
            w = min(NODE_W, 40 + 8 * len(str(n["label"])))
            solid = stroke if state != "untaken" else fill
            out.append(
                f'<rect x="{(NODE_W - w) / 2:.1f}" y="{NODE_H / 2 - 17:.1f}" width="{w}" height="34" rx="17" '
                f'fill="{solid}" stroke="{stroke}"/>'
            )
            out.append(
                f'<text x="{NODE_W / 2}" y="{NODE_H / 2 + 5}" text-anchor="middle" font-size="13" font-weight="600" '
                f'fill="#ffffff">{html.escape(_clip(label, 24))}</text>'
            )
        else:
            tag = "NOT TAKEN" if state == "untaken" else KIND_TAG.get(n["kind"], str(n["kind"]).upper())
            meta = (
                _clip(n.get("path"), 28)
                if state == "untaken"
                else f"{status.replace('_', ' ') if state == 'failed' else state} · {n.get('duration_ms', 0)} ms"
            )
            out.append(
                f'<rect width="{NODE_W}" height="{NODE_H}" rx="10" fill="{fill}" stroke="{stroke}" '
                f'stroke-width="{2 if state == "failed" else 1.6}"{dash}/>'
            )
            out.append(f'<text x="12" y="16" font-size="10" font-weight="700" fill="{ink}">{html.escape(tag)}</text>')
            out.append(
                f'<text x="12" y="34" font-size="13" font-weight="600" fill="{ink}">'
                f"{html.escape(_clip(n.get('label'), 24))}</text>"
            )
            out.append(f'<text x="12" y="49" font-size="11" fill="{ink}">{html.escape(meta)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
