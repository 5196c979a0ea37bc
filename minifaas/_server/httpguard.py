"""What the dev server refuses before any handler runs: cross-site writes from browsers and non-JSON bodies.

A browser that has logged in to the web UI with HTTP basic auth sends the credential with every request to the
server, including a form another site posts to it. Browsers mark such requests (``Sec-Fetch-Site``, ``Origin``)
and a form can only send ``application/x-www-form-urlencoded``, ``multipart/form-data`` or ``text/plain``; a
JSON content type forces a CORS preflight, which this server never grants. So a write is accepted only when
no browser says it comes from another origin and its body (if any) is declared JSON.
"""

from __future__ import annotations

from typing import Final

from starlette.types import Scope

__all__ = ("write_refusal",)

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``Sec-Fetch-Site`` values of a request the user made on this server's own pages or typed in
OWN_SITE_VALUES: Final = frozenset({b"same-origin", b"none"})
JSON_MEDIA_TYPE: Final = b"application/json"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _own_origin(scope: Scope, origin: bytes) -> bool:
    host = _header(scope, b"host")
    if host is None:
        return False
    scheme = b"https" if scope.get("scheme") == "https" else b"http"
    return origin.lower() == scheme + b"://" + host.lower()


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == JSON_MEDIA_TYPE or (media.startswith(b"application/") and media.endswith(b"+json"))


def write_refusal(scope: Scope) -> tuple[int, str] | None:
    """``(status, message)`` when an HTTP request that changes state must be refused, else None."""
    if scope.get("method", "GET") in SAFE_METHODS:
        return None
    site = _header(scope, b"sec-fetch-site")
    origin = _header(scope, b"origin")
    if site is not None and site.lower() not in OWN_SITE_VALUES:
        return 403, f"cross-site request refused (Sec-Fetch-Site: {site.decode('latin-1')})"
    if site is None and origin is not None and not _own_origin(scope, origin):
        return 403, f"cross-site request refused (Origin: {origin.decode('latin-1')})"
    content_type = _header(scope, b"content-type")
    if content_type is not None and not _is_json(content_type):
        shown = content_type.decode("latin-1")
        return 415, f"request bodies must be JSON (Content-Type: application/json), got {shown!r}"
    return None
