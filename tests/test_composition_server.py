"""Compositions through the dev server: the REST routes (``/compositions``) and ``minifaas composition ...``.

The REST tests run a real server in a thread over a state dir (restarted to show that the composition comes back);
the CLI test runs the real ``minifaas`` command against a real ``minifaas serve`` process. ``tests/data/composer``
holds a flow compiled by the real openwhisk-composer (see its .js file).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

import minifaas
from minifaas._server.app import ServerHandle, serve
from tests.helpers.subproc import reap

ROOT = Path(__file__).resolve().parent.parent
COMPOSER_FLOW = ROOT / "tests" / "data" / "composer" / "flow.json"
NS = "/api/v1/namespaces/_"
DOUBLE = "def main(args):\n    return {'n': args['n'] * 2}\n"
POSITIVE = "def main(args):\n    return {'value': args['n'] > 0}\n"
CLI_TIMEOUT_S = 120


@contextlib.asynccontextmanager
async def serving(state_dir: Path) -> AsyncIterator[ServerHandle]:
    async with minifaas.Engine(state_dir=state_dir) as engine, anyio.create_task_group() as tg:
        handle: ServerHandle = await tg.start(functools.partial(serve, engine, "127.0.0.1", 0))
        try:
            yield handle
        finally:
            handle.stop()


@contextlib.contextmanager
def http_client(state_dir: Path) -> Iterator[httpx.Client]:
    with start_blocking_portal("asyncio") as portal, portal.wrap_async_context_manager(serving(state_dir)) as handle:
        user, _, key = handle.auth.partition(":")
        with httpx.Client(base_url=handle.url, auth=(user, key), timeout=30) as http:
            yield http


def put_composition(http: httpx.Client, name: str, composition: Any, overwrite: bool = False, **body: Any) -> Any:
    exec_ = {"kind": "composition", "composition": composition}
    params = {"overwrite": "true"} if overwrite else {}
    return http.put(f"{NS}/compositions/{name}", params=params, json={"exec": exec_, **body})


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    message: str = r.json()["error"]
    return message


def test_compositions_over_rest_from_composer_json_survive_a_restart(tmp_path: Path) -> None:
    flow = json.loads(COMPOSER_FLOW.read_text())
    with http_client(tmp_path / "state") as http:
        for name, code in (("double", DOUBLE), ("positive", POSITIVE)):
            r = http.put(f"{NS}/actions/{name}", json={"exec": {"kind": "python:3", "code": code}})
            assert r.status_code == 200, r.text
        made = put_composition(http, "flow", flow)
        assert made.status_code == 200, made.text
        shape = made.json()
        assert shape["version"] == "0.0.1" and shape["exec"]["components"] == ["double", "positive"]
        assert shape["exec"]["composition"]["composition"]["type"] == "sequence"  # composer's ast, not lowered
        assert "already exists" in error_of(put_composition(http, "flow", flow), 409)
        assert put_composition(http, "flow", flow, overwrite=True).json()["version"] == "0.0.1"  # unchanged
        updated = put_composition(http, "flow", flow, overwrite=True, limits={"steps": 9})
        assert (updated.json()["version"], updated.json()["limits"]) == ("0.0.2", {"steps": 9})
        # listed among the actions (a conductor action, as OpenWhisk shows one) with the same version
        as_action = http.get(f"{NS}/actions/flow")
        assert as_action.status_code == 200, as_action.text
        assert as_action.json()["version"] == "0.0.2" and as_action.json()["exec"]["kind"] == "composition"
        assert "is an action" in error_of(put_composition(http, "double", flow, overwrite=True), 409)
        # code over HTTP: composer's inline JavaScript and a Python reference the host would import
        js = {"type": "function", "function": {"exec": {"kind": "nodejs:default", "code": "p => p"}}}
        assert "inline function" in error_of(put_composition(http, "bad", {"composition": js}), 400)
        py = {"type": "function", "function": {"exec": {"kind": "python:3", "ref": "os:system"}}}
        assert "os:system" in error_of(put_composition(http, "bad", py), 400)
        assert "exec.composition" in error_of(http.put(f"{NS}/compositions/bad", json={"exec": {}}), 400)
        assert "limits.steps" in error_of(put_composition(http, "bad", flow, limits={"steps": 0}), 400)
        assert http.get(f"{NS}/compositions/bad").status_code == 404
        listed = http.get(f"{NS}/compositions").json()
        assert [c["name"] for c in listed] == ["flow"] and "composition" not in listed[0]["exec"]
        assert "no composition" in error_of(http.post(f"{NS}/compositions/double"), 404)
    with http_client(tmp_path / "state") as http:  # a new server on the state dir: nothing deployed again
        r = http.post(f"{NS}/compositions/flow", params={"blocking": "true"}, json={"n": 3})
        assert r.status_code == 200, r.text
        record = r.json()
        assert record["response"]["result"] == {"params": {"n": 12}, "result": {"n": 24}}
        sid = record["activationId"]
        assert http.get(f"{NS}/sessions/{sid}").json()["name"] == "flow"
        graph = http.get(f"/ui/api/sessions/{sid}").json()["graph"]  # what the web UI draws
        assert graph["nodes"], graph
        assert http.delete(f"{NS}/compositions/flow").status_code == 200
        assert http.get(f"{NS}/compositions/flow").status_code == 404
        assert http.get(f"{NS}/actions/double").status_code == 200  # deleting it left its actions


# -- the CLI against `minifaas serve` ------------------------------------------------------------------------
# the console script of the interpreter running the tests: one found first on PATH may be another install's
_SCRIPT = shutil.which("minifaas", path=str(Path(sys.executable).parent))
CLI = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "minifaas._cli.main"]

FLOW_PY = """
from minifaas import composer

composition = composer.sequence("double", composer.if_("positive", "double", composer.literal({"n": 0})))
gate = composer.if_("positive", "double")
glue = composer.sequence("double", lambda p: p)

if __name__ == "__main__":
    raise SystemExit("not run as a script")
"""


@contextlib.contextmanager
def serve_process(state_dir: Path) -> Iterator[dict[str, str]]:
    """``minifaas serve`` on a free port until its ``export`` line; the environment the CLI talks to it with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIFAAS_")} | {"COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("export ")):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        m = re.match(r"export MINIFAAS_APIHOST=(\S+) MINIFAAS_AUTH=(\S+)$", lines[-1].strip() if lines else "")
        assert m, "".join(lines)
        yield env | {"MINIFAAS_APIHOST": m[1], "MINIFAAS_AUTH": m[2]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_composition_cli_against_a_real_server(tmp_path: Path) -> None:
    (tmp_path / "double.py").write_text(DOUBLE)
    (tmp_path / "positive.py").write_text(POSITIVE)
    flow_py = tmp_path / "flow.py"
    flow_py.write_text(FLOW_PY)
    with serve_process(tmp_path / "state") as env:
        for name in ("double", "positive"):
            ok(cli(env, "deploy", name, str(tmp_path / f"{name}.py")))
        out = ok(cli(env, "composition", "create", "wf", str(flow_py)))
        assert "created composition wf (version 0.0.1), actions: double, positive" in out, out
        ok(cli(env, "composition", "create", "gate", str(flow_py), "--attr", "gate", "--conditions", "strict"))
        ok(cli(env, "composition", "create", "composer-flow", str(COMPOSER_FLOW), "--max-steps", "20"))
        refused = cli(env, "composition", "create", "glue", str(flow_py), "--attr", "glue")
        assert refused.returncode == 1 and "root[1] is a Python function" in refused.stderr, refused.stderr
        listed = json.loads(ok(cli(env, "composition", "list", "--json")))
        assert sorted(c["name"] for c in listed) == ["composer-flow", "gate", "wf"]
        got = json.loads(ok(cli(env, "composition", "get", "gate")))
        assert got["exec"]["conditions"] == "strict" and got["exec"]["composition"]["composition"]["type"] == "if"
        run = cli(env, "composition", "invoke", "wf", "-p", "n", "5", "-r")
        assert json.loads(ok(run)) == {"n": 20}
        sid = re.search(r"session ([0-9a-f]{32}): its graph is at (\S+)", run.stderr)
        assert sid, run.stderr
        assert sid[2].endswith(f"/ui/sessions/{sid[1]}")
        result = json.loads(ok(cli(env, "composition", "invoke", "composer-flow", "-p", "n", "-1", "-r")))
        assert result == {"params": {"n": 0}, "result": {"n": 0}}  # -2 is not positive: the literal {n: 0}
    with serve_process(tmp_path / "state") as env:  # a restarted server has them all
        assert json.loads(ok(cli(env, "invoke", "wf", "-p", "n", "1", "-r"))) == {"n": 4}
        ok(cli(env, "composition", "delete", "wf"))
        gone = cli(env, "composition", "get", "wf")
        assert gone.returncode == 1 and "404" in gone.stderr


def test_what_the_cli_reads_from_a_file(tmp_path: Path) -> None:
    from minifaas._cli.compositions import load_composition
    from minifaas._cli.main import CliError

    flow_py = tmp_path / "flow.py"
    flow_py.write_text(FLOW_PY)
    assert load_composition(flow_py)["composition"]["type"] == "sequence"  # `composition`, the __main__ block idle
    assert load_composition(flow_py, "gate")["actions"] == [{"name": "positive"}, {"name": "double"}]
    assert load_composition(COMPOSER_FLOW) == json.loads(COMPOSER_FLOW.read_text())  # JSON goes as it is
    for path, attr, needle in (
        (flow_py, "nope", "defines no module-level 'nope'"),
        (flow_py, "__name__", "'__name__' is a str, not a minifaas.composer composition"),
        (tmp_path / "flow.yaml", "composition", "is not a file"),
        (ROOT / "pyproject.toml", "composition", "give a .json file"),
    ):
        with pytest.raises(CliError, match=re.escape(needle)):
            load_composition(path, attr)
