"""What a function may ask the host to fetch for it (``models.load(url)`` goes through the host's model store).

The host fetches with its own rights, so without a check a function reaches through it what it cannot reach
itself: a ``network=False`` function a loopback "metadata" server, a sandboxed one the host's files. Checked before
every fetch, and again on every redirect (:data:`REDIRECT_GUARD`, which the model store's HTTP opener consults).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Final

from .._errors import ModelError

__all__ = ("REDIRECT_GUARD", "check_model_url")

#: set around a guarded fetch: called with each redirect's target URL, raises ModelError to refuse it
REDIRECT_GUARD: ContextVar[Callable[[str], None] | None] = ContextVar("minifaas_redirect_guard", default=None)
HTTP_SCHEMES: Final = ("http", "https")


def check_model_url(url: str, *, network: bool, sandboxed: bool, readable: Iterable[Path]) -> None:
    """Raise ModelError unless a function with these settings may have the host fetch ``url``.

    ``readable``: the folders a sandboxed function may name local files in (its bundle and read_paths).
    """
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        if sandboxed:
            path = Path(urllib.parse.unquote(parsed.path) if scheme else url).resolve()
            if not any(path.is_relative_to(Path(folder).resolve()) for folder in readable):
                raise ModelError(f"model.fetch refused: {path} is outside this function's bundle and read_paths")
        return
    if not network:
        raise ModelError(f"model.fetch refused: the function was deployed with network=False ({scheme}: URL)")
    if not sandboxed:
        return
    if scheme not in HTTP_SCHEMES:
        raise ModelError(f"model.fetch refused: a sandboxed function fetches http(s) URLs only, not {scheme}:")
    check_public_host(parsed.hostname or "")


def check_public_host(host: str) -> None:
    """Raise ModelError when ``host`` resolves to a private, loopback, link-local or otherwise non-global address
    (checked on the resolved addresses, so a name pointing inward is refused too)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ModelError(f"model.fetch refused: cannot resolve {host!r}: {exc}") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not ip.is_global:
            raise ModelError(f"model.fetch refused: {host} resolves to {ip}, a private, loopback or link-local address")


def redirect_checker(*, network: bool, sandboxed: bool) -> Callable[[str], None]:
    def check(url: str) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme.lower() not in HTTP_SCHEMES:
            raise ModelError(f"model.fetch refused: a redirect to {parsed.scheme}: URL")
        if not network:
            raise ModelError("model.fetch refused: the function was deployed with network=False")
        if sandboxed:
            check_public_host(parsed.hostname or "")

    return check
