"""OpenWhisk entity names <-> the engine's names.

OpenWhisk names an action ``/namespace/name`` or ``/namespace/package/name`` (``_`` is the caller's namespace),
or relative: ``name``, ``package/name``. The engine keeps the server's own actions as ``name`` and
``package/name`` and the read-only system catalog as ``whisk.system/package/name``; records show OpenWhisk's
``namespace`` (``guest/package``) and short ``name``.
"""

from __future__ import annotations

from typing import Final

__all__ = ("SYSTEM_NS", "BadName", "engine_name", "entity_path", "fully_qualified", "split_ref")

#: the namespace of OpenWhisk's system catalog (read-only here)
SYSTEM_NS: Final = "whisk.system"


class BadName(ValueError):
    """A name that is not an entity of a namespace this server serves."""


def split_ref(ref: str) -> tuple[str | None, str | None, str]:
    """(namespace, package, name) of ``/ns/pkg/a``, ``/ns/a``, ``pkg/a`` or ``a`` (None where not given)."""
    if ref.startswith("/"):
        parts = ref[1:].split("/")
        if len(parts) == 2 and all(parts):
            return parts[0], None, parts[1]
        if len(parts) == 3 and all(parts):
            return parts[0], parts[1], parts[2]
        raise BadName(f"{ref!r} is not a fully qualified name /namespace/[package/]name")
    parts = ref.split("/")
    if len(parts) == 1 and parts[0]:
        return None, None, parts[0]
    if len(parts) == 2 and all(parts):
        return None, parts[0], parts[1]
    raise BadName(f"{ref!r} is not a name, package/name or /namespace/[package/]name")


def engine_name(ref: str, namespace: str) -> str:
    """The engine's name for an OpenWhisk reference made in ``namespace`` (the caller's)."""
    ns, pkg, name = split_ref(ref)
    local = name if pkg is None else f"{pkg}/{name}"
    if ns is None or ns in ("_", namespace):
        return local
    if ns == SYSTEM_NS:
        if pkg is None:
            raise BadName(f"{ref!r}: the system namespace holds packages only")
        return f"{SYSTEM_NS}/{local}"
    raise BadName(f"{ref!r} is not an entity of namespace {namespace!r} or {SYSTEM_NS!r}")


def entity_path(engine: str, namespace: str) -> tuple[str, str]:
    """OpenWhisk's (namespace path, short name): ``pkg/a`` -> (``guest/pkg``, ``a``)."""
    parent, _, name = engine.rpartition("/")
    if not parent:
        return namespace, name
    if parent.count("/") == 1:  # whisk.system/pkg
        return parent, name
    return f"{namespace}/{parent}", name


def fully_qualified(engine: str, namespace: str) -> str:
    """``/guest/pkg/a`` for the engine's ``pkg/a``; ``/whisk.system/utils/echo`` for the catalog's."""
    path, name = entity_path(engine, namespace)
    return f"/{path}/{name}"
