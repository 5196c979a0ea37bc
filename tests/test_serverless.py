"""The Serverless Framework v3 with its OpenWhisk provider (``serverless-openwhisk``) against a real ``minifaas serve``.

A service of two Python functions, a sequence of them, a trigger with a rule, an ``http:`` event (a web action
behind an API gateway route) and a ``schedule:`` event goes through ``serverless deploy``, ``invoke``, ``logs``,
``info`` and ``remove``; each must exit 0 and the server must hold (then no longer hold) what they made. The
``http:`` route is called over plain HTTP without a credential, as curl would.

The framework runs from ``tests/serverless/node_modules`` (``cd tests/serverless && npm ci``; ``.ci/run`` does it),
with ``OW_APIHOST``/``OW_AUTH`` pointing it at the server, a temporary ``HOME`` and its telemetry and
notifications turned off: it needs no account, no login and no network beyond the loopback server.

``serverless-openwhisk`` 0.18.4 never invokes a ``schedule:`` event's feed action (its ``deployTriggers`` blanks
the triggers' ``feed`` before ``deployFeeds`` reads it: serverless/serverless-openwhisk#195, against OpenWhisk
as well), so the test checks what it does make: the trigger annotated with ``/whisk.system/alarms/alarm`` and
the rule from it to the function.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server import serve_process

SLS_DIR = Path(__file__).parent / "serverless"
SLS_BIN = SLS_DIR / "node_modules" / "serverless" / "bin" / "serverless.js"
SLS_TIMEOUT_S = 120
SERVICE = "mfsls"
SERVERLESS_YML = """\
service: mfsls
frameworkVersion: "3"
configValidationMode: off
package:
  patterns:
    - "!**"
    - handler.py
provider:
  name: openwhisk
  runtime: python:3
functions:
  hello:
    handler: handler.hello
    events:
      - http: GET /hello
      - schedule: cron(*/5 * * * *)
  shout:
    handler: handler.shout
    events:
      - trigger: greet
  pipeline:
    sequence:
      - hello
      - shout
resources:
  triggers:
    greet: {}
plugins:
  - serverless-openwhisk
"""
HANDLER_PY = """\
def hello(args):
    print("hello called for", args.get("name", "world"))
    return {"greeting": "hello " + str(args.get("name", "world"))}


def shout(args):
    return {"greeting": str(args.get("greeting", "?")).upper()}
"""


@pytest.fixture(scope="module")
def sls_bin() -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    if not SLS_BIN.is_file():
        pytest.skip("the serverless npm packages are not installed: run `cd tests/serverless && npm ci`")
    return SLS_BIN


def run_sls(sls_bin: Path, service: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        ["node", str(sls_bin), *args],
        cwd=service,
        env=env,
        capture_output=True,
        text=True,
        timeout=SLS_TIMEOUT_S,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"serverless {' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


def names(http: httpx.Client, kind: str) -> set[str]:
    r = http.get(f"/api/v1/namespaces/_/{kind}", params={"limit": 200})
    assert r.status_code == 200, r.text
    return {e["name"] for e in r.json()}


def test_serverless_deploy_invoke_logs_info_remove(tmp_path: Path, sls_bin: Path) -> None:
    service = tmp_path / "svc"
    service.mkdir()
    (service / "serverless.yml").write_text(SERVERLESS_YML)
    (service / "handler.py").write_text(HANDLER_PY)
    # the framework loads the provider plugin from the service's node_modules (packaging leaves it out)
    (service / "node_modules").symlink_to(SLS_DIR / "node_modules", target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    with serve_process(tmp_path) as (_proc, http):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(home),
            "OW_APIHOST": str(http.base_url).rstrip("/"),
            "OW_AUTH": credential(http),
            "SLS_TELEMETRY_DISABLED": "1",
            "SLS_NOTIFICATIONS_MODE": "off",
            "SLS_DEPRECATION_DISABLE": "*",
            "SLS_INTERACTIVE_SETUP_DISABLE": "1",
            "CI": "1",
        }
        out = run_sls(sls_bin, service, env, "deploy")
        assert "Deployment successful!" in out, out
        actions = {f"{SERVICE}-dev-hello", f"{SERVICE}-dev-shout", f"{SERVICE}-dev-pipeline"}
        assert actions <= names(http, "actions")
        assert {"greet", f"{SERVICE}_hello_schedule_trigger"} <= names(http, "triggers")
        rules = {f"{SERVICE}_greet_to_shout", f"{SERVICE}_hello_schedule_rule"}
        assert rules <= names(http, "rules")
        schedule = http.get(f"/api/v1/namespaces/_/triggers/{SERVICE}_hello_schedule_trigger").json()
        assert {"key": "feed", "value": "/whisk.system/alarms/alarm"} in schedule["annotations"]

        # the http: event, as deploy printed it, answers without a credential
        match = re.search(r"GET (http://\S+/hello) --> " + re.escape(f"{SERVICE}-dev-hello"), out)
        assert match is not None, out
        r = httpx.get(match.group(1), params={"name": "curl"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"greeting": "hello curl"}

        out = run_sls(sls_bin, service, env, "invoke", "-f", "hello", "-d", '{"name": "sls"}')
        assert '"hello sls"' in out, out
        # the sequence, through the REST call `serverless invoke` makes (one framework start less: each costs seconds)
        seq = http.post(f"/api/v1/namespaces/_/actions/{SERVICE}-dev-pipeline?blocking=true", json={"name": "seq"})
        assert seq.status_code == 200, seq.text
        assert seq.json()["response"]["result"] == {"greeting": "HELLO SEQ"}
        assert len(seq.json()["logs"]) == 2  # the component activations' ids, as in OpenWhisk

        fired = http.post("/api/v1/namespaces/_/triggers/greet", json={"greeting": "fired"})
        assert fired.status_code == 202, fired.text
        shout = _wait_result(http, fired.json()["activationIds"][0])
        assert shout == {"greeting": "FIRED"}

        out = run_sls(sls_bin, service, env, "logs", "-f", "hello")
        assert "hello called for sls" in out, out

        out = run_sls(sls_bin, service, env, "info")
        assert "endpoints (api-gw):" in out and "--> " + f"{SERVICE}-dev-hello" in out, out
        assert "**failed to fetch routes**" not in out, out

        run_sls(sls_bin, service, env, "remove")
        assert not actions & names(http, "actions")
        assert not rules & names(http, "rules")
        assert not {"greet", f"{SERVICE}_hello_schedule_trigger"} & names(http, "triggers")
        assert http.get("/api/v1/web/whisk.system/apimgmt/getApi").json() == {"apis": []}
        assert httpx.get(match.group(1), timeout=30).status_code == 404


def credential(http: httpx.Client) -> str:
    """The ``uuid:key`` the client logs in with (what ``OW_AUTH`` holds)."""
    request = next(http.auth.auth_flow(http.build_request("GET", "/")))
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(token).decode()


def _wait_result(http: httpx.Client, act_id: str, timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        r = http.get(f"/api/v1/namespaces/_/activations/{act_id}")
        if r.status_code == 200:
            return r.json()["response"]["result"]
        assert time.monotonic() < deadline, f"activation {act_id} did not end"
        time.sleep(0.1)
