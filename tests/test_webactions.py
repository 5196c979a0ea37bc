"""Web actions and the API gateway over real HTTP, against a real engine and server (OpenWhisk's semantics).

The expectations follow OpenWhisk's controller (``WebActions.scala``, ``WebActionsApiTests.scala``) and its
route management actions (``core/routemgmt``): no credential for web actions unless ``require-whisk-auth`` asks,
``__ow_*`` arguments, parameter merging, the extensions' rules and OpenWhisk's error messages.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.test_server import JS_DIR, NS, client, put_action, server_thread

WEB = "/api/v1/web/guest/default"
ECHO = "def main(args):\n    return {'args': args}\n"
RETURN = "def main(args):\n    return args['r']\n"
HTTP = (
    "def main(args):\n"
    "    out = {k: v for k, v in args.items() if k in ('statusCode', 'headers', 'body')}\n"
    "    return out\n"
)
CRASH = "import os\ndef main(args):\n    os._exit(3)\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def ann(**kw: Any) -> list[dict[str, Any]]:
    return [{"key": k.replace("_", "-"), "value": v} for k, v in kw.items()]


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    with server_thread() as s, client(s.handle) as http:
        assert put_action(http, "echo", ECHO, annotations=ann(web_export=True)).status_code == 200
        assert put_action(http, "ret", RETURN, annotations=ann(web_export=True)).status_code == 200
        assert put_action(http, "http", HTTP, annotations=ann(web_export=True)).status_code == 200
        assert put_action(http, "raw", ECHO, annotations=ann(web_export=True, raw_http=True)).status_code == 200
        assert put_action(http, "plain", ECHO).status_code == 200
        yield s


@pytest.fixture(scope="module")
def http(server: SimpleNamespace) -> Iterator[httpx.Client]:
    with client(server.handle) as c:
        yield c


@pytest.fixture(scope="module")
def anon(server: SimpleNamespace) -> Iterator[httpx.Client]:
    """A client with no credential at all, as a browser or curl on the open web."""
    with httpx.Client(base_url=server.handle.url, timeout=30) as c:
        yield c


def ret_url(result: object, ext: str = ".http") -> tuple[str, dict[str, str]]:
    """The ``ret`` action returns its ``r`` parameter: the result under test travels as the request's JSON body."""
    return f"{WEB}/ret{ext}", {"r": result}  # type: ignore[dict-item]


def call_ret(anon: httpx.Client, result: object, ext: str = ".http") -> httpx.Response:
    url, body = ret_url(result, ext)
    return anon.post(url, json=body)


def assert_ow_error(r: httpx.Response, status: int, message: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "code"} and body["error"] == message, body


# -- the request as the action sees it -----------------------------------------------------------------------
def test_get_needs_no_credential_and_passes_the_http_context(anon: httpx.Client) -> None:
    r = anon.get(f"{WEB}/echo.json/some/path?name=Jane&n=1", headers={"X-Thing": "yes"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert len(r.headers["x-openwhisk-activation-id"]) == 32
    args = r.json()["args"]
    assert args["__ow_method"] == "get"
    assert args["__ow_path"] == "/some/path"
    assert args["__ow_headers"]["x-thing"] == "yes"
    assert args["name"] == "Jane" and args["n"] == "1"  # query values are strings
    assert "__ow_query" not in args and "__ow_body" not in args and "__ow_user" not in args


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"json": {"name": "Body", "x": [1, 2]}}, {"name": "Body", "x": [1, 2]}, id="json-object"),
        pytest.param({"data": {"name": "Form", "x": "2"}}, {"name": "Form", "x": "2"}, id="form"),
        pytest.param(
            {"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}},
            {"name": "Query", "__ow_body": [1, 2]},
            id="json-array-is-ow-body",
        ),
        pytest.param(
            {"content": b"Jane", "headers": {"Content-Type": "text/plain"}},
            {"name": "Query", "__ow_body": "Jane"},
            id="text-is-ow-body",
        ),
        pytest.param(
            {"content": PNG, "headers": {"Content-Type": "image/png"}},
            {"name": "Query", "__ow_body": base64.b64encode(PNG).decode()},
            id="binary-is-base64",
        ),
    ],
)
def test_bodies_merge_over_query_parameters(
    anon: httpx.Client, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    r = anon.post(f"{WEB}/echo.json?name=Query", **kwargs)
    assert r.status_code == 200, r.text
    args = r.json()["args"]
    assert args["__ow_method"] == "post"
    for key, value in expected.items():
        assert args[key] == value, (key, args)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_every_verb_reaches_the_action(anon: httpx.Client, method: str) -> None:
    r = anon.request(method, f"{WEB}/echo.json")
    assert r.status_code == 200 and r.json()["args"]["__ow_method"] == method.lower()


def test_raw_http_gets_the_query_and_body_unparsed(anon: httpx.Client) -> None:
    r = anon.post(f"{WEB}/raw.json?name=Jane&a=b", json={"name": "Body"})
    assert r.status_code == 200, r.text
    args = r.json()["args"]
    assert args["__ow_query"] == "name=Jane&a=b"
    assert base64.b64decode(args["__ow_body"]) == b'{"name":"Body"}'  # JSON is base64, as in OpenWhisk
    assert "name" not in args
    text = anon.post(f"{WEB}/raw.json", content=b"plain words", headers={"Content-Type": "text/plain"})
    assert text.json()["args"]["__ow_body"] == "plain words"
    empty = anon.get(f"{WEB}/raw.json")
    assert empty.json()["args"]["__ow_body"] == "" and empty.json()["args"]["__ow_query"] == ""


def test_reserved_and_final_parameters_cannot_be_overridden(http: httpx.Client, anon: httpx.Client) -> None:
    assert_ow_error(
        anon.get(f"{WEB}/echo.json?__ow_method=put"),
        400,
        "Request defines parameters that are not allowed (e.g., reserved properties).",
    )
    assert_ow_error(
        anon.post(f"{WEB}/echo.json", json={"__ow_headers": {}}),
        400,
        "Request defines parameters that are not allowed (e.g., reserved properties).",
    )
    put = put_action(
        http,
        "fin",
        ECHO,
        annotations=ann(web_export=True, final=True),
        parameters=[{"key": "greeting", "value": "hello"}],
    )
    assert put.status_code == 200, put.text
    assert anon.get(f"{WEB}/fin.json").json()["args"]["greeting"] == "hello"
    assert_ow_error(
        anon.get(f"{WEB}/fin.json?greeting=bye"),
        400,
        "Request defines parameters that are not allowed (e.g., reserved properties).",
    )
    # without final, a request parameter overrides the action's (OpenWhisk's merge order)
    put_action(http, "fin", ECHO, overwrite=True, annotations=ann(web_export=True))
    assert anon.get(f"{WEB}/fin.json?greeting=bye").json()["args"]["greeting"] == "bye"


# -- what is and is not a web action -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"{WEB}/plain.json", id="not-web-exported"),
        pytest.param(f"{WEB}/nosuch.json", id="no-such-action"),
        pytest.param("/api/v1/web/other/default/echo.json", id="other-namespace"),
        pytest.param("/api/v1/web/guest/nopkg/echo.json", id="no-such-package"),
        pytest.param("/api/v1/web/guest/default", id="no-action"),
    ],
)
def test_anything_but_a_web_action_is_404(anon: httpx.Client, path: str) -> None:
    assert_ow_error(anon.get(path), 404, "The requested resource does not exist.")


def test_the_rest_api_still_needs_the_credential(anon: httpx.Client) -> None:
    assert anon.get(f"{NS}/actions").status_code == 401
    assert anon.post(f"{NS}/actions/echo?blocking=true", json={}).status_code == 401


def test_web_export_false_turns_it_off(http: httpx.Client, anon: httpx.Client) -> None:
    put_action(http, "toggle", ECHO, annotations=ann(web_export=True))
    assert anon.get(f"{WEB}/toggle.json").status_code == 200
    put_action(http, "toggle", ECHO, overwrite=True, annotations=ann(web_export=False))
    assert anon.get(f"{WEB}/toggle.json").status_code == 404


# -- the response --------------------------------------------------------------------------------------------
def test_http_status_headers_and_body(anon: httpx.Client) -> None:
    r = call_ret(anon, {"statusCode": 201, "headers": {"X-A": 1, "Set-Cookie": ["a=1", "b=2"]}, "body": "<b>hi</b>"})
    assert r.status_code == 201
    assert r.headers["x-a"] == "1"
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers["content-type"] == "text/html; charset=UTF-8"  # a string body's default
    assert r.text == "<b>hi</b>"
    redirect = call_ret(anon, {"statusCode": 302, "headers": {"location": "http://openwhisk.org"}})
    assert redirect.status_code == 302 and redirect.headers["location"] == "http://openwhisk.org"


def test_http_json_body_and_default_extension(anon: httpx.Client) -> None:
    url, body = ret_url({"body": {"k": [1, 2]}}, "")  # no extension: .http
    r = anon.post(url, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"k": [1, 2]}


def test_http_binary_body_is_base64_decoded(anon: httpx.Client) -> None:
    b64 = base64.b64encode(PNG).decode()
    r = call_ret(anon, {"headers": {"Content-Type": "image/png"}, "body": b64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == PNG
    bad = call_ret(anon, {"headers": {"Content-Type": "image/png"}, "body": "not base64!"})
    assert_ow_error(bad, 400, "Response type in header did not match generated content type.")


def test_http_empty_body_is_204(anon: httpx.Client) -> None:
    r = call_ret(anon, {"headers": {"X-Empty": "yes"}})
    assert r.status_code == 204 and r.content == b"" and r.headers["x-empty"] == "yes"
    assert call_ret(anon, {"statusCode": 200, "body": ""}).status_code == 200


@pytest.mark.parametrize(
    "result",
    [
        pytest.param({"statusCode": True}, id="boolean-status"),
        pytest.param({"statusCode": 99}, id="status-out-of-range"),
        pytest.param({"statusCode": "abc"}, id="bad-status"),
        pytest.param({"statusCode": 200.5}, id="fractional-status"),
        pytest.param({"headers": "x"}, id="bad-headers"),
        pytest.param({"headers": {"x": {"nested": 1}}}, id="bad-header-value"),
    ],
)
def test_http_invalid_responses_are_400(anon: httpx.Client, result: object) -> None:
    assert_ow_error(call_ret(anon, result), 400, "Response is not valid 'message/http'.")


def test_http_json_body_with_a_text_content_type_is_400(anon: httpx.Client) -> None:
    r = call_ret(anon, {"headers": {"Content-Type": "text/plain"}, "body": {"a": 1}})
    assert_ow_error(r, 400, "Response type in header did not match generated content type.")


@pytest.mark.parametrize(
    ("ext", "result", "status", "ctype", "text"),
    [
        pytest.param(".json", {"a": 1}, 200, "application/json", '{\n  "a": 1\n}', id="json-object"),
        pytest.param(".text", {"text": "plain"}, 200, "text/plain; charset=UTF-8", "plain", id="text-field"),
        pytest.param(".text", {"body": 42}, 200, "text/plain; charset=UTF-8", "42", id="text-number"),
        pytest.param(".html", {"html": "<p>x</p>"}, 200, "text/html; charset=UTF-8", "<p>x</p>", id="html"),
        pytest.param(".svg", {"svg": "<svg/>"}, 200, "image/svg+xml", "<svg/>", id="svg"),
    ],
)
def test_extensions_pick_the_field(
    anon: httpx.Client, ext: str, result: object, status: int, ctype: str, text: str
) -> None:
    r = call_ret(anon, result, ext)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == ctype
    assert r.text == text


@pytest.mark.parametrize(
    ("ext", "result", "status", "message"),
    [
        pytest.param(".text", {"other": 1}, 404, "Response does not include requested property.", id="text-missing"),
        pytest.param(".html", {"other": 1}, 400, "Response is not valid 'text/html'.", id="html-missing"),
        pytest.param(".html", {"html": 1}, 400, "Response is not valid 'text/html'.", id="html-not-string"),
        pytest.param(".svg", {"other": 1}, 400, "Response is not valid 'image/svg+xml'.", id="svg-missing"),
    ],
)
def test_extensions_without_their_field(
    anon: httpx.Client, ext: str, result: object, status: int, message: str
) -> None:
    assert_ow_error(call_ret(anon, result, ext), status, message)


def test_application_errors_answer_with_their_error_field(http: httpx.Client, anon: httpx.Client) -> None:
    code = "def main(args):\n    return {'error': {'statusCode': 418, 'body': 'teapot'}}\n"
    put_action(http, "teapot", code, annotations=ann(web_export=True))
    r = anon.get(f"{WEB}/teapot.http")
    assert r.status_code == 418 and r.text == "teapot"
    assert anon.get(f"{WEB}/teapot.json").json() == {"statusCode": 418, "body": "teapot"}


def test_a_crash_is_a_400_with_an_activation(http: httpx.Client, anon: httpx.Client) -> None:
    put_action(http, "crash", CRASH, annotations=ann(web_export=True))
    r = anon.get(f"{WEB}/crash.json")
    assert_ow_error(r, 400, "There was an error processing your request.")
    act_id = r.headers["x-openwhisk-activation-id"]
    record = http.get(f"{NS}/activations/{act_id}").json()
    assert record["response"]["status"] == "developer_error"


def test_head_answers_without_a_body(anon: httpx.Client) -> None:
    r = anon.head(f"{WEB}/echo.json")
    assert r.status_code == 200 and r.content == b""


# -- CORS and OPTIONS ----------------------------------------------------------------------------------------
def test_options_is_answered_with_cors_without_invoking(server: SimpleNamespace, anon: httpx.Client) -> None:
    before = len(server.portal.call(server.engine.activations.list, "echo"))
    r = anon.options(f"{WEB}/echo.json", headers={"Access-Control-Request-Headers": "X-Custom"})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-methods"] == "OPTIONS, GET, DELETE, POST, PUT, HEAD, PATCH"
    assert r.headers["access-control-allow-headers"] == "X-Custom"
    assert len(server.portal.call(server.engine.activations.list, "echo")) == before
    get = anon.get(f"{WEB}/echo.json")
    assert get.headers["access-control-allow-origin"] == "*"


def test_web_custom_options_lets_the_action_answer(http: httpx.Client, anon: httpx.Client) -> None:
    code = (
        "def main(args):\n"
        "    if args['__ow_method'] == 'options':\n"
        "        return {'statusCode': 200, 'headers': {'Access-Control-Allow-Origin': 'example.com'}}\n"
        "    return {'body': 'hi'}\n"
    )
    put_action(http, "custom", code, annotations=ann(web_export=True, web_custom_options=True))
    r = anon.options(f"{WEB}/custom.http")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "example.com"
    assert "access-control-allow-methods" not in r.headers


# -- securing web actions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [pytest.param("my-secret", id="string"), pytest.param(4242, id="number")])
def test_require_whisk_auth_secret(http: httpx.Client, anon: httpx.Client, secret: object) -> None:
    put_action(http, "secured", ECHO, overwrite=True, annotations=ann(web_export=True, require_whisk_auth=secret))
    assert_ow_error(
        anon.get(f"{WEB}/secured.json"),
        401,
        "The request has not been applied because it lacks valid authentication credentials for the target resource.",
    )
    assert anon.get(f"{WEB}/secured.json", headers={"X-Require-Whisk-Auth": "wrong"}).status_code == 401
    assert http.get(f"{WEB}/secured.json").status_code == 401  # the server credential is not the secret
    ok = anon.get(f"{WEB}/secured.json", headers={"X-Require-Whisk-Auth": str(secret)})
    assert ok.status_code == 200, ok.text


def test_require_whisk_auth_true_takes_the_server_credential(
    server: SimpleNamespace, http: httpx.Client, anon: httpx.Client
) -> None:
    put_action(http, "mine", ECHO, annotations=ann(web_export=True, require_whisk_auth=True))
    assert anon.get(f"{WEB}/mine.json").status_code == 401
    assert anon.get(f"{WEB}/mine.json", auth=("someone", "else")).status_code == 401
    r = http.get(f"{WEB}/mine.json")
    assert r.status_code == 200, r.text
    args = r.json()["args"]
    assert args["__ow_user"] == "guest"
    # the action does not get to see the server's own credential
    assert "authorization" not in args["__ow_headers"]
    # another site's page cannot use the browser's stored credential
    cross = http.get(f"{WEB}/mine.json", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    # a bearer token of the action's own scheme goes through untouched
    bearer = anon.get(f"{WEB}/echo.json", headers={"Authorization": "Bearer abc"})
    assert bearer.json()["args"]["__ow_headers"]["authorization"] == "Bearer abc"


def test_web_action_bodies_are_capped_at_the_payload_limit(http: httpx.Client, anon: httpx.Client) -> None:
    put_action(http, "small", ECHO, annotations=ann(web_export=True), limits={"payload": 1000})
    r = anon.post(f"{WEB}/small.json", content=b"x" * 5000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413, r.text


# -- the API gateway -----------------------------------------------------------------------------------------
MGMT = "/api/v1/web/whisk.system/apimgmt"


def test_api_gateway_endpoint_create_get_route_delete(
    server: SimpleNamespace, http: httpx.Client, anon: httpx.Client
) -> None:
    # the body the openwhisk npm client's routes.create({basepath, relpath, operation, action}) sends
    apidoc = {
        "namespace": "_",
        "gatewayBasePath": "/hello",
        "gatewayPath": "/world/{id}",
        "gatewayMethod": "GET",
        "id": "API:_:/hello",
        "action": {
            "name": "echo",
            "namespace": "guest",
            "backendMethod": "GET",
            "backendUrl": f"{server.handle.url}/api/v1/web/guest/default/echo.http",
            "authkey": server.handle.auth,
        },
    }
    assert anon.post(f"{MGMT}/createApi", json={"apidoc": apidoc}).status_code == 401
    created = http.post(f"{MGMT}/createApi", params={"responsetype": "json"}, json={"apidoc": apidoc})
    assert created.status_code == 200, created.text
    url = created.json()["gwApiUrl"]
    assert url == f"{server.handle.url}/api/guest/hello"
    got = http.get(f"{MGMT}/getApi", params={"basepath": "/hello"}).json()
    assert [a["value"]["gwApiUrl"] for a in got["apis"]] == [url]
    assert list(got["apis"][0]["value"]["apidoc"]["paths"]) == ["/world/{id}"]
    r = anon.get(f"{url}/world/42?name=Jane")
    assert r.status_code == 200, r.text
    assert r.json()["args"]["name"] == "Jane"
    assert anon.post(f"{url}/world/42").status_code == 404  # only the route's verb
    assert anon.get(f"{url}/elsewhere").status_code == 404
    deleted = http.delete(f"{MGMT}/deleteApi", params={"basepath": "/hello", "force": "true"})
    assert deleted.status_code == 200 and deleted.json() == {}
    assert anon.get(f"{url}/world/42").status_code == 404
    assert http.get(f"{MGMT}/getApi", params={"basepath": "/hello"}).json() == {"apis": []}
    assert http.delete(f"{MGMT}/deleteApi", params={"basepath": "/hello"}).status_code == 404


def test_api_gateway_swagger_routes_carry_the_actions_secret(
    server: SimpleNamespace, http: httpx.Client, anon: httpx.Client
) -> None:
    # the swagger serverless-openwhisk generates for `http: POST /greet` on a function with a secret
    put_action(http, "greet", ECHO, annotations=ann(web_export=True, require_whisk_auth="s3cret"))
    target = "https://somehost/api/v1/web/guest/default/greet.json"
    swagger = {
        "swagger": "2.0",
        "basePath": "/svc",
        "info": {"title": "svc", "version": "1.0"},
        "paths": {
            "/greet": {
                "post": {
                    "operationId": "post-/greet",
                    "responses": {"200": {"description": "ok"}},
                    "x-openwhisk": {"action": "greet", "namespace": "guest", "package": "default", "url": target},
                }
            }
        },
        "x-ibm-configuration": {
            "cors": {"enabled": True},
            "assembly": {
                "execute": [
                    {
                        "operation-switch": {
                            "case": [
                                {
                                    "operations": ["post-/greet"],
                                    "execute": [
                                        {
                                            "set-variable": {
                                                "actions": [
                                                    {"set": "message.headers.X-Require-Whisk-Auth", "value": "s3cret"}
                                                ]
                                            }
                                        },
                                        {"invoke": {"target-url": target, "verb": "keep"}},
                                    ],
                                }
                            ]
                        }
                    }
                ]
            },
        },
    }
    created = http.post(f"{MGMT}/createApi", json={"apidoc": {"namespace": "_", "swagger": swagger}})
    assert created.status_code == 200, created.text
    url = created.json()["gwApiUrl"]
    assert anon.post(f"{WEB}/greet.json", json={"who": "x"}).status_code == 401  # the web action itself is secured
    r = anon.post(f"{url}/greet", json={"who": "gateway"})
    assert r.status_code == 200, r.text
    assert r.json()["args"]["who"] == "gateway"
    assert "x-require-whisk-auth" in r.json()["args"]["__ow_headers"]
    listed: list[dict[str, Any]] = server.handle.app.state.apigw.routes()
    assert {"basepath": "/svc", "relpath": "/greet", "operation": "POST", "action": "/guest/greet"}.items() <= (
        next(x for x in listed if x["basepath"] == "/svc").items()
    )
    http.delete(f"{MGMT}/deleteApi", params={"basepath": "/svc", "relpath": "/greet", "operation": "post"})
    assert anon.post(f"{url}/greet", json={}).status_code == 404


@pytest.mark.parametrize(
    "apidoc",
    [
        pytest.param({}, id="no-basepath"),
        pytest.param({"gatewayBasePath": "/b", "gatewayPath": "x", "gatewayMethod": "GET"}, id="relative-path"),
        pytest.param({"gatewayBasePath": "/b", "gatewayPath": "/x", "gatewayMethod": "FETCH"}, id="bad-verb"),
        pytest.param({"gatewayBasePath": "/v1", "gatewayPath": "/x", "gatewayMethod": "GET"}, id="v1-is-taken"),
        pytest.param({"swagger": {"basePath": "/b", "paths": {"/x": {"get": {}}}}}, id="swagger-without-action"),
    ],
)
def test_api_gateway_refuses_bad_documents(http: httpx.Client, apidoc: dict[str, Any]) -> None:
    r = http.post(f"{MGMT}/createApi", json={"apidoc": {"action": {"name": "echo"}, **apidoc}})
    assert r.status_code == 400, r.text


def test_api_gateway_routes_survive_a_restart(tmp_path: Path) -> None:
    for attempt in range(2):
        with server_thread(tmp_path) as s, client(s.handle) as http:
            if attempt == 0:
                put_action(http, "kept", ECHO, annotations=ann(web_export=True))
                apidoc = {
                    "gatewayBasePath": "/keep",
                    "gatewayPath": "/it",
                    "gatewayMethod": "GET",
                    "action": {"name": "kept", "namespace": "guest"},
                }
                assert http.post(f"{MGMT}/createApi", json={"apidoc": apidoc}).status_code == 200
            r = httpx.get(f"{s.handle.url}/api/guest/keep/it?n=1", timeout=30)
            assert r.status_code == 200, r.text
            assert json.loads(r.text)["args"]["n"] == "1"


# -- the CLI -------------------------------------------------------------------------------------------------
def cli_runner(server: SimpleNamespace) -> Any:
    env = {
        **os.environ,
        "MINIFAAS_APIHOST": server.handle.url,
        "MINIFAAS_AUTH": server.handle.auth,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "minifaas._cli.main", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)

    return cli


def test_cli_web_flags(server: SimpleNamespace, anon: httpx.Client, tmp_path: Path) -> None:
    cli = cli_runner(server)
    code = tmp_path / "page.py"
    code.write_text(ECHO)
    made = cli("action", "create", "cliweb", str(code), "-p", "who", "param", "--web", "true")
    assert made.returncode == 0, made.stderr
    assert anon.get(f"{WEB}/cliweb.json").json()["args"]["who"] == "param"
    assert anon.get(f"{WEB}/cliweb.json?who=x").status_code == 400  # --web true finalizes the parameters
    secured = cli("action", "update", "cliweb", "--web-secure", "s3")
    assert secured.returncode == 0, secured.stderr
    assert anon.get(f"{WEB}/cliweb.json").status_code == 401
    assert anon.get(f"{WEB}/cliweb.json", headers={"X-Require-Whisk-Auth": "s3"}).status_code == 200
    raw = cli("action", "update", "cliweb", "--web", "raw")
    assert raw.returncode == 0, raw.stderr
    got = anon.get(f"{WEB}/cliweb.json?q=1", headers={"X-Require-Whisk-Auth": "s3"}).json()["args"]
    assert got["__ow_query"] == "q=1"  # raw, and the secret was kept by the update
    off = cli("action", "update", "cliweb", "--web", "false")
    assert off.returncode == 0, off.stderr
    assert anon.get(f"{WEB}/cliweb.json").status_code == 404
    refused = cli("action", "update", "cliweb", "--web-secure", "true")
    assert refused.returncode == 1 and "needs a web action" in refused.stderr


def test_cli_api_create_list_delete(server: SimpleNamespace, http: httpx.Client, anon: httpx.Client) -> None:
    cli = cli_runner(server)
    refused = cli("api", "create", "/cli", "/x", "get", "plain")
    assert refused.returncode == 1 and "not a web action" in refused.stderr, refused.stderr
    put_action(http, "clisecret", ECHO, annotations=ann(web_export=True, require_whisk_auth="cli-secret"))
    made = cli("api", "create", "/cli", "/books/{id}", "GET", "clisecret", "--response-type", "json")
    assert made.returncode == 0, made.stderr
    url = f"{server.handle.url}/api/guest/cli/books/{{id}}"
    assert url in made.stdout, made.stdout
    r = anon.get(url.replace("{id}", "7"), params={"q": "x"})
    assert r.status_code == 200, r.text  # the route carries the action's secret
    assert r.json()["args"]["q"] == "x"
    listed = cli("api", "list")
    assert listed.returncode == 0, listed.stderr
    assert "/guest/clisecret" in listed.stdout and "GET" in listed.stdout and url in listed.stdout, listed.stdout
    as_json = json.loads(cli("api", "list", "/cli", "--json").stdout)
    assert [a["value"]["gwApiUrl"] for a in as_json] == [f"{server.handle.url}/api/guest/cli"]
    gone = cli("api", "delete", "/cli", "/books/{id}", "get")
    assert gone.returncode == 0, gone.stderr
    assert anon.get(url.replace("{id}", "7")).status_code == 404
    missing = cli("api", "delete", "/cli")
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr


def test_a_sequence_can_be_a_web_action(http: httpx.Client, anon: httpx.Client) -> None:
    put_action(http, "upper", "def main(args):\n    return {'name': args.get('name', '').upper()}\n")
    put_action(http, "page", "def main(args):\n    return {'body': '<p>' + args['name'] + '</p>'}\n")
    seq = {"kind": "sequence", "components": ["/_/upper", "/_/page"]}
    r = http.put(f"{NS}/actions/webseq", json={"exec": seq, "annotations": ann(web_export=True)})
    assert r.status_code == 200, r.text
    page = anon.get(f"{WEB}/webseq.http", params={"name": "web"})
    assert page.status_code == 200, page.text
    assert page.text == "<p>WEB</p>" and page.headers["content-type"] == "text/html; charset=UTF-8"


def test_openwhisk_js_client_web_actions_and_routes(server: SimpleNamespace) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    if not (JS_DIR / "node_modules" / "openwhisk").is_dir():
        pytest.skip("the openwhisk npm package is not installed: run `cd tests/js && npm ci`")
    env = {**os.environ, "MINIFAAS_APIHOST": server.handle.url, "MINIFAAS_AUTH": server.handle.auth}
    proc = subprocess.run(
        [node, str(JS_DIR / "ow_web_test.js")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout


def test_web_actions_in_packages_and_bindings(http: httpx.Client, anon: httpx.Client) -> None:
    def put_pkg(name: str, **body: Any) -> None:
        r = http.put(f"{NS}/packages/{name}", params={"overwrite": "true"}, json=body)
        assert r.status_code == 200, r.text

    put_pkg("wp", parameters=[{"key": "a", "value": "pkg"}, {"key": "b", "value": "pkg"}])
    put = put_action(http, "wp/show", ECHO, annotations=ann(web_export=True, final=True))
    assert put.status_code == 200, put.text
    put_pkg("wp-bound", binding={"namespace": "_", "name": "wp"}, parameters=[{"key": "b", "value": "binding"}])
    direct = anon.get("/api/v1/web/guest/wp/show.json", params={"c": "query"})
    assert direct.status_code == 200, direct.text
    assert {k: direct.json()["args"][k] for k in "abc"} == {"a": "pkg", "b": "pkg", "c": "query"}
    bound = anon.get("/api/v1/web/guest/wp-bound/show.json")
    assert bound.status_code == 200, bound.text
    assert {k: bound.json()["args"][k] for k in "ab"} == {"a": "pkg", "b": "binding"}
    # final protects what the package and the binding give too
    assert_ow_error(
        anon.get("/api/v1/web/guest/wp-bound/show.json", params={"b": "caller"}),
        400,
        "Request defines parameters that are not allowed (e.g., reserved properties).",
    )
    assert anon.get("/api/v1/web/guest/default/show.json").status_code == 404  # not outside its package


def test_api_gateway_documents_are_capped(http: httpx.Client) -> None:
    huge = {"apidoc": {"gatewayBasePath": "/big", "pad": "x" * (2 << 20)}}
    assert http.post(f"{MGMT}/createApi", json=huge).status_code == 413
