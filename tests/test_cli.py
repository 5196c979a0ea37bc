"""The ``minifaas`` command, run as a real subprocess against a real server (and in ``--local`` mode)."""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.metadata
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

import minifaas
from minifaas._cli.main import _brief, _pairs, pack_folder
from minifaas._events.triggers import TriggerManager
from minifaas._server.app import ServerHandle, serve
from tests.helpers.subproc import reap

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "data" / "images"
FUNCTIONS = ROOT / "functions"
HELLO = "def main(args):\n    print('hello', args.get('name'))\n    return {'hi': args.get('name')}\n"
CLI_TIMEOUT_S = 120
# the console script of the interpreter running the tests: one found first on PATH may be another install's
_SCRIPT = shutil.which("minifaas", path=str(Path(sys.executable).parent))
CLI = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "minifaas._cli.main"]


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[minifaas.Engine, ServerHandle]]:
    async with minifaas.Engine() as engine, anyio.create_task_group() as tg:
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


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(serving()) as (
            engine,
            handle,
        ),
    ):
        yield SimpleNamespace(portal=portal, engine=engine, handle=handle)


@pytest.fixture(scope="module")
def cli(server: SimpleNamespace) -> Iterator[functools.partial[subprocess.CompletedProcess[str]]]:
    env = {
        **os.environ,
        "MINIFAAS_APIHOST": server.handle.url,
        "MINIFAAS_AUTH": server.handle.auth,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    yield functools.partial(run, env=env)


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env=env if env is not None else {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        cwd=cwd,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_help_and_usage() -> None:
    out = ok(run("--help"))
    for verb in (
        "serve",
        "deploy",
        "action",
        "invoke",
        "invoke-batch",
        "activation",
        "trigger",
        "rule",
        "session",
        "demo",
    ):
        assert verb in out
    assert "--apihost" in ok(run("activation", "list", "--help"))
    bad = run("frobnicate")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_parameter_values_parse_like_wsk(tmp_path: Path) -> None:
    pfile = tmp_path / "p.json"
    pfile.write_text('{"a": 1, "b": "file"}')
    given = [["b", "cli"], ["n", "3"], ["list", "[1, 2]"], ["s", "plain text"], ["t", "true"]]
    assert _pairs(given, [str(pfile)]) == {
        "a": 1,
        "b": "cli",
        "n": 3,
        "list": [1, 2],
        "s": "plain text",
        "t": True,
    }
    assert _brief({"crop": "x" * 100, "ok": True}) == '{"crop":"<100 chars>","ok":true}'
    assert _brief({"error": "a long message " * 3}) == "error: " + "a long message " * 3


def test_deploy_invoke_and_activations(
    cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    src = tmp_path / "hello.py"
    src.write_text(HELLO)
    assert "deployed action cli-hello" in ok(cli("deploy", "cli-hello", str(src), "-p", "name", "World", "-t", "5000"))
    assert json.loads(ok(cli("invoke", "cli-hello", "-p", "name", "[1, 2]", "--result"))) == {"hi": [1, 2]}
    record = json.loads(ok(cli("invoke", "cli-hello", "--blocking")))
    assert record["response"]["result"] == {"hi": "World"}
    act_id = record["activationId"]
    out = ok(cli("invoke", "cli-hello", "-p", "name", "later"))
    assert re.search(r"ok: invoked /_/cli-hello with id [0-9a-f]{32}", out)

    listing = ok(cli("activation", "list", "cli-hello"))
    assert act_id in listing and "cli-hello" in listing and "success" in listing
    assert json.loads(ok(cli("activation", "get", act_id)))["response"]["result"] == {"hi": "World"}
    assert ok(cli("activation", "logs", act_id, "--strip")).strip() == "hello World"

    action = json.loads(ok(cli("action", "get", "cli-hello", "--code")))
    assert action["exec"]["code"] == HELLO and action["limits"]["timeout"] == 5000
    failed = cli("action", "create", "cli-hello", str(src))
    assert failed.returncode == 1 and "409" in failed.stderr
    assert "updated" in ok(cli("action", "update", "cli-hello", "-p", "name", "Upd"))
    assert "deleted action cli-hello" in ok(cli("action", "delete", "cli-hello"))
    missing = cli("invoke", "cli-hello", "-r")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_failed_activation_exits_1(cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    src = tmp_path / "fail.py"
    src.write_text("def main(args):\n    return {'error': 'no good'}\n")
    ok(cli("deploy", "cli-fail", str(src)))
    proc = cli("invoke", "cli-fail", "-r")
    assert proc.returncode == 1 and json.loads(proc.stdout) == {"error": "no good"}
    proc = cli("activation", "result", "--last")
    assert proc.returncode == 1 and json.loads(proc.stdout) == {"error": "no good"}


def test_pack_folder_and_deploy_it(cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    (tmp_path / "_lib").mkdir()
    (tmp_path / "_lib" / "shared.py").write_text("GREETING = 'hi from a shared module'\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.txt").write_text("42")
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "__main__.py").write_text(
        "import shared\nfrom urllib.request import url2pathname\nfrom urllib.parse import urlparse\n"
        "def main(args):\n"
        "    weights = open(url2pathname(urlparse(args['weights_url']).path)).read()\n"
        "    return {'greeting': shared.GREETING, 'weights': weights, 'k': args['k']}\n"
    )
    (fn / "__pycache__").mkdir()
    (fn / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (fn / "minifaas.json").write_text(
        json.dumps(
            {
                "include": ["../_lib/shared.py"],
                "params": {"k": 7},
                "models": {"weights_url": "../models/weights.txt"},
            }
        )
    )
    with zipfile.ZipFile(__import__("io").BytesIO(pack_folder(fn))) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("minifaas.json"))
    assert names == {"__main__.py", "shared.py", "_models/weights.txt", "minifaas.json"}
    assert manifest == {"params": {"k": 7}, "models": {"weights_url": "_models/weights.txt"}}

    ok(cli("deploy", "cli-folder", str(fn)))
    assert json.loads(ok(cli("invoke", "cli-folder", "-r"))) == {
        "greeting": "hi from a shared module",
        "weights": "42",
        "k": 7,
    }
    assert json.loads(ok(cli("action", "get", "cli-folder")))["exec"]["binary"] is True


def test_invoke_batch_with_a_real_function(cli: functools.partial[subprocess.CompletedProcess[str]]) -> None:
    ok(cli("deploy", "cli-quality", str(FUNCTIONS / "image_quality")))
    images = sorted(p.name for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    out = ok(cli("invoke-batch", "cli-quality", str(IMAGES), "--pattern", "*.jpg", "--concurrency", "2"))
    jpgs = [n for n in images if n.endswith(".jpg")]
    assert f"{len(jpgs)}/{len(jpgs)} succeeded" in out
    for name in jpgs:
        assert name in out
    # as paths, as JSON: a function deployed over HTTP has no folder granted, so it refuses every path, saying why
    # and nothing about the file
    refused = cli("invoke-batch", "cli-quality", str(IMAGES), "--pattern", "*.png", "--send", "path", "--json")
    assert refused.returncode == 1, refused.stderr
    rows = json.loads(refused.stdout)
    assert sorted(r["file"] for r in rows) == [n for n in images if n.endswith(".png")]
    assert all(r["status"] == "application_error" and "read_paths" in r["result"]["error"] for r in rows), rows
    missing = cli("invoke-batch", "cli-quality", str(IMAGES / "nope"))
    assert missing.returncode == 1 and "not a folder" in missing.stderr


def test_triggers_and_rules(cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    src = tmp_path / "hello.py"
    src.write_text(HELLO)
    ok(cli("deploy", "cli-target", str(src)))
    ok(cli("trigger", "create", "cli-t", "-p", "name", "trig"))
    ok(cli("rule", "create", "cli-r", "cli-t", "cli-target"))
    out = ok(cli("trigger", "fire", "cli-t"))
    target = re.search(r"fired trigger cli-t with id \w+: ([0-9a-f]{32})", out)
    assert target, out
    deadline = time.monotonic() + 30
    while (proc := cli("activation", "result", target.group(1))).returncode != 0:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.1)
    assert json.loads(proc.stdout) == {"hi": "trig"}
    ok(cli("rule", "disable", "cli-r"))
    assert "no active rule" in ok(cli("trigger", "fire", "cli-t"))
    assert "cli-r (inactive)" in ok(cli("trigger", "list"))
    assert json.loads(ok(cli("rule", "get", "cli-r")))["status"] == "inactive"
    ok(cli("trigger", "delete", "cli-t"))
    # as in OpenWhisk, the rule outlives its trigger (it names one that does not exist)
    assert json.loads(ok(cli("rule", "get", "cli-r")))["trigger"]["name"] == "cli-t"
    ok(cli("rule", "delete", "cli-r"))
    gone = cli("rule", "get", "cli-r")
    assert gone.returncode == 1 and "404" in gone.stderr


def test_sessions_and_demo(
    server: SimpleNamespace, cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    proc = cli("session", "list")
    assert proc.returncode == 0, proc.stderr
    # the main job, as README's first command runs it: real photos through the workflow into real files
    demo = cli("demo", "--workdir", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stdout + demo.stderr
    catalog = tmp_path / "demo" / "catalog"
    rejected = tmp_path / "demo" / "rejected"
    assert (catalog / "messi5.json").is_file() and (catalog / "messi5.jpg").is_file()
    assert (rejected / "text_motion.json").is_file()


def test_unreachable_server_and_bad_auth(server: SimpleNamespace, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MINIFAAS_APIHOST": "http://127.0.0.1:9",
        "MINIFAAS_AUTH": "a:b",
        "HOME": str(tmp_path),
    }
    proc = run("action", "list", env=env)
    assert proc.returncode == 1 and "cannot reach the server" in proc.stderr
    proc = run("action", "list", "--apihost", server.handle.url, env=env)
    assert proc.returncode == 1 and "401" in proc.stderr
    # ~/.wskprops, as `wsk property set` writes it, is read when no option or variable is given
    (tmp_path / ".wskprops").write_text(f"APIHOST={server.handle.url}\nAUTH={server.handle.auth}\n")
    env = {k: v for k, v in env.items() if not k.startswith("MINIFAAS_")}
    assert ok(run("action", "list", "--json", env=env)).startswith("[")


def test_local_mode_keeps_actions_and_records(tmp_path: Path) -> None:
    src = tmp_path / "hello.py"
    src.write_text(HELLO)
    state = ["--local", "--state-dir", str(tmp_path / "state")]
    ok(run(*state, "deploy", "loc", str(src)))
    # a second process: the action was saved in the state dir and is deployed again
    assert json.loads(ok(run("invoke", "loc", "-p", "name", "local", "-r", *state))) == {"hi": "local"}
    assert ok(run(*state, "activation", "logs", "--last", "--strip")).strip() == "hello local"


def test_serve_command_prints_credentials_and_stops_on_sigint(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("export "):
                break
        m = re.match(r"export MINIFAAS_APIHOST=(\S+) MINIFAAS_AUTH=(\S+)$", lines[-1].strip())
        assert m, "".join(lines)
        url, auth = m.groups()
        user, _, key = auth.partition(":")
        assert re.fullmatch(r"[A-Za-z0-9]{64}", key)
        with httpx.Client(base_url=url, auth=(user, key), timeout=10) as http:
            assert http.get("/api/v1/namespaces").json() == ["guest"]
            assert http.get("/api/v1/namespaces/_/actions", auth=("x", "y")).status_code == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        reap(proc)


def test_serve_on_a_taken_port_fails_clearly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run("serve", "--port", str(taken.getsockname()[1]))
    assert proc.returncode == 1 and "Address already in use" in proc.stderr, proc.stderr


# -- issue 24 ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _listener() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback HTTP listener that records what it receives and answers every request with ``[]``."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    seen.append(data)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}", seen
    finally:
        srv.close()
        thread.join(5)


def test_wskprops_credential_goes_only_to_its_own_apihost(tmp_path: Path) -> None:
    import base64

    secret = "prod-user:PRODUCTION-KEY-1234"
    leaked = base64.b64encode(secret.encode()).decode()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MINIFAAS_", "WSK_"))}
    env = {**base, "HOME": str(tmp_path), "COLUMNS": "200"}
    with _listener() as (hostport, seen):
        # ~/.wskprops names production (scheme-less, as `wsk property set` writes it); the user points elsewhere
        (tmp_path / ".wskprops").write_text(f"APIHOST=openwhisk.prod.example\nAUTH={secret}\n")
        ok(run("action", "list", "--json", env={**env, "MINIFAAS_APIHOST": f"http://{hostport}"}))
        ok(run("action", "list", "--json", "--apihost", f"http://{hostport}", env=env))
        assert len(seen) == 2
        assert not any(leaked.encode() in s or b"authorization" in s.lower() for s in seen), seen
        # with its own APIHOST (scheme-less loopback: plain http) the key is sent: the listener does see it
        (tmp_path / ".wskprops").write_text(f"APIHOST={hostport}\nAUTH={secret}\n")
        ok(run("action", "list", "--json", env=env))
        assert leaked.encode() in seen[-1]


def test_basic_auth_is_never_sent_in_clear_beyond_loopback(tmp_path: Path) -> None:
    from minifaas._cli.main import _normalized

    assert _normalized("openwhisk.prod.example") == "https://openwhisk.prod.example"
    assert _normalized("127.0.0.1:3233") == "http://127.0.0.1:3233"
    assert _normalized("localhost:3233/") == "http://localhost:3233"
    env = {**os.environ, "HOME": str(tmp_path), "COLUMNS": "200"}
    # 192.0.2.1 (TEST-NET-1) is never routed: the refusal comes before any connection attempt
    proc = run("action", "list", "--apihost", "http://192.0.2.1:3233", "--auth", "a:b", env=env)
    assert proc.returncode == 1
    assert "refusing to send credentials over plain http" in proc.stderr, proc.stderr


def test_user_text_is_printed_verbatim(
    cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    # the server's 400 quotes the bad name: rich took `[/x]` for a closing tag and crashed
    proc = cli("invoke", "a[/x]")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "a[/x]" in proc.stderr, proc.stderr
    src = tmp_path / "shout.py"
    line = ":thumbs_up: [bold]not bold[/bold] :x:"
    src.write_text(f"def main(args):\n    print({line!r})\n    return {{'said': {line!r}}}\n")
    ok(cli("deploy", "cli-shout", str(src)))
    act_id = json.loads(ok(cli("invoke", "cli-shout", "--blocking")))["activationId"]
    assert ok(cli("activation", "logs", act_id, "--strip")).strip() == line
    assert line in ok(cli("activation", "logs", act_id))
    assert json.loads(ok(cli("invoke", "cli-shout", "-r"))) == {"said": line}


@contextlib.contextmanager
def serve_process(
    *argv: str, command: tuple[str, ...] = ("serve", "--port", "0"), wait_s: float = 30
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``minifaas serve ...`` running until its banner's ``export`` line; stopped with SIGINT afterwards."""
    proc = subprocess.Popen(
        [*CLI, *command, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MINIFAAS_")} | {"COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("export ")):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert lines and lines[-1].startswith("export "), "".join(lines) + (proc.stderr.read() if proc.stderr else "")
        yield proc, lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        reap(proc)


def _exported(lines: list[str]) -> tuple[str, str]:
    m = re.match(r"export MINIFAAS_APIHOST=(\S+) MINIFAAS_AUTH=(\S+)$", lines[-1].strip())
    assert m, "".join(lines)
    return m[1], m[2]


def test_serve_with_a_state_dir_keeps_its_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serve_process("--state-dir", str(state)) as (_, lines):
        url, auth = _exported(lines)
        user, _, key = auth.partition(":")
        # the banner says which half is the user, and gives a URL to paste in a browser
        text = "".join(lines)
        assert f"user {user} and password {key}" in text, text
        assert f"http://{user}:{key}@{url.removeprefix('http://')}/ui/\n" in text
        with httpx.Client(base_url=url, auth=(user, key), timeout=10) as http:
            assert http.get("/api/v1/namespaces").json() == ["guest"]
    key_file = state / "server" / "auth"
    assert key_file.read_text().strip() == auth
    assert key_file.stat().st_mode & 0o777 == 0o600
    # a restart on the same state dir: the same credentials, so clients and bookmarks keep working
    with serve_process("--state-dir", str(state)) as (_, lines):
        url2, auth2 = _exported(lines)
        assert auth2 == auth
        with httpx.Client(base_url=url2, auth=(user, key), timeout=10) as http:
            assert http.get("/api/v1/namespaces").status_code == 200
    # --auth wins over the kept key, and does not replace it
    with serve_process("--state-dir", str(state), "--auth", "me:secret") as (_, lines):
        assert _exported(lines)[1] == "me:secret"
    assert key_file.read_text().strip() == auth


def test_serve_refuses_a_malformed_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "server" / "auth"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("not a credential\n")
    proc = run("serve", "--port", "0", "--state-dir", str(tmp_path))
    assert proc.returncode == 1
    assert f"{key_file} does not hold one uuid:key line" in proc.stderr.replace("\n", ""), proc.stderr


def test_a_401_says_how_to_authenticate(server: SimpleNamespace) -> None:
    with httpx.Client(base_url=server.handle.url, timeout=10) as http:
        missing = http.get("/api/v1/namespaces/_/actions")
        wrong = http.get("/api/v1/namespaces/_/actions", auth=("x", "y"))
    assert missing.status_code == wrong.status_code == 401
    assert "not supplied" in missing.json()["error"] and "is invalid" in wrong.json()["error"]
    for r in (missing, wrong):
        msg = r.json()["error"]
        assert "the uuid is the user, the key the password" in msg
        assert "MINIFAAS_AUTH" in msg and "--auth" in msg
    # the CLI shows the server's explanation
    env = {**os.environ, "MINIFAAS_APIHOST": server.handle.url, "MINIFAAS_AUTH": "a:b"}
    proc = run("action", "list", env=env)
    assert proc.returncode == 1 and "MINIFAAS_AUTH" in proc.stderr, proc.stderr


def test_version() -> None:
    out = ok(run("--version"))
    assert out.split()[:2] == ["minifaas", minifaas.__version__]
    assert minifaas.__version__ == importlib.metadata.version("minifaas")


def test_functions_page_says_where_an_action_came_from(
    server: SimpleNamespace, cli: functools.partial[subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    src = tmp_path / "hello.py"
    src.write_text(HELLO)
    ok(cli("action", "create", "from-file", str(src)))
    ok(cli("action", "create", "from-folder", str(FUNCTIONS / "image_quality")))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__main__.py", HELLO)
    user, _, key = server.handle.auth.partition(":")
    with httpx.Client(base_url=server.handle.url, auth=(user, key), timeout=30) as http:
        # what another client (wsk, the JS client) sends: no annotation naming a file
        zipped = {"exec": {"kind": "python:3", "binary": True, "code": base64.b64encode(buf.getvalue()).decode()}}
        assert http.put("/api/v1/namespaces/_/actions/from-zip", json=zipped).status_code == 200
        plain = {"exec": {"kind": "python:3", "code": HELLO}}
        assert http.put("/api/v1/namespaces/_/actions/from-text", json=plain).status_code == 200
        functions = {f["name"]: f for f in http.get("/ui/api/functions").json()["functions"]}
    assert functions["from-file"]["origin"] == str(src.resolve())
    assert functions["from-folder"]["origin"] == str((FUNCTIONS / "image_quality").resolve())
    assert functions["from-zip"]["origin"] == "uploaded zip"  # not the server's temporary copy
    assert functions["from-text"]["origin"] == "uploaded code"
    for name in ("from-file", "from-folder", "from-zip", "from-text"):
        ok(cli("action", "delete", name))


def test_demo_serve_keeps_a_dev_server_with_the_demo_sessions(tmp_path: Path) -> None:
    command = ("demo", "--serve", "--port", "0", "--workdir", str(tmp_path / "demo"))
    with serve_process(command=command, wait_s=CLI_TIMEOUT_S) as (_, lines):
        text = "".join(lines)
        assert "done in" in text  # the demo ran first
        url, auth = _exported(lines)
        user, _, key = auth.partition(":")
        assert f"user {user} and password {key}" in text and f"@{url.removeprefix('http://')}/ui/" in text
        photos = sorted((tmp_path / "demo" / "uploads").iterdir())
        with httpx.Client(base_url=url, auth=(user, key), timeout=10) as http:
            sessions = http.get("/ui/api/sessions", params={"name": "catalog", "limit": 100}).json()["sessions"]
            assert len(sessions) == len(photos) and {s["status"] for s in sessions} == {"success"}
            page = http.get(f"/ui/sessions/{sessions[0]['session_id']}")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            names = {f["name"] for f in http.get("/ui/api/functions").json()["functions"]}
            assert {"catalog", "image_quality", "crop", "auto_tag"} <= names


def test_local_read_commands_read_a_state_dir_a_server_holds(tmp_path: Path) -> None:
    """twoengines.py, the CLI's side: with ``minifaas serve`` holding the state dir, ``--local`` read commands
    failed with StateDirLocked; they open the dir read-only now, and writing commands still say it is locked."""
    state = tmp_path / "state"
    fn = tmp_path / "hello.py"
    fn.write_text(HELLO)
    with serve_process("--state-dir", str(state)) as (_, lines):
        url, auth = _exported(lines)
        remote = {**os.environ, "MINIFAAS_APIHOST": url, "MINIFAAS_AUTH": auth, "COLUMNS": "200", "NO_COLOR": "1"}
        ok(run("action", "create", "hello", str(fn), env=remote))
        user, _, key = auth.partition(":")
        with httpx.Client(base_url=f"{url}/api/v1/namespaces/_", auth=(user, key), timeout=30) as http:
            assert http.put("/triggers/tick", json={}).status_code == 200
            rule = {"trigger": "/_/tick", "action": "/_/hello"}
            assert http.put("/rules/tick-hello", json=rule).status_code == 200
            invoked = http.post("/actions/hello", params={"blocking": "true"}, json={"name": "ro"}).json()
            aid = invoked["activationId"]
            served = http.get("/actions/hello", params={"code": "false"}).json()
        local = {k: v for k, v in os.environ.items() if not k.startswith("MINIFAAS_")} | {"COLUMNS": "200"}

        def read(*args: str) -> str:
            return ok(run(*args, "--local", "--state-dir", str(state), env=local))

        assert aid in read("activation", "list")
        assert json.loads(read("activation", "get", aid))["response"]["status"] == "success"
        assert "hello ro" in read("activation", "logs", aid)
        assert json.loads(read("activation", "result", aid)) == {"hi": "ro"}
        assert aid in read("activation", "poll", "--since-s", "600", "--exit", "0.2")
        got = json.loads(read("action", "get", "hello"))
        assert (got["name"], got["version"], got["exec"]) == (served["name"], served["version"], served["exec"])
        assert "tick-hello" in read("rule", "list")
        # what would run something or change the dir is refused, saying why
        refused = run("invoke", "hello", "--local", "--state-dir", str(state), env=local)
        assert refused.returncode != 0 and "StateDirLocked" in refused.stderr, refused.stderr
        # the server's record and its engine are untouched: nothing was recovered or ended by the readers
        with httpx.Client(base_url=f"{url}/api/v1/namespaces/_", auth=(user, key), timeout=30) as http:
            record = http.get(f"/activations/{aid}").json()
            assert record["response"]["status"] == "success"
            assert not any(a["key"] == "recovered" for a in record["annotations"])
            again = http.post("/actions/hello", params={"blocking": "true"}, json={"name": "x"}).json()
            assert again["response"]["status"] == "success"
