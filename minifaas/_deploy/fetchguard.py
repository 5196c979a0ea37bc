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

__all__ = ("REDIRECT_GUARD", "check_allow_list", "check_model_url")

#: set around a guarded fetch: called with each redirect's target URL, raises ModelError to refuse it
REDIRECT_GUARD: ContextVar[Callable[[str], None] | None] = ContextVar("minifaas_redirect_guard", default=None)
HTTP_SCHEMES: Final = ("http", "https")


def check_allow_list(entries: Iterable[str] | None) -> tuple[str, ...] | None:
    """An allow-list of model URL origins, normalized: ``scheme://host[:port]``, the host possibly ``*.domain``
    (its subdomains); ValueError naming a bad entry."""
    if entries is None:
        return None
    if isinstance(entries, str):
        raise ValueError("model_url_allow must be a list of origins, not one string")
    out: list[str] = []
    for entry in entries:
        parsed = urllib.parse.urlparse(str(entry))
        scheme = parsed.scheme.lower()
        if scheme not in HTTP_SCHEMES or not parsed.netloc or parsed.path not in ("", "/") or parsed.query:
            raise ValueError(f"model_url_allow entry {entry!r}: use scheme://host[:port] (http or https, no path)")
        out.append(f"{scheme}://{parsed.netloc.lower()}")
    return tuple(out)


def _allowed(url: str, allow: Iterable[str]) -> bool:
    parsed = urllib.parse.urlparse(url)
    scheme, host = parsed.scheme.lower(), (parsed.hostname or "").lower()
    try:
        port = parsed.port
    except ValueError:
        return False
    for entry in allow:
        e = urllib.parse.urlparse(entry)
        if e.scheme != scheme or (e.port is not None and e.port != port):
            continue
        want = (e.hostname or "").lower()
        if host == want or (want.startswith("*.") and host.endswith(want[1:])):
            return True
    return False


def check_model_url(
    url: str, *, network: bool, sandboxed: bool, readable: Iterable[Path], allow: Iterable[str] | None = None
) -> None:
    """Raise ModelError unless a function with these settings may have the host fetch ``url``.

    ``readable``: the folders a sandboxed function may name local files in (its bundle and read_paths).
    ``allow``: when given, the only origins an http(s) URL may name (:func:`check_allow_list`); an origin named
    there may be private or loopback (the allow-list says so), any other is refused.
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
    if allow is not None:
        _check_allowed(url, allow)
        return  # an origin the allow-list names is fetched, private or not
    if not sandboxed:
        return
    if scheme not in HTTP_SCHEMES:
        raise ModelError(f"model.fetch refused: a sandboxed function fetches http(s) URLs only, not {scheme}:")
    check_public_host(parsed.hostname or "")


def _check_allowed(url: str, allow: Iterable[str]) -> None:
    allow = tuple(allow)
    if not _allowed(url, allow):
        parsed = urllib.parse.urlparse(url)
        raise ModelError(
            f"model.fetch refused: {parsed.scheme}://{parsed.netloc} is not in the model URL allow-list "
            f"({', '.join(allow) or 'empty'})"
        )


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


def redirect_checker(*, network: bool, sandboxed: bool, allow: Iterable[str] | None = None) -> Callable[[str], None]:
    allowed = None if allow is None else tuple(allow)

    def check(url: str) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme.lower() not in HTTP_SCHEMES:
            raise ModelError(f"model.fetch refused: a redirect to {parsed.scheme}: URL")
        if not network:
            raise ModelError("model.fetch refused: the function was deployed with network=False")
        if allowed is not None:
            _check_allowed(url, allowed)
        elif sandboxed:
            check_public_host(parsed.hostname or "")

    return check
