"""OpenWhisk packages over REST: ``/namespaces/{ns}/packages[/{name}]``, bindings, and the names they give actions.

A package groups actions (``pkg/action``) and gives them default parameters (under the action's own and the
invocation's). A *binding* is a package that points at another (``binding: {namespace, name}``), one level deep,
and adds parameters of its own: ``binding/action`` runs the bound package's action with package < binding <
action < invocation parameters. Packages of another namespace (here: ``whisk.system``) are visible only when
published. Deleting a package that still holds actions is refused (409), as OpenWhisk does.

The engine asks :meth:`PackageStore.resolve` for every name it runs (``Engine.set_resolver``), so rules,
sequences, triggers and direct invocations all see packages the same way. Packages of the server's namespace
are kept under ``state_dir/server/packages`` (one JSON file each) when the engine has a state dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import Response

from .._core.statedir import PRIVATE_DIR_MODE, write_private
from .names import SYSTEM_NS

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ("PACKAGES_SUBDIR", "Package", "PackageRoutes", "PackageStore")

PACKAGES_SUBDIR: Final = "server/packages"
#: OpenWhisk's messages, word for word
BINDING_MISSING: Final = "Binding references a package that does not exist."
BINDING_OF_BINDING: Final = "Cannot bind to another package binding."
PACKAGE_TO_BINDING: Final = "Resource is a package and cannot be converted into a binding."
BINDING_TO_PACKAGE: Final = "Resource is a binding and cannot be converted into a package."
NOT_ON_BINDING: Final = "Operation not permitted on package binding."

logger = logging.getLogger("minifaas.server")


@dataclasses.dataclass(slots=True)
class Package:
    """A package or (with ``binding``) a package binding."""

    namespace: str
    name: str
    params: dict[str, Any]
    annotations: dict[str, Any]
    publish: bool
    binding: tuple[str, str] | None = None
    version: int = 1
    updated: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["binding"] = list(self.binding) if self.binding is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Package:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        b = kw.get("binding")
        kw["binding"] = (str(b[0]), str(b[1])) if isinstance(b, list) and len(b) == 2 else None
        return cls(**kw)


class PackageStore:
    """Packages by (namespace, name): the server's own (saved with a state dir) and the system catalog's."""

    def __init__(self, namespace: str, folder: Path | None) -> None:
        self.namespace = namespace
        self.folder = folder
        self.packages: dict[tuple[str, str], Package] = {}

    def load(self) -> int:
        if self.folder is None or not self.folder.is_dir():
            return 0
        n = 0
        for path in sorted(self.folder.glob("*.json")):
            try:
                pkg = Package.from_json(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("skipping unreadable saved package %s: %s", path, exc)
                continue
            pkg.namespace = self.namespace
            self.packages[(pkg.namespace, pkg.name)] = pkg
            n += 1
        return n

    def get(self, namespace: str, name: str) -> Package | None:
        return self.packages.get((namespace, name))

    def list(self, namespace: str) -> list[Package]:
        return sorted((p for (ns, _), p in self.packages.items() if ns == namespace), key=lambda p: p.name)

    def put(self, pkg: Package) -> None:
        self.packages[(pkg.namespace, pkg.name)] = pkg
        if self.folder is not None and pkg.namespace == self.namespace:
            self.folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
            write_private(self.folder / f"{pkg.name}.json", json.dumps(pkg.to_json()).encode("utf-8"))

    def delete(self, namespace: str, name: str) -> None:
        self.packages.pop((namespace, name), None)
        if self.folder is not None and namespace == self.namespace:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{name}.json").unlink()

    def visible(self, pkg: Package) -> bool:
        """The server's own packages, and published ones of other namespaces."""
        return pkg.namespace == self.namespace or pkg.publish

    def resolve(self, ref: str) -> tuple[str, dict[str, Any]]:
        """The engine's resolver: ``pkg/a`` -> (``pkg/a``, package parameters); ``binding/a`` -> the bound
        package's action, with its package's parameters under the binding's. Anything else is unchanged."""
        base, at, qualifier = ref.partition("@")
        parts = base.split("/")
        if len(parts) == 2:
            ns, pkg_name, action = self.namespace, parts[0], parts[1]
        elif len(parts) == 3:
            ns, pkg_name, action = parts
        else:
            return ref, {}
        pkg = self.get(ns, pkg_name)
        if pkg is None:
            return ref, {}
        if pkg.binding is None:
            return ref, dict(pkg.params)
        target = self.get(*pkg.binding)
        if target is None:
            return ref, {}
        prefix = target.name if target.namespace == self.namespace else f"{target.namespace}/{target.name}"
        return f"{prefix}/{action}{at}{qualifier}", {**target.params, **pkg.params}


def _now_ms() -> int:
    return int(time.time() * 1000)


class PackageRoutes:
    """The REST handlers of ``/namespaces/{ns}/packages``; ``api`` is the app's ``_Api``."""

    def __init__(self, api: Any, engine: Engine, store: PackageStore) -> None:
        self.api = api
        self.engine = engine
        self.store = store

    # -- shapes ------------------------------------------------------------------------------------------------
    async def _actions_of(self, pkg: Package) -> list[dict[str, Any]]:
        """``[{name, version, annotations, publish}]`` of the package's actions (a binding's: its target's)."""
        target = self.store.get(*pkg.binding) if pkg.binding is not None else pkg
        if target is None:
            return []
        prefix = f"{target.name}/" if target.namespace == self.store.namespace else f"{SYSTEM_NS}/{target.name}/"
        out = []
        for info in sorted(await self.engine.list_functions(), key=lambda i: str(i["name"])):
            name = str(info["name"])
            if name.startswith(prefix) and "/" not in name[len(prefix) :]:
                shape = self.api._action_json(info, code=False)
                out.append({k: shape[k] for k in ("name", "version", "annotations", "publish")})
        return out

    def _json(self, pkg: Package, actions: list[dict[str, Any]] | None) -> dict[str, Any]:
        from .app import _kv

        out: dict[str, Any] = {
            "namespace": pkg.namespace,
            "name": pkg.name,
            "version": f"0.0.{pkg.version}",
            "publish": pkg.publish,
            "parameters": _kv(pkg.params),
            "annotations": _kv(pkg.annotations),
            "binding": {"namespace": pkg.binding[0], "name": pkg.binding[1]} if pkg.binding is not None else {},
            "updated": pkg.updated,
        }
        if actions is not None:
            feeds = [a for a in actions if any(x["key"] == "feed" for x in a["annotations"])]
            out["actions"] = [a for a in actions if a not in feeds]
            out["feeds"] = feeds
        return out

    def _visible(self, ns: str, name: str) -> Package:
        from .app import NOT_FOUND, ApiError

        pkg = self.store.get(ns, name)
        if pkg is None:
            raise ApiError(404, f"{NOT_FOUND} (package {name!r})")
        if not self.store.visible(pkg):
            raise ApiError(403, f"The supplied authentication is not authorized to access '{ns}/{name}'.")
        return pkg

    # -- handlers ----------------------------------------------------------------------------------------------
    async def list(self, request: Request) -> Response:
        from .app import _flag, int_arg, json_response, list_limit

        ns = self.api.ns_read(request)
        pkgs = [p for p in self.store.list(ns) if self.store.visible(p)]
        if _flag(request, "count"):
            return json_response({"packages": len(pkgs)})
        skip = int_arg(request, "skip", 0) or 0
        return json_response([self._json(p, None) for p in pkgs[skip : skip + list_limit(request)]])

    async def get(self, request: Request) -> Response:
        from .app import json_response

        ns = self.api.ns_read(request)
        pkg = self._visible(ns, str(request.path_params["name"]))
        return json_response(self._json(pkg, await self._actions_of(pkg)))

    async def put(self, request: Request) -> Response:
        from .app import MAX_SMALL_BODY_BYTES, ApiError, _flag, _from_kv, _read_json, json_response

        ns = self.api.ns(request)
        name = str(request.path_params["name"])
        if not _name_ok(name) or name == SYSTEM_NS:
            raise ApiError(400, f"invalid package name {name!r}: use letters, digits, _ . - (first not . or -)")
        doc = await _read_json(request, self.api.budget, max_bytes=MAX_SMALL_BODY_BYTES, empty={})
        if not isinstance(doc, dict):
            raise ApiError(400, "The request content must be a JSON object.")
        async with self.api._locks.hold("package", name):
            old = self.store.get(ns, name)
            if old is not None and not _flag(request, "overwrite"):
                raise ApiError(409, f"resource already exists: package {name!r} (use ?overwrite=true to update)")
            wants_binding = doc.get("binding") not in (None, {})
            if old is not None and "binding" in doc and (old.binding is not None) != wants_binding:
                raise ApiError(400, PACKAGE_TO_BINDING if old.binding is None else BINDING_TO_PACKAGE)
            binding = self._binding(doc.get("binding"), old)
            publish = doc.get("publish", old.publish if old is not None else False)
            if not isinstance(publish, bool):
                raise ApiError(400, f"publish must be true or false, got {publish!r}")
            params = (
                _from_kv(doc["parameters"], "parameters")
                if "parameters" in doc
                else (dict(old.params) if old is not None else {})
            )
            annotations = (
                _from_kv(doc["annotations"], "annotations")
                if "annotations" in doc
                else (dict(old.annotations) if old is not None else {})
            )
            pkg = Package(
                namespace=ns,
                name=name,
                params=params,
                annotations=annotations,
                publish=publish,
                binding=binding,
                version=old.version + 1 if old is not None else 1,
                updated=_now_ms(),
            )
            if self.engine.namespace == ns and any(
                f["name"] == name for f in await self.engine.list_functions() if "/" not in str(f["name"])
            ):
                raise ApiError(409, f"resource already exists: {name!r} is an action")
            self.store.put(pkg)
        return json_response(self._json(pkg, None))

    def _binding(self, given: object, old: Package | None) -> tuple[str, str] | None:
        from .app import ApiError

        if given is None:
            return old.binding if old is not None else None
        if given == {}:
            return None
        if not isinstance(given, dict) or not isinstance(given.get("name"), str):
            raise ApiError(400, "binding must be an object {namespace, name}")
        ns = given.get("namespace") or self.store.namespace
        if not isinstance(ns, str):
            raise ApiError(400, "binding.namespace must be a string")
        ns = self.store.namespace if ns == "_" else ns
        target = self.store.get(ns, given["name"])
        if target is None:
            raise ApiError(400, BINDING_MISSING)
        if not self.store.visible(target):
            raise ApiError(403, f"The supplied authentication is not authorized to access '{ns}/{target.name}'.")
        if target.binding is not None:
            raise ApiError(400, BINDING_OF_BINDING)
        return ns, target.name

    async def delete(self, request: Request) -> Response:
        from .app import NOT_FOUND, ApiError, json_response

        ns = self.api.ns(request)
        name = str(request.path_params["name"])
        async with self.api._locks.hold("package", name):
            pkg = self.store.get(ns, name)
            if pkg is None:
                raise ApiError(404, f"{NOT_FOUND} (package {name!r})")
            if pkg.binding is None:
                inside = [f for f in await self.engine.list_functions() if str(f["name"]).startswith(f"{name}/")]
                if inside:
                    n = len(inside)
                    raise ApiError(409, f"Package not empty (contains {n} {'entity' if n == 1 else 'entities'})")
            self.store.delete(ns, name)
        return json_response(self._json(pkg, None))

    def require_for_action(self, ns: str, engine_name: str) -> None:
        """An action ``pkg/name`` may be created only in an existing package of ``ns`` that is not a binding."""
        from .app import ApiError

        pkg_name, sep, _ = engine_name.partition("/")
        if not sep:
            if self.store.get(ns, engine_name) is not None:
                raise ApiError(409, f"resource already exists: {engine_name!r} is a package")
            return
        pkg = self.store.get(ns, pkg_name)
        if pkg is None:
            raise ApiError(404, f"package {pkg_name!r} does not exist: create it first")
        if pkg.binding is not None:
            raise ApiError(400, f"{NOT_ON_BINDING} ({pkg_name!r} is a binding: create the action in its package)")


def _name_ok(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,255}", name) is not None
