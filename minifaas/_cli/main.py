"""The ``minifaas`` command: a dev server, and ``wsk``-like verbs that talk to it over its REST API.

::

    minifaas serve                                  # prints the API host and a fresh uuid:key
    export MINIFAAS_APIHOST=http://127.0.0.1:3233 MINIFAAS_AUTH=<uuid:key>
    minifaas deploy crop functions/smart_body_crop  # .py file, folder (packed with its manifest) or .zip
    minifaas invoke crop -p image tests/data/images/messi5.jpg --result
    minifaas activation list
    minifaas invoke-batch crop tests/data/images

``--local`` runs the same commands against an engine embedded in the command itself (state in
``--state-dir``), through the same REST app in memory, so no server is needed for one-shot work.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import mimetypes
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from .._errors import MinifaasError

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

    from .._engine import Engine

__all__ = ("CliError", "main", "pack_folder")

ENV_APIHOST: Final = "MINIFAAS_APIHOST"
ENV_AUTH: Final = "MINIFAAS_AUTH"
ENV_STATE_DIR: Final = "MINIFAAS_STATE_DIR"
DEFAULT_APIHOST: Final = "http://127.0.0.1:3233"
LOCAL_BASE_URL: Final = "http://minifaas.local"
#: the action annotation naming the file or folder an action was created from (the dev server shows it)
ORIGIN_ANNOTATION: Final = "origin"
#: a blocking invocation may wait 60 s on the server, plus transfer time
HTTP_TIMEOUT_S: Final = 75.0
WAIT_POLL_S: Final = 0.2
WAIT_MAX_S: Final = 600.0
ACTIVATION_POLL_S: Final = 2.0
BATCH_CONCURRENCY: Final = 4
BRIEF_STRING_CHARS: Final = 40
BRIEF_CHARS: Final = 70
PIPE_WIDTH: Final = 200
MANIFEST: Final = "minifaas.json"
PACK_IGNORED: Final = ("__pycache__", ".git", ".mypy_cache", ".pytest_cache")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130


class CliError(MinifaasError):
    """Raised by CLI commands when a request fails or an argument is unusable; printed, exit status 1."""


CliError.__module__ = "minifaas"


# -- talking to the API --------------------------------------------------------------------------------------
class Api:
    """A thin REST client: paths under the namespace, OpenWhisk error bodies turned into CliError."""

    def __init__(self, client: httpx.AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def path(self, *parts: str) -> str:
        return "/api/v1/namespaces/" + "/".join([self.namespace, *parts])

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        import httpx

        try:
            resp = await self.client.request(method, path, params=params, json=body)
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the server at {self.client.base_url}: {exc} (is `minifaas serve` running? "
                f"set --apihost or {ENV_APIHOST}, or use --local)"
            ) from None
        except httpx.TransportError as exc:
            raise CliError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code not in ok:
            try:
                message = resp.json().get("error", resp.text)
            except (ValueError, AttributeError):
                message = resp.text or resp.reason_phrase
            raise CliError(f"{method} {path} -> {resp.status_code}: {message}")
        return resp

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.call(method, path, **kwargs)).json()


#: the commands --local runs on a read-only engine when another engine (minifaas serve) holds the state dir
READ_COMMANDS: Final[dict[str, frozenset[str]]] = {
    "activation": frozenset({"list", "get", "logs", "result", "poll"}),
    "action": frozenset({"list", "get"}),
    "trigger": frozenset({"list", "get"}),
    "rule": frozenset({"list", "get"}),
    "session": frozenset({"list", "get"}),
}


def _reads_only(args: argparse.Namespace) -> bool:
    return getattr(args, "verb", None) in READ_COMMANDS.get(getattr(args, "command", ""), frozenset())


def _state_dir(args: argparse.Namespace) -> Path:
    given = args.state_dir or os.environ.get(ENV_STATE_DIR)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "minifaas"


def _credentials(args: argparse.Namespace) -> tuple[str, str | None]:
    """The server URL and the credential for it.

    ``~/.wskprops`` gives its AUTH only to its own APIHOST: a key for production must not go to the host that
    ``--apihost`` or $MINIFAAS_APIHOST name. A host without a scheme is https (as ``wsk`` reads it), but for
    loopback, where the dev server speaks plain http. Basic auth over plain http leaves this machine only never.
    """
    given = args.apihost or os.environ.get(ENV_APIHOST)
    auth = args.auth or os.environ.get(ENV_AUTH)
    props = _wskprops()
    props_host = _normalized(props["APIHOST"]) if props.get("APIHOST") else None
    apihost = _normalized(given) if given else props_host or DEFAULT_APIHOST
    if auth is None and props.get("AUTH") and props_host == apihost:
        auth = props["AUTH"]
    if auth and apihost.startswith("http://") and not _is_loopback(apihost):
        raise CliError(
            f"refusing to send credentials over plain http to {apihost}: use https:// "
            "(the dev server's plain http is for 127.0.0.1/localhost only)"
        )
    return apihost, auth


def _normalized(apihost: str) -> str:
    if "://" not in apihost:
        scheme = "http" if _is_loopback(f"http://{apihost}") else "https"
        apihost = f"{scheme}://{apihost}"
    return apihost.rstrip("/")


def _is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _wskprops() -> dict[str, str]:
    """``~/.wskprops`` (or $WSK_CONFIG_FILE), as the ``wsk`` CLI keeps APIHOST and AUTH there."""
    path = Path(os.environ.get("WSK_CONFIG_FILE") or Path.home() / ".wskprops")
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text("utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip()
    return out


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Api]:
    """An :class:`Api` on the server the options name, or on an engine embedded here (``--local``)."""
    import httpx

    if args.local:
        from .._engine import Engine
        from .._errors import StateDirLocked
        from .._server.app import create_app

        async with contextlib.AsyncExitStack() as stack:
            try:
                engine = await stack.enter_async_context(Engine(state_dir=_state_dir(args)))
            except StateDirLocked:
                if not _reads_only(args):
                    raise
                # another engine (a running minifaas serve) holds the dir: reading its records needs no lock
                engine = await stack.enter_async_context(Engine(state_dir=_state_dir(args), read_only=True))
            app = create_app(engine, auth=None, namespace=engine.namespace)
            await app.state.api.restore()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=LOCAL_BASE_URL, timeout=None) as client:
                yield Api(client, "_")
        return
    apihost, auth = _credentials(args)
    user, _, key = (auth or "").partition(":")
    basic = (user, key) if auth else None
    # loading the CA bundle costs a tenth of a second per command: only https needs it
    verify = apihost.startswith("https://")
    async with httpx.AsyncClient(base_url=apihost, auth=basic, timeout=HTTP_TIMEOUT_S, verify=verify) as client:
        yield Api(client, args.namespace)


# -- small helpers -------------------------------------------------------------------------------------------
def _value(text: str) -> Any:
    """``-p key value``: JSON if it parses (numbers, true, objects), else the string, as ``wsk`` does."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(pairs: list[list[str]] | None, files: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in files or ():
        try:
            data = json.loads(Path(name).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read parameter file {name}: {exc}") from None
        if not isinstance(data, dict):
            raise CliError(f"parameter file {name} must hold a JSON object")
        out.update(data)
    for key, value in pairs or ():
        out[key] = _value(value)
    return out


def _kv(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in d.items()]


def _brief(value: Any, limit: int = BRIEF_CHARS) -> str:
    """A one-line view of a result: long strings (base64 images) shown by their length."""

    def shrink(v: Any) -> Any:
        if isinstance(v, str) and len(v) > BRIEF_STRING_CHARS:
            return f"<{len(v)} chars>"
        if isinstance(v, dict):
            return {k: shrink(x) for k, x in v.items()}
        if isinstance(v, list):
            return [shrink(x) for x in v]
        return v

    if isinstance(value, dict) and isinstance(value.get("error"), str):
        text = f"error: {value['error']}"  # the message is the point: never shortened to its length
    else:
        text = json.dumps(shrink(value), separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _annotation(record: dict[str, Any], key: str) -> Any:
    for item in record.get("annotations") or ():
        if item.get("key") == key:
            return item.get("value")
    return None


def _verbatim(text: str) -> Any:
    """A table cell showing ``text`` as it is (no markup, no emoji codes)."""
    from rich.text import Text

    return Text(text)


def _print_json(console: Console, data: Any) -> None:
    console.print_json(json.dumps(data), highlight=console.is_terminal)


def pack_folder(folder: Path) -> bytes:
    """A self-contained zip of a function folder: manifest ``include`` files copied in, ``models`` packed.

    A server cannot see files beside the folder, so what the manifest points to outside it travels in the
    zip: included files at its root, model files under ``_models/`` with the manifest rewritten to match.
    """
    folder = folder.resolve()
    manifest: dict[str, Any] = {}
    mpath = folder / MANIFEST
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except ValueError as exc:
            raise CliError(f"invalid {mpath}: {exc}") from None
    entries: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not set(rel.parts) & set(PACK_IGNORED) and f.suffix != ".pyc" and f.name != MANIFEST:
            entries[rel.as_posix()] = f
    for inc in manifest.get("include", []):
        src = (folder / str(inc)).resolve()
        if src.is_dir():
            for f in sorted(src.rglob("*")):
                rel = f.relative_to(src)
                if f.is_file() and not set(rel.parts) & set(PACK_IGNORED) and f.suffix != ".pyc":
                    entries[f"{src.name}/{rel.as_posix()}"] = f
        elif src.is_file():
            entries[src.name] = src
        else:
            raise CliError(f"{mpath}: included file {inc!r} does not exist")
    models: dict[str, str] = {}
    for param, rel_path in (manifest.get("models") or {}).items():
        src = (folder / str(rel_path)).resolve()
        if not src.is_file():
            raise CliError(f"{mpath}: model file for {param!r} does not exist: {src}")
        arc = f"_models/{src.name}"
        entries[arc] = src
        models[str(param)] = arc
    rest = {k: v for k, v in manifest.items() if k not in ("include", "models")}
    if models:
        rest["models"] = models
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, src in entries.items():
            zf.write(src, arc)
        if rest:
            zf.writestr(MANIFEST, json.dumps(rest, indent=1))
    return buf.getvalue()


def _exec_from_path(path: Path, kind: str, main: str | None) -> dict[str, Any]:
    if path.is_dir():
        code, binary = base64.b64encode(pack_folder(path)).decode("ascii"), True
    elif path.suffix == ".zip":
        code, binary = base64.b64encode(path.read_bytes()).decode("ascii"), True
    elif path.is_file():
        code, binary = path.read_text("utf-8"), False
    else:
        raise CliError(f"{path}: no such file or folder")
    exec_: dict[str, Any] = {"kind": kind, "code": code, "binary": binary}
    if main:
        exec_["main"] = main
    return exec_


# -- commands ------------------------------------------------------------------------------------------------
Command = Callable[[Api, argparse.Namespace, "Console"], Awaitable[int]]


def _action_body(args: argparse.Namespace, *, need_path: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.path is not None:
        body["exec"] = _exec_from_path(Path(args.path).expanduser(), args.kind, args.main)
    elif need_path:
        raise CliError("give the action's code: a .py file, a folder with __main__.py, or a .zip")
    if args.param or args.param_file:
        body["parameters"] = _kv(_pairs(args.param, args.param_file))
    annotations = _pairs(args.annotation) if args.annotation else {}
    if args.path is not None:
        # the server deploys what it was sent from a temporary file: this says, in its UI, where it came from
        annotations.setdefault(ORIGIN_ANNOTATION, str(Path(args.path).expanduser().resolve()))
    if annotations:
        body["annotations"] = _kv(annotations)
    limits = {
        "timeout": args.timeout,
        "memory": args.memory,
        "concurrency": args.concurrency,
        "logs": args.logsize,
        "instances": args.instances,
        "payload": args.payload_limit,
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        body["limits"] = limits
    return body


async def cmd_action_put(api: Api, args: argparse.Namespace, console: Console) -> int:
    create, update = args.verb == "create", args.verb == "update"
    body = _action_body(args, need_path=not update)
    overwrite = "false" if create else "true"
    if args.verb == "deploy" or update:
        overwrite = "true"
    action = await api.json("PUT", api.path("actions", args.name), params={"overwrite": overwrite}, body=body)
    verb = "created" if create else "updated" if update else "deployed"
    console.print(f"[green]ok:[/] {verb} action [bold]{action['name']}[/] (version {action['version']})")
    return EXIT_OK


async def cmd_action_get(api: Api, args: argparse.Namespace, console: Console) -> int:
    action = await api.json("GET", api.path("actions", args.name), params={"code": str(args.code).lower()})
    _print_json(console, action)
    return EXIT_OK


async def cmd_action_delete(api: Api, args: argparse.Namespace, console: Console) -> int:
    await api.call("DELETE", api.path("actions", args.name))
    console.print(f"[green]ok:[/] deleted action [bold]{args.name}[/]")
    return EXIT_OK


async def cmd_action_list(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    actions = await api.json("GET", api.path("actions"), params={"limit": args.limit, "skip": args.skip})
    if args.json:
        _print_json(console, actions)
        return EXIT_OK
    table = Table("name", "version", "kind", "timeout", "memory", "concurrency", "updated", title="actions")
    for a in actions:
        lim = a.get("limits", {})
        table.add_row(
            a["name"],
            a["version"],
            a["exec"]["kind"],
            f"{lim.get('timeout')} ms",
            f"{lim.get('memory')} MB",
            str(lim.get("concurrency")),
            _when(a.get("updated")),
        )
    console.print(table)
    return EXIT_OK


async def _wait_record(api: Api, activation_id: str, timeout_s: float = WAIT_MAX_S) -> dict[str, Any]:
    """The ended record of an activation (the server answers 404 until it has ended)."""
    deadline = time.monotonic() + timeout_s
    import anyio

    while True:
        resp = await api.call("GET", api.path("activations", activation_id), ok=(200, 404))
        if resp.status_code == 200:
            record: dict[str, Any] = resp.json()
            return record
        if time.monotonic() > deadline:
            raise CliError(f"activation {activation_id} has not ended after {timeout_s:g} s")
        await anyio.sleep(WAIT_POLL_S)


async def cmd_invoke(api: Api, args: argparse.Namespace, console: Console) -> int:
    payload = _pairs(args.param, args.param_file)
    blocking = args.blocking or args.result
    params = {"blocking": str(blocking).lower(), "result": str(args.result).lower()}
    resp = await api.call("POST", api.path("actions", args.name), params=params, body=payload, ok=(200, 202, 500, 502))
    if not blocking:
        act_id = resp.json()["activationId"]
        console.print(f"[green]ok:[/] invoked /{api.namespace}/{args.name} with id {act_id}")
        return EXIT_OK
    if resp.status_code == 202:  # the server stopped waiting: follow the record
        record = await _wait_record(api, resp.json()["activationId"])
        success = bool(record["response"]["success"])
        data: Any = record["response"]["result"] if args.result else record
    else:
        success = resp.status_code == 200
        data = resp.json()
    _print_json(console, data)
    return EXIT_OK if success else EXIT_FAILED


async def _resolve_id(api: Api, args: argparse.Namespace) -> str:
    if args.id and not args.last:
        return str(args.id)
    acts = await api.json("GET", api.path("activations"), params={"limit": 1})
    if not acts:
        raise CliError("there are no activations yet")
    return str(acts[0]["activationId"])


async def cmd_activation_list(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    params: dict[str, Any] = {"limit": args.limit, "skip": args.skip, "docs": str(args.full).lower()}
    for key in ("name", "since", "upto"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    acts = await api.json("GET", api.path("activations"), params=params)
    if args.json:
        _print_json(console, acts)
        return EXIT_OK
    table = Table("datetime", "activation id", "start", "duration", "status", "entity", title="activations")
    for a in acts:
        code = a.get("statusCode", a.get("response", {}).get("statusCode"))
        status = {
            0: "[green]success[/]",
            1: "[yellow]application error[/]",
            2: "[red]developer error[/]",
            3: "[red]internal error[/]",
        }.get(code, str(code))
        start = "cold" if _annotation(a, "initTime") is not None else "warm"
        table.add_row(
            _when(a.get("start")),
            a["activationId"],
            start,
            f"{a.get('duration', 0)} ms",
            status,
            f"{a['name']}:{a.get('version', '')}",
        )
    console.print(table)
    return EXIT_OK


async def cmd_activation_get(api: Api, args: argparse.Namespace, console: Console) -> int:
    record = await api.json("GET", api.path("activations", await _resolve_id(api, args)))
    _print_json(console, record)
    return EXIT_OK


async def cmd_activation_logs(api: Api, args: argparse.Namespace, console: Console) -> int:
    logs = (await api.json("GET", api.path("activations", await _resolve_id(api, args), "logs")))["logs"]
    for line in logs:
        if args.strip:
            # "<ISO time> stdout: text" -> "text", like `wsk activation logs --strip`
            parts = line.split(" ", 2)
            line = parts[2] if len(parts) == 3 and parts[1] in ("stdout:", "stderr:") else line
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


async def cmd_activation_result(api: Api, args: argparse.Namespace, console: Console) -> int:
    response = await api.json("GET", api.path("activations", await _resolve_id(api, args), "result"))
    _print_json(console, response.get("result", response))
    return EXIT_OK if response.get("success", True) else EXIT_FAILED


async def cmd_activation_poll(api: Api, args: argparse.Namespace, console: Console) -> int:
    import anyio

    seen: set[str] = set()
    since = int(time.time() * 1000) - int(args.since_s * 1000)
    deadline = None if args.exit is None else time.monotonic() + args.exit
    console.print("[dim]polling for activation logs (Ctrl-C to stop)[/]")
    while deadline is None or time.monotonic() < deadline:
        params: dict[str, Any] = {"docs": "true", "since": since, "limit": 200}
        if args.name:
            params["name"] = args.name
        acts = await api.json("GET", api.path("activations"), params=params)
        for a in sorted(acts, key=lambda r: r.get("start", 0)):
            if a["activationId"] in seen:
                continue
            seen.add(a["activationId"])
            status = a["response"]["status"]
            console.print(f"\n[bold]Activation:[/] '{a['name']}' ({a['activationId']}) {status}")
            for line in a.get("logs", []):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
        left = args.interval if deadline is None else deadline - time.monotonic()
        await anyio.sleep(max(0.0, min(args.interval, left)))
    return EXIT_OK


async def cmd_trigger(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    verb = args.verb
    if verb == "create":
        body: dict[str, Any] = {"parameters": _kv(_pairs(args.param, args.param_file))}
        if args.annotation:
            body["annotations"] = _kv(_pairs(args.annotation))
        if args.rate is not None:
            body["limits"] = {"rate_per_minute": args.rate or None}
        await api.call("PUT", api.path("triggers", args.name), params={"overwrite": "false"}, body=body)
        console.print(f"[green]ok:[/] created trigger [bold]{args.name}[/]")
    elif verb == "fire":
        resp = await api.call(
            "POST", api.path("triggers", args.name), body=_pairs(args.param, args.param_file), ok=(202, 204)
        )
        if resp.status_code == 204:
            console.print(f"[yellow]ok:[/] fired trigger {args.name}: no active rule, nothing invoked")
        else:
            data = resp.json()
            ids = ", ".join(data.get("activationIds", []))
            console.print(f"[green]ok:[/] fired trigger {args.name} with id {data.get('activationId')}: {ids}")
    elif verb == "get":
        _print_json(console, await api.json("GET", api.path("triggers", args.name)))
    elif verb == "delete":
        await api.call("DELETE", api.path("triggers", args.name))
        console.print(f"[green]ok:[/] deleted trigger [bold]{args.name}[/]")
    else:
        triggers = await api.json("GET", api.path("triggers"), params={"limit": args.limit})
        if args.json:
            _print_json(console, triggers)
            return EXIT_OK
        table = Table("name", "parameters", "rules", title="triggers")
        for t in triggers:
            params = {p["key"]: p["value"] for p in t.get("parameters", [])}
            rules = ", ".join(f"{k.split('/')[-1]} ({v['status']})" for k, v in (t.get("rules") or {}).items())
            table.add_row(t["name"], _verbatim(_brief(params)), rules or "-")
        console.print(table)
    return EXIT_OK


async def cmd_rule(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    verb = args.verb
    if verb == "create":
        body = {
            "trigger": args.trigger,
            "action": args.action,
            "status": "inactive" if args.disabled else "active",
        }
        await api.call("PUT", api.path("rules", args.name), params={"overwrite": "false"}, body=body)
        console.print(f"[green]ok:[/] created rule [bold]{args.name}[/]: {args.trigger} -> {args.action}")
    elif verb in ("enable", "disable"):
        status = "active" if verb == "enable" else "inactive"
        await api.call("POST", api.path("rules", args.name), body={"status": status})
        console.print(f"[green]ok:[/] rule [bold]{args.name}[/] is {status}")
    elif verb == "get":
        _print_json(console, await api.json("GET", api.path("rules", args.name)))
    elif verb == "delete":
        await api.call("DELETE", api.path("rules", args.name))
        console.print(f"[green]ok:[/] deleted rule [bold]{args.name}[/]")
    else:
        rules = await api.json("GET", api.path("rules"), params={"limit": args.limit})
        if args.json:
            _print_json(console, rules)
            return EXIT_OK
        table = Table("name", "trigger", "action", "status", title="rules")
        for r in rules:
            table.add_row(r["name"], r["trigger"]["name"], r["action"]["name"], r["status"])
        console.print(table)
    return EXIT_OK


async def cmd_session(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    if args.verb == "get":
        _print_json(console, await api.json("GET", api.path("sessions", args.id)))
        return EXIT_OK
    params: dict[str, Any] = {"limit": args.limit}
    if args.name:
        params["name"] = args.name
    sessions = await api.json("GET", api.path("sessions"), params=params)
    if args.json:
        _print_json(console, sessions)
        return EXIT_OK
    table = Table("datetime", "session id", "composition", "steps", "duration", "status", title="sessions")
    for s in sessions:
        table.add_row(
            _when(s.get("start")),
            s["session_id"],
            s.get("name", ""),
            str(len(s.get("steps", []))),
            f"{s.get('duration') or 0} ms",
            s.get("status", ""),
        )
    console.print(table)
    return EXIT_OK


@dataclasses.dataclass(slots=True)
class _BatchRow:
    file: str
    status: str = "pending"
    duration_ms: int = 0
    start: str = "-"
    result: Any = None
    activation_id: str = ""


async def cmd_invoke_batch(api: Api, args: argparse.Namespace, console: Console) -> int:
    import anyio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise CliError(f"{folder}: not a folder")
    files = sorted(f for f in folder.glob(args.pattern) if f.is_file() and not f.name.startswith("."))
    if not files:
        raise CliError(f"{folder}: no files match {args.pattern!r}")
    extra = _pairs(args.param, args.param_file)
    rows = [_BatchRow(f.name) for f in files]
    limiter = anyio.Semaphore(max(1, args.concurrency))
    t0 = time.perf_counter()

    def payload(f: Path) -> dict[str, Any]:
        if args.send == "path":
            value = str(f.resolve())
        else:
            mime = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            value = f"data:{mime};base64,{base64.b64encode(f.read_bytes()).decode('ascii')}"
        return {**extra, args.param_name: value}

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # stdout is for the table (or the JSON)
        transient=False,
    ) as progress:
        task = progress.add_task(f"{args.name} over {folder.name}", total=len(files))

        async def one(f: Path, row: _BatchRow) -> None:
            async with limiter:
                try:
                    resp = await api.call(
                        "POST",
                        api.path("actions", args.name),
                        params={"blocking": "true"},
                        body=payload(f),
                        ok=(200, 202, 500, 502),
                    )
                    record = resp.json()
                    if resp.status_code == 202:
                        record = await _wait_record(api, record["activationId"])
                    row.activation_id = record["activationId"]
                    row.status = record["response"]["status"]
                    row.duration_ms = int(record.get("duration") or 0)
                    row.start = "cold" if _annotation(record, "initTime") is not None else "warm"
                    row.result = record["response"]["result"]
                except (CliError, OSError, KeyError, ValueError) as exc:
                    row.status, row.result = "failed", {"error": str(exc)}
                progress.advance(task)

        async with anyio.create_task_group() as tg:
            for f, row in zip(files, rows, strict=True):
                tg.start_soon(one, f, row)
    wall = time.perf_counter() - t0
    if args.json:
        _print_json(console, [dataclasses.asdict(r) for r in rows])
    else:
        table = Table("file", "status", "start", "duration", "result", title=f"{args.name}: {len(rows)} files")
        for r in rows:
            color = "green" if r.status == "success" else "red"
            table.add_row(
                _verbatim(r.file),
                f"[{color}]{r.status}[/]",
                r.start,
                f"{r.duration_ms} ms",
                _verbatim(_brief(r.result)),
            )
        console.print(table)
    ok = sum(1 for r in rows if r.status == "success")
    durations = sorted(r.duration_ms for r in rows if r.status == "success")
    median = durations[len(durations) // 2] if durations else 0
    (Console(stderr=True) if args.json else console).print(
        f"{ok}/{len(rows)} succeeded in {wall:.2f} s ({len(rows) / wall:.1f} files/s, "
        f"median duration {median} ms, cold starts {sum(1 for r in rows if r.start == 'cold')})"
    )
    return EXIT_OK if ok == len(rows) else EXIT_FAILED


# -- commands that do not talk to a server -------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from .._engine import Engine
    from .._server.app import new_auth

    state_dir = args.state_dir or os.environ.get(ENV_STATE_DIR)
    auth = args.auth or os.environ.get(ENV_AUTH)
    auth_file: Path | None = None
    if not auth and state_dir:
        from .._server.auth import stored_auth

        auth, auth_file = stored_auth(state_dir, new_auth())
    auth = auth or new_auth()
    from .._deploy.fetchguard import check_allow_list

    isolation: Literal["process", "sandbox"] = "process" if args.unconfined else "sandbox"
    if isolation == "sandbox":
        from .._deploy.isolation import require_sandbox
        from .._errors import DeployError

        try:
            require_sandbox()
        except DeployError as exc:
            # code that comes over HTTP never runs unconfined unless asked for in so many words
            raise CliError(f"{exc}; start with --unconfined to serve anyway") from None

    try:
        allow = check_allow_list(args.model_url_allow)
    except ValueError as exc:
        raise CliError(str(exc)) from None

    async def run() -> None:
        async with Engine(
            state_dir=state_dir, namespace=args.server_namespace, isolation=isolation, model_url_allow=allow
        ) as engine:
            await _serve_until_signal(engine, args.host, args.port, auth, console, state_dir, auth_file)

    _run_server(run, args.host, args.port)
    return EXIT_OK


async def _serve_until_signal(
    engine: Engine, host: str, port: int, auth: str, console: Console, state_dir: str | None, auth_file: Path | None
) -> None:
    """Serve ``engine`` until SIGINT or SIGTERM (a second one does not wait for requests in flight)."""
    import signal

    import anyio
    import anyio.abc

    from .._server.app import ServerHandle, serve

    async with anyio.create_task_group() as tg:

        async def serving(*, task_status: anyio.abc.TaskStatus[ServerHandle]) -> None:
            await serve(engine, host, port, auth, task_status=task_status)
            tg.cancel_scope.cancel()  # stopped: end the signal watcher too

        handle: ServerHandle = await tg.start(serving)
        # listening before the banner: a client that stops the server as soon as it has read the banner
        # must not hit Python's default SIGINT handler
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            _banner(console, handle, state_dir, auth_file, isolation=str(getattr(engine, "isolation", "process")))
            async for _ in signals:
                if handle.stopping:
                    tg.cancel_scope.cancel()  # a second signal: do not wait for requests in flight
                    break
                console.print("[dim]stopping (finishing requests in flight)...[/]")
                handle.stop()


def _run_server(run: Callable[[], Awaitable[Any]], host: str, port: int) -> None:
    import anyio

    failures: list[OSError] = []
    try:
        anyio.run(run)
    except* OSError as group:  # the port is taken, the state dir unwritable...
        from .._engine import _leaves

        # ``except*`` keeps the groups' nesting (the server's task group inside the engine's): take the leaves
        failures += [e for e in _leaves(group) if isinstance(e, OSError)]
    if failures:
        raise CliError(f"cannot serve on {host}:{port}: {failures[0]}")


def cmd_gc(args: argparse.Namespace, console: Console) -> int:
    """Collect the state dir: leftovers of killed builds and downloads, unused things over the budget."""
    import anyio

    from .._engine import Engine
    from .._server.app import create_app

    async def run() -> dict[str, Any]:
        async with Engine(state_dir=_state_dir(args), launcher="spawn", preload=()) as engine:
            # the actions a server keeps here are deployed first: what they use is in use (on a detached alias
            # table: these deploys must not use up version numbers)
            engine._aliases = engine._aliases.detached()
            app = create_app(engine, auth=None, namespace=engine.namespace)
            await app.state.api.restore()
            budget = None if args.budget_mb is None else int(args.budget_mb * (1 << 20))
            return await engine.gc(budget)

    report = anyio.run(run)
    if args.json:
        console.print_json(data=report)
    else:
        for path in report["removed"]:
            console.print(f"removed {path}", soft_wrap=True)
        console.print(
            f"freed {report['freed_bytes'] / (1 << 20):.1f} MiB; {report['kept_bytes'] / (1 << 20):.1f} MiB kept "
            f"(budget {report['budget_bytes'] / (1 << 20):.0f} MiB)"
        )
    return EXIT_OK


def _banner(
    console: Console, handle: Any, state_dir: str | None, auth_file: Path | None = None, isolation: str = "process"
) -> None:
    console.print(
        f"[bold green]minifaas[/] serving the OpenWhisk API at [bold]{handle.url}[/] "
        f"(state: {state_dir or 'in memory'})"
    )
    if isolation == "sandbox":
        console.print("isolation: sandbox (own namespaces, unprivileged uid, read-only root, seccomp)")
    else:
        console.print(
            "[bold red]isolation: UNCONFINED[/]: deployed code runs as this user, with its files, processes and "
            "network (`minifaas serve` sandboxes it unless started with --unconfined)"
        )
    user, _, key = handle.auth.partition(":")
    console.print(f"web UI: {handle.url}/ui/   metrics: {handle.url}/metrics")
    print(f"log in with user {user} and password {key} (HTTP basic auth), or open:", flush=True)
    scheme, _, host = handle.url.partition("://")
    print(f"{scheme}://{user}:{key}@{host}/ui/", flush=True)
    if auth_file is not None:
        console.print(f"[dim]the key is kept in {auth_file}: it stays the same across restarts[/]", soft_wrap=True)
    # plain prints: a terminal-width wrap would break these copy-and-paste lines
    print(f"export {ENV_APIHOST}={handle.url} {ENV_AUTH}={handle.auth}", flush=True)
    print(f"wsk property set --apihost {handle.url} --auth {handle.auth}", flush=True)


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    import anyio

    try:
        from .demo import run_demo  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "minifaas._cli.demo":
            raise
        console.print("[red]error:[/] the demo is not part of this build")
        return EXIT_FAILED
    workdir = Path(args.workdir).expanduser() if args.workdir else Path(tempfile.mkdtemp(prefix="minifaas-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.serve:
        code: int = anyio.run(run_demo, workdir, console)
        return code
    from .._server.app import new_auth

    auth = args.auth or os.environ.get(ENV_AUTH) or new_auth()
    outcome: list[int] = []

    async def keep_serving(engine: Engine) -> None:
        console.rule("[bold]dev server")
        console.print(
            "The demo's engine stays up: its functions, activations and sessions are in the web UI below, and "
            "photos dropped into uploads/ still go through the workflow. Ctrl-C stops it."
        )
        await _serve_until_signal(engine, args.host, args.port, auth, console, None, None)

    async def run() -> None:
        outcome.append(await run_demo(workdir, console, keep=keep_serving))

    _run_server(run, args.host, args.port)
    return outcome[0] if outcome else EXIT_FAILED


# -- argument parsing ----------------------------------------------------------------------------------------
def _common(suppress: bool) -> argparse.ArgumentParser:
    """Connection options, accepted before and after the verb (after it, they override)."""
    d: Any = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--apihost", default=d, help=f"server URL (env {ENV_APIHOST}, ~/.wskprops; {DEFAULT_APIHOST})")
    g.add_argument("--auth", "-u", default=d, help=f"uuid:key printed by `minifaas serve` (env {ENV_AUTH})")
    g.add_argument("--namespace", default=argparse.SUPPRESS if suppress else "_", help="namespace (default: _)")
    g.add_argument(
        "--local",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="run an embedded engine instead of talking to a server",
    )
    g.add_argument("--state-dir", default=d, help=f"state folder of --local and serve (env {ENV_STATE_DIR})")
    g.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print lists as JSON",
    )
    return p


def _params(p: argparse.ArgumentParser, *, files: bool = True) -> None:
    p.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="parameter (VALUE is parsed as JSON when it can be)",
    )
    if files:
        p.add_argument("-P", "--param-file", action="append", metavar="FILE", help="JSON file of parameters")
    else:
        p.set_defaults(param_file=None)


def _action_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="python:3", help="python:3 (default), python:3.11 or python:default")
    p.add_argument("--main", help="entry function (default: main)")
    _params(p)
    p.add_argument("-a", "--annotation", nargs=2, action="append", metavar=("KEY", "VALUE"))
    p.add_argument("-t", "--timeout", type=int, metavar="MS", help="time limit in milliseconds")
    p.add_argument("-m", "--memory", type=int, metavar="MB", help="memory limit in MB")
    p.add_argument("-c", "--concurrency", type=int, help="activations one sandbox runs at once")
    p.add_argument("-l", "--logsize", type=int, metavar="MB", help="log limit in MB")
    p.add_argument("--instances", type=int, help="most sandboxes of this action at once")
    p.add_argument("--payload-limit", type=int, metavar="BYTES", help="largest accepted parameters")


def _id_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", nargs="?", help="activation id")
    p.add_argument("--last", action="store_true", help="the most recent activation")


def _version() -> str:
    from .. import __version__

    # where it is installed and on which Python: the first thing to ask when two installs disagree
    where = Path(__file__).resolve().parent.parent
    return f"minifaas {__version__} ({where}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog="minifaas",
        parents=[_common(suppress=False)],
        description="minifaas: a lightweight FaaS for Python AI functions, with an OpenWhisk-compatible dev server.",
    )
    parser.add_argument("--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(sub: Any, name: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, parents=[common], **kw)
        return p

    p = verbs.add_parser("serve", help="run the dev server (OpenWhisk REST API, web UI, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=3233, help="port (default 3233, as OpenWhisk standalone; 0: any)")
    p.add_argument("--state-dir", help=f"keep activations, bundles and actions here (env {ENV_STATE_DIR})")
    p.add_argument(
        "--auth", "-u", help="uuid:key to accept (default: the one kept in the state dir, else a fresh one; printed)"
    )
    p.add_argument("--namespace", dest="server_namespace", default="guest", help="namespace (default guest)")
    p.add_argument(
        "--unconfined",
        action="store_true",
        help="run deployed code as plain processes (isolation='process'), not sandboxed: only for trusted code",
    )
    p.add_argument(
        "--model-url-allow",
        action="append",
        metavar="ORIGIN",
        help="fetch model URLs for deployed code from this origin only (scheme://host[:port], *.domain allowed; "
        "repeat for more); a listed origin may be loopback or private",
    )
    p.set_defaults(run=cmd_serve)

    p = verb(verbs, "deploy", "create or update an action from a .py file, a folder or a .zip")
    p.add_argument("name")
    p.add_argument("path")
    _action_options(p)
    p.set_defaults(call=cmd_action_put, verb="deploy")

    action = verbs.add_parser("action", help="create, update, get, list or delete actions")
    av = action.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in ("create", "update"):
        p = verb(av, name, f"{name} an action")
        p.add_argument("name")
        p.add_argument("path", nargs="?" if name == "update" else None)
        _action_options(p)
        p.set_defaults(call=cmd_action_put)
    p = verb(av, "get", "show an action")
    p.add_argument("name")
    p.add_argument("--code", action=argparse.BooleanOptionalAction, default=False, help="include the code")
    p.set_defaults(call=cmd_action_get)
    p = verb(av, "delete", "delete an action")
    p.add_argument("name")
    p.set_defaults(call=cmd_action_delete)
    p = verb(av, "list", "list actions")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--skip", type=int, default=0)
    p.set_defaults(call=cmd_action_list)

    p = verb(verbs, "invoke", "invoke an action")
    p.add_argument("name")
    _params(p)
    p.add_argument("-b", "--blocking", action="store_true", help="wait for the activation record")
    p.add_argument("-r", "--result", action="store_true", help="wait and print only the result")
    p.set_defaults(call=cmd_invoke)

    p = verb(verbs, "invoke-batch", "invoke an action once per file of a folder")
    p.add_argument("name")
    p.add_argument("folder")
    p.add_argument("--param-name", default="image", help="parameter that receives each file (default image)")
    p.add_argument(
        "--send",
        choices=("data", "path"),
        default="data",
        help="send each file as a base64 data: URL (default) or its path (read only by a function granted the folder)",
    )
    p.add_argument("--pattern", default="*", help="glob of files to take (default *)")
    p.add_argument("--concurrency", type=int, default=BATCH_CONCURRENCY, help="requests in flight")
    _params(p)
    p.set_defaults(call=cmd_invoke_batch)

    act = verbs.add_parser("activation", help="list activations, show records, logs and results")
    acv = act.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verb(acv, "list", "list recent activations")
    p.add_argument("name", nargs="?")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--since", type=int, metavar="EPOCH_MS")
    p.add_argument("--upto", type=int, metavar="EPOCH_MS")
    p.add_argument("--full", action="store_true", help="whole records (with logs and results)")
    p.set_defaults(call=cmd_activation_list)
    for name, fn, help_text in (
        ("get", cmd_activation_get, "show an activation record"),
        ("logs", cmd_activation_logs, "show an activation's logs"),
        ("result", cmd_activation_result, "show an activation's result"),
    ):
        p = verb(acv, name, help_text)
        _id_options(p)
        if name == "logs":
            p.add_argument("--strip", action="store_true", help="without time stamps and stream names")
        p.set_defaults(call=fn)
    p = verb(acv, "poll", "print activations and their logs as they end")
    p.add_argument("name", nargs="?")
    p.add_argument("--interval", type=float, default=ACTIVATION_POLL_S, help="seconds between polls")
    p.add_argument("--since-s", type=float, default=0.0, help="also show those that ended this long ago")
    p.add_argument("--exit", type=float, metavar="SECONDS", help="stop after this long")
    p.set_defaults(call=cmd_activation_poll)

    trig = verbs.add_parser("trigger", help="create, fire, get, list or delete triggers")
    tv = trig.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verb(tv, "create", "create a trigger")
    p.add_argument("name")
    _params(p)
    p.add_argument("-a", "--annotation", nargs=2, action="append", metavar=("KEY", "VALUE"))
    p.add_argument("--rate", type=int, metavar="PER_MINUTE", help="fire rate limit (0: none; default 60)")
    p = verb(tv, "fire", "fire a trigger")
    p.add_argument("name")
    _params(p)
    for name in ("get", "delete"):
        p = verb(tv, name, f"{name} a trigger")
        p.add_argument("name")
    p = verb(tv, "list", "list triggers")
    p.add_argument("--limit", type=int, default=30)
    tv_choices: dict[str, argparse.ArgumentParser] = tv.choices
    for p in tv_choices.values():
        p.set_defaults(call=cmd_trigger)

    rule = verbs.add_parser("rule", help="create, enable, disable, get, list or delete rules")
    rv = rule.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verb(rv, "create", "create a rule: fire ACTION when TRIGGER fires")
    p.add_argument("name")
    p.add_argument("trigger")
    p.add_argument("action")
    p.add_argument("--disabled", action="store_true", help="create it inactive")
    for name in ("enable", "disable", "get", "delete"):
        p = verb(rv, name, f"{name} a rule")
        p.add_argument("name")
    p = verb(rv, "list", "list rules")
    p.add_argument("--limit", type=int, default=30)
    rv_choices: dict[str, argparse.ArgumentParser] = rv.choices
    for p in rv_choices.values():
        p.set_defaults(call=cmd_rule)

    sess = verbs.add_parser("session", help="list and show composition sessions")
    sv = sess.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verb(sv, "list", "list recent sessions")
    p.add_argument("name", nargs="?")
    p.add_argument("--limit", type=int, default=30)
    p.set_defaults(call=cmd_session)
    p = verb(sv, "get", "show a session with its steps")
    p.add_argument("id")
    p.set_defaults(call=cmd_session)

    from .compositions import add_parser as add_composition_parser

    add_composition_parser(verbs, verb)

    p = verb(verbs, "gc", "remove leftovers and unused bundles, environments and models of the state dir")
    p.add_argument("--budget-mb", type=float, help="keep unused things up to this many MiB (default 10 GiB)")
    p.set_defaults(run=cmd_gc)

    p = verbs.add_parser("demo", help="deploy the sample AI functions and run them on sample photos")
    p.add_argument("--workdir", help="folder for the demo's files (default: a new temporary folder)")
    p.add_argument("--serve", action="store_true", help="afterwards, keep a dev server up on the demo's engine")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3233, help="with --serve: port (default 3233; 0: any)")
    p.add_argument("--auth", "-u", help="with --serve: uuid:key to accept (default: a fresh one, printed)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minifaas`` console script."""
    from rich.console import Console
    from rich.markup import escape

    args = build_parser().parse_args(argv)
    # piped output is not cut to 80 columns: ids and JSON lines stay whole for grep and scripts
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    # user text (names, logs, results, server messages) is printed verbatim: no :emoji: codes anywhere, and
    # markup only in the CLI's own message templates, with user values escaped
    console = Console(highlight=False, width=width, emoji=False)
    errors = Console(stderr=True, highlight=False, width=width, emoji=False)
    try:
        run = getattr(args, "run", None)
        if run is not None:
            code: int = run(args, console)
            return code
        return _run_call(args, console)
    except CliError as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_FAILED
    except MinifaasError as exc:
        errors.print(f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run_call(args: argparse.Namespace, console: Console) -> int:
    import anyio

    command: Command = args.call

    async def run() -> int:
        async with connect(args) as api:
            return await command(api, args, console)

    code: int = anyio.run(run)
    return code


if __name__ == "__main__":
    sys.exit(main())
