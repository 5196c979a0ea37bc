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
from minifaas._server import ServerHandle, create_app, new_auth, serve
from minifaas._triggers import TriggerManager

API = "/api/v1"
NS = f"{API}/namespaces/_"
JS_DIR = Path(__file__).parent / "js"
HELLO = "def main(args):\n    print('hello', args.get('name'))\n    return {'hi': args.get('name')}\n"
SLEEP = "import time\ndef main(args):\n    time.sleep(args.get('s', 0))\n    return {'slept': args.get('s', 0)}\n"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@contextlib.asynccontextmanager
async def serving(state_dir: Path | None = None) -> AsyncIterator[tuple[minifaas.Engine, ServerHandle]]:
    """An engine and its server on a free port; a trigger manager is attached if the engine has none."""
    async with minifaas.Engine(state_dir=state_dir) as engine, anyio.create_task_group() as tg:
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
def server_thread(state_dir: Path | None = None) -> Iterator[SimpleNamespace]:
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(serving(state_dir)) as (
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
    with httpx.Client(base_url=url, auth=(user, key[:-1] + "x"), timeout=10) as wrong_key:
        assert_error(wrong_key.get(f"{API}/namespaces"), 401)


def test_namespaces_and_isolation(http: httpx.Client) -> None:
    assert http.get(f"{API}/namespaces").json() == ["guest"]
    assert http.get(f"{API}/namespaces/guest/actions").status_code == 200
    assert http.get(f"{NS}/packages").json() == []
    for path in ("activations", "actions", "actions/x", "triggers", "rules", "activations/0123/logs"):
        assert_error(http.get(f"{API}/namespaces/alice/{path}"), 403, "not authorized to access 'alice'")
    assert_error(http.post(f"{API}/namespaces/alice/actions/x", json={}), 403)
    assert_error(http.get("/no/such/route"), 404, "does not exist")
    assert_error(http.patch(f"{NS}/actions/x"), 405)


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
    assert action["name"] == "srv-hello" and action["namespace"] == "guest" and action["version"] == "1"
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
    assert r.json()["version"] == "2" and r.json()["limits"]["timeout"] == 5000
    assert http.post(f"{NS}/actions/srv-hello", params={"blocking": "true", "result": "true"}).json() == {
        "hi": "updated"
    }

    got = http.get(f"{NS}/actions/srv-hello").json()
    assert got["exec"]["code"] == HELLO and got["version"] == "2"
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
        ({"exec": {"kind": "python:3", "code": ""}}, "exec.code"),
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
        "empty-code",
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
    assert http.post(f"{NS}/triggers/srv-rate", json={}).status_code == 202
    limited = http.post(f"{NS}/triggers/srv-rate", json={})
    assert_error(limited, 429, "rate limit")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    http.delete(f"{NS}/triggers/srv-rate")


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
