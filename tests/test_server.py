"""The dev server: every REST route and status code over real HTTP, against a real engine in a server thread.

The server runs uvicorn on a free port of 127.0.0.1 in a background event loop (an anyio blocking portal), so
these tests are plain sync functions using httpx, and the JS client test can run ``node`` against the same
server. The OpenWhisk JS client test needs ``node`` and ``tests/js/node_modules`` (``cd tests/js && npm ci``).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

import minifaas
from minifaas._events.triggers import TriggerManager
from minifaas._server.app import ServerHandle, create_app, new_auth, serve

API = "/api/v1"
NS = f"{API}/namespaces/_"
JS_DIR = Path(__file__).parent / "js"
HELLO = "def main(args):\n    print('hello', args.get('name'))\n    return {'hi': args.get('name')}\n"
SLEEP = "import time\ndef main(args):\n    time.sleep(args.get('s', 0))\n    return {'slept': args.get('s', 0)}\n"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@contextlib.asynccontextmanager
async def serving(
    state_dir: Path | None = None, namespace: str = "guest"
) -> AsyncIterator[tuple[minifaas.Engine, ServerHandle]]:
    """An engine and its server on a free port; a trigger manager is attached if the engine has none."""
    async with minifaas.Engine(state_dir=state_dir, namespace=namespace) as engine, anyio.create_task_group() as tg:
        own: TriggerManager | None = None
        if getattr(engine, "triggers", None) is None:
            own = TriggerManager(engine.submit, state_dir=None, task_group=tg)
            engine.triggers = own  # type: ignore[attr-defined]
        handle: ServerHandle = await tg.start(functools.partial(serve, engine, "127.0.0.1", 0))
        try:
            yield engine, handle
        finally:
            handle.stop()
            if own is not None:
                await own.aclose()


@contextlib.contextmanager
def server_thread(state_dir: Path | None = None, namespace: str = "guest") -> Iterator[SimpleNamespace]:
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(serving(state_dir, namespace)) as (
            engine,
            handle,
        ),
    ):
        yield SimpleNamespace(portal=portal, engine=engine, handle=handle)


def client(handle: ServerHandle, **kwargs: Any) -> httpx.Client:
    user, _, key = handle.auth.partition(":")
    return httpx.Client(base_url=handle.url, auth=(user, key), timeout=30, **kwargs)


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    with server_thread() as s:
        yield s


@pytest.fixture(scope="module")
def http(server: SimpleNamespace) -> Iterator[httpx.Client]:
    with client(server.handle) as c:
        yield c


def put_action(http: httpx.Client, name: str, code: str, *, overwrite: bool = False, **body: Any) -> httpx.Response:
    params = {"overwrite": "true"} if overwrite else {}
    return http.put(f"{NS}/actions/{name}", params=params, json={"exec": {"kind": "python:3", "code": code}, **body})


def wait_ended(http: httpx.Client, act_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = http.get(f"{NS}/activations/{act_id}")
        if r.status_code == 200:
            record: dict[str, Any] = r.json()
            return record
        assert r.status_code == 404, r.text
        assert time.monotonic() < deadline, f"activation {act_id} did not end"
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, fragment: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "code"}, body
    assert isinstance(body["code"], str) and body["code"]
    assert fragment.lower() in body["error"].lower(), body["error"]


# -- auth and namespaces -------------------------------------------------------------------------------------
def test_new_auth_has_openwhisk_format() -> None:
    user, key = new_auth().split(":")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", user)
    assert re.fullmatch(r"[A-Za-z0-9]{64}", key)
    assert new_auth() != new_auth()
    with pytest.raises(ValueError, match="uuid:key"):
        create_app(object(), auth="no-colon")  # type: ignore[arg-type]


def test_auth_is_required(server: SimpleNamespace) -> None:
    url = server.handle.url
    with httpx.Client(base_url=url, timeout=10) as anon:
        r = anon.get(f"{API}/namespaces")
        assert_error(r, 401, "authentication")
        assert r.headers["www-authenticate"].startswith("Basic")
        assert_error(anon.get(f"{NS}/actions", auth=("someone", "wrong")), 401)
        assert_error(anon.get(f"{NS}/actions", headers={"Authorization": "Bearer x"}), 401)
        assert_error(anon.get(f"{NS}/actions", headers={"Authorization": "Basic !!!"}), 401)
        assert_error(anon.get("/metrics"), 401)
        assert anon.get("/ping").json() == "pong"
    user, key = server.handle.auth.split(":")
    # the key's last character changed (replacing it by a fixed one left the key as it was one run in 62)
    wrong = key[:-1] + ("y" if key.endswith("x") else "x")
    with httpx.Client(base_url=url, auth=(user, wrong), timeout=10) as wrong_key:
        assert_error(wrong_key.get(f"{API}/namespaces"), 401)


def test_namespaces_and_isolation(http: httpx.Client) -> None:
    assert http.get(f"{API}/namespaces").json() == ["guest"]
    assert http.get(f"{API}/namespaces/guest/actions").status_code == 200
    assert http.get(f"{NS}/packages").json() == []
    for path in ("activations", "actions", "actions/x", "triggers", "rules", "activations/0123/logs"):
        assert_error(http.get(f"{API}/namespaces/alice/{path}"), 403, "not authorized to access 'alice'")
    assert_error(http.post(f"{API}/namespaces/alice/actions/x", json={}), 403)
    assert_error(http.get("/no/such/route"), 404, "does not exist")
    assert_error(http.patch(f"{NS}/actions/x"), 501, "does not implement PATCH")


def test_keep_alive_requests_do_not_wait_for_delayed_acks(http: httpx.Client) -> None:
    # without TCP_NODELAY on accepted sockets every keep-alive request took 40+ ms (Nagle vs delayed ACK)
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        assert http.get("/ping").status_code == 200
        times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.035, times


def test_index_page(http: httpx.Client) -> None:
    r = http.get("/", follow_redirects=True)  # the web UI's home, or the plain index without it
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


# -- actions -------------------------------------------------------------------------------------------------
def test_action_create_get_update_list_delete(http: httpx.Client) -> None:
    r = put_action(
        http,
        "srv-hello",
        HELLO,
        parameters=[{"key": "name", "value": "default"}],
        limits={"timeout": 5000, "memory": 128, "concurrency": 2},
        annotations=[{"key": "a", "value": 1}],
    )
    assert r.status_code == 200, r.text
    action = r.json()
    assert action["name"] == "srv-hello" and action["namespace"] == "guest" and action["version"] == "0.0.1"
    assert action["exec"] == {"kind": "python:3", "binary": False, "main": "main", "code": HELLO}
    assert action["limits"]["timeout"] == 5000 and action["limits"]["memory"] == 128
    assert action["limits"]["concurrency"] == 2
    assert {"key": "name", "value": "default"} in action["parameters"]
    assert {"key": "a", "value": 1} in action["annotations"]
    assert {"key": "exec", "value": "python:3"} in action["annotations"]

    assert_error(put_action(http, "srv-hello", HELLO), 409, "already exists")
    # an update keeps what it does not give (here: the code and the limits)
    r = http.put(
        f"{NS}/actions/srv-hello",
        params={"overwrite": "true"},
        json={"parameters": [{"key": "name", "value": "updated"}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "0.0.2" and r.json()["limits"]["timeout"] == 5000
    assert http.post(f"{NS}/actions/srv-hello", params={"blocking": "true", "result": "true"}).json() == {
        "hi": "updated"
    }

    got = http.get(f"{NS}/actions/srv-hello").json()
    assert got["exec"]["code"] == HELLO and got["version"] == "0.0.2"
    assert "code" not in http.get(f"{NS}/actions/srv-hello", params={"code": "false"}).json()["exec"]

    put_action(http, "srv-other", HELLO)
    names = [a["name"] for a in http.get(f"{NS}/actions").json()]
    assert {"srv-hello", "srv-other"} <= set(names) and names == sorted(names)
    assert all("code" not in a["exec"] for a in http.get(f"{NS}/actions").json())
    assert len(http.get(f"{NS}/actions", params={"limit": 1}).json()) == 1
    assert http.get(f"{NS}/actions", params={"limit": 1, "skip": 1}).json()[0]["name"] == names[1]
    assert http.get(f"{NS}/actions", params={"count": "true"}).json() == {"actions": len(names)}
    assert_error(http.get(f"{NS}/actions", params={"limit": "x"}), 400, "integer")
    assert_error(http.get(f"{NS}/actions", params={"limit": 500}), 400, "between")

    deleted = http.delete(f"{NS}/actions/srv-other")
    assert deleted.status_code == 200 and deleted.json()["name"] == "srv-other"
    assert_error(http.get(f"{NS}/actions/srv-other"), 404, "srv-other")
    assert_error(http.delete(f"{NS}/actions/srv-other"), 404)
    assert_error(http.post(f"{NS}/actions/srv-other", params={"blocking": "true"}), 404)
    assert "srv-other" not in [a["name"] for a in http.get(f"{NS}/actions").json()]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"exec": {"kind": "nodejs:default", "code": "function main() {}"}}, "nodejs:default"),
        ({"exec": {"kind": "blackbox", "image": "x"}}, "not supported"),
        ({"exec": {"kind": "python:3", "code": "def main(args:\n"}}, "syntax"),
        ({"exec": {"kind": "python:3", "code": "def other(args): pass"}}, "main"),
        ({"exec": {"kind": "python:3", "code": 5}}, "exec.code"),
        ({"parameters": []}, "exec undefined"),
        ({"exec": {"kind": "python:3", "code": HELLO}, "limits": {"timeout": -1}}, "timeout"),
        ({"exec": {"kind": "python:3", "code": HELLO}, "limits": {"gpu": 1}}, "unknown limit"),
        ({"exec": {"kind": "python:3", "code": HELLO}, "parameters": "x"}, "parameters"),
        ({"exec": {"kind": "python:3", "code": "UEsDBBQAAAAI", "binary": True}}, "zip"),
        ([1, 2], "object"),
    ],
    ids=[
        "nodejs",
        "blackbox",
        "syntax",
        "no-main",
        "code-not-text",
        "no-exec",
        "bad-timeout",
        "unknown-limit",
        "bad-params",
        "bad-zip",
        "not-object",
    ],
)
def test_action_put_rejects(http: httpx.Client, body: Any, fragment: str) -> None:
    assert_error(http.put(f"{NS}/actions/srv-bad", json=body), 400, fragment)
    assert_error(http.get(f"{NS}/actions/srv-bad"), 404)


def test_action_put_malformed_json(http: httpx.Client) -> None:
    r = http.put(f"{NS}/actions/srv-bad", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed")
    assert_error(
        http.put(f"{NS}/actions/bad name!", json={"exec": {"kind": "python:3", "code": HELLO}}),
        400,
        "invalid function name",
    )


def test_binary_zip_action(http: httpx.Client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__main__.py", "import helper\ndef main(args):\n    return {'v': helper.VALUE, 'x': args['x']}\n")
        zf.writestr("helper.py", "VALUE = 42\n")
    code = base64.b64encode(buf.getvalue()).decode()
    # binary: true as wsk sends it; the JS client sends a zip Buffer without the flag, so it is sniffed
    for name, exec_ in (
        ("srv-zip", {"kind": "python:3.11", "code": code, "binary": True}),
        ("srv-zip-sniffed", {"kind": "python:default", "code": code}),
    ):
        r = http.put(f"{NS}/actions/{name}", json={"exec": exec_})
        assert r.status_code == 200, r.text
        assert r.json()["exec"]["binary"] is True
        r = http.post(f"{NS}/actions/{name}", params={"blocking": "true", "result": "true"}, json={"x": 1})
        assert r.json() == {"v": 42, "x": 1}


# -- invocation ----------------------------------------------------------------------------------------------
def test_invoke_blocking_and_not(http: httpx.Client) -> None:
    assert put_action(http, "srv-inv", HELLO).status_code == 200
    r = http.post(f"{NS}/actions/srv-inv", params={"blocking": "true", "result": "true"}, json={"name": "Ada"})
    assert r.status_code == 200 and r.json() == {"hi": "Ada"}
    assert HEX32.match(r.headers["x-openwhisk-activation-id"])

    r = http.post(f"{NS}/actions/srv-inv", params={"blocking": "true"}, json={"name": "Bob"})
    assert r.status_code == 200
    record = r.json()
    assert record["activationId"] == r.headers["x-openwhisk-activation-id"]
    assert record["response"] == {
        "status": "success",
        "statusCode": 0,
        "success": True,
        "result": {"hi": "Bob"},
    }
    assert record["logs"][0].endswith("stdout: hello Bob")
    assert record["name"] == "srv-inv" and record["namespace"] == "guest" and record["end"] >= record["start"]

    r = http.post(f"{NS}/actions/srv-inv", json={"name": "Cy"})
    assert r.status_code == 202 and set(r.json()) == {"activationId"}
    act_id = r.json()["activationId"]
    assert r.headers["x-openwhisk-activation-id"] == act_id
    record = wait_ended(http, act_id)
    assert record["response"]["result"] == {"hi": "Cy"}
    assert http.get(f"{NS}/activations/{act_id}/logs").json() == {"logs": record["logs"]}
    assert http.get(f"{NS}/activations/{act_id}/result").json() == record["response"]
    # an empty body is an empty parameter object
    r = http.post(f"{NS}/actions/srv-inv", params={"blocking": "true", "result": "true"})
    assert r.json() == {"hi": None}


def test_invoke_errors_are_502(http: httpx.Client) -> None:
    code = (
        "def main(args):\n"
        "    if args.get('mode') == 'raise':\n"
        "        raise RuntimeError('boom')\n"
        "    return {'error': 'bad input'}\n"
    )
    put_action(http, "srv-err", code)
    r = http.post(f"{NS}/actions/srv-err", params={"blocking": "true"}, json={})
    assert r.status_code == 502
    assert r.json()["response"]["status"] == "application_error" and r.json()["response"]["statusCode"] == 1
    r = http.post(f"{NS}/actions/srv-err", params={"blocking": "true", "result": "true"}, json={})
    assert r.status_code == 502 and r.json() == {"error": "bad input"}
    r = http.post(f"{NS}/actions/srv-err", params={"blocking": "true"}, json={"mode": "raise"})
    assert r.status_code == 502
    assert r.json()["response"]["status"] in ("application_error", "developer_error")
    assert "boom" in json.dumps(r.json()["response"]["result"])


def test_invoke_rejects(server: SimpleNamespace, http: httpx.Client) -> None:
    put_action(http, "srv-small", HELLO, limits={"payload": 200})
    assert_error(http.post(f"{NS}/actions/srv-missing", params={"blocking": "true"}, json={}), 404, "srv-missing")
    assert_error(http.post(f"{NS}/actions/srv-small", json=[1, 2]), 400, "object")
    assert_error(
        http.post(f"{NS}/actions/srv-small", content=b"{", headers={"content-type": "application/json"}),
        400,
        "malformed",
    )
    assert_error(http.post(f"{NS}/actions/srv-small", json={"name": "x" * 500}), 413, "limit")
    # a body declared over the server's request limit is refused before it is sent
    host, port = http.base_url.host, http.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        auth = base64.b64encode(server.handle.auth.encode()).decode()
        sock.sendall(
            f"POST {NS}/actions/srv-small HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic "
            f"{auth}\r\nContent-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
        )
        assert sock.recv(65536).split(b"\r\n", 1)[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert_error(http.post(f"{NS}/actions/srv-small", params={"timeout": "soon"}), 400, "integer")


def test_overload_is_429_and_blocking_wait_falls_back_to_202(http: httpx.Client) -> None:
    put_action(http, "srv-sleep", SLEEP, limits={"instances": 1, "queue": 1})
    assert http.post(f"{NS}/actions/srv-sleep", params={"blocking": "true"}, json={"s": 0}).status_code == 200
    # a blocking call that outlasts its wait answers 202 with the id (timeout= caps the wait, in ms)
    t0 = time.monotonic()
    r = http.post(f"{NS}/actions/srv-sleep", params={"blocking": "true", "timeout": 150}, json={"s": 1.0})
    assert r.status_code == 202 and time.monotonic() - t0 < 0.9
    running = r.json()["activationId"]
    assert r.headers["x-openwhisk-activation-id"] == running
    # not ended yet: OpenWhisk answers 404 for records it does not have yet, and does not list them
    assert_error(http.get(f"{NS}/activations/{running}"), 404, "not ended")
    assert running not in [a["activationId"] for a in http.get(f"{NS}/activations").json()]
    queued = http.post(f"{NS}/actions/srv-sleep", json={"s": 0})
    assert queued.status_code == 202
    assert_error(http.post(f"{NS}/actions/srv-sleep", json={"s": 0}), 429, "queued")
    assert wait_ended(http, running)["response"]["result"] == {"slept": 1.0}
    assert wait_ended(http, queued.json()["activationId"])["response"]["success"] is True


def test_bytes_and_nan_results_are_json(http: httpx.Client) -> None:
    put_action(http, "srv-bytes", "def main(args):\n    return {'b': b'\\x00\\xffab', 'nan': float('nan')}\n")
    r = http.post(f"{NS}/actions/srv-bytes", params={"blocking": "true", "result": "true"})
    assert r.status_code == 200
    assert json.loads(r.text) == {"b": base64.b64encode(b"\x00\xffab").decode(), "nan": None}


# -- activations ---------------------------------------------------------------------------------------------
def test_activation_list_get_logs_result(http: httpx.Client) -> None:
    put_action(http, "srv-act", HELLO)
    ids = []
    before = int(time.time() * 1000) - 1
    for who in ("a", "b", "c"):
        r = http.post(f"{NS}/actions/srv-act", params={"blocking": "true"}, json={"name": who})
        ids.append(r.json()["activationId"])
    listed = http.get(f"{NS}/activations", params={"name": "srv-act"}).json()
    assert [a["activationId"] for a in listed] == ids[::-1]  # newest first
    brief = listed[0]
    assert "logs" not in brief and "response" not in brief and brief["statusCode"] == 0
    assert brief["name"] == "srv-act" and "annotations" in brief
    full = http.get(f"{NS}/activations", params={"name": "srv-act", "docs": "true", "limit": 2}).json()
    assert len(full) == 2 and full[0]["response"]["result"] == {"hi": "c"} and full[0]["logs"]
    assert [
        a["activationId"]
        for a in http.get(f"{NS}/activations", params={"name": "srv-act", "skip": 1, "limit": 1}).json()
    ] == [ids[1]]
    assert http.get(f"{NS}/activations", params={"name": "/_/srv-act", "limit": 1}).json()[0]["activationId"] == ids[2]
    assert http.get(f"{NS}/activations", params={"name": "srv-act", "since": before}).json()
    assert http.get(f"{NS}/activations", params={"name": "srv-act", "upto": before}).json() == []
    assert http.get(f"{NS}/activations", params={"name": "srv-act", "count": "true"}).json() == {"activations": 3}

    record = http.get(f"{NS}/activations/{ids[0]}").json()
    assert record["activationId"] == ids[0] and record["response"]["result"] == {"hi": "a"}
    keys = {a["key"] for a in record["annotations"]}
    assert {"path", "waitTime", "limits", "kind"} <= keys
    # trailing slashes, as some versions of the JS client ask for them
    assert http.get(f"{NS}/activations/{ids[0]}/").json()["activationId"] == ids[0]
    assert http.get(f"{NS}/activations/{ids[0]}/logs").json()["logs"][0].endswith("stdout: hello a")
    assert http.get(f"{NS}/activations/{ids[0]}/result").json() == {
        "status": "success",
        "statusCode": 0,
        "success": True,
        "result": {"hi": "a"},
    }
    assert_error(http.get(f"{NS}/activations/{'0' * 32}"), 404)
    assert_error(http.get(f"{NS}/activations/{'0' * 32}/logs"), 404)
    assert_error(http.get(f"{NS}/activations/{'0' * 32}/result"), 404)


# -- triggers and rules --------------------------------------------------------------------------------------
def test_triggers_and_rules(http: httpx.Client) -> None:
    put_action(http, "srv-target", HELLO)
    r = http.put(f"{NS}/triggers/srv-t", json={"parameters": [{"key": "name", "value": "from-trigger"}]})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "srv-t" and r.json()["parameters"] == [{"key": "name", "value": "from-trigger"}]
    assert_error(http.put(f"{NS}/triggers/srv-t", json={}), 409, "already exists")
    # no active rule: the fire is accepted but activates nothing
    assert http.post(f"{NS}/triggers/srv-t", json={}).status_code == 204

    r = http.put(f"{NS}/rules/srv-r", json={"trigger": "/_/srv-t", "action": "/_/srv-target"})
    assert r.status_code == 200, r.text
    rule = r.json()
    assert rule["status"] == "active" and rule["trigger"]["name"] == "srv-t" and rule["action"]["name"] == "srv-target"
    assert_error(http.put(f"{NS}/rules/srv-r", json={"trigger": "srv-t", "action": "srv-target"}), 409)
    assert_error(http.put(f"{NS}/rules/srv-r2", json={"trigger": "nope", "action": "srv-target"}), 404)
    assert_error(http.put(f"{NS}/rules/srv-r2", json={"trigger": "/alice/srv-t", "action": "srv-target"}), 400)
    assert_error(http.put(f"{NS}/rules/srv-r2", json={"trigger": "srv-t"}), 400, "action")

    trig = http.get(f"{NS}/triggers/srv-t").json()
    assert trig["rules"]["guest/srv-r"]["status"] == "active"
    # overwrite keeps the trigger's rules
    r = http.put(
        f"{NS}/triggers/srv-t",
        params={"overwrite": "true"},
        json={"parameters": [{"key": "name", "value": "updated"}]},
    )
    assert r.status_code == 200 and "guest/srv-r" in r.json()["rules"]

    fired = http.post(f"{NS}/triggers/srv-t", json={})
    assert fired.status_code == 202, fired.text
    fire_id, (target,) = fired.json()["activationId"], fired.json()["activationIds"]
    assert fire_id and fired.headers["x-openwhisk-activation-id"] == fire_id
    record = wait_ended(http, target)
    assert record["response"]["result"] == {"hi": "updated"} and record["cause"] == fire_id
    fired = http.post(f"{NS}/triggers/srv-t", json={"name": "payload wins"})
    assert wait_ended(http, fired.json()["activationIds"][0])["response"]["result"] == {"hi": "payload wins"}

    assert http.post(f"{NS}/rules/srv-r", json={"status": "inactive"}).json()["status"] == "inactive"
    assert http.post(f"{NS}/triggers/srv-t", json={}).status_code == 204
    assert http.post(f"{NS}/rules/srv-r", json={"status": "active"}).json()["status"] == "active"
    assert_error(http.post(f"{NS}/rules/srv-r", json={"status": "paused"}), 400, "status")
    assert [r["name"] for r in http.get(f"{NS}/rules").json()] == ["srv-r"]
    assert http.get(f"{NS}/rules/srv-r").json()["status"] == "active"
    assert "srv-t" in [t["name"] for t in http.get(f"{NS}/triggers").json()]
    assert http.get(f"{NS}/triggers", params={"count": "true"}).json() == {"triggers": 1}

    assert_error(http.post(f"{NS}/triggers/srv-t", json=[1]), 400, "object")
    assert_error(http.post(f"{NS}/triggers/nope", json={}), 404)
    assert_error(http.get(f"{NS}/triggers/nope"), 404)
    assert_error(http.get(f"{NS}/rules/nope"), 404)
    assert http.delete(f"{NS}/rules/srv-r").json()["name"] == "srv-r"
    assert_error(http.delete(f"{NS}/rules/srv-r"), 404)
    assert http.delete(f"{NS}/triggers/srv-t").json()["name"] == "srv-t"
    assert_error(http.delete(f"{NS}/triggers/srv-t"), 404)
    assert http.get(f"{NS}/triggers").json() == [] and http.get(f"{NS}/rules").json() == []


def test_trigger_rate_limit_is_429(http: httpx.Client) -> None:
    put_action(http, "srv-rate-target", HELLO)
    http.put(f"{NS}/triggers/srv-rate", json={"limits": {"rate_per_minute": 1}})
    http.put(f"{NS}/rules/srv-rate-r", json={"trigger": "srv-rate", "action": "srv-rate-target"})
    fired = http.post(f"{NS}/triggers/srv-rate", json={})
    assert fired.status_code == 202
    limited = http.post(f"{NS}/triggers/srv-rate", json={})
    assert_error(limited, 429, "rate limit")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    http.delete(f"{NS}/triggers/srv-rate")
    # the server is shared by this module's tests: an activation left running shows in test_metrics' in_flight
    assert wait_ended(http, fired.json()["activationIds"][0])["response"]["success"] is True


def test_sessions_route(server: SimpleNamespace, http: httpx.Client) -> None:
    r = http.get(f"{NS}/sessions")
    if getattr(server.engine, "sessions", None) is None:
        assert_error(r, 501, "not available")
    else:
        assert r.status_code == 200 and isinstance(r.json(), list)
        assert_error(http.get(f"{NS}/sessions/{'0' * 32}"), 404)


# -- metrics -------------------------------------------------------------------------------------------------
def test_metrics(http: httpx.Client) -> None:
    put_action(http, "srv-metrics", HELLO)
    for _ in range(2):
        http.post(f"{NS}/actions/srv-metrics", params={"blocking": "true"}, json={})
    put_action(http, "srv-metrics-err", "def main(args):\n    return {'error': 'no'}\n")
    http.post(f"{NS}/actions/srv-metrics-err", params={"blocking": "true"}, json={})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert m, f"{sample} not in metrics"
        return float(m.group(1))

    assert value('minifaas_invocations_total{function="srv-metrics",status="success"}') == 2
    assert value('minifaas_invocations_total{function="srv-metrics-err",status="application_error"}') == 1
    assert value('minifaas_starts_total{function="srv-metrics",start="cold"}') == 1
    assert value('minifaas_starts_total{function="srv-metrics",start="warm"}') == 1
    assert value('minifaas_init_seconds_count{function="srv-metrics"}') == 1
    assert value('minifaas_run_seconds_count{function="srv-metrics"}') == 2
    assert value('minifaas_wait_seconds_count{function="srv-metrics"}') == 2
    assert value('minifaas_sandboxes{function="srv-metrics",state="idle",version="1"}') == 1
    assert value('minifaas_queue_length{function="srv-metrics",version="1"}') == 0
    assert value("minifaas_sandboxes_total") >= 2
    assert value('minifaas_pool_events_total{event="cold_starts"}') >= 2
    assert value("minifaas_in_flight") == 0
    # the zygote's spares and what they hold in memory
    assert value("minifaas_spares_target") >= 1 and value("minifaas_spares") >= 0
    assert value("minifaas_spares_pss_bytes") >= 0


# -- persistence and the JS client ---------------------------------------------------------------------------
def test_actions_survive_a_restart_on_a_state_dir(tmp_path: Path) -> None:
    with server_thread(tmp_path) as first, client(first.handle) as http:
        assert put_action(http, "kept", HELLO, parameters=[{"key": "name", "value": "again"}]).status_code == 200
        act_id = http.post(f"{NS}/actions/kept", params={"blocking": "true"}).json()["activationId"]
        put_action(http, "dropped", HELLO)
        assert http.delete(f"{NS}/actions/dropped").status_code == 200
    with server_thread(tmp_path) as second, client(second.handle) as http:
        assert [a["name"] for a in http.get(f"{NS}/actions").json()] == ["kept"]
        r = http.post(f"{NS}/actions/kept", params={"blocking": "true", "result": "true"})
        assert r.json() == {"hi": "again"}
        assert http.get(f"{NS}/activations/{act_id}").json()["response"]["result"] == {"hi": "again"}


def test_openwhisk_js_client(server: SimpleNamespace) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (JS_DIR / "node_modules" / "openwhisk").is_dir():
        pytest.skip("the openwhisk npm package is not installed: run `cd tests/js && npm ci`")
    env = {**os.environ, "MINIFAAS_APIHOST": server.handle.url, "MINIFAAS_AUTH": server.handle.auth}
    proc = subprocess.run(
        [node, str(JS_DIR / "ow_client_test.js")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout


# -- issue 24: browsers, abuse, correctness ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        pytest.param({"Content-Type": "text/plain"}, 415, "must be JSON", id="text-plain"),
        pytest.param({"Content-Type": "application/x-www-form-urlencoded"}, 415, "must be JSON", id="form"),
        pytest.param({"Origin": "http://evil.example"}, 403, "cross-site", id="foreign-origin"),
        pytest.param({"Origin": "null"}, 403, "cross-site", id="null-origin"),
        pytest.param({"Sec-Fetch-Site": "cross-site"}, 403, "cross-site", id="fetch-cross-site"),
        pytest.param({"Sec-Fetch-Site": "same-site"}, 403, "cross-site", id="fetch-same-site"),
    ],
)
def test_writes_refuse_cross_site_and_non_json(
    http: httpx.Client, headers: dict[str, str], status: int, fragment: str, request: pytest.FixtureRequest
) -> None:
    name = "csrf_" + re.sub(r"\W", "_", request.node.callspec.id)
    assert put_action(http, name, HELLO).status_code == 200
    for method, path in (("POST", f"actions/{name}"), ("PUT", "triggers/csrf_t"), ("DELETE", "actions/x")):
        r = http.request(method, f"{NS}/{path}", content=b"{}", headers=headers)
        assert_error(r, status, fragment)
    assert http.get(f"{NS}/activations", params={"name": name}).json() == []
    # reads stay open to any origin's links; the server's own origin may write
    assert http.get(f"{NS}/actions/{name}", headers=headers).status_code == 200
    own = {"Origin": str(http.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    assert http.post(f"{NS}/actions/{name}", json={}, headers=own, params={"blocking": "true"}).status_code == 200


def test_state_dir_belongs_to_one_namespace_and_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = [{"key": "api_key", "value": "sk-first-namespace"}]
    with server_thread(state) as first, client(first.handle) as http:
        assert put_action(http, "keyed", HELLO, parameters=secret).status_code == 200
        token = [{"key": "token", "value": "t0k"}]
        assert http.put(f"{NS}/triggers/tok", json={"parameters": token}).status_code == 200
        assert http.post(f"{NS}/actions/keyed", params={"blocking": "true"}).status_code == 200
    # the same state dir under another namespace is refused: it would show the first one's key and token
    with (
        pytest.raises(minifaas.StateDirConflict, match="belongs to namespace 'guest'"),
        server_thread(state, namespace="alice"),
    ):
        pass
    with server_thread(state) as again, client(again.handle) as http:
        params = http.get(f"{NS}/actions/keyed").json()["parameters"]
        assert params == secret
    assert state.stat().st_mode & 0o777 == 0o700
    files = [p for p in state.rglob("*") if p.is_file() and "bundles" not in p.parts]
    assert any(p.name == "keyed.json" for p in files) and any(p.suffix == ".sqlite3" for p in files)
    for p in files:
        if p.name == "keyed.json" or ".sqlite3" in p.name or p.parent.name == "triggers":
            assert p.stat().st_mode & 0o777 == 0o600, p


@contextlib.contextmanager
def serve_process(
    tmp_path: Path, *, nofile: int | None = None, args: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """``minifaas serve`` in its own process (own memory, own fd limit), with a client logged in to it."""
    import resource
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth = new_auth()

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "minifaas._cli.main", "serve", "--port", str(port), "--auth", auth, *(args or [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        preexec_fn=limit_fds,
    )
    user, _, key = auth.partition(":")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(user, key), timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if http.get("/ping").status_code == 200:
                    break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield proc, http
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_huge_invoke_body_is_refused_while_it_streams(tmp_path: Path) -> None:
    chunk = b"{}," * (1 << 18)  # 768 KiB of empty objects: parsed, each becomes a dict of ~64 bytes

    def body() -> Iterator[bytes]:
        yield b'{"a": ['
        for _ in range(70 << 20 // len(chunk)):
            yield chunk
        yield b"{}]}"

    with serve_process(tmp_path) as (proc, http):
        assert put_action(http, "sink", HELLO).status_code == 200
        before_mb = _peak_rss_mb(proc.pid)
        try:
            r = http.post(f"{NS}/actions/sink", content=body(), headers={"Content-Type": "application/json"})
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            r = None  # the server answered 413 and closed while the client was still sending
        if r is not None:
            assert_error(r, 413, "byte limit")
        grown_mb = _peak_rss_mb(proc.pid) - before_mb
        assert grown_mb < 100, f"the server grew by {grown_mb:.0f} MB for a refused body"
        # a PUT of an action keeps its large cap: a 3 MB source is accepted
        big = HELLO + "#" + "x" * (3 << 20) + "\n"
        assert put_action(http, "big_source", big).status_code == 200
        # the cap is the action's payload limit, not a server-wide one
        assert put_action(http, "tiny", HELLO, limits={"payload": 1000}).status_code == 200
        assert_error(http.post(f"{NS}/actions/tiny", json={"name": "x" * 2000}), 413, "1000 byte limit")
        assert http.post(f"{NS}/actions/tiny", json={"name": "ok"}).status_code == 202


@pytest.mark.parametrize("depth", [600, 2_000, 100_000], ids=["600", "2000", "100000"])
def test_deep_json_is_a_400(http: httpx.Client, depth: int) -> None:
    put_action(http, "deep", HELLO, overwrite=True)
    deep = '{"a": ' + "[" * depth + "]" * depth + "}"
    # names of this depth's own: a body the server accepts (parsed, not too deep) creates what it names
    for method, path in (("POST", "actions/deep"), ("PUT", f"actions/deep-{depth}"), ("PUT", f"triggers/deep-{depth}")):
        r = http.request(method, f"{NS}/{path}", content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 200, 202), r.text
        if r.status_code == 400:
            assert_error(r, 400)
            assert "Traceback" not in r.text and "RecursionError" not in r.text


@pytest.mark.parametrize("param", ["skip", "since", "upto", "limit"])
def test_huge_query_integers_are_400(http: httpx.Client, param: str) -> None:
    paths = ("activations",) if param in ("since", "upto") else ("activations", "actions", "triggers", "rules")
    for path in paths:
        r = http.get(f"{NS}/{path}", params={param: str(1 << 64)})
        assert_error(r, 400, param)


def test_internal_errors_carry_no_internals() -> None:
    from starlette.requests import Request

    from minifaas._server.app import _on_error

    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""})
    response = anyio.run(_on_error, request, KeyError("limits: /secret/path"))
    assert response.status_code == 500
    body = json.loads(bytes(response.body))
    assert set(body) == {"error", "code"} and "secret" not in body["error"] and "KeyError" not in body["error"]


def test_client_gone_mid_upload_is_logged_plainly(
    server: SimpleNamespace, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    put_action(http, "upload_target", HELLO, overwrite=True)
    user, _, key = server.handle.auth.partition(":")
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    caplog.set_level(logging.INFO, logger="minifaas.server")
    with socket.create_connection((server.handle.host, server.handle.port)) as s:
        s.sendall(
            f"PUT {NS}/actions/upload_target?overwrite=true HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"exec": '.encode()
        )
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not any("client disconnected" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records), caplog.text


def test_idle_connections_cannot_starve_the_server_under_a_low_fd_limit(tmp_path: Path) -> None:
    import resource

    from minifaas._server.connguard import HEADER_TIMEOUT_S

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1_400:
        pytest.skip(f"this test needs 1,400 descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1_400), hard))
    idle: list[socket.socket] = []
    try:
        with serve_process(tmp_path, nofile=1024) as (proc, http):
            for _ in range(1_100):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", http.base_url.port or 0))
                idle.append(s)
            time.sleep(1)
            for i, s in enumerate(idle):
                if i % 2:  # half of them send half a request head, and nothing more
                    with contextlib.suppress(OSError):
                        s.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
            # /ping answers again once the idle connections are cut (the server holds none for ever)
            t0 = time.monotonic()
            answered = False
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 20:
                try:
                    with httpx.Client(timeout=2) as fresh:
                        answered = fresh.get(f"{http.base_url}/ping").status_code == 200
                except httpx.TransportError:
                    answered = False
                if answered:
                    break
                time.sleep(0.2)
            assert answered, f"/ping did not answer within {HEADER_TIMEOUT_S + 20} s with 1,100 idle connections"
            assert proc.poll() is None
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            assert fds < 1024, fds
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_compositions_have_their_own_shape_in_the_actions_api(server: SimpleNamespace, http: httpx.Client) -> None:
    from minifaas import composer as c

    put_action(http, "comp_step", HELLO, overwrite=True)
    server.portal.call(server.engine.deploy_composition, "twice", c.sequence("comp_step", "comp_step"))
    listed = http.get(f"{NS}/actions", params={"limit": 200})
    assert listed.status_code == 200, listed.text
    shapes = {a["name"]: a for a in listed.json()}
    assert shapes["twice"]["exec"]["kind"] == "composition" and shapes["twice"]["limits"] == {}
    assert shapes["comp_step"]["exec"]["kind"] == "python:3"
    one = http.get(f"{NS}/actions/twice")
    assert one.status_code == 200, one.text
    assert one.json()["exec"]["composition"]["composition"]["type"] == "sequence"
    before = len(server.engine.sessions.list("twice", limit=100))
    r = http.post(f"{NS}/actions/twice", params={"blocking": "true", "result": "true"}, json={"name": "Ada"})
    assert r.status_code == 200, r.text
    assert r.json() == {"hi": None}  # the second step saw the first one's result
    assert len(server.engine.sessions.list("twice", limit=100)) == before + 1  # ran once, not retried
    assert http.delete(f"{NS}/actions/twice").status_code == 200


@pytest.mark.parametrize(
    "limits",
    [{"rate_per_minute": 0}, {"rate_per_minute": "many"}, {"rate_per_minute": True}, "fast"],
    ids=["zero", "string", "bool", "not-an-object"],
)
def test_a_refused_trigger_update_leaves_it_and_its_rules(http: httpx.Client, limits: Any) -> None:
    params = [{"key": "name", "value": "kept"}]
    http.delete(f"{NS}/triggers/upd-t")
    assert http.put(f"{NS}/triggers/upd-t", json={"parameters": params}).status_code == 200
    assert http.put(
        f"{NS}/rules/upd-r", params={"overwrite": "true"}, json={"trigger": "upd-t", "action": "a"}
    ).is_success
    r = http.put(f"{NS}/triggers/upd-t", params={"overwrite": "true"}, json={"parameters": [], "limits": limits})
    assert_error(r, 400, "rate_per_minute" if isinstance(limits, dict) else "limits")
    trig = http.get(f"{NS}/triggers/upd-t")
    assert trig.status_code == 200 and trig.json()["parameters"] == params
    assert "guest/upd-r" in trig.json()["rules"]
    assert http.get(f"{NS}/rules/upd-r").json()["action"]["name"] == "a"


def test_a_refused_rule_update_leaves_the_rule(http: httpx.Client) -> None:
    http.put(f"{NS}/triggers/upd-t2", json={})
    assert http.put(f"{NS}/rules/upd-r2", json={"trigger": "upd-t2", "action": "first"}).status_code == 200
    r = http.put(f"{NS}/rules/upd-r2", params={"overwrite": "true"}, json={"trigger": "upd-t2", "action": "x" * 300})
    assert_error(r, 400, "invalid rule target")
    assert http.get(f"{NS}/rules/upd-r2").json()["action"]["name"] == "first"


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_activation_paging_skips_running_records_in_the_query(tmp_path: Path, store: str) -> None:
    with server_thread(tmp_path / "state" if store == "sqlite" else None) as s, client(s.handle) as http:
        assert put_action(http, "pg_fast", HELLO).status_code == 200
        assert put_action(http, "pg_slow", SLEEP, limits={"concurrency": 3}).status_code == 200
        ended = [
            http.post(f"{NS}/actions/pg_fast", params={"blocking": "true"}).json()["activationId"] for _ in range(4)
        ]
        running = [http.post(f"{NS}/actions/pg_slow", json={"s": 5}).json()["activationId"] for _ in range(3)]
        deadline = time.monotonic() + 10
        while s.engine.stats().get("in_flight", 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pages = [http.get(f"{NS}/activations", params={"limit": 1, "skip": k}).json() for k in range(5)]
        seen = [p[0]["activationId"] for p in pages if p]
        assert seen == list(reversed(ended)), (seen, ended)
        assert pages[4] == []
        assert http.get(f"{NS}/activations", params={"count": "true"}).json() == {"activations": 4}
        assert not set(running) & {a["activationId"] for a in http.get(f"{NS}/activations").json()}


def test_sigterm_answers_blocking_invokes_202_and_drains(tmp_path: Path) -> None:
    import concurrent.futures
    import signal

    from minifaas._core.store import SQLiteStore
    from minifaas._engine import CLOSE_TIMEOUT_S

    state = tmp_path / "state"
    with serve_process(tmp_path, args=["--state-dir", str(state)]) as (proc, http):
        assert put_action(http, "long", SLEEP, limits={"timeout": 60_000}).status_code == 200
        assert put_action(http, "short", SLEEP).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.post, f"{NS}/actions/long", params={"blocking": "true"}, json={"s": 20})
            short_id = http.post(f"{NS}/actions/short", json={"s": 2}).json()["activationId"]
            time.sleep(1.5)  # both run now
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            r = waiting.result(timeout=30)
            answered_s = time.monotonic() - t0
        assert r.status_code == 202, r.text
        long_id = r.json()["activationId"]
        assert r.headers["X-OpenWhisk-Activation-Id"] == long_id
        assert answered_s < 3, f"the blocking request waited {answered_s:.1f} s after SIGTERM"
        assert proc.wait(timeout=CLOSE_TIMEOUT_S + 20) == 0
        exited_s = time.monotonic() - t0
    assert exited_s < CLOSE_TIMEOUT_S + 5, exited_s
    store = SQLiteStore(state / "activations.sqlite3")
    try:
        short, long = store.get(short_id), store.get(long_id)
    finally:
        store.close()
    assert short is not None and short.status == "success"  # drained: it ended within the grace period
    assert long is not None and long.status == "internal_error" and "closed" in long.result["error"]


def test_a_hanging_environment_build_holds_up_only_its_own_action(tmp_path: Path) -> None:
    import concurrent.futures

    # a package index that accepts connections and never answers: pip waits on it
    index = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = False

    def accept() -> None:
        index.settimeout(0.2)
        while not stop:
            with contextlib.suppress(TimeoutError, OSError):
                held.append(index.accept()[0])

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__main__.py", HELLO)
        zf.writestr("requirements.txt", "minifaas-test-never-published==1.0\n")
    zipped = {"exec": {"kind": "python:3", "code": base64.b64encode(buf.getvalue()).decode(), "binary": True}}
    env = {
        "PIP_INDEX_URL": f"http://127.0.0.1:{index.getsockname()[1]}/simple",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PIP_NO_CACHE_DIR": "1",
    }
    try:
        with (
            concurrent.futures.ThreadPoolExecutor(2) as pool,
            serve_process(tmp_path, args=["--state-dir", str(tmp_path / "state")], env=env) as (_, http),
        ):
            pool.submit(accept)
            try:
                assert put_action(http, "bystander", HELLO).status_code == 200
                building = pool.submit(http.put, f"{NS}/actions/needs_deps", json=zipped)
                deadline = time.monotonic() + 20
                while not held:  # pip is now waiting on the index
                    assert time.monotonic() < deadline and not building.done(), "pip never asked the index"
                    time.sleep(0.05)
                t0 = time.monotonic()
                assert http.delete(f"{NS}/actions/bystander").status_code == 200
                assert put_action(http, "another", HELLO).status_code == 200
                # the same action is not queued behind its own build either: refused at once, to retry later
                assert_error(http.put(f"{NS}/actions/needs_deps", json=zipped), 409, "being deployed")
                assert_error(http.delete(f"{NS}/actions/needs_deps"), 409, "being deployed")
                took_s = time.monotonic() - t0
                assert not building.done()
                assert took_s < 3, f"deploys waited {took_s:.1f} s on an environment build"
            finally:
                stop = True
    finally:
        stop = True
        for conn in held:
            conn.close()
        index.close()


def test_request_bytes_in_flight_are_bounded_across_requests(server: SimpleNamespace, http: httpx.Client) -> None:
    budget = server.handle.app.state.api.budget
    saved = budget.max_bytes
    budget.max_bytes = 100_000
    user, _, key = server.handle.auth.partition(":")
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    try:
        with socket.create_connection((server.handle.host, server.handle.port)) as slow:
            # an upload that sends 80 kB of its 1 MB and then stalls: those bytes are held
            slow.sendall(
                f"PUT {NS}/actions/held HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n".encode()
                + b'{"exec": {"code": "'
                + b"#" * 80_000
            )
            deadline = time.monotonic() + 10
            while budget.held < 80_000:
                assert time.monotonic() < deadline, budget.held
                time.sleep(0.02)
            r = put_action(http, "second", HELLO + "#" * 50_000)
            assert_error(r, 503, "too many request bytes")
            assert r.headers["retry-after"] == "1"
            assert put_action(http, "small_enough", HELLO).status_code == 200
        deadline = time.monotonic() + 10
        while budget.held:  # the stalled upload's bytes are given back when its client goes
            assert time.monotonic() < deadline, budget.held
            time.sleep(0.02)
    finally:
        budget.max_bytes = saved
