"""OpenWhisk compatibility over real HTTP: sequences, packages and bindings, exact semantics, the system catalog.

A real ``minifaas`` server (uvicorn on a free loopback port, a real engine with subprocess sandboxes) in a
background thread, driven with httpx as OpenWhisk's clients drive OpenWhisk (see ``tests/test_server.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

import minifaas
from minifaas._server.app import ServerHandle, serve
from minifaas.testing import FakeClock
from tests.test_cli import ok, run
from tests.test_server import API, HEX32, NS, assert_error, client, put_action, server_thread, wait_ended

ADD = "def main(args):\n    return {'n': args.get('n', 0) + args.get('step', 1)}\n"
DOUBLE = "def main(args):\n    return {'n': args.get('n', 0) * 2}\n"
FAIL = "def main(args):\n    return {'error': 'stop at ' + str(args.get('n'))}\n"
CRASH = "def main(args):\n    raise RuntimeError('crashed')\n"
ECHO_ARGS = "def main(args):\n    return dict(args)\n"


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    with server_thread() as s:
        yield s


@pytest.fixture(scope="module")
def http(server: SimpleNamespace) -> Iterator[httpx.Client]:
    with client(server.handle) as c:
        yield c


def put_sequence(http: httpx.Client, name: str, components: list[str], **body: Any) -> httpx.Response:
    params = {"overwrite": "true"}
    return http.put(
        f"{NS}/actions/{name}", params=params, json={"exec": {"kind": "sequence", "components": components}, **body}
    )


def invoke(http: httpx.Client, name: str, args: dict[str, Any] | None = None, **query: str) -> httpx.Response:
    return http.post(f"{NS}/actions/{name}", params={"blocking": "true", **query}, json=args or {})


def ann(record: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: a["value"] for a in record["annotations"]}


# -- sequences -----------------------------------------------------------------------------------------------
def test_sequence_crud_and_blocking_invoke(http: httpx.Client) -> None:
    assert put_action(http, "sq-add", ADD, overwrite=True).status_code == 200
    assert put_action(http, "sq-double", DOUBLE, overwrite=True).status_code == 200
    r = put_sequence(http, "sq-seq", ["/_/sq-add", "/guest/sq-double", "sq-add"])
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["exec"] == {"kind": "sequence", "components": ["/guest/sq-add", "/guest/sq-double", "/guest/sq-add"]}
    assert made["version"] == "0.0.1" and ann(made)["exec"] == "sequence"
    got = http.get(f"{NS}/actions/sq-seq").json()
    assert got["exec"]["components"] == made["exec"]["components"]
    assert "sq-seq" in [a["name"] for a in http.get(f"{NS}/actions").json()]

    r = invoke(http, "sq-seq", {"n": 1})
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["response"]["result"] == {"n": 5}  # (1+1)*2+1
    assert record["response"]["status"] == "success" and record["name"] == "sq-seq"
    assert len(record["logs"]) == 3 and all(HEX32.match(i) for i in record["logs"])
    a = ann(record)
    assert a["kind"] == "sequence" and a["topmost"] is True and a["path"] == "guest/sq-seq"
    components = [wait_ended(http, i) for i in record["logs"]]
    assert [c["name"] for c in components] == ["sq-add", "sq-double", "sq-add"]
    assert [c["response"]["result"]["n"] for c in components] == [2, 4, 5]
    assert all(c["cause"] == record["activationId"] for c in components)
    assert record["duration"] == sum(c["duration"] for c in components)

    assert invoke(http, "sq-seq", {"n": 2}, result="true").json() == {"n": 7}
    accepted = http.post(f"{NS}/actions/sq-seq", json={"n": 0})
    assert accepted.status_code == 202
    done = wait_ended(http, accepted.json()["activationId"])
    assert done["response"]["result"] == {"n": 3} and len(done["logs"]) == 3

    # update: components and default parameters (the first component gets them under the invocation's)
    r = put_sequence(http, "sq-seq", ["/_/sq-add"], parameters=[{"key": "step", "value": 10}])
    assert r.json()["version"] == "0.0.2"
    assert invoke(http, "sq-seq", {"n": 1}, result="true").json() == {"n": 11}
    assert invoke(http, "sq-seq", {"n": 1, "step": 2}, result="true").json() == {"n": 3}
    deleted = http.delete(f"{NS}/actions/sq-seq")
    assert deleted.status_code == 200 and deleted.json()["exec"]["kind"] == "sequence"
    assert_error(http.get(f"{NS}/actions/sq-seq"), 404)


def test_sequence_error_stops_the_chain(http: httpx.Client) -> None:
    put_action(http, "sq2-add", ADD, overwrite=True)
    put_action(http, "sq2-fail", FAIL, overwrite=True)
    put_action(http, "sq2-crash", CRASH, overwrite=True)
    put_sequence(http, "sq2-app", ["sq2-add", "sq2-fail", "sq2-add"])
    r = invoke(http, "sq2-app", {"n": 1})
    assert r.status_code == 502
    record = r.json()
    assert record["response"]["status"] == "application_error" and record["response"]["statusCode"] == 1
    assert record["response"]["result"] == {"error": "stop at 2"}
    assert len(record["logs"]) == 2  # the third component never ran
    assert invoke(http, "sq2-app", {"n": 1}, result="true").json() == {"error": "stop at 2"}

    put_sequence(http, "sq2-dev", ["sq2-crash", "sq2-add"])
    record = invoke(http, "sq2-dev").json()
    assert len(record["logs"]) == 1 and "crashed" in str(record["response"]["result"])
    assert record["response"] == wait_ended(http, record["logs"][0])["response"]  # the component's, status and all


@pytest.mark.parametrize(
    ("components", "fragment"),
    [
        pytest.param([], "No component specified", id="empty"),
        pytest.param(["/_/sq3-missing"], "Sequence component does not exist", id="missing"),
        pytest.param(["/bob/sq3-a"], "not an entity", id="foreign-namespace"),
        pytest.param(["sq3-a"] * 51, "Too many actions in the sequence", id="too-long"),
    ],
)
def test_sequence_create_rejects(http: httpx.Client, components: list[str], fragment: str) -> None:
    put_action(http, "sq3-a", ADD, overwrite=True)
    assert_error(put_sequence(http, "sq3-bad", components), 400, fragment)


def test_sequence_may_not_refer_to_itself(http: httpx.Client) -> None:
    put_action(http, "sq4-a", ADD, overwrite=True)
    put_sequence(http, "sq4-inner", ["sq4-a"])
    put_sequence(http, "sq4-outer", ["sq4-inner", "sq4-a"])
    assert_error(put_sequence(http, "sq4-inner", ["sq4-outer"]), 400, "may not refer to itself")
    record = invoke(http, "sq4-outer", {"n": 0}).json()
    assert record["response"]["result"] == {"n": 2}
    inner = wait_ended(http, record["logs"][0])
    assert ann(inner)["kind"] == "sequence" and ann(inner)["topmost"] is False and ann(inner)["causedBy"] == "sequence"
    assert inner["cause"] == record["activationId"] and len(inner["logs"]) == 1


def test_deleting_a_component_leaves_the_sequence_which_then_fails_clearly(http: httpx.Client) -> None:
    put_action(http, "sq5-a", ADD, overwrite=True)
    put_action(http, "sq5-b", DOUBLE, overwrite=True)
    put_sequence(http, "sq5-seq", ["sq5-a", "sq5-b"])
    assert http.delete(f"{NS}/actions/sq5-b").status_code == 200
    assert http.get(f"{NS}/actions/sq5-seq").status_code == 200
    r = invoke(http, "sq5-seq", {"n": 1})
    assert r.status_code == 502
    record = r.json()
    assert record["response"]["statusCode"] == 1
    assert record["response"]["result"] == {"error": "Sequence component does not exist."}
    assert len(record["logs"]) == 1


def test_sequence_as_rule_target(http: httpx.Client) -> None:
    put_action(http, "sq6-a", ADD, overwrite=True)
    put_sequence(http, "sq6-seq", ["sq6-a", "sq6-a"])
    http.put(f"{NS}/triggers/sq6-t", json={})
    http.put(f"{NS}/rules/sq6-r", json={"trigger": "/_/sq6-t", "action": "/_/sq6-seq"})
    fired = http.post(f"{NS}/triggers/sq6-t", json={"n": 5})
    assert fired.status_code == 202
    record = wait_ended(http, fired.json()["activationIds"][0])
    assert record["name"] == "sq6-seq" and record["response"]["result"] == {"n": 7}


def test_sequence_kept_across_restart(tmp_path: Any) -> None:
    with server_thread(tmp_path) as first, client(first.handle) as http:
        put_action(http, "zz-a", ADD)
        put_action(http, "zz-b", ADD)
        assert put_sequence(http, "mm-seq", ["zz-a", "zz-a"]).status_code == 200
        assert put_sequence(http, "aa-outer", ["mm-seq", "/whisk.system/utils/echo"]).status_code == 200
        assert put_sequence(http, "bb-broken", ["zz-b"]).status_code == 200
        assert http.delete(f"{NS}/actions/zz-b").status_code == 200
    with server_thread(tmp_path) as second, client(second.handle) as http:
        # saved in any order, naming sequences and the catalog, or a component deleted since: all come back
        assert invoke(http, "aa-outer", {"n": 0}, result="true").json() == {"n": 2}
        assert invoke(http, "bb-broken", result="true").json() == {"error": "Sequence component does not exist."}


def cli_env(server: SimpleNamespace) -> dict[str, str]:
    return {
        **os.environ,
        "MINIFAAS_APIHOST": server.handle.url,
        "MINIFAAS_AUTH": server.handle.auth,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }


def test_cli_creates_a_sequence(server: SimpleNamespace, http: httpx.Client, tmp_path: Path) -> None:
    put_action(http, "sq7-a", ADD, overwrite=True)
    put_action(http, "sq7-b", DOUBLE, overwrite=True)
    env = cli_env(server)
    out = ok(run("action", "create", "sq7-seq", "--sequence", "sq7-a,/_/sq7-b", "-p", "step", "3", env=env))
    assert "sq7-seq" in out and "0.0.1" in out
    got = http.get(f"{NS}/actions/sq7-seq").json()
    assert got["exec"]["components"] == ["/guest/sq7-a", "/guest/sq7-b"]
    assert json.loads(ok(run("invoke", "sq7-seq", "-p", "n", "1", "--result", env=env))) == {"n": 8}
    code = tmp_path / "a.py"
    code.write_text(ADD)
    bad = run("action", "create", "sq7-x", str(code), "--sequence", "sq7-a", env=env)
    assert bad.returncode != 0 and "not both" in bad.stderr + bad.stdout


# -- packages ------------------------------------------------------------------------------------------------
def kv(**d: Any) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in d.items()]


def put_package(http: httpx.Client, name: str, overwrite: bool = False, **body: Any) -> httpx.Response:
    return http.put(f"{NS}/packages/{name}", params={"overwrite": str(overwrite).lower()}, json=body)


def test_package_crud_actions_inside_and_parameters(http: httpx.Client) -> None:
    r = put_package(http, "pk1", parameters=kv(a="pkg", b="pkg"))
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["name"] == "pk1" and made["namespace"] == "guest" and made["version"] == "0.0.1"
    assert made["publish"] is False and made["binding"] == {}
    assert_error(put_package(http, "pk1"), 409, "already exists")
    assert put_package(http, "pk1", overwrite=True, publish=True).json()["version"] == "0.0.2"
    assert http.get(f"{NS}/packages/pk1").json()["parameters"] == kv(a="pkg", b="pkg")  # kept by the update

    assert_error(put_action(http, "pk-missing/x", ECHO_ARGS), 404, "does not exist")
    assert_error(put_action(http, "pk1", ECHO_ARGS), 409, "is a package")  # one name space for both
    r = put_action(http, "pk1/echo", ECHO_ARGS, parameters=kv(b="action", c="action"))
    assert r.status_code == 200, r.text
    assert r.json()["namespace"] == "guest/pk1" and r.json()["name"] == "echo"
    got = http.get(f"{NS}/actions/pk1/echo").json()
    assert got["namespace"] == "guest/pk1" and got["exec"]["code"] == ECHO_ARGS
    record = invoke(http, "pk1/echo", {"c": "invoke"}).json()
    assert record["response"]["result"] == {"a": "pkg", "b": "action", "c": "invoke"}
    assert record["name"] == "echo" and ann(record)["path"] == "guest/pk1/echo"
    listed = {(a["namespace"], a["name"]) for a in http.get(f"{NS}/actions").json()}
    assert ("guest/pk1", "echo") in listed
    pkg = http.get(f"{NS}/packages/pk1").json()
    assert [a["name"] for a in pkg["actions"]] == ["echo"] and pkg["feeds"] == []
    assert "pk1" in [p["name"] for p in http.get(f"{NS}/packages").json()]
    assert http.get(f"{NS}/packages", params={"count": "true"}).json()["packages"] >= 1

    # package parameters reach rules and sequences too: the engine resolves every name the same way
    put_sequence(http, "pk-seq", ["/guest/pk1/echo"])
    assert invoke(http, "pk-seq", {"c": 1}, result="true").json() == {"a": "pkg", "b": "action", "c": 1}
    http.put(f"{NS}/triggers/pk-t", json={})
    rule = http.put(f"{NS}/rules/pk-r", json={"trigger": "/_/pk-t", "action": "/_/pk1/echo"}).json()
    assert rule["action"] == {"name": "echo", "path": "guest/pk1"}
    fired = http.post(f"{NS}/triggers/pk-t", json={"c": "fire"}).json()
    assert wait_ended(http, fired["activationIds"][0])["response"]["result"]["a"] == "pkg"

    assert_error(http.delete(f"{NS}/packages/pk1"), 409, "not empty")
    assert http.delete(f"{NS}/actions/pk1/echo").status_code == 200
    assert http.delete(f"{NS}/packages/pk1").status_code == 200
    assert_error(http.get(f"{NS}/packages/pk1"), 404)


def test_package_bindings(http: httpx.Client) -> None:
    put_package(http, "pk2", overwrite=True, parameters=kv(a="pkg", b="pkg", c="pkg"))
    put_action(http, "pk2/echo", ECHO_ARGS, overwrite=True, parameters=kv(c="action"))
    r = put_package(http, "pk2-bound", binding={"namespace": "_", "name": "pk2"}, parameters=kv(b="binding"))
    assert r.status_code == 200, r.text
    assert r.json()["binding"] == {"namespace": "guest", "name": "pk2"}
    # package < binding < action < invocation
    got = invoke(http, "pk2-bound/echo", {"d": "invoke"}, result="true").json()
    assert got == {"a": "pkg", "b": "binding", "c": "action", "d": "invoke"}
    assert invoke(http, "pk2/echo", result="true").json() == {"a": "pkg", "b": "pkg", "c": "action"}
    assert http.get(f"{NS}/actions/pk2-bound/echo").json()["name"] == "echo"
    assert [a["name"] for a in http.get(f"{NS}/packages/pk2-bound").json()["actions"]] == ["echo"]
    put_sequence(http, "pk2-seq", ["/_/pk2-bound/echo"])
    assert invoke(http, "pk2-seq", result="true").json()["b"] == "binding"

    assert_error(put_package(http, "pk2-bb", binding={"name": "pk2-bound"}), 400, "another package binding")
    assert_error(put_package(http, "pk2-nb", binding={"name": "pk2-nothing"}), 400, "does not exist")
    assert_error(put_action(http, "pk2-bound/x", ECHO_ARGS), 400, "binding")
    assert_error(put_package(http, "pk2", overwrite=True, binding={"name": "pk2-bound"}), 400, "cannot be converted")
    # a binding holds no actions of its own: deleting it is allowed while its package still has actions
    assert http.delete(f"{NS}/packages/pk2-bound").status_code == 200
    assert_error(http.delete(f"{NS}/packages/pk2"), 409, "not empty")


def test_packages_kept_across_restart(tmp_path: Path) -> None:
    with server_thread(tmp_path) as first, client(first.handle) as http:
        put_package(http, "kp", parameters=kv(a=1))
        put_package(http, "kp-b", binding={"name": "kp"}, parameters=kv(b=2))
        assert put_action(http, "kp/echo", ECHO_ARGS).status_code == 200
    with server_thread(tmp_path) as second, client(second.handle) as http:
        assert invoke(http, "kp-b/echo", result="true").json() == {"a": 1, "b": 2}
        assert http.get(f"{NS}/actions/kp/echo").json()["namespace"] == "guest/kp"


def test_cli_packages_bindings_and_package_actions(server: SimpleNamespace, http: httpx.Client, tmp_path: Path) -> None:
    env = cli_env(server)
    ok(run("package", "create", "cp", "-p", "a", "1", "--shared", "yes", env=env))
    assert http.get(f"{NS}/packages/cp").json()["publish"] is True
    code = tmp_path / "echo.py"
    code.write_text(ECHO_ARGS)
    ok(run("action", "create", "cp/echo", str(code), "-p", "b", "2", env=env))
    ok(run("package", "bind", "cp", "cp-b", "-p", "a", "9", env=env))
    assert json.loads(ok(run("invoke", "/_/cp-b/echo", "--result", env=env))) == {"a": 9, "b": 2}
    assert "cp/echo" in ok(run("action", "list", "--limit", "200", env=env))
    listed = json.loads(ok(run("package", "list", "--json", env=env)))
    assert {"cp", "cp-b"} <= {p["name"] for p in listed}
    bad = run("package", "delete", "cp", env=env)
    assert bad.returncode != 0 and "not empty" in bad.stderr + bad.stdout


# -- exact semantics -----------------------------------------------------------------------------------------
def test_versions_are_semver_bumped_on_every_update(http: httpx.Client) -> None:
    assert put_action(http, "ver-a", ADD, overwrite=True).json()["version"] == "0.0.1"
    assert put_action(http, "ver-a", ADD, overwrite=True).json()["version"] == "0.0.2"
    assert http.get(f"{NS}/actions/ver-a").json()["version"] == "0.0.2"
    assert put_package(http, "ver-p").json()["version"] == "0.0.1"
    assert put_package(http, "ver-p", overwrite=True).json()["version"] == "0.0.2"
    t = http.put(f"{NS}/triggers/ver-t", json={}).json()
    assert t["version"] == "0.0.1" and t["limits"] == {}
    t = http.put(f"{NS}/triggers/ver-t", params={"overwrite": "true"}, json={"parameters": kv(x=1)}).json()
    assert t["version"] == "0.0.2" and http.get(f"{NS}/triggers/ver-t").json()["version"] == "0.0.2"
    r = http.put(f"{NS}/rules/ver-r", json={"trigger": "/_/ver-t", "action": "/_/ver-a"}).json()
    assert r["version"] == "0.0.1"
    r = http.put(f"{NS}/rules/ver-r", params={"overwrite": "true"}, json={"trigger": "ver-t", "action": "ver-a"})
    assert r.json()["version"] == "0.0.2"
    # a delete and a create start again at 0.0.1
    http.delete(f"{NS}/rules/ver-r")
    http.delete(f"{NS}/actions/ver-a")
    assert put_action(http, "ver-a", ADD).json()["version"] == "0.0.1"
    r = http.put(f"{NS}/rules/ver-r", json={"trigger": "ver-t", "action": "ver-a"})
    assert r.json()["version"] == "0.0.1"


def test_deleting_a_trigger_or_action_leaves_its_rules(http: httpx.Client) -> None:
    put_action(http, "dl-a", ADD, overwrite=True)
    http.put(f"{NS}/triggers/dl-t", json={})
    http.put(f"{NS}/rules/dl-r", json={"trigger": "dl-t", "action": "dl-a"})
    assert http.delete(f"{NS}/triggers/dl-t").status_code == 200
    rule = http.get(f"{NS}/rules/dl-r")
    assert rule.status_code == 200 and rule.json()["trigger"]["name"] == "dl-t"
    assert "dl-r" in [r["name"] for r in http.get(f"{NS}/rules").json()]
    # the trigger made again: the rule that named it fires again
    http.put(f"{NS}/triggers/dl-t", json={})
    fired = http.post(f"{NS}/triggers/dl-t", json={"n": 1})
    assert fired.status_code == 202
    assert wait_ended(http, fired.json()["activationIds"][0])["response"]["result"] == {"n": 2}
    assert http.delete(f"{NS}/actions/dl-a").status_code == 200
    assert http.get(f"{NS}/rules/dl-r").json()["action"]["name"] == "dl-a"


def test_empty_code_is_taken_and_fails_at_init(http: httpx.Client) -> None:
    r = http.put(f"{NS}/actions/empty-code", json={"exec": {"kind": "python:3", "code": ""}})
    assert r.status_code == 200, r.text
    assert http.get(f"{NS}/actions/empty-code").json()["exec"]["code"] == ""
    r = invoke(http, "empty-code")
    assert r.status_code == 502
    response = r.json()["response"]
    assert response["status"] == "developer_error" and response["statusCode"] == 2
    assert "Missing main/no code to execute." in response["result"]["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", f"{API}/namespaces/_/limits", id="limits"),
        pytest.param("GET", f"{API}/namespaces/_/apis", id="apis"),
        pytest.param("POST", f"{NS}/packages/x", id="post-package"),
        pytest.param("PATCH", f"{NS}/actions/x", id="patch-action"),
        pytest.param("GET", f"{API}/something/else", id="unknown"),
    ],
)
def test_unimplemented_endpoints_answer_501_with_their_name(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path, json={} if method != "GET" else None)
    assert_error(r, 501, f"does not implement {method} {path}")


# -- the system catalog --------------------------------------------------------------------------------------
SYS = f"{API}/namespaces/whisk.system"


@pytest.mark.parametrize(
    ("action", "args", "expected"),
    [
        pytest.param("echo", {"payload": "Five fuzzy felines"}, {"payload": "Five fuzzy felines"}, id="echo"),
        pytest.param("cat", {"lines": [4, 2, 3]}, {"lines": [4, 2, 3], "payload": "4\n2\n3"}, id="cat"),
        pytest.param("sort", {"lines": [4, 2, 3]}, {"lines": [2, 3, 4], "length": 3}, id="sort"),
        pytest.param("sort", {"lines": [10, 9, 1]}, {"lines": [1, 10, 9], "length": 3}, id="sort-as-javascript"),
        pytest.param("head", {"lines": [4, 2, 3], "num": 2}, {"lines": [4, 2], "num": 2}, id="head"),
        pytest.param("head", {"lines": [4, 2, 3]}, {"lines": [4], "num": 1}, id="head-default"),
        pytest.param(
            "split",
            {"payload": "one,two,three", "separator": ","},
            {"lines": ["one", "two", "three"], "payload": "one,two,three"},
            id="split",
        ),
        pytest.param("split", {"payload": "a\r\nb\nc"}, {"lines": ["a", "b", "c"], "payload": "a\r\nb\nc"}, id="lines"),
        pytest.param("namespace", {}, {"namespace": "guest"}, id="namespace"),
    ],
)
def test_utils_catalog_actions(http: httpx.Client, action: str, args: dict[str, Any], expected: Any) -> None:
    r = http.post(f"{SYS}/actions/utils/{action}", params={"blocking": "true"}, json=args)
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["response"]["result"] == expected
    assert record["namespace"] == "guest" and ann(record)["path"] == f"whisk.system/utils/{action}"


def test_utils_date_is_now(http: httpx.Client) -> None:
    r = http.post(f"{SYS}/actions/utils/date", params={"blocking": "true", "result": "true"}, json={})
    stamp = r.json()["date"]
    assert (
        stamp.endswith("Z") and abs(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - time.time()) < 60
    )


def test_system_namespace_is_read_only_and_publish_is_honoured(http: httpx.Client) -> None:
    names = [p["name"] for p in http.get(f"{SYS}/packages").json()]
    assert names == ["alarms", "utils"]  # alarmsWeb is not published
    assert_error(http.get(f"{SYS}/packages/alarmsWeb"), 403, "not authorized")
    assert_error(http.post(f"{SYS}/actions/alarmsWeb/alarmWebAction", json={}), 403, "not authorized")
    assert_error(http.get(f"{SYS}/actions/alarmsWeb/alarmWebAction"), 403, "not authorized")
    utils = http.get(f"{SYS}/packages/utils").json()
    assert utils["publish"] is True and {a["name"] for a in utils["actions"]} >= {"echo", "cat", "split"}
    alarms = http.get(f"{SYS}/packages/alarms").json()
    assert {f["name"] for f in alarms["feeds"]} == {"alarm", "interval", "once"}
    listed = {a["name"] for a in http.get(f"{SYS}/actions").json()}
    assert "echo" in listed and "alarmWebAction" not in listed
    assert not [a for a in http.get(f"{NS}/actions").json() if a["namespace"].startswith("whisk.system")]
    # writes are refused
    assert_error(http.put(f"{SYS}/actions/utils/echo", params={"overwrite": "true"}, json={}), 403, "read-only")
    assert_error(http.delete(f"{SYS}/actions/utils/echo"), 403, "read-only")
    assert_error(http.put(f"{SYS}/packages/mine", json={}), 403, "read-only")
    assert_error(http.delete(f"{SYS}/packages/utils"), 403, "read-only")
    # bindings: to a published package of another namespace, not to an unpublished one
    r = put_package(http, "my-utils", overwrite=True, binding={"namespace": "whisk.system", "name": "utils"})
    assert r.status_code == 200, r.text
    put_package(http, "my-utils", overwrite=True, parameters=kv(payload="bound"))
    assert invoke(http, "my-utils/echo", result="true").json() == {"payload": "bound"}
    assert invoke(http, "my-utils/echo", {"payload": "mine"}, result="true").json() == {"payload": "mine"}
    bad = put_package(http, "my-web", binding={"namespace": "whisk.system", "name": "alarmsWeb"})
    assert_error(bad, 403, "not authorized")
    # nor through the server's own namespace, nor as a sequence's component or a rule's action
    assert_error(http.delete(f"{NS}/actions/whisk.system/utils/echo"), 404)
    assert_error(http.post(f"{NS}/actions/whisk.system/alarmsWeb/alarmWebAction", json={}), 404)
    assert_error(put_sequence(http, "web-seq", ["/whisk.system/alarmsWeb/alarmWebAction"]), 403, "not authorized")
    http.put(f"{NS}/triggers/web-t", json={})
    r = http.put(f"{NS}/rules/web-r", json={"trigger": "web-t", "action": "/whisk.system/alarmsWeb/alarmWebAction"})
    assert_error(r, 403, "not authorized")
    assert http.post(f"{SYS}/actions/utils/echo", params={"blocking": "true"}, json={}).status_code == 200
    # fully qualified names of the catalog in sequences
    put_sequence(http, "cat-seq", ["/whisk.system/utils/split", "/whisk.system/utils/sort", "/_/my-utils/echo"])
    out = invoke(http, "cat-seq", {"payload": "c b a", "separator": " "}, result="true").json()
    assert out == {"lines": ["a", "b", "c"], "length": 3, "payload": "bound"}


@contextlib.asynccontextmanager
async def fake_clock_serving(
    clock: FakeClock, state_dir: Path | None = None
) -> AsyncIterator[tuple[minifaas.Engine, ServerHandle]]:
    async with minifaas.Engine(clock=clock, state_dir=state_dir) as engine, anyio.create_task_group() as tg:
        handle: ServerHandle = await tg.start(functools.partial(serve, engine, "127.0.0.1", 0))
        try:
            yield engine, handle
        finally:
            handle.stop()


@contextlib.contextmanager
def clocked_server(clock: FakeClock, state_dir: Path | None = None) -> Iterator[SimpleNamespace]:
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(fake_clock_serving(clock, state_dir)) as (engine, handle),
        client(handle) as http,
    ):
        yield SimpleNamespace(portal=portal, engine=engine, handle=handle, clock=clock, http=http)


@pytest.fixture(scope="module")
def clocked() -> Iterator[SimpleNamespace]:
    with clocked_server(FakeClock()) as s:
        yield s


def feed(s: SimpleNamespace, kind: str, event: str, trigger: str, **params: Any) -> httpx.Response:
    body = {"lifecycleEvent": event, "triggerName": f"/_/{trigger}", "authKey": s.handle.auth, **params}
    return s.http.post(f"{SYS}/actions/alarms/{kind}", params={"blocking": "true"}, json=body)


def fired(s: SimpleNamespace, action: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = s.http.get(f"{NS}/activations", params={"name": action, "docs": "true"}).json()
    return got


def advance_until(s: SimpleNamespace, action: str, n: int, seconds: float) -> list[dict[str, Any]]:
    """Move the fake clock ``seconds`` forward, then wait (real time) for ``n`` activations of ``action``."""
    s.portal.call(s.clock.advance, seconds)
    deadline = time.monotonic() + 30
    while len(got := fired(s, action)) < n:
        assert time.monotonic() < deadline, f"{action}: {len(got)} activations, expected {n}"
        time.sleep(0.05)
    return got


def settle_and_count(s: SimpleNamespace, action: str, seconds: float) -> int:
    s.portal.call(s.clock.advance, seconds)
    time.sleep(0.5)  # a wrong fire would be submitted within this (the fake clock woke the feed at once)
    return len(fired(s, action))


def setup_trigger(s: SimpleNamespace, name: str, kind: str) -> None:
    put_action(s.http, f"{name}-a", ECHO_ARGS, overwrite=True)
    annotations = kv(feed=f"/whisk.system/alarms/{kind}")
    over = {"overwrite": "true"}
    assert s.http.put(f"{NS}/triggers/{name}", params=over, json={"annotations": annotations}).status_code == 200
    rule = {"trigger": name, "action": f"{name}-a"}
    assert s.http.put(f"{NS}/rules/{name}-r", params=over, json=rule).status_code == 200


def test_interval_feed_lifecycle(clocked: SimpleNamespace) -> None:
    s = clocked
    setup_trigger(s, "fi", "interval")
    r = feed(s, "interval", "CREATE", "fi", minutes=1, trigger_payload={"x": 1})
    assert r.status_code == 200, r.text
    got = advance_until(s, "fi-a", 1, 60)
    assert got[0]["response"]["result"]["x"] == 1 and "scheduled" in got[0]["response"]["result"]
    read = feed(s, "interval", "READ", "fi").json()["response"]["result"]
    assert read["config"]["minutes"] == 1 and read["config"]["payload"] == {"x": 1}
    assert read["status"]["active"] is True
    assert feed(s, "interval", "PAUSE", "fi").status_code == 200
    assert feed(s, "interval", "READ", "fi").json()["response"]["result"]["status"]["active"] is False
    assert settle_and_count(s, "fi-a", 60) == 1
    assert feed(s, "interval", "UNPAUSE", "fi").status_code == 200
    advance_until(s, "fi-a", 2, 60)
    assert feed(s, "interval", "UPDATE", "fi", minutes=2).status_code == 200
    assert feed(s, "interval", "READ", "fi").json()["response"]["result"]["config"]["minutes"] == 2
    assert settle_and_count(s, "fi-a", 60) == 2
    advance_until(s, "fi-a", 3, 60)
    assert feed(s, "interval", "DELETE", "fi").status_code == 200
    assert settle_and_count(s, "fi-a", 120) == 3
    r = feed(s, "interval", "READ", "fi")
    assert r.status_code == 502 and "no alarm feed" in r.json()["response"]["result"]["error"]


def test_deleting_the_trigger_stops_its_feed(clocked: SimpleNamespace) -> None:
    s = clocked
    setup_trigger(s, "fd", "alarm")
    assert feed(s, "alarm", "CREATE", "fd", cron="* * * * *").status_code == 200
    advance_until(s, "fd-a", 1, 60)
    assert s.http.delete(f"{NS}/triggers/fd").status_code == 200
    assert settle_and_count(s, "fd-a", 120) == 1


def test_once_feed_fires_once(clocked: SimpleNamespace) -> None:
    s = clocked
    setup_trigger(s, "fo", "once")
    at = datetime.fromtimestamp(s.clock.now() + 30, UTC).isoformat()
    assert feed(s, "once", "CREATE", "fo", date=at, trigger_payload='{"y": 2}').status_code == 200
    got = advance_until(s, "fo-a", 1, 30)
    assert got[0]["response"]["result"]["y"] == 2
    assert settle_and_count(s, "fo-a", 600) == 1


@pytest.mark.parametrize(
    ("kind", "params", "fragment"),
    [
        pytest.param("interval", {"minutes": 0}, "minutes", id="minutes"),
        pytest.param("alarm", {"cron": "* * *"}, "cron", id="cron"),
        pytest.param("once", {"date": "someday"}, "date", id="date"),
        pytest.param("interval", {"minutes": 1, "stopDate": "2030-01-01"}, "not supported", id="stopDate"),
        pytest.param("interval", {"minutes": 1, "authKey": "x:y"}, "authKey", id="authKey"),
        pytest.param("interval", {"minutes": 1, "triggerName": "/bob/t"}, "not a trigger", id="foreign"),
        pytest.param("interval", {"minutes": 1, "triggerName": "/_/fx-missing"}, "does not exist", id="missing"),
        pytest.param("interval", {"lifecycleEvent": "EXPLODE"}, "lifecycleEvent", id="event"),
    ],
)
def test_feed_rejects(clocked: SimpleNamespace, kind: str, params: dict[str, Any], fragment: str) -> None:
    setup_trigger(clocked, "fx", kind)
    r = feed(clocked, kind, "CREATE", "fx", **params)
    assert r.status_code == 502, r.text
    assert fragment in r.json()["response"]["result"]["error"]
    assert clocked.portal.call(lambda: clocked.engine.triggers.list_feeds("fx")) == []


def test_user_actions_cannot_call_the_feed_service(http: httpx.Client) -> None:
    code = (
        "import minifaas_sandbox\n"
        "def main(args):\n"
        "    return minifaas_sandbox.host_call('whisk.alarms', {'lifecycleEvent': 'DELETE', 'feedKind': 'interval',"
        " 'triggerName': '/_/t'})\n"
    )
    put_action(http, "sneaky", code, overwrite=True)
    r = invoke(http, "sneaky")
    assert r.status_code == 502 and "not available to this function" in json.dumps(r.json()["response"]["result"])


def test_cli_trigger_with_a_feed(server: SimpleNamespace, http: httpx.Client) -> None:
    env = cli_env(server)
    feeds = server.engine.triggers.list_feeds

    def feed_calls() -> int:
        r = http.get(f"{NS}/activations", params={"name": "whisk.system/alarms/interval", "count": "true"})
        return int(r.json()["activations"])

    ok(run("trigger", "create", "ct", "--feed", "/whisk.system/alarms/interval", "-p", "minutes", "5", env=env))
    made = server.portal.call(lambda: feeds("ct"))
    assert len(made) == 1 and made[0].options["interval_s"] == 300.0
    got = http.get(f"{NS}/triggers/ct").json()
    assert {"key": "feed", "value": "/whisk.system/alarms/interval"} in got["annotations"] and got["parameters"] == []
    before = feed_calls()
    assert "warning" not in ok(run("trigger", "delete", "ct", env=env))
    assert feed_calls() == before + 1  # the feed was told DELETE, then the trigger deleted
    assert server.portal.call(lambda: feeds("ct")) == [] and http.get(f"{NS}/triggers/ct").status_code == 404
    # its feed gone already (told DELETE by another client): the trigger is still deleted, with a warning
    ok(run("trigger", "create", "ct3", "--feed", "/whisk.system/alarms/interval", "-p", "minutes", "5", env=env))
    body = {"lifecycleEvent": "DELETE", "triggerName": "/_/ct3", "authKey": server.handle.auth}
    assert http.post(f"{SYS}/actions/alarms/interval", params={"blocking": "true"}, json=body).status_code == 200
    assert "warning" in ok(run("trigger", "delete", "ct3", env=env))
    assert http.get(f"{NS}/triggers/ct3").status_code == 404
    # a feed that refuses its parameters leaves no trigger behind
    bad = run("trigger", "create", "ct2", "--feed", "/whisk.system/alarms/interval", "-p", "minutes", "0", env=env)
    assert bad.returncode != 0 and "minutes" in bad.stderr + bad.stdout
    assert http.get(f"{NS}/triggers/ct2").status_code == 404


def test_paused_feed_survives_a_restart_and_goes_with_its_trigger(tmp_path: Path) -> None:
    clock = FakeClock()
    with clocked_server(clock, tmp_path) as s:
        setup_trigger(s, "fp", "interval")
        assert feed(s, "interval", "CREATE", "fp", minutes=1).status_code == 200
        assert feed(s, "interval", "PAUSE", "fp").status_code == 200
    with clocked_server(clock, tmp_path) as s:
        read = feed(s, "interval", "READ", "fp").json()["response"]["result"]
        assert read["status"]["active"] is False and read["config"]["minutes"] == 1
        assert feed(s, "interval", "UNPAUSE", "fp").status_code == 200
        advance_until(s, "fp-a", 1, 60)
        assert feed(s, "interval", "PAUSE", "fp").status_code == 200
        assert s.http.delete(f"{NS}/triggers/fp").status_code == 200
        setup_trigger(s, "fp", "interval")  # a new trigger of that name: no paused feed of the old one
        assert feed(s, "interval", "READ", "fp").status_code == 502
        assert feed(s, "interval", "CREATE", "fp", minutes=2).status_code == 200
