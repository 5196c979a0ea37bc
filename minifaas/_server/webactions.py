"""Web actions: an action annotated ``web-export: true`` answers plain HTTP at ``/api/v1/web/{ns}/{pkg}/{action}``.

OpenWhisk's controller (``WebActions.scala``) is the reference for every rule here: any of GET, POST, PUT, PATCH,
DELETE, HEAD and OPTIONS; no credential unless ``require-whisk-auth`` asks for one (``true``: the server's own
key, a string or number: the same value in ``X-Require-Whisk-Auth``); the request reaches the action as
``__ow_method``, ``__ow_headers``, ``__ow_path`` (the path left after the action's name and extension) and, with
``raw-http``, ``__ow_query`` and ``__ow_body``; otherwise query, form and JSON-object body parameters are merged
into the arguments (body over query) and any other body comes as ``__ow_body`` (base64 when binary). The extension
(``.http`` when none) says how the result becomes the response: ``.http`` reads ``statusCode``, ``headers`` and
``body`` (a base64 body for binary content types), ``.json`` sends the object, ``.text``, ``.html`` and ``.svg``
send one field. An application error answers with its ``error`` field the same way; other failures are a 400.

Two deliberate differences from OpenWhisk: the server's own basic credential is not passed on in
``__ow_headers`` (other ``Authorization`` headers, e.g. bearer tokens, are), and a ``require-whisk-auth: true``
action refuses a request that another site's page made with the browser's stored credential.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._core.function import MAX_PAYLOAD_BYTES
from .._errors import FunctionNotFound, MinifaasError
from .app import _ERROR_STATUS, BLOCKING_GRACE_S, ApiError, dumps, error_response, held_body

if TYPE_CHECKING:
    from .._core.activation import Activation
    from .app import _Api

__all__ = ("WEB_PREFIX", "WebActions", "WebRouter")

WEB_PREFIX: Final = "/api/v1/web/"
EXTENSIONS: Final = (".http", ".json", ".html", ".svg", ".text")
DEFAULT_PACKAGE: Final = "default"
RESERVED: Final = frozenset({"__ow_method", "__ow_headers", "__ow_path", "__ow_user", "__ow_query", "__ow_body"})
ALLOWED_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
WEB_EXPORT: Final = "web-export"
RAW_HTTP: Final = "raw-http"
REQUIRE_AUTH: Final = "require-whisk-auth"
CUSTOM_OPTIONS: Final = "web-custom-options"
FINAL: Final = "final"
REQUIRE_AUTH_HEADER: Final = "x-require-whisk-auth"
#: OpenWhisk's entity names (``EntityName.REGEX``)
NAME_RE: Final = re.compile(r"^(?:\w|\w[\w@ .-]*[\w@.-]+)$")
BASE64_RE: Final = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)?$")
CORS_ALLOW_METHODS: Final = "OPTIONS, GET, DELETE, POST, PUT, HEAD, PATCH"
CORS_ALLOW_HEADERS: Final = "Authorization, Origin, X-Requested-With, Content-Type, Accept, User-Agent"
#: media types with no charset that are text all the same (pekko-http's registered non-binary types)
TEXT_APPLICATION_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
        "application/xhtml+xml",
        "application/x-javascript",
        "application/ecmascript",
    }
)

# OpenWhisk's messages, word for word (``ErrorResponse.scala``)
PARAMETERS_NOT_ALLOWED: Final = "Request defines parameters that are not allowed (e.g., reserved properties)."
PROPERTY_NOT_FOUND: Final = "Response does not include requested property."
ERROR_PROCESSING: Final = "There was an error processing your request."
RESPONSE_NOT_READY: Final = "Response not yet ready."
HTTP_CONTENT_TYPE_ERROR: Final = "Response type in header did not match generated content type."
HTTP_UNKNOWN_CONTENT_TYPE: Final = "Response did not specify a known content-type."
NOT_FOUND: Final = "The requested resource does not exist."
UNAUTHORIZED: Final = (
    "The request has not been applied because it lacks valid authentication credentials for the target resource."
)
CROSS_SITE: Final = "This web action requires the server's credential, which another site's page may not use."


def invalid_media(media: str) -> str:
    return f"Response is not valid '{media}'."


# -- media types ---------------------------------------------------------------------------------------------
def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json_family(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def is_binary(content_type: str) -> bool:
    """Whether a body of this type travels as base64 (pekko-http's rule: text types, types that name a charset
    and the registered text application types are text; everything else, images such as SVG too, is binary)."""
    media = media_type(content_type)
    if media.startswith("text/") or "charset=" in content_type.lower():
        return False
    return not (media in TEXT_APPLICATION_TYPES or is_json_family(media) or media.endswith("+xml"))


# -- requests ------------------------------------------------------------------------------------------------
def is_credential(authorization: str, auth: str) -> bool:
    """Whether an ``Authorization`` header value is HTTP basic auth with ``auth`` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, auth.encode("utf-8"))


def split_path(path: str) -> tuple[str, str, str, str, str] | None:
    """``/api/v1/web/ns/pkg/name.ext/rest`` -> ``(ns, pkg, name, ext, "/rest")``; None when it names no action."""
    parts = path[len(WEB_PREFIX) :].split("/", 3)
    if len(parts) < 3:
        return None
    ns, pkg, last = parts[0], parts[1], parts[2]
    rest = "/" + parts[3] if len(parts) == 4 else ""
    ext = next((e for e in EXTENSIONS if last.endswith(e)), ".http")
    name = last[: -len(ext)] if last.endswith(ext) else last
    if not all(NAME_RE.match(s) for s in (ns, pkg, name)):
        return None
    return ns, pkg, name, ext, rest


def _truthy(annotations: dict[str, Any], key: str) -> bool:
    return annotations.get(key) is True


def _form(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "Failed extracting request body.") from None
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def request_body(body: bytes, content_type: str | None, *, raw: bool) -> object:
    """The request entity as the action sees it: a JSON value, a form as an object, or a string (base64 when
    binary); ``None`` for no entity."""
    if not body:
        return None
    ctype = content_type or "application/octet-stream"
    media = media_type(ctype)
    if not raw and is_json_family(media):
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except RecursionError:
            raise ApiError(400, "The request content was malformed: JSON nested too deeply.") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request content was malformed: {exc}") from None
    if not raw and media == "application/x-www-form-urlencoded":
        return _form(body)
    if is_binary(ctype) or media == "application/json":
        return base64.b64encode(body).decode("ascii")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii")


# -- responses -----------------------------------------------------------------------------------------------
def _header_values(key: str, value: object) -> list[tuple[str, str]]:
    if isinstance(value, bool):
        return [(key, "true" if value else "false")]
    if isinstance(value, str):
        return [(key, value)]
    if isinstance(value, int | float):
        return [(key, str(value))]
    if isinstance(value, list):
        return [pair for v in value for pair in _header_values(key, v)]
    raise ApiError(400, invalid_media("message/http"))


def _status(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, invalid_media("message/http"))
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(400, invalid_media("message/http")) from None
    if not isinstance(value, int) or not 100 <= value <= 599:
        raise ApiError(400, invalid_media("message/http"))
    return value


def _with_charset(content_type: str) -> str:
    return content_type if "charset=" in content_type.lower() else f"{content_type}; charset=UTF-8"


def _raw_response(status: int, headers: list[tuple[str, str]], body: bytes, content_type: str | None) -> Response:
    response = Response(body, status_code=status)
    for key, value in headers:
        if key.lower() != "content-type":
            response.headers.append(key, value)
    if content_type is not None and body:
        response.headers["content-type"] = content_type
    return response


def http_response(result: object) -> Response:
    """``.http``: the result's ``statusCode``, ``headers`` and ``body`` (OpenWhisk's ``resultAsHttp``)."""
    if not isinstance(result, dict):
        raise ApiError(400, invalid_media("message/http"))
    raw_headers = result.get("headers")
    if raw_headers is not None and not isinstance(raw_headers, dict):
        raise ApiError(400, invalid_media("message/http"))
    headers = [pair for k, v in (raw_headers or {}).items() for pair in _header_values(str(k), v)]
    code = _status(result.get("statusCode"))
    declared = next((v for k, v in headers if k.lower() == "content-type"), None)
    body = result.get("body")
    if body is None or body == "":
        return _raw_response(code or 204, headers, b"", None)
    if isinstance(body, str):
        ctype = declared or "text/html"
        if "/" not in media_type(ctype):
            raise ApiError(400, HTTP_UNKNOWN_CONTENT_TYPE)
        binary = is_binary(ctype)
        if binary or (is_json_family(media_type(ctype)) and BASE64_RE.match(body.strip()) and body.strip()):
            try:
                data = base64.b64decode(body.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, HTTP_CONTENT_TYPE_ERROR) from None
            return _raw_response(code or 200, headers, data, ctype if binary else _with_charset(ctype))
        return _raw_response(code or 200, headers, body.encode("utf-8"), _with_charset(ctype))
    ctype = declared or "application/json"
    if not is_json_family(media_type(ctype)):
        raise ApiError(400, HTTP_CONTENT_TYPE_ERROR)
    shown = "application/json" if media_type(ctype) == "application/json" else _with_charset(media_type(ctype))
    return _raw_response(code or 200, headers, _pretty(body), shown)


def _pretty(value: object) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")


def _field(result: object, *names: str) -> tuple[bool, object]:
    if not isinstance(result, dict):
        return True, result
    for name in names:
        if name in result:
            return True, result[name]
    return False, None


def extension_response(ext: str, result: object) -> Response:
    """The response for ``result`` under the extension's rule (``WhiskWebActionsApi``'s transcoders)."""
    if ext == ".http":
        return http_response(result)
    if ext == ".json":
        if not isinstance(result, dict | list):
            raise ApiError(400, invalid_media("application/json"))
        return Response(_pretty(result), media_type="application/json")
    if ext == ".text":
        found, value = _field(result, "body", "text")
        if not found:
            raise ApiError(404, PROPERTY_NOT_FOUND)
        if isinstance(value, dict | list):
            text = _pretty(value).decode("utf-8")
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        else:
            text = str(value)
        return Response(text, media_type="text/plain; charset=UTF-8")
    field, media = ("html", "text/html") if ext == ".html" else ("svg", "image/svg+xml")
    _, value = _field(result, "body", field)
    if not isinstance(value, str):
        raise ApiError(400, invalid_media(media))
    return Response(value.encode("utf-8"), media_type=_with_charset(media) if ext == ".html" else media)


def _web_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return error_response(status, message, headers)


# -- the handler ---------------------------------------------------------------------------------------------
class WebActions:
    """Answers ``/api/v1/web/...`` for the actions of one server's ``_Api`` (engine, namespace, body budget)."""

    def __init__(self, api: _Api, auth: str | None) -> None:
        self.api = api
        self.auth = auth

    def _authenticated(self, request: Request) -> bool:
        return self.auth is None or is_credential(request.headers.get("authorization", ""), self.auth)

    def _own_credential(self, value: str) -> bool:
        return self.auth is not None and is_credential(value, self.auth)

    async def lookup(self, ns: str, pkg: str, name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The name to invoke, the description of the web-exported action it runs (through a package binding
        too) and the parameters its package and binding give it; 404 for anything else."""
        if ns != self.api.namespace:
            raise ApiError(404, NOT_FOUND)
        full = name if pkg == DEFAULT_PACKAGE else f"{pkg}/{name}"
        target, defaults = self.api.packages.resolve(full)
        try:
            info = await self.api.engine.get_function(target)
        except (FunctionNotFound, ApiError):
            raise ApiError(404, NOT_FOUND) from None
        if not _truthy(info.get("annotations") or {}, WEB_EXPORT):
            raise ApiError(404, NOT_FOUND)
        return full, info, defaults

    def _allowed(self, request: Request, annotations: dict[str, Any], authenticated: bool) -> bool:
        if REQUIRE_AUTH not in annotations:
            return True
        required = annotations[REQUIRE_AUTH]
        if required is True:
            return authenticated
        if required is False:
            return True
        if isinstance(required, str | int | float):
            given = request.headers.get(REQUIRE_AUTH_HEADER)
            expected = str(required)
            return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
        return False

    @staticmethod
    def _cross_site(request: Request) -> bool:
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site.lower() not in ("same-origin", "none")
        origin = request.headers.get("origin")
        return origin is not None and origin.lower() != f"{request.url.scheme}://{request.headers.get('host', '')}"

    async def read_body(self, request: Request, max_bytes: int) -> bytes:
        """The body, refused (413) as soon as it passes ``max_bytes``, held within the server's body budget."""
        async with held_body(request, self.api.budget, max_bytes) as body:
            return body

    def _arguments(
        self, request: Request, rest: str, body: object, *, raw: bool, authenticated: bool
    ) -> dict[str, Any]:
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in request.scope["headers"]
            if not (k.lower() == b"authorization" and self._own_credential(v.decode("latin-1")))
        }
        args: dict[str, Any] = {
            "__ow_method": request.method.lower(),
            "__ow_headers": headers,
            "__ow_path": rest,
        }
        if authenticated and self.auth is not None and "authorization" in request.headers:
            args["__ow_user"] = self.api.namespace
        if raw:
            args["__ow_query"] = request.scope.get("query_string", b"").decode("latin-1")
            args["__ow_body"] = "" if body is None else body
            return args
        args.update(dict(request.query_params))
        if isinstance(body, dict):
            args.update(body)
        elif body is not None:
            args["__ow_body"] = body
        return args

    @staticmethod
    def _overrides(request: Request, body: object, protected: set[str]) -> bool:
        keys = set(request.query_params.keys())
        if isinstance(body, dict):
            keys |= set(body)
        return bool(keys & protected)

    async def _run(self, name: str, info: dict[str, Any], args: dict[str, Any]) -> Activation | str:
        """The ended activation, or its id when it did not end within the blocking wait."""
        api = self.api
        if api.stopping:
            raise ApiError(503, "The server is shutting down; nothing was invoked.")
        try:
            act_id = await api.engine.submit(name, args)
        except MinifaasError as exc:
            raise ApiError(*_engine_error(exc)) from None
        wait_s = api.blocking_wait_s
        limits = info.get("limits") or {}
        if "timeout_s" in limits:
            wait_s = min(wait_s, float(limits["timeout_s"]) + BLOCKING_GRACE_S)
        with anyio.move_on_after(wait_s) as waiting:
            api._waiting.add(waiting)
            if api.stopping:
                waiting.cancel()
            try:
                return await api.engine.activations.wait(act_id, timeout_s=None)
            finally:
                api._waiting.discard(waiting)
        return act_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.respond(request)
        except ApiError as exc:
            response = _web_error(exc.status, exc.message, exc.headers)
        if request.method == "HEAD":
            response.body = b""
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        if request.method not in ALLOWED_METHODS:
            return _web_error(405, f"HTTP method not allowed, supported methods: {', '.join(sorted(ALLOWED_METHODS))}")
        parsed = split_path(request.url.path)
        if parsed is None:
            raise ApiError(404, NOT_FOUND)
        ns, pkg, action, ext, rest = parsed
        name, info, defaults = await self.lookup(ns, pkg, action)
        annotations: dict[str, Any] = info.get("annotations") or {}
        cors: dict[str, str] = {}
        if not _truthy(annotations, CUSTOM_OPTIONS):
            cors = {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers")
                or CORS_ALLOW_HEADERS,
            }
            if request.method == "OPTIONS":
                return Response(b"", status_code=200, headers=cors)
        response = await self._invoke(request, name, info, defaults, ext, rest)
        for key, value in cors.items():
            response.headers[key] = value
        return response

    async def _invoke(
        self, request: Request, name: str, info: dict[str, Any], defaults: dict[str, Any], ext: str, rest: str
    ) -> Response:
        annotations: dict[str, Any] = info.get("annotations") or {}
        authenticated = self._authenticated(request)
        if request.method != "OPTIONS" or not _truthy(annotations, CUSTOM_OPTIONS):
            if not self._allowed(request, annotations, authenticated):
                raise ApiError(401, UNAUTHORIZED)
            if annotations.get(REQUIRE_AUTH) is True and self._cross_site(request):
                raise ApiError(403, CROSS_SITE)
        raw = _truthy(annotations, RAW_HTTP)
        limits = info.get("limits") or {}
        data = await self.read_body(request, int(limits.get("max_payload_bytes", MAX_PAYLOAD_BYTES)))
        body = request_body(data, request.headers.get("content-type"), raw=raw)
        if not raw:
            protected = set(RESERVED)
            if _truthy(annotations, FINAL):
                # OpenWhisk: the action's parameters once merged over its package's and binding's
                protected |= set(info.get("params") or {}) | set(defaults)
            if self._overrides(request, body, protected):
                raise ApiError(400, PARAMETERS_NOT_ALLOWED)
        args = self._arguments(request, rest, body, raw=raw, authenticated=authenticated)
        outcome = await self._run(name, info, args)
        if isinstance(outcome, str):
            return _web_error(202, RESPONSE_NOT_READY, {"X-OpenWhisk-Activation-Id": outcome})
        headers = {"X-OpenWhisk-Activation-Id": outcome.activation_id}
        if outcome.status not in ("success", "application_error"):
            return _web_error(400, ERROR_PROCESSING, headers)
        result: Any = json.loads(dumps(outcome.result))
        if outcome.status == "application_error":
            if not isinstance(result, dict) or "error" not in result:
                return _web_error(404, PROPERTY_NOT_FOUND, headers)
            result = result["error"]
        try:
            response = extension_response(ext, result)
        except ApiError as exc:
            return _web_error(exc.status, exc.message, headers)
        response.headers.update(headers)
        return response


def _engine_error(exc: MinifaasError) -> tuple[int, str]:
    for cls, status in _ERROR_STATUS:
        if isinstance(exc, cls):
            return status, str(exc)
    return 500, str(exc)


# -- routing -------------------------------------------------------------------------------------------------
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class WebRouter:
    """ASGI middleware outside the server's auth gate: web action paths (and the API gateway's routes, through
    ``extra``) are answered here, with their own auth rules; everything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, *, web: Handler, extra: list[tuple[Callable[[str], bool], Handler]]) -> None:
        self.app = app
        self.web = web
        self.extra = extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            for matches, handler in self.extra:
                if matches(path):
                    await handler(scope, receive, send)
                    return
            if path.startswith(WEB_PREFIX):
                await self.web(scope, receive, send)
                return
        await self.app(scope, receive, send)
