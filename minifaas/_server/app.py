"""The dev server: a subset of OpenWhisk's REST API over an Engine, so OpenWhisk clients work unchanged.

``create_app(engine, auth=...)`` builds the Starlette app; ``serve(engine, ...)`` runs it with uvicorn inside
the engine's event loop. Routes (prefix ``/api/v1``, HTTP basic auth with OpenWhisk's ``uuid:key``)::

    GET  /namespaces
    GET|PUT|DELETE|POST  /namespaces/{ns}/actions[/{name}]        create/update, get, list, delete, invoke
    GET  /namespaces/{ns}/activations[/{id}[/logs|/result]]
    GET|PUT|DELETE|POST  /namespaces/{ns}/triggers[/{name}]       (POST fires: also the HTTP webhook feed)
    GET|PUT|DELETE|POST  /namespaces/{ns}/rules[/{name}]          (POST {status: active|inactive})
    GET  /namespaces/{ns}/sessions[/{id}]                         (minifaas: composition sessions)
    GET|PUT|DELETE|POST  /namespaces/{ns}/compositions[/{name}]   (minifaas: compositions from JSON, compositions.py)
    GET  /metrics   (Prometheus)      GET /ping   (no auth)

Action ``limits`` take OpenWhisk's ``timeout`` (ms), ``memory`` (MB), ``logs`` (MB), ``concurrency`` and
``instances`` (most sandboxes), plus minifaas's ``payload`` and ``result`` (bytes), ``queue`` (waiting
invocations) and ``idle`` (keep-alive, ms). Errors have OpenWhisk's body ``{"error": message, "code": id}``.
Results holding bytes are sent as base64 strings. With ``engine.state_dir`` set, actions created over the API
are kept under ``state_dir/server/actions`` and deployed again when a server starts on that state dir.

Writes from another origin and non-JSON bodies are refused (``_httpguard``); bodies are capped while they stream
in (an invoke at its action's payload limit); connections must send their request head in time and are capped
from the fd limit (``_connguard``). Shutdown is one rule: the HTTP server stops first (waiting blocking
invocations answer 202 with their id at once, other requests get ``SHUTDOWN_GRACE_S``), then the engine drains
running activations within its ``close_timeout_s``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hmac
import importlib
import json
import logging
import math
import secrets
import socket
import string
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .._core.activation import Activation, summarize_value
from .._core.function import MAX_PAYLOAD_BYTES
from .._core.statedir import PRIVATE_DIR_MODE, write_private
from .._errors import (
    ActivationNotFound,
    CompositionError,
    DeployError,
    EngineClosed,
    FunctionNotFound,
    InvalidPayload,
    MinifaasError,
    Overloaded,
    PayloadTooLarge,
    TriggerError,
)
from .catalog import AlarmFeeds, install_catalog
from .entity_versions import VERSIONS_FILE, EntityVersions
from .httpguard import write_refusal
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .names import SYSTEM_NS, BadName, engine_name, entity_path
from .packages import PACKAGES_SUBDIR, PackageRoutes, PackageStore
from .sequences import SEQUENCE_KIND, components_of, parse_components, sequence_json

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ("ApiError", "ServerHandle", "create_app", "new_auth", "serve")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3233
API_PREFIX: Final = "/api/v1"
#: OpenWhisk's cap on a blocking invocation's wait; a longer run answers 202 with its id
BLOCKING_WAIT_MAX_S: Final = 60.0
#: added to the action's timeout when waiting, for queueing and cold start (OpenWhisk's blocking grace)
BLOCKING_GRACE_S: Final = 5.0
#: request bodies above this are refused at once (an action's code may be 48 MiB, base64 makes it 64)
MAX_REQUEST_BYTES: Final = 72 << 20
#: bodies of trigger and rule writes and of trigger fires (an action's invoke body is capped at its payload limit)
MAX_SMALL_BODY_BYTES: Final = 1 << 20
#: request body bytes held by all requests together (a few action uploads at once, not hundreds)
MAX_BODY_BYTES_IN_FLIGHT: Final = 256 << 20
LIST_LIMIT_DEFAULT: Final = 30
LIST_LIMIT_MAX: Final = 200
#: integer query parameters (skip, since, upto) fit SQLite's signed 64-bit integers
QUERY_INT_MAX: Final = (1 << 63) - 1
SUPPORTED_KINDS: Final = ("python:3", "python:3.11", "python:default")
DEFAULT_KIND: Final = "python:3"
#: a trigger's fires per minute when its PUT names none (the trigger manager's default)
TRIGGER_RATE_DEFAULT: Final = 60
#: ``exec.kind`` of a composition (deployed with the composer, run by the conductor) in the actions API
COMPOSITION_KIND: Final = "composition"
AUTH_KEY_CHARS: Final = 64
SHUTDOWN_GRACE_S: Final = 5
STARTUP_POLL_S: Final = 0.005
ACTIONS_SUBDIR: Final = "server/actions"
LOG_LIMIT_UNIT_BYTES: Final = 1 << 20  # OpenWhisk's ``limits.logs`` is in MB
NOT_FOUND: Final = "The requested resource does not exist."
ZIP_MAGIC: Final = b"PK\x03\x04"
#: what an action created with empty ``exec.code`` runs: its init fails with OpenWhisk's message
EMPTY_CODE: Final = "raise ImportError('Missing main/no code to execute.')\n\n\ndef main(args):\n    return args\n"
WS_POLICY_VIOLATION: Final = 1008
INTERNAL_ERROR_MESSAGE: Final = "The server met an internal error; its log names it by the code below."
#: nginx's status for a request whose client went away (never read by anyone, but logged by proxies)
CLIENT_CLOSED_STATUS: Final = 499
#: the action annotation in which the minifaas CLI names the file or folder an action was created from
ORIGIN_ANNOTATION: Final = "origin"
AUTH_MISSING: Final = "The resource requires authentication, which was not supplied with the request."
AUTH_INVALID: Final = "The supplied authentication is invalid."
#: a 401 says how to get in: the newcomer holding a uuid:key does not know which half is the user
AUTH_HOW: Final = (
    "Use HTTP basic auth with the uuid:key that `minifaas serve` printed (kept in <state dir>/server/auth with "
    "--state-dir): the uuid is the user, the key the password. The minifaas CLI reads it from MINIFAAS_AUTH, "
    "--auth uuid:key or ~/.wskprops."
)

logger = logging.getLogger("minifaas.server")


class ApiError(MinifaasError):
    """Raised by REST handlers to answer with a status and OpenWhisk's error body; never leaves the app."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


ApiError.__module__ = "minifaas"


def new_auth() -> str:
    """A fresh credential in OpenWhisk's format: ``<uuid4>:<64 letters and digits>``."""
    alphabet = string.ascii_letters + string.digits
    return f"{uuid.uuid4()}:{''.join(secrets.choice(alphabet) for _ in range(AUTH_KEY_CHARS))}"


# -- JSON ----------------------------------------------------------------------------------------------------
def _default(o: object) -> object:
    if isinstance(o, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(o)).decode("ascii")
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    summary = summarize_value(o)
    return summary if summary is not None else repr(o)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def dumps(obj: object) -> bytes:
    """Strict JSON (NaN and infinities become null, bytes become base64) as UTF-8."""
    try:
        text = json.dumps(obj, default=_default, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        text = json.dumps(_finite(obj), default=_default, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``obj`` encoded by :func:`dumps`: the one JSON encoder of the REST API and the web UI's JSON API."""
    return Response(dumps(obj), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """OpenWhisk's error body ``{"error": message, "code": id}``."""
    return json_response({"error": message, "code": secrets.token_hex(16)}, status, headers)


_json = json_response
_error = error_response


def _kv(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in d.items()]


def _from_kv(items: object, what: str) -> dict[str, Any]:
    """OpenWhisk's ``[{key, value}]`` lists (a plain object is accepted too)."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if not isinstance(items, list):
        raise ApiError(400, f"{what} must be a list of {{key, value}} objects")
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise ApiError(400, f"{what} must be a list of {{key, value}} objects, got {item!r}")
        out[item["key"]] = item.get("value")
    return out


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() == "true"


def int_arg(request: Request, name: str, default: int | None, lo: int = 0, hi: int | None = None) -> int | None:
    """An integer query parameter; out of ``lo..hi`` (or of SQLite's 64 bits) or not a number is a 400."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer, got {raw!r}") from None
    top = QUERY_INT_MAX if hi is None else hi
    if value < lo or value > top:
        raise ApiError(400, f"query parameter {name!r} must be between {lo} and {top}, got {value}")
    return value


def list_limit(request: Request) -> int:
    """``limit`` of a listing: OpenWhisk's default and maximum, 0 meaning the maximum."""
    limit = int_arg(request, "limit", LIST_LIMIT_DEFAULT, 0, LIST_LIMIT_MAX)
    assert limit is not None
    return limit or LIST_LIMIT_MAX  # OpenWhisk: 0 means the maximum


class _BodyBudget:
    """The request body bytes all requests hold at once, capped: many large bodies together answer 503."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.max_bytes:
            raise ApiError(503, "The server holds too many request bytes right now; retry later.", {"Retry-After": "1"})
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


@contextlib.asynccontextmanager
async def held_body(request: Request, budget: _BodyBudget, max_bytes: int) -> AsyncIterator[bytes]:
    """The body, refused (413) as soon as it passes ``max_bytes``: nothing larger is ever held; it counts against
    the server's body budget until the block ends."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"The request content is {declared} bytes, over the {max_bytes} byte limit.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            budget.take(len(chunk))
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"The request content is over the {max_bytes} byte limit.")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        yield body
    finally:
        budget.give(size)


async def _read_json(
    request: Request, budget: _BodyBudget, *, max_bytes: int = MAX_REQUEST_BYTES, empty: object = None
) -> Any:
    """The body as JSON (see :func:`held_body`)."""
    async with held_body(request, budget, max_bytes) as body:
        if not body.strip():
            return empty
        try:
            return json.loads(body)
        except RecursionError:
            raise ApiError(400, "The request content was malformed: JSON nested too deeply.") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request content was malformed: {exc}") from None


# -- auth and path normalization -----------------------------------------------------------------------------
class _Gate:
    """ASGI middleware: HTTP basic auth on all but ``/ping``; cross-site and non-JSON writes refused (CSRF);
    trailing slashes dropped from API paths."""

    def __init__(self, app: ASGIApp, auth: str | None) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.auth is not None and not self._authorized(scope):
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(API_PREFIX) and len(path) > 1 and path.endswith("/"):
            # the JS client of some versions asks for ``activations/{id}/``
            scope = dict(scope, path=path.rstrip("/"))
        refusal = write_refusal(scope)
        if refusal is not None:
            await _error(*refusal)(scope, receive, send)
            return
        if self.auth is not None and path != "/ping" and not self._authorized(scope):
            given = any(k == b"authorization" for k, _ in scope.get("headers", ()))
            why = AUTH_INVALID if given else AUTH_MISSING
            response = _error(401, f"{why} {AUTH_HOW}", {"WWW-Authenticate": 'Basic realm="minifaas"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.auth is not None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return False
                try:
                    given = base64.b64decode(token.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return hmac.compare_digest(given, self.auth.encode("utf-8"))
        return False


# -- action records ------------------------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _ActionBody:
    """An action as PUT over the API (an update merged in), kept to answer GET and to redeploy at start."""

    kind: str
    code: str
    binary: bool
    main: str
    parameters: dict[str, Any]
    env: dict[str, str]
    annotations: dict[str, Any]
    limits: dict[str, Any]
    #: OpenWhisk's version ``0.0.N``: 1 when created, one more on every update
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _ActionBody:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d or f.name != "version"})


def _is_binary(exec_: dict[str, Any], code: str) -> bool:
    flag = exec_.get("binary")
    if isinstance(flag, bool):
        return flag
    # the JS client sends a zip Buffer as base64 ``code`` without ``binary``: OpenWhisk sniffs it too
    head = code[:16].strip()
    try:
        return base64.b64decode(head[: len(head) // 4 * 4] or "x", validate=True).startswith(ZIP_MAGIC)
    except (binascii.Error, ValueError):
        return False


def _deploy_limits(limits: dict[str, Any]) -> dict[str, Any]:
    """OpenWhisk limits (timeout ms, memory MB, logs MB, concurrency) and extensions -> deploy kwargs."""
    out: dict[str, Any] = {}
    spec = {
        "timeout": ("timeout_s", 1 / 1000),
        "memory": ("memory_mb", 1),
        "concurrency": ("concurrency", 1),
        "logs": ("max_log_bytes", LOG_LIMIT_UNIT_BYTES),
        "instances": ("max_sandboxes", 1),
        "payload": ("max_payload_bytes", 1),
        "result": ("max_result_bytes", 1),
        "idle": ("idle_timeout_s", 1 / 1000),
        "queue": ("max_queue", 1),
    }
    for key, value in limits.items():
        if key not in spec:
            raise ApiError(400, f"unknown limit {key!r}; known limits: {', '.join(spec)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(400, f"limit {key!r} must be a number, got {value!r}")
        name, scale = spec[key]
        scaled = value * scale
        out[name] = scaled if isinstance(scale, float) else int(scaled)
    return out


def _file_name(name: str) -> str:
    return f"{name.replace('/', '%2F')}.json"  # ``pkg/action``; a name never holds '%'


def _from_file_name(stem: str) -> str:
    return stem.replace("%2F", "/")


class _ActionStore:
    """The ``_ActionBody`` of each action created over the API, in memory and (with a state dir) on disk."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.bodies: dict[str, _ActionBody] = {}

    async def save(self, name: str, body: _ActionBody) -> None:
        self.bodies[name] = body
        folder = self.folder
        if folder is None:
            return
        data = dumps(body.to_json())

        def write() -> None:
            folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
            write_private(folder / _file_name(name), data)

        await anyio.to_thread.run_sync(write)

    def forget(self, name: str) -> None:
        self.bodies.pop(name, None)
        if self.folder is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / _file_name(name)).unlink()

    def saved(self) -> list[tuple[str, _ActionBody]]:
        if self.folder is None or not self.folder.is_dir():
            return []
        out: list[tuple[str, _ActionBody]] = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                out.append((_from_file_name(path.stem), _ActionBody.from_json(json.loads(path.read_text("utf-8")))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("skipping unreadable saved action %s: %s", path, exc)
        return out


# -- the API -------------------------------------------------------------------------------------------------
class _EntityLocks:
    """A lock per entity (kind and name), made on first use and dropped when no request holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[anyio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, kind: str, name: str) -> AsyncIterator[None]:
        key = (kind, name)
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _Api:
    def __init__(self, engine: Engine, *, namespace: str, blocking_wait_s: float) -> None:
        self.engine = engine
        self.namespace = namespace
        self.blocking_wait_s = blocking_wait_s
        state_dir = getattr(engine, "state_dir", None)
        self.actions = _ActionStore(Path(state_dir) / ACTIONS_SUBDIR if state_dir is not None else None)
        self.metrics = Metrics(engine)
        self.budget = _BodyBudget(MAX_BODY_BYTES_IN_FLIGHT)
        #: set by ``begin_shutdown``: blocking waits answer 202 at once, new invocations are refused
        self.stopping = False
        self._waiting: set[anyio.CancelScope] = set()
        self._locks = _EntityLocks()
        #: actions whose deploy (perhaps an environment build) runs now, outside any lock
        self._deploying: set[str] = set()
        self._restored = False
        self.packages = PackageStore(namespace, Path(state_dir) / PACKAGES_SUBDIR if state_dir is not None else None)
        self.packages.load()
        engine.set_resolver(self.packages.resolve)
        self.package_routes = PackageRoutes(self, engine, self.packages)
        #: the server's ``uuid:key`` (the feed actions check the ``authKey`` they are given against it)
        self.auth: str | None = None
        #: the alarms feeds' host service (set when the catalog is installed)
        self.alarm_feeds: AlarmFeeds | None = None
        self.versions = EntityVersions(Path(state_dir) / VERSIONS_FILE if state_dir is not None else None)

    # -- helpers ---------------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """The server is stopping: requests waiting on a blocking invocation get 202 with its id now (as after
        OpenWhisk's 60 s), so they do not hold the HTTP grace period; the engine then drains the work."""
        self.stopping = True
        for scope in list(self._waiting):
            scope.cancel()

    def _refuse_when_stopping(self) -> None:
        if self.stopping:
            raise ApiError(503, "The server is shutting down; nothing was invoked.", {"Retry-After": "5"})

    def ns(self, request: Request) -> str:
        ns = str(request.path_params["ns"])
        if ns == SYSTEM_NS:
            raise ApiError(403, f"The namespace {SYSTEM_NS} is read-only: its packages can be read, invoked and bound.")
        if ns not in ("_", self.namespace):
            raise ApiError(403, f"The supplied authentication is not authorized to access '{ns}'.")
        return self.namespace

    def ns_read(self, request: Request) -> str:
        """The namespace of a read or an invocation: the server's, or the system catalog's."""
        if str(request.path_params["ns"]) == SYSTEM_NS:
            return SYSTEM_NS
        return self.ns(request)

    def _action_ref(self, request: Request, *, through_binding: bool = False) -> str:
        """The engine's name of the action a read or invocation names (in a published package if not ours)."""
        ns = self.ns_read(request)
        name = str(request.path_params["name"])
        if ns != SYSTEM_NS:
            if name.count("/") > 1:  # never another namespace's action through ours
                raise ApiError(404, f"{NOT_FOUND} (action {name!r})")
            return self.packages.resolve(name)[0] if through_binding else name
        pkg_name, sep, _ = name.partition("/")
        pkg = self.packages.get(SYSTEM_NS, pkg_name) if sep else None
        if pkg is None:
            raise ApiError(404, f"{NOT_FOUND} (action {SYSTEM_NS}/{name})")
        if not self.packages.visible(pkg):
            raise ApiError(403, f"The supplied authentication is not authorized to access '{SYSTEM_NS}/{pkg_name}'.")
        return f"{SYSTEM_NS}/{name}"

    def check_visible(self, name: str) -> None:
        """403 for an engine name in an unpublished package of another namespace (a rule's or a sequence's)."""
        if name.count("/") == 2:
            ns, pkg_name, _ = name.split("/")
            pkg = self.packages.get(ns, pkg_name)
            if pkg is not None and not self.packages.visible(pkg):
                raise ApiError(403, f"The supplied authentication is not authorized to access '{ns}/{pkg_name}'.")

    def _triggers(self) -> Any:
        tm = getattr(self.engine, "triggers", None)
        if tm is None:
            raise ApiError(501, "Triggers and rules are not available on this server.")
        return tm

    def _short(self, ref: object, what: str) -> str:
        """``/_/name``, ``/guest/name`` or ``name`` -> ``name`` (other namespaces are refused)."""
        if not isinstance(ref, str) or not ref:
            raise ApiError(400, f"{what} must be a name, got {ref!r}")
        if ref.startswith("/"):
            parts = ref.split("/")
            if len(parts) < 3 or parts[1] not in ("_", self.namespace) or not parts[2]:
                raise ApiError(400, f"{what} {ref!r} is not an entity of namespace {self.namespace!r}")
            return "/".join(parts[2:])
        return ref

    async def restore(self) -> int:
        """Deploy the actions saved under the state dir by an earlier server; returns how many."""
        if self._restored:
            return 0
        self._restored = True
        # the system catalog first: saved sequences and bindings may name its actions
        self.alarm_feeds = await install_catalog(self.engine, self.packages, self.auth)
        n = 0
        saved = await anyio.to_thread.run_sync(self.actions.saved)
        for name, body in saved:
            try:
                await self._deploy(name, body, saved=True)
            except MinifaasError as exc:
                logger.error("cannot redeploy saved action %s: %s", name, exc)
                continue
            self.actions.bodies[name] = body
            n += 1
        return n

    # -- actions ---------------------------------------------------------------------------------------------
    def _composition_json(self, info: dict[str, Any], *, code: bool) -> dict[str, Any]:
        """A composition as OpenWhisk shows a conductor action: its IR instead of code, no sandbox limits."""
        exec_: dict[str, Any] = {"kind": COMPOSITION_KIND, "binary": False, "components": info.get("actions", [])}
        if code and "composition" in info:
            exec_["composition"] = info["composition"]
        return {
            "namespace": self.namespace,
            "name": info["name"],
            # the composition's own version, as /compositions/{name} shows it
            "version": f"0.0.{info.get('version', 1)}",
            "publish": False,
            "exec": exec_,
            "annotations": _kv({"exec": COMPOSITION_KIND, "conductor": True}),
            "parameters": [],
            "limits": {},
            "updated": 0,
        }

    def _action_json(self, info: dict[str, Any], *, code: bool = True) -> dict[str, Any]:
        if info.get("kind") == COMPOSITION_KIND:
            return self._composition_json(info, code=code)
        body = self.actions.bodies.get(info["name"])
        version = f"0.0.{body.version if body is not None else info['version']}"
        if info.get("kind") == SEQUENCE_KIND:
            params = _kv(info.get("params", {}))
            return sequence_json(info, self.namespace, version=version, parameters=params, updated=info["created"])
        path, short = entity_path(str(info["name"]), self.namespace)
        limits = info["limits"]
        kind = body.kind if body is not None else DEFAULT_KIND
        exec_: dict[str, Any] = {
            "kind": kind,
            "binary": body.binary if body is not None else info.get("origin") != "code",
            "main": info["main"],
        }
        if code and body is not None:
            exec_["code"] = body.code
        annotations = {"exec": kind, **info.get("annotations", {})}
        return {
            "namespace": path,
            "name": short,
            "version": version,
            "publish": False,
            "exec": exec_,
            "annotations": _kv(annotations),
            "parameters": _kv(info.get("params", {})),
            "limits": {
                "timeout": round(limits["timeout_s"] * 1000),
                "memory": limits["memory_mb"],
                "logs": max(1, limits["max_log_bytes"] // LOG_LIMIT_UNIT_BYTES),
                "concurrency": limits["concurrency"],
                "instances": limits["max_sandboxes"],
            },
            "updated": info.get("created", 0),
        }

    async def _deploy(self, name: str, body: _ActionBody, *, saved: bool = False) -> dict[str, Any]:
        if body.kind == SEQUENCE_KIND:
            return await self.engine.deploy_sequence(
                name,
                components_of(body.code),
                params=body.parameters,
                annotations=body.annotations,
                check_components=not saved,
            )
        kwargs: dict[str, Any] = dict(
            main=body.main,
            params=body.parameters,
            annotations=body.annotations,
            env=body.env,
            **_deploy_limits(body.limits),
        )
        # where the code came from, for the web UI: the file the minifaas CLI names in an annotation, else what
        # was uploaded (never the temporary zip it is deployed from)
        named = body.annotations.get(ORIGIN_ANNOTATION)
        kwargs["origin"] = named if isinstance(named, str) else "uploaded zip" if body.binary else "uploaded code"
        if not body.binary:
            # OpenWhisk takes an action without code and fails each activation at its init, saying so
            code = body.code if body.code.strip() else EMPTY_CODE
            return await self.engine.deploy(name, code=code, **kwargs)
        try:
            data = base64.b64decode(body.code, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"exec.code of a binary action must be base64: {exc}") from None
        with tempfile.TemporaryDirectory(prefix="minifaas-put-") as tmp:
            zpath = Path(tmp) / f"{name}.zip"
            await anyio.to_thread.run_sync(zpath.write_bytes, data)
            return await self.engine.deploy(name, path=zpath, **kwargs)

    def _parse_action(self, name: str, doc: object, old: _ActionBody | None) -> _ActionBody:
        if not isinstance(doc, dict):
            raise ApiError(400, "The request content must be a JSON object.")
        exec_ = doc.get("exec")
        if exec_ is None:
            if old is None:
                raise ApiError(400, "exec undefined: give {exec: {kind, code}} to create an action.")
            kind, code, binary, main = old.kind, old.code, old.binary, old.main
        else:
            if not isinstance(exec_, dict):
                raise ApiError(400, "exec must be an object {kind, code, binary, main}.")
            kind = str(exec_.get("kind") or DEFAULT_KIND)
            if kind == SEQUENCE_KIND:
                try:
                    code = parse_components(exec_, self.namespace)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from None
                for component in components_of(code):
                    self.check_visible(component)
                binary, main = False, ""
            elif kind not in SUPPORTED_KINDS:
                raise ApiError(
                    400,
                    f"kind {kind!r} is not supported by minifaas; use one of "
                    f"{', '.join(SUPPORTED_KINDS)} (Python actions only).",
                )
            else:
                given = exec_.get("code")
                if not isinstance(given, str):
                    raise ApiError(400, "exec.code must be a string (Python source or a base64 zip).")
                code = given
                binary = _is_binary(exec_, code)
                main = exec_.get("main") or "main"
                if not isinstance(main, str):
                    raise ApiError(400, "exec.main must be a string.")
        if "parameters" in doc:
            params, env = {}, {}
            raw = doc["parameters"]
            for item in raw if isinstance(raw, list) else []:
                if isinstance(item, dict) and item.get("init") is True and isinstance(item.get("key"), str):
                    env[item["key"]] = str(item.get("value"))  # OpenWhisk: init parameters become env
            params = {k: v for k, v in _from_kv(raw, "parameters").items() if k not in env}
        else:
            params, env = (dict(old.parameters), dict(old.env)) if old is not None else ({}, {})
        if "annotations" in doc:
            annotations = _from_kv(doc["annotations"], "annotations")
        else:
            annotations = dict(old.annotations) if old is not None else {}
        limits = dict(old.limits) if old is not None else {}
        new_limits = doc.get("limits")
        if new_limits is not None:
            if not isinstance(new_limits, dict):
                raise ApiError(400, "limits must be an object {timeout, memory, concurrency, logs}.")
            limits.update(new_limits)
        _deploy_limits(limits)
        if kind == SEQUENCE_KIND:
            limits = {}  # a sequence's components have their own
        version = old.version + 1 if old is not None else 1
        return _ActionBody(kind, code, binary, main, params, env, annotations, limits, version)

    async def _exists(self, name: str) -> bool:
        try:
            await self.engine.get_function(name)
        except FunctionNotFound:
            return False
        return True

    async def put_action(self, request: Request) -> Response:
        ns = self.ns(request)
        name = str(request.path_params["name"])
        if name.count("/") > 1:
            raise ApiError(400, f"invalid action name {name!r}: use name or package/name")
        self.package_routes.require_for_action(ns, name)
        doc = await _read_json(request, self.budget)
        # no lock is held while the deploy runs (it may build an environment for minutes): the action is marked
        # as being deployed instead, and other writes to it are refused meanwhile; other actions are untouched
        async with self._locks.hold("action", name):
            self._refuse_while_deploying(name)
            exists = await self._exists(name)
            if exists and not _flag(request, "overwrite"):
                raise ApiError(409, f"resource already exists: action {name!r} (use ?overwrite=true to update)")
            old = self.actions.bodies.get(name) if exists else None
            body = self._parse_action(name, doc, old)
            self._deploying.add(name)
        try:
            if exists and (old is None or (old.kind == SEQUENCE_KIND) != (body.kind == SEQUENCE_KIND)):
                # a sequence becoming code or code becoming a sequence: the engine keeps them apart
                was = await self.engine.get_function(name)
                if (was.get("kind") == SEQUENCE_KIND) != (body.kind == SEQUENCE_KIND):
                    await self.engine.delete(name)
            info = await self._deploy(name, body)
            async with self._locks.hold("action", name):
                await self.actions.save(name, body)
        finally:
            self._deploying.discard(name)
        return _json(self._action_json(info))

    def _refuse_while_deploying(self, name: str) -> None:
        if name in self._deploying:
            raise ApiError(409, f"action {name!r} is being deployed by another request; retry when it is done")

    async def get_action(self, request: Request) -> Response:
        info = await self.engine.get_function(self._action_ref(request, through_binding=True))
        return _json(self._action_json(info, code=request.query_params.get("code", "true") != "false"))

    async def delete_action(self, request: Request) -> Response:
        self.ns(request)
        name = str(request.path_params["name"])
        if name.count("/") > 1:  # never another namespace's action through ours
            raise ApiError(404, f"{NOT_FOUND} (action {name!r})")
        async with self._locks.hold("action", name.partition("@")[0]):
            self._refuse_while_deploying(name.partition("@")[0])
            info = await self.engine.get_function(name)
            shape = self._action_json(info, code=False)
            await self.engine.delete(name)
            if "@" not in name:
                self.actions.forget(name)
        return _json(shape)

    async def list_actions(self, request: Request) -> Response:
        ns = self.ns_read(request)
        infos = sorted(await self.engine.list_functions(), key=lambda i: i["name"])
        system = f"{SYSTEM_NS}/"
        if ns == SYSTEM_NS:
            public = {f"{system}{p.name}/" for p in self.packages.list(SYSTEM_NS) if p.publish}
            infos = [i for i in infos if str(i["name"]).rpartition("/")[0] + "/" in public]
        else:
            infos = [i for i in infos if not str(i["name"]).startswith(system)]
        if _flag(request, "count"):
            return _json({"actions": len(infos)})
        skip = int_arg(request, "skip", 0) or 0
        return _json([self._action_json(i, code=False) for i in infos[skip : skip + list_limit(request)]])

    async def invoke(self, request: Request) -> Response:
        name = self._action_ref(request)
        # the action's payload limit caps the body while it streams in: a larger one is never parsed
        info = await self.engine.get_function(self.packages.resolve(name)[0])
        limits = info.get("limits") or {}
        max_bytes = int(limits.get("max_payload_bytes", MAX_PAYLOAD_BYTES))
        args = await _read_json(request, self.budget, max_bytes=max_bytes, empty={})
        if not isinstance(args, dict):
            raise ApiError(400, "The request content must be a JSON object of parameters.")
        blocking = _flag(request, "blocking")
        timeout_ms = int_arg(request, "timeout", None, 1)
        self._refuse_when_stopping()
        act_id = await self.engine.submit(name, args)
        headers = {"X-OpenWhisk-Activation-Id": act_id}
        if not blocking:
            return _json({"activationId": act_id}, 202, headers)
        wait_s = self.blocking_wait_s
        if "timeout_s" in limits:
            wait_s = min(wait_s, float(limits["timeout_s"]) + BLOCKING_GRACE_S)
        if timeout_ms is not None:
            wait_s = min(wait_s, timeout_ms / 1000)
        with anyio.move_on_after(wait_s) as waiting:
            self._waiting.add(waiting)
            if self.stopping:  # the stop came while the invocation was being submitted
                waiting.cancel()
            try:
                act = await self.engine.activations.wait(act_id, timeout_s=None)
                return _activation_response(act, result_only=_flag(request, "result"), headers=headers)
            finally:
                self._waiting.discard(waiting)
        return _json({"activationId": act_id}, 202, headers)

    # -- activations -----------------------------------------------------------------------------------------
    async def list_activations(self, request: Request) -> Response:
        self.ns(request)
        limit = list_limit(request)
        skip = int_arg(request, "skip", 0) or 0
        since = int_arg(request, "since", None)
        upto = int_arg(request, "upto", None)
        name = request.query_params.get("name") or None
        if name is not None:
            name = self._short(name, "name")
        if _flag(request, "count"):
            n = await self.engine.activations.count(name, since=since, upto=upto, namespace=self.namespace, ended=True)
            return _json({"activations": n})
        # records of running activations are in the store too; OpenWhisk lists ended ones only
        done = await self.engine.activations.list(
            name, limit=limit, skip=skip, since=since, upto=upto, namespace=self.namespace, ended=True
        )
        if _flag(request, "docs"):
            return _json([a.to_openwhisk() for a in done])
        return _json([_summary(a) for a in done])

    async def _ended(self, request: Request) -> Activation:
        self.ns(request)
        act_id = str(request.path_params["id"])
        act = await self.engine.activations.get(act_id, namespace=self.namespace)
        if not act.done:
            raise ApiError(404, f"{NOT_FOUND} (activation {act_id} has not ended yet)")
        return act

    async def get_activation(self, request: Request) -> Response:
        return _json((await self._ended(request)).to_openwhisk())

    async def activation_logs(self, request: Request) -> Response:
        return _json({"logs": list((await self._ended(request)).logs)})

    async def activation_result(self, request: Request) -> Response:
        return _json((await self._ended(request)).to_openwhisk()["response"])

    # -- triggers and rules ----------------------------------------------------------------------------------
    def _trigger_json(self, tm: Any, t: Any) -> dict[str, Any]:
        rules = {
            f"{self.namespace}/{r.name}": {
                "action": dict(zip(("path", "name"), entity_path(r.action, self.namespace), strict=True)),
                "status": r.status,
            }
            for r in tm.list_rules(t.name)
        }
        return {
            "namespace": self.namespace,
            "name": t.name,
            "version": self.versions.get("trigger", t.name),
            "publish": False,
            "parameters": _kv(t.params),
            "annotations": _kv(t.annotations),
            "limits": {},  # OpenWhisk's; minifaas's fire rate limit is taken as limits.rate_per_minute on PUT
            "rules": rules,
            "updated": int(t.created * 1000),
        }

    def _rule_json(self, r: Any) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": r.name,
            "version": self.versions.get("rule", r.name),
            "publish": False,
            "status": r.status,
            "trigger": {"name": r.trigger, "path": self.namespace},
            "action": dict(zip(("path", "name"), entity_path(r.action, self.namespace), strict=True)),
            "updated": int(r.created * 1000),
        }

    @staticmethod
    def _lookup(get: Callable[[str], Any], name: str) -> Any:
        try:
            return get(name)
        except TriggerError:
            raise ApiError(404, f"{NOT_FOUND} ({name!r})") from None

    async def put_trigger(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        doc = await _read_json(request, self.budget, max_bytes=MAX_SMALL_BODY_BYTES, empty={})
        if not isinstance(doc, dict):
            raise ApiError(400, "The request content must be a JSON object.")
        params = _from_kv(doc.get("parameters"), "parameters")
        annotations = _from_kv(doc.get("annotations"), "annotations")
        limits = doc.get("limits") or {}
        if not isinstance(limits, dict):
            raise ApiError(400, "limits must be an object {rate_per_minute}.")
        rate = limits.get("rate_per_minute", TRIGGER_RATE_DEFAULT)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
            raise ApiError(400, f"limits.rate_per_minute must be a positive integer or null, got {rate!r}")
        async with self._locks.hold("trigger", name):
            if name not in {t.name for t in tm.list_triggers()}:
                trigger = tm.create_trigger(name, params=params, annotations=annotations, rate_per_minute=rate)
                self.versions.created("trigger", name)
                return _json(self._trigger_json(tm, trigger))
            if not _flag(request, "overwrite"):
                raise ApiError(409, f"resource already exists: trigger {name!r} (use ?overwrite=true)")
            if tm.list_feeds(name):
                raise ApiError(409, f"trigger {name!r} has feeds: delete and create it again to change it")
            # the manager has no update: re-create it (its rules stay), and put the old one back if the new one
            # is refused after all
            old = tm.get_trigger(name)
            tm.delete_trigger(name, keep_rules=True)
            try:
                trigger = tm.create_trigger(name, params=params, annotations=annotations, rate_per_minute=rate)
            except MinifaasError:
                tm.create_trigger(
                    name, params=old.params, annotations=old.annotations, rate_per_minute=old.rate_per_minute
                )
                raise
            self.versions.bumped("trigger", name)
        return _json(self._trigger_json(tm, trigger))

    async def get_trigger(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        return _json(self._trigger_json(tm, self._lookup(tm.get_trigger, str(request.path_params["name"]))))

    async def delete_trigger(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        async with self._locks.hold("trigger", name):
            shape = self._trigger_json(tm, self._lookup(tm.get_trigger, name))
            tm.delete_trigger(name, keep_rules=True)  # OpenWhisk's rules outlive their trigger
            self.versions.drop("trigger", name)
            if self.alarm_feeds is not None:
                self.alarm_feeds.forget(name)
        return _json(shape)

    async def list_triggers(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        triggers = tm.list_triggers()
        if _flag(request, "count"):
            return _json({"triggers": len(triggers)})
        skip = int_arg(request, "skip", 0) or 0
        return _json([self._trigger_json(tm, t) for t in triggers[skip : skip + list_limit(request)]])

    async def fire_trigger(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        self._lookup(tm.get_trigger, name)
        payload = await _read_json(request, self.budget, max_bytes=MAX_SMALL_BODY_BYTES, empty={})
        if not isinstance(payload, dict):
            raise ApiError(400, "The trigger payload must be a JSON object.")
        enabled = [r for r in tm.list_rules(name) if r.enabled]
        self._refuse_when_stopping()
        ids = await tm.fire(name, payload)
        if not enabled:
            return Response(status_code=204)  # OpenWhisk: no active rule, nothing was activated
        fire_id = next((f.activation_id for f in tm.list_fires(name, limit=50) if f.activation_ids == ids), None)
        body: dict[str, Any] = {"activationId": fire_id, "activationIds": ids}
        return _json(body, 202, {"X-OpenWhisk-Activation-Id": fire_id} if fire_id else None)

    async def put_rule(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        doc = await _read_json(request, self.budget, max_bytes=MAX_SMALL_BODY_BYTES, empty={})
        if not isinstance(doc, dict):
            raise ApiError(400, "The request content must be a JSON object {trigger, action}.")
        trigger = self._short(doc.get("trigger"), "trigger")
        action = doc.get("action")
        if not isinstance(action, str) or not action:
            raise ApiError(400, f"action must be a name, got {action!r}")
        try:
            action = engine_name(action, self.namespace)
        except BadName as exc:
            raise ApiError(400, f"action {exc}") from None
        self.check_visible(action)
        status = doc.get("status") or "active"
        if status not in ("active", "inactive"):
            raise ApiError(400, f"status must be 'active' or 'inactive', got {status!r}")
        self._lookup(tm.get_trigger, trigger)
        async with self._locks.hold("rule", name):
            old = next((r for r in tm.list_rules() if r.name == name), None)
            if old is not None:
                if not _flag(request, "overwrite"):
                    raise ApiError(409, f"resource already exists: rule {name!r} (use ?overwrite=true)")
                tm.delete_rule(name)
            try:
                rule = tm.create_rule(name, trigger, action, enabled=status == "active")
            except MinifaasError:
                if old is not None:  # a refused update leaves the rule as it was
                    tm.create_rule(old.name, old.trigger, old.action, enabled=old.enabled)
                raise
            if old is None:
                self.versions.created("rule", name)
            else:
                self.versions.bumped("rule", name)
        return _json(self._rule_json(rule))

    async def set_rule_status(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        self._lookup(tm.get_rule, name)
        doc = await _read_json(request, self.budget, max_bytes=MAX_SMALL_BODY_BYTES, empty={})
        status = doc.get("status") if isinstance(doc, dict) else None
        if status == "active":
            rule = tm.enable_rule(name)
        elif status == "inactive":
            rule = tm.disable_rule(name)
        else:
            raise ApiError(400, f"status must be 'active' or 'inactive', got {status!r}")
        return _json(self._rule_json(rule))

    async def get_rule(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        return _json(self._rule_json(self._lookup(tm.get_rule, str(request.path_params["name"]))))

    async def delete_rule(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        name = str(request.path_params["name"])
        rule = self._lookup(tm.get_rule, name)
        tm.delete_rule(name)
        self.versions.drop("rule", name)
        return _json(self._rule_json(rule))

    async def list_rules(self, request: Request) -> Response:
        self.ns(request)
        tm = self._triggers()
        rules = tm.list_rules()
        if _flag(request, "count"):
            return _json({"rules": len(rules)})
        skip = int_arg(request, "skip", 0) or 0
        return _json([self._rule_json(r) for r in rules[skip : skip + list_limit(request)]])

    # -- sessions (minifaas) ---------------------------------------------------------------------------------
    def _sessions(self) -> Any:
        store = getattr(self.engine, "sessions", None)
        if store is None:
            raise ApiError(501, "Composition sessions are not available on this server.")
        return store

    async def list_sessions(self, request: Request) -> Response:
        self.ns(request)
        store = self._sessions()
        name = request.query_params.get("name") or None
        skip = int_arg(request, "skip", 0) or 0
        listed = store.list(name, limit=list_limit(request), skip=skip)
        return _json([s.to_dict() for s in listed if await in_namespace(self.engine, s.session_id, self.namespace)])

    async def get_session(self, request: Request) -> Response:
        self.ns(request)
        session_id = str(request.path_params["id"])
        if not await in_namespace(self.engine, session_id, self.namespace):
            raise ApiError(404, f"{NOT_FOUND} (session {session_id})")
        return _json(self._sessions().get(session_id).to_dict())

    # -- misc ------------------------------------------------------------------------------------------------
    async def namespaces(self, request: Request) -> Response:
        return _json([self.namespace])

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def ping(self, request: Request) -> Response:
        return _json("pong")

    async def index(self, request: Request) -> Response:
        ns = self.namespace
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>minifaas</title><h1>minifaas dev server</h1><ul>"
            f"<li><a href='{API_PREFIX}/namespaces/{ns}/actions'>actions</a>"
            f"<li><a href='{API_PREFIX}/namespaces/{ns}/activations'>activations</a>"
            f"<li><a href='{API_PREFIX}/namespaces/{ns}/triggers'>triggers</a>"
            f"<li><a href='{API_PREFIX}/namespaces/{ns}/rules'>rules</a>"
            "<li><a href='/metrics'>metrics</a></ul>"
        )


ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


async def not_implemented(request: Request) -> Response:
    """501 naming the endpoint: OpenWhisk's API has it (or might), minifaas does not."""
    return _error(501, f"minifaas does not implement {request.method} {request.url.path} (an OpenWhisk API endpoint).")


async def in_namespace(engine: Engine, activation_id: str, namespace: str) -> bool:
    """Whether the activation (a session's id is its conductor's) is one of ``namespace``."""
    try:
        await engine.activations.get(activation_id, namespace=namespace)
    except ActivationNotFound:
        return False
    return True


def _summary(act: Activation) -> dict[str, Any]:
    """OpenWhisk's activation list entry without ``docs=true``: no logs, no response, a statusCode."""
    full = act.to_openwhisk()
    full.pop("logs")
    response = full.pop("response")
    full["statusCode"] = response["statusCode"]
    return full


def _activation_response(act: Activation, *, result_only: bool, headers: dict[str, str]) -> Response:
    if act.status == "success":
        status = 200
    elif act.status == "internal_error":
        status = 500
    else:
        status = 502  # application and developer errors, as OpenWhisk answers them
    return _json(act.result if result_only else act.to_openwhisk(), status, headers)


_ERROR_STATUS: Final[tuple[tuple[type[Exception], int], ...]] = (
    (Overloaded, 429),  # RateLimited too
    (PayloadTooLarge, 413),
    (FunctionNotFound, 404),
    (ActivationNotFound, 404),
    (InvalidPayload, 400),
    (DeployError, 400),
    (CompositionError, 400),
    (TriggerError, 400),
    (EngineClosed, 503),
)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.message, exc.headers)
    if isinstance(exc, HTTPException):
        detail = NOT_FOUND if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, detail, dict(exc.headers or {}))
    for cls, status in _ERROR_STATUS:
        if isinstance(exc, cls):
            retry = getattr(exc, "retry_after_s", None)
            headers = {"Retry-After": str(max(1, math.ceil(retry)))} if isinstance(retry, int | float) else None
            return _error(status, str(exc), headers)
    if isinstance(exc, ClientDisconnect):
        # nobody reads this answer: the client went away while sending its request
        logger.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_STATUS)
    if isinstance(exc, RecursionError):
        return _error(400, "The request content was malformed: nested too deeply.")
    # the message names the code to find in the log; exception text stays in the log, not in the answer
    code = secrets.token_hex(16)
    logger.error("unexpected error %s answering %s %s", code, request.method, request.url.path, exc_info=exc)
    return _json({"error": INTERNAL_ERROR_MESSAGE, "code": code}, 500)


def _webui_routes(engine: Engine, namespace: str) -> list[BaseRoute] | None:
    try:
        mod = importlib.import_module("minifaas._server.webui")
    except ModuleNotFoundError as exc:
        if exc.name != "minifaas._server.webui":
            raise
        return None
    routes: list[BaseRoute] = list(mod.routes(engine, namespace=namespace))
    return routes


def create_app(
    engine: Engine,
    *,
    auth: str | None,
    namespace: str = "guest",
    blocking_wait_s: float = BLOCKING_WAIT_MAX_S,
) -> Starlette:
    """The REST app over ``engine``. ``auth`` is ``"user:key"`` for HTTP basic auth, ``None`` to disable it.

    ``blocking_wait_s`` caps how long a blocking invocation waits before answering 202 with the activation id.
    The app's ``state.api.restore()`` deploys actions saved by an earlier server on the same state dir (the
    lifespan does it when a server runs the app).
    """
    if auth is not None and (":" not in auth or auth.startswith(":")):
        raise ValueError("auth must look like 'uuid:key' (OpenWhisk's format)")
    api = _Api(engine, namespace=namespace, blocking_wait_s=blocking_wait_s)
    api.auth = auth
    ns = f"{API_PREFIX}/namespaces/{{ns}}"
    routes: list[BaseRoute] = [
        Route("/ping", api.ping, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        Route(f"{API_PREFIX}/namespaces", api.namespaces, methods=["GET"]),
        Route(f"{ns}/packages", api.package_routes.list, methods=["GET"]),
        Route(f"{ns}/packages/{{name}}", api.package_routes.get, methods=["GET"]),
        Route(f"{ns}/packages/{{name}}", api.package_routes.put, methods=["PUT"]),
        Route(f"{ns}/packages/{{name}}", api.package_routes.delete, methods=["DELETE"]),
        Route(f"{ns}/actions", api.list_actions, methods=["GET"]),
        Route(f"{ns}/actions/{{name:path}}", api.get_action, methods=["GET"]),
        Route(f"{ns}/actions/{{name:path}}", api.put_action, methods=["PUT"]),
        Route(f"{ns}/actions/{{name:path}}", api.delete_action, methods=["DELETE"]),
        Route(f"{ns}/actions/{{name:path}}", api.invoke, methods=["POST"]),
        Route(f"{ns}/activations", api.list_activations, methods=["GET"]),
        Route(f"{ns}/activations/{{id}}", api.get_activation, methods=["GET"]),
        Route(f"{ns}/activations/{{id}}/logs", api.activation_logs, methods=["GET"]),
        Route(f"{ns}/activations/{{id}}/result", api.activation_result, methods=["GET"]),
        Route(f"{ns}/triggers", api.list_triggers, methods=["GET"]),
        Route(f"{ns}/triggers/{{name}}", api.get_trigger, methods=["GET"]),
        Route(f"{ns}/triggers/{{name}}", api.put_trigger, methods=["PUT"]),
        Route(f"{ns}/triggers/{{name}}", api.fire_trigger, methods=["POST"]),
        Route(f"{ns}/triggers/{{name}}", api.delete_trigger, methods=["DELETE"]),
        Route(f"{ns}/rules", api.list_rules, methods=["GET"]),
        Route(f"{ns}/rules/{{name}}", api.get_rule, methods=["GET"]),
        Route(f"{ns}/rules/{{name}}", api.put_rule, methods=["PUT"]),
        Route(f"{ns}/rules/{{name}}", api.set_rule_status, methods=["POST"]),
        Route(f"{ns}/rules/{{name}}", api.delete_rule, methods=["DELETE"]),
        Route(f"{ns}/sessions", api.list_sessions, methods=["GET"]),
        Route(f"{ns}/sessions/{{id}}", api.get_session, methods=["GET"]),
    ]
    from .compositions import routes as composition_routes

    routes += composition_routes(api)
    ui = _webui_routes(engine, namespace)
    routes += ui if ui is not None else [Route("/", api.index, methods=["GET"])]
    # last: an API path no route above serves is one minifaas does not implement (not "no such entity")
    routes.append(Route(f"{API_PREFIX}/{{rest:path}}", not_implemented, methods=ALL_METHODS))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        restored = await api.restore()
        if restored:
            logger.info("redeployed %d saved actions", restored)
        yield

    app = Starlette(
        routes=routes,
        # a handler of its own: one registered only under Exception answers from ServerErrorMiddleware, which then
        # re-raises, and uvicorn logs a client that went away as an error with a traceback
        exception_handlers={
            Exception: _on_error,
            HTTPException: _on_error,
            MinifaasError: _on_error,
            ClientDisconnect: _on_error,
        },
        lifespan=lifespan,
    )
    app.state.api = api
    app.add_middleware(_Gate, auth=auth)
    _add_web_routes(app, api, auth)
    return app


def _add_web_routes(app: Starlette, api: _Api, auth: str | None) -> None:
    """Web actions and the API gateway's routes, outside the auth gate: they have auth rules of their own."""
    from .apigw import ApiGateway
    from .webactions import WebActions, WebRouter

    web = WebActions(api, auth)
    gateway = ApiGateway(api, web, auth)
    app.state.apigw = gateway
    app.add_middleware(WebRouter, web=web, extra=[(gateway.is_mgmt, gateway.mgmt), (gateway.is_route, gateway.route)])


# -- running it ----------------------------------------------------------------------------------------------
def _quiet_server(base: Any) -> Any:
    """uvicorn's Server without its signal handlers: the owner of the event loop decides when to stop."""

    class Server(base):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


@dataclasses.dataclass
class ServerHandle:
    """What ``serve`` reports once it listens (through ``task_status``): where, with which credential."""

    url: str
    host: str
    port: int
    auth: str
    app: Starlette
    _server: Any = dataclasses.field(repr=False, default=None)

    @property
    def stopping(self) -> bool:
        return bool(self._server is not None and self._server.should_exit)

    def stop(self) -> None:
        """Ask the server to stop: blocking invocations still waiting answer 202 with their activation id at
        once, other requests get up to ``SHUTDOWN_GRACE_S`` to finish, then ``serve`` returns. (The engine's
        own close, after that, drains running activations within its ``close_timeout_s``.)"""
        self.app.state.api.begin_shutdown()
        if self._server is not None:
            self._server.should_exit = True


async def serve(
    engine: Engine,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: str | None = None,
    *,
    namespace: str | None = None,
    blocking_wait_s: float = BLOCKING_WAIT_MAX_S,
    log_level: str = "warning",
    task_status: anyio.abc.TaskStatus[ServerHandle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API for ``engine`` until ``handle.stop()`` (or cancellation); signals are the caller's.

    ``auth=None`` generates a credential; ``port=0`` picks a free port. Start it with
    ``handle = await task_group.start(serve, engine)`` to learn both.
    """
    import uvicorn  # only the server needs it, not the CLI client

    from .connguard import connection_cap, guarded_protocol, raise_fd_limit

    auth = auth or new_auth()
    app = create_app(engine, auth=auth, namespace=namespace or engine.namespace, blocking_wait_s=blocking_wait_s)
    max_connections = connection_cap(raise_fd_limit())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets that do, and without it a
    # keep-alive client waits out a 40 ms delayed ACK between uvicorn's header and body writes
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            server_header=False,
            http=guarded_protocol(max_connections=max_connections),
            limit_concurrency=max_connections,
        )
        server = _quiet_server(uvicorn.Server)(config)
        failed: list[BaseException] = []

        async def run() -> None:
            try:
                await server.serve(sockets=[sock])
            except (Exception, SystemExit) as exc:  # uvicorn exits on a failed startup
                failed.append(exc)
                raise

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, name="minifaas-http")
            while not server.started:
                if failed:
                    raise RuntimeError(f"the HTTP server failed to start: {failed[0]!r}")
                await anyio.sleep(STARTUP_POLL_S)
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            task_status.started(ServerHandle(f"http://{shown}:{bound_port}", host, bound_port, auth, app, server))
    finally:
        sock.close()
