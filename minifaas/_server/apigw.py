"""A subset of OpenWhisk's API gateway: routes (base path + relative path + verb) onto web actions.

The management API is OpenWhisk's ``whisk.system/apimgmt`` package as the ``openwhisk`` client and
``serverless-openwhisk`` call it: ``POST .../createApi`` with ``{apidoc}`` (a whole swagger document, or one
endpoint as ``gatewayBasePath``/``gatewayPath``/``gatewayMethod``/``action``), ``GET .../getApi`` answering
``{apis: [{id, key, value: {gwApiUrl, apidoc, ...}}]}`` and ``DELETE .../deleteApi`` (a base path, or one of its
paths or operations). They need the server's credential. A route answers at ``{server}/api/{namespace}{basepath}
{relpath}`` (the ``gwApiUrl`` of its API), with no credential: the request goes on to the web action the route
names, with the ``X-Require-Whisk-Auth`` secret the route carries. Path templates (``/books/{id}``) match one
segment each. With a state dir the APIs are kept in ``state_dir/server/apis.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._core.statedir import PRIVATE_DIR_MODE, write_private
from .app import ApiError, dumps, error_response, json_response
from .webactions import WEB_PREFIX, is_credential

if TYPE_CHECKING:
    from .app import _Api
    from .webactions import WebActions

__all__ = ("ApiGateway",)

MGMT_PREFIX: Final = f"{WEB_PREFIX}whisk.system/apimgmt/"
GATEWAY_PREFIX: Final = "/api/"
APIS_FILE: Final = "server/apis.json"
MAX_APIDOC_BYTES: Final = 1 << 20
OPERATIONS: Final = ("get", "put", "post", "delete", "patch", "head", "options")
RESPONSE_TYPES: Final = ("http", "json", "text", "html", "svg")
REQUEST_PATH_VAR: Final = "$(request.path)"
SECURE_KEY_VARIABLE: Final = "message.headers.X-Require-Whisk-Auth"
NOT_FOUND: Final = "The requested resource does not exist."

logger = logging.getLogger("minifaas.server")


def _operation_id(operation: str, relpath: str) -> str:
    """OpenWhisk's ``makeOperationId``: the verb, then each path word camel-cased."""
    words = re.sub(r"[^0-9a-z_-]", " ", relpath, flags=re.IGNORECASE).split()
    return operation.lower() + "".join(w[:1].upper() + w[1:].lower() for w in words)


def _normal_basepath(basepath: object) -> str:
    if not isinstance(basepath, str) or not basepath.strip():
        raise ApiError(400, "apidoc: a base path (gatewayBasePath or swagger.basePath) is required.")
    path = "/" + basepath.strip().strip("/")
    if path.split("/")[1:2] == ["v1"]:
        raise ApiError(400, "base path /v1 is taken by the REST API; choose another.")
    return path


def _path_regex(relpath: str) -> re.Pattern[str]:
    parts = [re.escape(p) if not re.fullmatch(r"\{[^}]+\}", p) else "[^/]+" for p in relpath.strip("/").split("/")]
    return re.compile("^/" + "/".join(parts) + "/?$")


class _Target:
    """Where a route sends a request: a web action, its response extension, its secret."""

    def __init__(self, namespace: str, package: str, action: str, ext: str, secure_key: str | None, path: bool) -> None:
        self.namespace = namespace
        self.package = package or "default"
        self.action = action
        self.ext = ext
        self.secure_key = secure_key
        self.path = path


def _case_of(swagger: dict[str, Any], operation_id: str) -> dict[str, Any]:
    config = swagger.get("x-ibm-configuration") or {}
    for step in (config.get("assembly") or {}).get("execute") or []:
        for case in ((step or {}).get("operation-switch") or {}).get("case") or []:
            if operation_id in (case.get("operations") or []):
                return dict(case)
    return {}


def _target(swagger: dict[str, Any], op: dict[str, Any], namespace: str) -> _Target | None:
    x_ow = op.get("x-openwhisk")
    if not isinstance(x_ow, dict) or not isinstance(x_ow.get("action"), str):
        return None
    case = _case_of(swagger, str(op.get("operationId", "")))
    secure_key: str | None = None
    url = str(x_ow.get("url") or "")
    for step in case.get("execute") or []:
        for act in ((step or {}).get("set-variable") or {}).get("actions") or []:
            if act.get("set") == SECURE_KEY_VARIABLE and act.get("value") is not None:
                secure_key = str(act["value"])
        invoke = (step or {}).get("invoke")
        if isinstance(invoke, dict) and isinstance(invoke.get("target-url"), str):
            url = invoke["target-url"]
    ext_match = re.search(r"\.(http|json|text|html|svg)(?:\$\(request\.path\))?$", url)
    ns = str(x_ow.get("namespace") or namespace)
    return _Target(
        namespace if ns == "_" else ns.split("/")[0],
        str(x_ow.get("package") or "default"),
        x_ow["action"],
        ext_match.group(1) if ext_match else "json",
        secure_key,
        url.endswith(REQUEST_PATH_VAR),
    )


class ApiGateway:
    """The APIs of one server (swagger documents by base path), their management and their routes."""

    def __init__(self, api: _Api, web: WebActions, auth: str | None) -> None:
        self.api = api
        self.web = web
        self.auth = auth
        state_dir = getattr(api.engine, "state_dir", None)
        self.file = Path(state_dir) / APIS_FILE if state_dir is not None else None
        self.apis: dict[str, dict[str, Any]] = self._load()
        self.lock = anyio.Lock()

    # -- storage ---------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            logger.error("skipping unreadable API gateway routes %s: %s", self.file, exc)
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    async def _save(self) -> None:
        file = self.file
        if file is None:
            return
        data = dumps(self.apis)

        def write() -> None:
            file.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
            write_private(file, data)

        await anyio.to_thread.run_sync(write)

    # -- routing ---------------------------------------------------------------------------------------------
    def is_mgmt(self, path: str) -> bool:
        return path.startswith(MGMT_PREFIX)

    def is_route(self, path: str) -> bool:
        prefix = f"{GATEWAY_PREFIX}{self.api.namespace}/"
        return path.startswith(prefix) and not path.startswith(f"{GATEWAY_PREFIX}v1/")

    def routes(self) -> list[dict[str, Any]]:
        """Every route: base path, relative path, verb, the action and the URL (for the CLI's ``api list``)."""
        out: list[dict[str, Any]] = []
        for basepath, swagger in sorted(self.apis.items()):
            for relpath, ops in sorted((swagger.get("paths") or {}).items()):
                for verb, op in sorted(ops.items()):
                    target = _target(swagger, op, self.api.namespace) if isinstance(op, dict) else None
                    action = (
                        "?"
                        if target is None
                        else f"/{target.namespace}/{'' if target.package == 'default' else target.package + '/'}"
                        f"{target.action}"
                    )
                    out.append(
                        {
                            "api": (swagger.get("info") or {}).get("title", basepath),
                            "basepath": basepath,
                            "relpath": relpath,
                            "operation": verb.upper(),
                            "action": action,
                            "responsetype": target.ext if target else None,
                        }
                    )
        return out

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request to a route: rewritten into its web action's request (or a 404)."""
        path: str = scope["path"]
        rest = path[len(f"{GATEWAY_PREFIX}{self.api.namespace}") :]
        method = str(scope.get("method", "GET")).lower()
        found = self._match(rest, method)
        if found is None:
            await error_response(404, NOT_FOUND)(scope, receive, send)
            return
        target, relpath = found
        pkg = target.package
        web_path = f"{WEB_PREFIX}{target.namespace}/{pkg}/{target.action}.{target.ext}"
        if target.path:
            web_path += relpath
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-require-whisk-auth"]
        if target.secure_key is not None:
            headers.append((b"x-require-whisk-auth", target.secure_key.encode("utf-8")))
        inner = dict(scope, path=web_path, raw_path=web_path.encode("utf-8"), headers=headers)
        await self.web(inner, receive, send)

    def _match(self, rest: str, method: str) -> tuple[_Target, str] | None:
        for basepath in sorted(self.apis, key=len, reverse=True):
            if rest != basepath and not rest.startswith(basepath.rstrip("/") + "/"):
                continue
            relative = rest[len(basepath.rstrip("/")) :] or "/"
            swagger = self.apis[basepath]
            for relpath, ops in (swagger.get("paths") or {}).items():
                if not isinstance(ops, dict) or not _path_regex(relpath).match(relative):
                    continue
                op = ops.get(method)
                if isinstance(op, dict):
                    target = _target(swagger, op, self.api.namespace)
                    if target is not None:
                        return target, relative
        return None

    # -- management ------------------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        return self.auth is None or is_credential(request.headers.get("authorization", ""), self.auth)

    async def mgmt(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self._mgmt(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        await response(scope, receive, send)

    async def _mgmt(self, request: Request) -> Response:
        if not self._authorized(request):
            raise ApiError(401, "The supplied authentication is invalid: the API gateway needs the server's uuid:key.")
        op = request.url.path[len(MGMT_PREFIX) :].split(".", 1)[0]
        method = request.method
        async with self.lock:
            if op == "createApi" and method in ("POST", "PUT"):
                return await self.create(request)
            if op == "getApi" and method == "GET":
                return self.get(request)
            if op == "deleteApi" and method == "DELETE":
                return await self.delete(request)
        if op in ("createApi", "getApi", "deleteApi"):
            raise ApiError(405, f"{op} does not take {method}.")
        raise ApiError(404, NOT_FOUND)

    def _cli_api(self, request: Request, basepath: str, swagger: dict[str, Any]) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        return {
            "namespace": self.api.namespace,
            "gwApiActivated": True,
            "tenantId": self.api.namespace,
            "gwApiUrl": f"{base}{GATEWAY_PREFIX}{self.api.namespace}{basepath.rstrip('/')}",
            "apidoc": swagger,
        }

    async def create(self, request: Request) -> Response:
        raw = await self.web.read_body(request, MAX_APIDOC_BYTES)
        try:
            doc = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"The request content was malformed: {exc}") from None
        apidoc = doc.get("apidoc") if isinstance(doc, dict) else None
        if isinstance(apidoc, str):
            with contextlib.suppress(ValueError):
                apidoc = json.loads(apidoc)
        if not isinstance(apidoc, dict):
            raise ApiError(400, "apidoc is required: {apidoc: {swagger}} or {apidoc: {gatewayBasePath, ...}}.")
        swagger = apidoc.get("swagger")
        if isinstance(swagger, str):
            try:
                swagger = json.loads(swagger)
            except ValueError as exc:
                raise ApiError(400, f"apidoc.swagger is not JSON: {exc}") from None
        if swagger is not None:
            if not isinstance(swagger, dict) or not isinstance(swagger.get("paths"), dict):
                raise ApiError(400, "apidoc.swagger must be a swagger 2.0 object with paths.")
            basepath = _normal_basepath(swagger.get("basePath"))
            swagger = dict(swagger, basePath=basepath)
            self._check_targets(swagger)
        else:
            responsetype = request.query_params.get("responsetype") or "json"
            if responsetype not in RESPONSE_TYPES:
                raise ApiError(400, f"responsetype must be one of {', '.join(RESPONSE_TYPES)}, got {responsetype!r}")
            basepath = _normal_basepath(apidoc.get("gatewayBasePath"))
            swagger = self._add_endpoint(basepath, apidoc, responsetype)
        self.apis[basepath] = swagger
        await self._save()
        return json_response(self._cli_api(request, basepath, swagger))

    def _check_targets(self, swagger: dict[str, Any]) -> None:
        for relpath, ops in swagger["paths"].items():
            if not isinstance(ops, dict):
                raise ApiError(400, f"apidoc.swagger.paths[{relpath!r}] must be an object of operations.")
            for verb, op in ops.items():
                if verb.lower() not in OPERATIONS:
                    raise ApiError(400, f"apidoc.swagger.paths[{relpath!r}]: unknown operation {verb!r}.")
                if not isinstance(op, dict) or _target(swagger, op, self.api.namespace) is None:
                    raise ApiError(
                        400, f"apidoc.swagger.paths[{relpath!r}].{verb} names no action (x-openwhisk.action)."
                    )

    def _add_endpoint(self, basepath: str, apidoc: dict[str, Any], responsetype: str) -> dict[str, Any]:
        relpath, verb, action = apidoc.get("gatewayPath"), apidoc.get("gatewayMethod"), apidoc.get("action")
        if not isinstance(relpath, str) or not relpath.startswith("/"):
            raise ApiError(400, f"apidoc.gatewayPath must be a path starting with '/', got {relpath!r}.")
        if not isinstance(verb, str) or verb.lower() not in OPERATIONS:
            raise ApiError(400, f"apidoc.gatewayMethod must be one of {', '.join(OPERATIONS)}, got {verb!r}.")
        if not isinstance(action, dict) or not isinstance(action.get("name"), str):
            raise ApiError(400, "apidoc.action must be an object with the action's name.")
        operation = verb.lower()
        name = action["name"].strip("/")
        pkg, _, short = name.rpartition("/")
        ns = str(action.get("namespace") or self.api.namespace)
        ns = self.api.namespace if ns == "_" else ns
        operation_id = _operation_id(operation, relpath)
        target = f"{WEB_PREFIX}{ns}/{pkg or 'default'}/{short}.{responsetype}"
        swagger = copy.deepcopy(self.apis.get(basepath)) or {
            "swagger": "2.0",
            "info": {"title": apidoc.get("apiName") or basepath, "version": "1.0.0"},
            "basePath": basepath,
            "paths": {},
            "x-ibm-configuration": {
                "assembly": {"execute": [{"operation-switch": {"case": []}}]},
                "cors": {"enabled": True},
            },
        }
        swagger["paths"].setdefault(relpath, {})[operation] = {
            "operationId": operation_id,
            "parameters": apidoc.get("pathParameters"),
            "x-openwhisk": {"url": target, "namespace": ns, "package": pkg, "action": short},
            "responses": {"default": {"description": "Default response"}},
        }
        execute: list[dict[str, Any]] = [
            {"invoke": {"target-url": target + (REQUEST_PATH_VAR if responsetype == "http" else ""), "verb": "keep"}}
        ]
        if action.get("secureKey") is not None:
            execute.append(
                {"set-variable": {"actions": [{"set": SECURE_KEY_VARIABLE, "value": str(action["secureKey"])}]}}
            )
        cases = self._cases(swagger)
        cases[:] = [c for c in cases if operation_id not in (c.get("operations") or [])]
        cases.append({"operations": [operation_id], "execute": execute})
        return swagger

    @staticmethod
    def _cases(swagger: dict[str, Any]) -> list[dict[str, Any]]:
        config = swagger.setdefault("x-ibm-configuration", {})
        execute = config.setdefault("assembly", {}).setdefault("execute", [])
        if not execute:
            execute.append({"operation-switch": {"case": []}})
        switch = execute[0].setdefault("operation-switch", {})
        cases: list[dict[str, Any]] = switch.setdefault("case", [])
        return cases

    def _find(self, name: str | None) -> list[str]:
        """Base paths of the API named by ``name`` (its base path or its title), all of them for None."""
        if not name:
            return sorted(self.apis)
        as_path = "/" + name.strip("/")
        return sorted(b for b, s in self.apis.items() if b == as_path or (s.get("info") or {}).get("title") == name)

    def get(self, request: Request) -> Response:
        q = request.query_params
        relpath, operation = q.get("relpath"), (q.get("operation") or "").lower() or None
        apis = []
        for basepath in self._find(q.get("basepath")):
            swagger = copy.deepcopy(self.apis[basepath])
            if relpath is not None:
                paths = {p: ops for p, ops in swagger.get("paths", {}).items() if p == relpath}
                if operation is not None:
                    paths = {p: {v: o for v, o in ops.items() if v == operation} for p, ops in paths.items()}
                swagger["paths"] = {p: ops for p, ops in paths.items() if ops}
                if not swagger["paths"]:
                    continue
            apis.append(
                {
                    "id": f"API:{self.api.namespace}:{basepath}",
                    "key": self.api.namespace,
                    "value": self._cli_api(request, basepath, swagger),
                }
            )
        return json_response({"apis": apis})

    async def delete(self, request: Request) -> Response:
        q = request.query_params
        name = q.get("basepath")
        if not name:
            raise ApiError(400, "basepath is required: the base path or name of the API to delete.")
        found = self._find(name)
        if not found:
            raise ApiError(404, f"API '{name}' does not exist.")
        relpath, operation = q.get("relpath"), (q.get("operation") or "").lower() or None
        for basepath in found:
            if relpath is None:
                del self.apis[basepath]
                continue
            swagger = self.apis[basepath]
            paths = swagger.get("paths") or {}
            if relpath not in paths or (operation is not None and operation not in paths[relpath]):
                what = f"path '{relpath}'" + (f" with operation '{operation}'" if operation else "")
                raise ApiError(404, f"{what} does not exist in the API")
            ops = [operation] if operation is not None else list(paths[relpath])
            cases = self._cases(swagger)
            for op in ops:
                del paths[relpath][op]
                op_id = _operation_id(op, relpath)
                cases[:] = [c for c in cases if op_id not in (c.get("operations") or [])]
            if not paths[relpath]:
                del paths[relpath]
            if not paths:
                del self.apis[basepath]
        await self._save()
        return json_response({})
