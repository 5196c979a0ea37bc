"""Web UI: the JSON endpoints, the flow-graph layout, and the pages in a real headless Chromium.

One module-scoped engine serves the UI over real HTTP (uvicorn on 127.0.0.1) from a background event loop;
the browser tests drive Debian's ``chromium`` through playwright. Screenshots of every page land in
``$MINIFAAS_SCREENSHOT_DIR`` (default: a ``webui-screens`` folder under the system temp dir), with the
measured page load times in ``load_times_ms.txt``. ``$MINIFAAS_CHROMIUM`` overrides the browser's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

import minifaas
from minifaas import composer as c
from minifaas._server.app import new_auth, serve
from minifaas._server.webui import GRAPH_MAX_COLUMNS, session_graph
from minifaas._workflows.sessions import Session, Step

CHROMIUM = os.environ.get("MINIFAAS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: how long playwright waits for anything (generous: CI shares 2 cores with the sandboxes)
PAGE_TIMEOUT_MS = 15_000
#: a page shows its data within this (they take ~0.2-0.7 s here; the list polls every second)
PAGE_BUDGET_MS = 5_000
AUTH = new_auth()
USER, KEY = AUTH.split(":", 1)
SCREEN_DIR = Path(os.environ.get("MINIFAAS_SCREENSHOT_DIR", Path(tempfile.gettempdir()) / "webui-screens"))

HELLO = "def main(args):\n    print('hello', args.get('name'))\n    return {'hi': args.get('name')}\n"
ADD = "def main(args):\n    return {**args, 'n': args.get('n', 0) + 1}\n"
CHECK = "def main(args):\n    return {'value': args.get('n', 0) > 5}\n"
TAG = "def main(args):\n    return {**args, 'size': args['size_label']}\n"
CRASH = """import sys
def main(args):
    print('about to fail', file=sys.stderr)
    raise ValueError('kaput')
"""
NAP = "import time\ndef main(args):\n    time.sleep(args.get('s', 1.5))\n    return {'slept': True}\n"
RESCUE = "def main(args):\n    return {'rescued': True, 'why': args.get('error')}\n"


@dataclasses.dataclass
class Live:
    portal: BlockingPortal
    engine: minifaas.Engine
    base: str

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(lambda: fn(*args, **kwargs))


def _flow() -> c.Composition:
    """prep, then if n > 5: try crash (fails) / rescue, else tag 'small'; then finish."""
    return c.sequence("w_add", c.if_("w_check", c.try_("w_crash", "w_rescue"), "w_tag"), "w_add")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with start_blocking_portal() as portal:
        engine = minifaas.Engine(idle_timeout_s=600)
        with portal.wrap_async_context_manager(engine):
            for name, code in (
                ("hello", HELLO),
                ("w_add", ADD),
                ("w_check", CHECK),
                ("w_tag", TAG),
                ("w_crash", CRASH),
                ("w_rescue", RESCUE),
                ("nap", NAP),
            ):
                portal.call(partial(engine.deploy, name, code=code))
            portal.call(engine.deploy_composition, "flow", _flow())
            fan = c.sequence("w_add", c.parallel("nap", "w_add", "w_crash"), "w_add")
            portal.call(engine.deploy_composition, "fan", fan)
            served, handle = portal.start_task(serve, engine, "127.0.0.1", 0, AUTH)
            try:
                yield Live(portal, engine, handle.url)
            finally:
                handle.stop()
                served.result(timeout=10)


@pytest.fixture(scope="module")
def warm(live: Live) -> dict[str, Any]:
    """A few activations and two sessions (one per branch of the if_) recorded before the pages load."""
    acts = [live.run(live.engine.call, "hello", {"name": f"Ada {i}"}) for i in range(3)]
    big = live.run(live.engine.call, "flow", {"n": 10}).activation_id
    small = live.run(live.engine.call, "flow", {"n": 1, "size_label": "small"}).activation_id
    fan = live.run(live.engine.call, "fan", {"s": 0.3}).activation_id
    return {"acts": acts, "big": big, "small": small, "fan": fan}


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.base, timeout=10, auth=(USER, KEY)) as cl:
        yield cl


# ------------------------------------------------------------------------------------------------ JSON API


def test_functions_endpoint_reports_pool_state(client: httpx.Client, warm: dict[str, Any]) -> None:
    r = client.get("/ui/api/functions")
    assert r.status_code == 200
    fns = {f["name"]: f for f in r.json()["functions"]}
    hello = fns["hello"]
    assert hello["version"] == "1"
    # the three calls ran one after another: one sandbox, warm and idle now
    assert hello["pool"]["sandboxes"] >= 1
    assert hello["pool"]["idle"] == hello["pool"]["sandboxes"]
    assert hello["pool"]["busy"] == 0
    assert hello["pools"][0]["version"] == "1"
    assert "w_crash" in fns


def test_activations_endpoint_lists_newest_first(client: httpx.Client, warm: dict[str, Any]) -> None:
    r = client.get("/ui/api/activations", params={"name": "hello", "limit": 100})
    acts = r.json()["activations"]
    assert all(a["name"] == "hello" for a in acts)
    listed = [a["activation_id"] for a in acts]
    mine = [a.activation_id for a in warm["acts"]]
    assert [i for i in listed if i in mine] == mine[::-1]
    by_id = {a["activation_id"]: a for a in acts}
    assert [by_id[i]["cold"] for i in mine] == [True, False, False]  # later calls reuse the first's sandbox
    assert all(by_id[i]["status"] == "success" for i in mine)
    assert "result" not in acts[0]  # the live list stays small
    assert len(client.get("/ui/api/activations", params={"limit": 2}).json()["activations"]) == 2


def test_activation_endpoint_has_result_logs_and_timings(client: httpx.Client, warm: dict[str, Any]) -> None:
    first = warm["acts"][0]
    a = client.get(f"/ui/api/activations/{first.activation_id}").json()
    assert a["result"] == {"hi": "Ada 0"}
    assert a["logs"] and a["logs"][0].endswith("stdout: hello Ada 0")
    assert a["cold"] is True and a["init_time"] is not None
    assert a["duration"] >= a["init_time"]
    assert a["done"] is True and a["session"] is None


def test_activation_endpoint_shows_step_params(client: httpx.Client, warm: dict[str, Any]) -> None:
    s = client.get(f"/ui/api/sessions/{warm['big']}").json()["session"]
    check = next(st for st in s["steps"] if st["name"] == "w_check")
    a = client.get(f"/ui/api/activations/{check['activation_id']}").json()
    assert a["params"] == {"n": 11}
    assert a["session"]["session_id"] == warm["big"]
    assert a["session"]["step"]["path"] == "[1].test"


@pytest.mark.parametrize(
    "path",
    [
        "/ui/api/activations/0123456789abcdef0123456789abcdef",
        "/ui/api/sessions/nope",
        "/ui/api/sessions/a%20b",
    ],
    ids=["activation", "session", "bad-id"],
)
def test_unknown_records_are_404(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert "error" in r.json()


def test_pages_and_assets_are_served(client: httpx.Client) -> None:
    for path in ("/ui/", "/ui/activations", "/ui/activations/x", "/ui/sessions", "/ui/sessions/x"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert 'src="/ui/static/app.js"' in r.text
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/ui/static/{asset}").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_session_endpoint_lays_out_taken_and_untaken(client: httpx.Client, warm: dict[str, Any]) -> None:
    data = client.get(f"/ui/api/sessions/{warm['big']}").json()
    ses, graph = data["session"], data["graph"]
    assert ses["not_taken"] == ["[1].alternate"]
    by_path = {n.get("path"): n for n in graph["nodes"]}
    crash, rescue, tag = (
        by_path["[1].consequent.body"],
        by_path["[1].consequent.handler"],
        by_path["[1].alternate"],
    )
    assert crash["status"] == "application_error" and crash["activation_id"]
    assert rescue["status"] == "success"
    assert tag["taken"] is False and tag["status"] == "not_taken"
    # the untaken arm sits in the row of the taken one, hanging from the test
    assert tag["row"] == crash["row"] and tag["col"] > crash["col"]
    assert {"from": by_path["[1].test"]["id"], "to": tag["id"], "taken": False} in graph["edges"]
    listed = client.get("/ui/api/sessions").json()["sessions"]
    assert {warm["big"], warm["small"]} <= {x["session_id"] for x in listed}


# ---------------------------------------------------------------------------------------------- graph layout


def _session(steps: list[tuple[str, str, int, Any, str]], not_taken: list[str]) -> Session:
    return Session(
        session_id="s" * 32,
        name="wf",
        status="success",
        start=1000,
        steps=[
            Step(path=p, kind="action", name=n, activation_id=f"a{i}", start=t, duration_ms=d, status=st)  # type: ignore[arg-type]
            for i, (p, n, t, d, st) in enumerate(steps)
        ],
        not_taken=not_taken,
    )


def _rows(graph: dict[str, Any]) -> list[list[str]]:
    """Each row's nodes by column: their path (``start``/``end`` for those), ``""`` for a kept-free slot."""
    out: list[list[str]] = [[] for _ in range(graph["rows"])]
    for n in graph["nodes"]:
        row = out[n["row"]]
        row += [""] * (n["cols"] - len(row))
        row[n["col"]] = n.get("path", n["id"])
    return out


@pytest.mark.parametrize(
    ("steps", "not_taken", "rows"),
    [
        (
            [
                ("[0]", "a", 1000, 5, "success"),
                ("[1].test", "t", 1006, 3, "success"),
                ("[1].consequent", "yes", 1010, 4, "success"),
                ("[2]", "z", 1015, 2, "success"),
            ],
            ["[1].alternate"],
            [["start"], ["[0]"], ["[1].test"], ["[1].consequent", "[1].alternate"], ["[2]"], ["end"]],
        ),
        (
            [
                ("[0]", "a", 1000, 5, "success"),
                ("[1].test", "t", 1006, 3, "success"),
                ("[1].alternate", "no", 1010, 4, "success"),
            ],
            ["[1].consequent"],
            [["start"], ["[0]"], ["[1].test"], ["[1].alternate", "[1].consequent"], ["end"]],
        ),
        (
            [(".body", "b", 1000, 5, "success")],
            [".handler"],
            [["start"], [".body"], ["", ".handler"], ["end"]],
        ),
        (
            [(".test", "t", 1000, 5, "success")],
            [".body"],
            [["start"], [".test"], ["", ".body"], ["end"]],
        ),
        (
            [
                ("[0]", "a", 1000, 2, "success"),
                ("[1][0]", "p", 1003, 50, "success"),
                ("[1][1]", "q", 1003, 60, "success"),
                ("[1][2]", "r", 1004, 40, "application_error"),
                ("[2]", "z", 1064, 1, "success"),
            ],
            [],
            [["start"], ["[0]"], ["[1][0]", "[1][1]", "[1][2]"], ["[2]"], ["end"]],
        ),
        (
            [("[0]", "a", 1000, 0.05, "success"), ("[1]", "b", 1000, 0.05, "success")],
            [],
            [["start"], ["[0]"], ["[1]"], ["end"]],
        ),
    ],
    ids=["if-consequent", "if-alternate", "try-no-error", "while-never", "parallel", "sub-ms-sequence"],
)
def test_graph_layout(steps: list[Any], not_taken: list[str], rows: list[list[str]]) -> None:
    assert _rows(session_graph(_session(steps, not_taken))) == rows


def test_graph_edges_fan_out_and_in() -> None:
    steps = [("[0]", "a", 1000, 2, "success"), ("[1][0]", "p", 1003, 50, "success"),
             ("[1][1]", "q", 1003, 60, "success"), ("[2]", "z", 1064, 1, "success")]  # fmt: skip
    graph = session_graph(_session(steps, []))
    pairs = {(e["from"], e["to"]) for e in graph["edges"]}
    assert pairs == {("start", "s0"), ("s0", "s1"), ("s0", "s2"), ("s1", "s3"), ("s2", "s3"), ("s3", "end")}
    assert all(e["taken"] for e in graph["edges"])


def test_graph_wraps_wide_rows_and_caps_steps() -> None:
    wide = [(f"[{i}]", "m", 1000, 100, "success") for i in range(GRAPH_MAX_COLUMNS + 3)]
    graph = session_graph(_session(wide, []))
    assert graph["columns"] == GRAPH_MAX_COLUMNS
    long = [(f"[{i}]", "m", 1000 + 10 * i, 1, "success") for i in range(400)]
    graph = session_graph(_session(long, []))
    assert graph["truncated"] is True
    assert sum(1 for n in graph["nodes"] if n["id"].startswith("s")) < 400


def test_graph_labels_untaken_branch_from_composition() -> None:
    comp = c.sequence("a", c.if_("t", c.sequence("yes1", "yes2"), c.sequence("no1", "no2"))).to_json()
    ses = _session(
        [("[0]", "a", 1000, 1, "success"), ("[1].test", "t", 1002, 1, "success"),
         ("[1].consequent[0]", "yes1", 1004, 1, "success"),
         ("[1].consequent[1]", "yes2", 1006, 1, "success")],
        ["[1].alternate"],
    )  # fmt: skip
    node = next(n for n in session_graph(ses, comp["composition"])["nodes"] if n.get("path") == "[1].alternate")
    assert node["label"] == "no1 → no2"
    assert node["kind"] == "sequence"


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (CI installs it)")
    pw = sync_api.sync_playwright().start()
    try:
        yield pw
    finally:
        pw.stop()


def _chromium(pw: Any, profile: Path, **options: Any) -> Any:
    ctx = pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1360, "height": 900},
        color_scheme="light",
        **options,
    )
    ctx.set_default_timeout(PAGE_TIMEOUT_MS)
    return ctx


@pytest.fixture(scope="module")
def browser_context(playwright: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ctx = _chromium(
        playwright, tmp_path_factory.mktemp("chromium-profile"), http_credentials={"username": USER, "password": KEY}
    )
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    pg = browser_context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield pg
    pg.close()
    assert errors == [], f"the page logged errors: {errors}"


LOAD_TIMES_MS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_load_times() -> Iterator[None]:
    """Leaves the measured page load times next to the screenshots, for humans."""
    yield
    if LOAD_TIMES_MS:
        SCREEN_DIR.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"{k}: {v} ms\n" for k, v in LOAD_TIMES_MS.items())
        (SCREEN_DIR / "load_times_ms.txt").write_text(lines, encoding="utf-8")


def _open(page: Any, live: Live, path: str, ready: str, label: str) -> None:
    """Load a page and wait until ``ready`` (a selector of data drawn from the API) is visible."""
    t0 = time.perf_counter()
    page.goto(live.base + path)
    page.wait_for_selector(ready, state="visible")
    took_ms = LOAD_TIMES_MS[label] = round((time.perf_counter() - t0) * 1e3, 1)
    assert took_ms < PAGE_BUDGET_MS, f"{label} took {took_ms} ms to show its data"


def _shot(page: Any, name: str) -> Path:
    SCREEN_DIR.mkdir(parents=True, exist_ok=True)
    out = SCREEN_DIR / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 5_000, "a blank screenshot"
    return out


def test_functions_page_shows_pools(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, "/ui/", "[data-function=hello] [data-pool]", "functions")
    card = page.locator("[data-function=hello]")
    pool = card.locator("[data-pool]").inner_text()
    assert "warm" in pool and "busy" in pool and "idle" in pool
    assert card.locator(".pip").count() >= 1
    assert page.locator("[data-function]").count() == len(live.run(live.engine.list_functions))
    assert page.locator("a[data-nav=functions]").get_attribute("class") == "active"
    _shot(page, "functions")


def test_functions_page_follows_busy_sandboxes(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, "/ui/", "[data-function=nap] [data-pool]", "functions (busy)")
    ids = [live.run(live.engine.submit, "nap", {"s": 1.5}) for _ in range(2)]
    page.wait_for_function("document.querySelectorAll('[data-function=nap] .pip.busy').length === 2", timeout=5_000)
    assert "2 busy" in page.locator("[data-function=nap] [data-pool]").inner_text()
    _shot(page, "functions-busy")
    for aid in ids:
        live.run(live.engine.activations.wait, aid, 30)
    page.wait_for_function(
        "document.querySelectorAll('[data-function=nap] .pip.busy').length === 0"
        " && document.querySelectorAll('[data-function=nap] .pip.idle').length === 2",
        timeout=5_000,
    )
    flow = page.locator("[data-function=flow]")
    assert flow.get_attribute("data-kind") == "composition"
    assert "w_crash" in flow.inner_text()


def test_activation_list_updates_live(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, "/ui/activations", f"tr[data-id='{warm['acts'][-1].activation_id}']", "activations")
    rows = page.locator("#activations tr")
    assert rows.count() >= len(warm["acts"])
    first = page.locator(f"tr[data-id='{warm['acts'][0].activation_id}']")
    assert "cold" in first.inner_text() and "success" in first.inner_text()
    # a new invocation shows up without a reload (the list polls every second)
    act = live.run(live.engine.call, "hello", {"name": "live"})
    t0 = time.perf_counter()
    page.wait_for_selector(f"tr[data-id='{act.activation_id}']", timeout=5_000)
    LOAD_TIMES_MS["activation appears in list"] = round((time.perf_counter() - t0) * 1e3, 1)
    assert "warm" in page.locator(f"tr[data-id='{act.activation_id}']").inner_text()
    # the filter keeps only the errors
    page.click("button[data-filter=errors]")
    page.wait_for_function("document.querySelectorAll('#activations tr[data-status=success]').length === 0")
    statuses = page.locator("#activations tr[data-status]").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert statuses and all(s.endswith("error") for s in statuses)
    page.click("button[data-filter=all]")
    _shot(page, "activations")


def test_activation_page_shows_result_logs_timings(page: Any, live: Live, warm: dict[str, Any]) -> None:
    cold = warm["acts"][0]
    _open(page, live, f"/ui/activations/{cold.activation_id}", "#result pre", "activation")
    assert page.locator("#activation-id").inner_text() == cold.activation_id
    assert '"hi": "Ada 0"' in page.locator("#result").inner_text()
    assert "hello Ada 0" in page.locator("#logs").inner_text()
    timings = page.locator("#timings").inner_text()
    assert "init" in timings and "cold" in timings
    assert page.locator("#timings .timeline .init").count() == 1
    assert '"kind"' not in page.locator("#annotations").inner_text()  # a key/value list, not raw JSON
    _shot(page, "activation")


def test_failed_step_page_shows_stderr(page: Any, live: Live, warm: dict[str, Any]) -> None:
    ses = live.engine.sessions.get(warm["big"])
    crash = next(s for s in ses.steps if s.name == "w_crash")
    _open(page, live, f"/ui/activations/{crash.activation_id}", "#logs .stderr", "activation (failed step)")
    assert "about to fail" in page.locator("#logs .stderr").first.inner_text()
    assert page.locator(".page-head .badge[data-status$=error]").count() == 1
    assert "kaput" in page.locator("#result").inner_text()
    assert '"n": 11' in page.locator("#params").inner_text()  # the step's input, from the session
    page.click("#session-link")
    page.wait_for_selector("#flow-graph")
    assert page.url.endswith(f"/ui/sessions/{warm['big']}")


def _stroke(page: Any, selector: str) -> str:
    return str(page.locator(selector).evaluate("e => getComputedStyle(e).stroke"))


def _css_var(page: Any, name: str) -> str:
    """A CSS variable resolved to the rgb() form that getComputedStyle reports."""
    return str(
        page.evaluate(
            """name => { const d = document.createElement('div'); d.style.color = `var(${name})`;
                 document.body.append(d); const c = getComputedStyle(d).color; d.remove(); return c; }""",
            name,
        )
    )


def test_session_flow_graph(page: Any, live: Live, warm: dict[str, Any]) -> None:
    sid = warm["big"]
    _open(page, live, f"/ui/sessions/{sid}", "#flow-graph [data-node=end]", "session graph")
    graph = page.locator("#flow-graph")
    ses = live.engine.sessions.get(sid)
    assert graph.locator("g.node").count() == len(ses.steps) + len(ses.not_taken) + 2
    untaken = graph.locator("g.node[data-path='[1].alternate']")
    assert "untaken" in (untaken.get_attribute("class") or "")
    # labelled with the function it would have run (the UI reads the deployed composition)
    assert "w_tag" in (untaken.text_content() or "")
    grey, red, accent = _css_var(page, "--grey"), _css_var(page, "--err"), _css_var(page, "--accent")
    assert _stroke(page, "g.node[data-path='[1].alternate'] rect") == grey
    assert _stroke(page, "g.node[data-path='[1].consequent.body'] rect") == red
    assert _stroke(page, "g.node[data-path='[1].consequent.handler'] rect") == accent
    assert graph.locator("path.edge.untaken").count() == 1
    assert _stroke(page, "path.edge.untaken") == grey
    # the path taken is drawn in the accent colour from start to end
    taken = graph.locator("path.edge.taken")
    assert taken.count() == len(ses.steps) + 1
    hovered = page.locator("g.node[data-path='[1].consequent.body']")
    hovered.hover()
    assert "kaput" in page.locator("#step-detail").inner_text()
    _shot(page, "session-graph")
    page.emulate_media(color_scheme="dark")
    page.wait_for_timeout(100)
    assert _css_var(page, "--bg") != "rgb(245, 246, 248)"
    _shot(page, "session-graph-dark")
    page.emulate_media(color_scheme="light")
    # each node that ran as an activation links to its page
    check = next(s for s in ses.steps if s.path == "[1].test")
    page.click("g.node[data-path='[1].test']")
    page.wait_for_url(f"**/ui/activations/{check.activation_id}")
    page.wait_for_selector("#result pre")
    assert '"value": true' in page.locator("#result").inner_text()


def test_session_graph_of_other_branch(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, f"/ui/sessions/{warm['small']}", "#flow-graph [data-node=end]", "session graph (small)")
    untaken = page.locator("g.node[data-path='[1].consequent']")
    assert "untaken" in (untaken.get_attribute("class") or "")
    assert page.locator("g.node.failed").count() == 0
    assert page.locator("g.node[data-path='[1].alternate'] rect").evaluate("e => getComputedStyle(e).stroke") == (
        _css_var(page, "--accent")
    )
    _shot(page, "session-graph-small")


def test_session_graph_draws_parallel_branches_side_by_side(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, f"/ui/sessions/{warm['fan']}", "#flow-graph [data-node=end]", "session graph (parallel)")
    boxes = {
        p: page.locator(f"g.node[data-path='{p}'] rect").bounding_box() for p in ("[0]", "[1][0]", "[1][1]", "[1][2]")
    }
    ys = [boxes[p]["y"] for p in ("[1][0]", "[1][1]", "[1][2]")]
    assert max(ys) - min(ys) < 2 and min(ys) > boxes["[0]"]["y"] + 20  # one row (strokes differ by a pixel)
    assert boxes["[1][0]"]["x"] < boxes["[1][1]"]["x"] < boxes["[1][2]"]["x"]
    assert "failed" in (page.locator("g.node[data-path='[1][2]']").get_attribute("class") or "")
    # fan-out from the step before, fan-in to the one after
    assert page.locator("path.edge[data-from=s0]").count() == 3
    assert page.locator("path.edge[data-to=s4]").count() == 3
    _shot(page, "session-graph-parallel")


def test_sessions_page_lists_runs(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, "/ui/sessions", f"tr[data-id='{warm['big']}']", "sessions")
    assert page.locator(f"tr[data-id='{warm['small']}']").count() == 1
    _shot(page, "sessions")
    page.click(f"tr[data-id='{warm['big']}'] a.session-link")
    page.wait_for_selector("#flow-graph")
    # the primary activation lists its steps' activations as links, and links back to the graph
    page.click("text=Primary activation")
    page.wait_for_selector("#logs .step-link")
    ses = live.engine.sessions.get(warm["big"])
    assert page.locator("#logs .step-link").all_inner_texts() == ses.activation_ids
    assert page.locator("#session-link").get_attribute("href") == f"/ui/sessions/{warm['big']}"
    _shot(page, "activation-primary")


def test_dark_theme_and_unknown_pages(page: Any, live: Live, warm: dict[str, Any]) -> None:
    _open(page, live, "/ui/", "[data-function=hello]", "functions (again)")
    page.click("#theme")  # auto -> light
    page.click("#theme")  # light -> dark
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.reload()
    page.wait_for_selector("[data-function=hello]")
    assert page.evaluate("localStorage.getItem('minifaas-theme')") == "dark"
    _shot(page, "functions-dark")
    page.evaluate("localStorage.removeItem('minifaas-theme')")


def test_unknown_activation_page(browser_context: Any, live: Live) -> None:
    page = browser_context.new_page()  # not the `page` fixture: the browser logs the expected 404
    try:
        page.goto(live.base + "/ui/activations/0123456789abcdef0123456789abcdef")
        page.wait_for_selector(".empty")
        assert "Not found" in page.locator(".empty").inner_text()
    finally:
        page.close()


# ------------------------------------------------------------------------------------------------ CSRF


@contextlib.contextmanager
def _second_origin(html: str) -> Iterator[str]:
    """A page served by another origin (``localhost``, another port): what a hostile site would serve."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = html.encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _greeted(live: Live, name: str) -> bool:
    acts = live.run(live.engine.activations.list, "hello", limit=500)
    return any(a.result == {"hi": name} for a in acts)


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(
            "<form id=f method=POST enctype=text/plain action='{url}'>"
            '<input name=\'{{"name":"csrf-form","x":"\' value=\'"}}\'></form>'
            "<script>document.getElementById('f').submit()</script>",
            id="text-plain-form",
        ),
        pytest.param(
            "<form id=f method=POST action='{url}'><input name=name value=csrf-form></form>"
            "<script>document.getElementById('f').submit()</script>",
            id="urlencoded-form",
        ),
        pytest.param(
            "<script>fetch('{url}', {{method: 'POST', mode: 'no-cors', credentials: 'include',"
            " body: JSON.stringify({{name: 'csrf-form'}})}})</script>",
            id="no-cors-fetch",
        ),
    ],
)
def test_another_site_cannot_invoke_through_a_logged_in_browser(browser_context: Any, live: Live, attack: str) -> None:
    page = browser_context.new_page()  # not the `page` fixture: the browser logs the refused request
    try:
        page.goto(live.base + "/ui/")  # the user is logged in to the UI
        # the server's own page may write: the browser sends its credential along (the attack's premise)
        status = page.evaluate(
            """async (url) => (await fetch(url, {method: 'POST', headers: {'content-type': 'application/json'},
                   body: JSON.stringify({name: 'same-origin'})})).status""",
            live.base + "/api/v1/namespaces/_/actions/hello?blocking=true",
        )
        assert status == 200
        assert _greeted(live, "same-origin")
        target = live.base + "/api/v1/namespaces/_/actions/hello?blocking=true"
        with _second_origin(attack.format(url=target)) as evil:
            with page.expect_response(lambda r: "/actions/hello" in r.url) as answer:
                page.goto(evil)
            assert answer.value.status == 403, answer.value.status
        time.sleep(0.5)  # an accepted invocation would have ended by now (hello takes milliseconds)
        assert not _greeted(live, "csrf-form")
    finally:
        page.close()


def test_ui_api_reads_only_its_namespace(client: httpx.Client, live: Live, warm: dict[str, Any]) -> None:
    from minifaas._core.activation import Activation, new_activation_id, now_ms

    other = Activation(
        new_activation_id(),
        "hello",
        namespace="intruder",
        status="success",
        start=now_ms(),
        end=now_ms(),
        result={"secret": "of another namespace"},
        logs=["theirs"],
    )
    live.run(live.engine._store.put, other)
    # the record is there: the engine reads every namespace when asked to
    assert live.run(live.engine.activations.get, other.activation_id).namespace == "intruder"
    listed = client.get("/ui/api/activations", params={"limit": 200}).json()["activations"]
    assert listed and other.activation_id not in {a["activation_id"] for a in listed}
    assert client.get(f"/ui/api/activations/{other.activation_id}").status_code == 404
    # REST agrees
    r = client.get(f"/api/v1/namespaces/_/activations/{other.activation_id}")
    assert r.status_code == 404


def test_ui_and_rest_share_encoder_and_limit_rules(client: httpx.Client, live: Live) -> None:
    code = "def main(args):\n    return {'b': b'\\x00\\xffab', 'nan': float('nan')}\n"
    r = client.put("/api/v1/namespaces/_/actions/w_bytes", params={"overwrite": "true"}, json={"exec": {"code": code}})
    assert r.status_code == 200, r.text
    rest = client.post("/api/v1/namespaces/_/actions/w_bytes", params={"blocking": "true"}).json()
    ui = client.get(f"/ui/api/activations/{rest['activationId']}").json()
    assert ui["result"] == rest["response"]["result"] == {"b": "AP9hYg==", "nan": None}
    for params in ({"limit": "1000"}, {"limit": "-1"}, {"limit": "many"}, {"since": str(1 << 64)}):
        rest_r = client.get("/api/v1/namespaces/_/activations", params=params)
        ui_r = client.get("/ui/api/activations", params=params)
        assert rest_r.status_code == ui_r.status_code == 400, (params, rest_r.text, ui_r.text)
        assert set(ui_r.json()) == set(rest_r.json()) == {"error", "code"}
    # the same default and maximum: 0 means the maximum (200) in both
    for params in ({}, {"limit": "0"}):
        n_rest = len(client.get("/api/v1/namespaces/_/activations", params=params).json())
        n_ui = len(client.get("/ui/api/activations", params=params).json()["activations"])
        assert n_rest <= n_ui  # the UI lists running activations too, REST ended ones only
        assert n_ui <= (30 if not params else 200)


def test_ui_opened_with_credentials_in_the_url(
    playwright: Any, live: Live, warm: dict[str, Any], tmp_path: Path
) -> None:
    # what a newcomer pastes: http://uuid:key@host/ui/. The browser then refuses fetch() of any URL resolved
    # against the page's (it carries the credentials): the UI must ask for its data by origin, which has none
    ctx = _chromium(playwright, tmp_path / "profile")  # no http_credentials: only those in the URL
    try:
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        host = live.base.removeprefix("http://")
        page.goto(f"http://{USER}:{KEY}@{host}/ui/")
        page.wait_for_selector("[data-function=hello] [data-pool]", state="visible")
        assert page.locator("#conn").inner_text() == "live"
        page.goto(f"http://{USER}:{KEY}@{host}/ui/activations/{warm['acts'][0].activation_id}")
        page.wait_for_selector("text=Ada 0")
        assert page.locator("#conn").inner_text() == "live"
        assert errors == [], f"the page logged errors: {errors}"
    finally:
        ctx.close()


def test_activation_page_wraps_long_annotations(page: Any, live: Live) -> None:
    # a model function's "models" annotation is one long JSON line (file URLs, digests): it must wrap inside its
    # panel, not push the page sideways
    root = Path(__file__).resolve().parent.parent
    live.run(live.engine.deploy, "w_crop", path=root / "functions" / "smart_body_crop")
    image = (root / "tests" / "data" / "images" / "messi5.jpg").read_bytes()
    act = live.run(live.engine.call, "w_crop", {"image": image})
    assert act.status == "success", act.result
    assert len(str(act.annotations["models"])) > 200
    _open(page, live, f"/ui/activations/{act.activation_id}", "#annotations dd", "activation-long-annotations")
    panel = page.locator("#annotations")
    assert "pose_detection" in panel.inner_text()
    sizes = page.evaluate(
        """() => {
            const panel = document.querySelector('#annotations');
            return {panel: panel.getBoundingClientRect().right, scroll: panel.scrollWidth, client: panel.clientWidth,
                    page: document.documentElement.scrollWidth, viewport: window.innerWidth};
        }"""
    )
    assert sizes["scroll"] <= sizes["client"] and sizes["panel"] <= sizes["viewport"], sizes
    assert sizes["page"] <= sizes["viewport"], sizes
    _shot(page, "activation-long-annotations")
    # the Functions page says where it came from: the folder, not a staging copy
    _open(page, live, "/ui/", "[data-function=w_crop] .origin", "functions-origin")
    origin = page.locator("[data-function=w_crop] .origin")
    assert origin.inner_text() == "from functions/smart_body_crop"
    assert origin.get_attribute("title") == str(root / "functions" / "smart_body_crop")
    live.run(live.engine.delete, "w_crop")
