"""One model download over HTTP(S) with an overall deadline, prompt cancellation, a Content-Length check and
bounded retries with backoff. Used by the sandbox's default fetcher and by the host's model store.

``urllib``'s timeout bounds each socket read, not the download: a server dripping one byte a second kept a
"60 s" download going for ever, and a cancelled fetch held its worker thread (and every waiter) until then. Here
every read waits at most until the deadline, the body is read one socket read at a time (``read1``), and
:meth:`Abort.abort` shuts the socket from another thread so a blocked read returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import threading
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final

__all__ = ("Abort", "DownloadError", "FetchLimits", "download")

CHUNK_BYTES: Final = 1 << 20
MAX_REDIRECTS: Final = 5
#: answers worth another attempt: the server or a proxy in front of it had a transient problem
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(Exception):
    """A download failed; ``retriable`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class FetchLimits:
    """What one download may take: ``deadline_s`` for all attempts together, ``read_timeout_s`` per read."""

    deadline_s: float = 600.0
    read_timeout_s: float = 60.0
    max_bytes: int = 2 << 30
    attempts: int = 3
    backoff_s: float = 0.5
    #: how errors name ``max_bytes``
    limit_name: str = "the download limit"
    #: called with every redirect's target before it is followed; raises to refuse it (the host's guard)
    on_redirect: Callable[[str], None] | None = None


class Abort:
    """Cancels a download from another thread: the blocked read returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._sock is not None:
                _shutdown(self._sock)

    def _attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if sock is not None and self.aborted:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def download(url: str, out: BinaryIO, limits: FetchLimits, abort: Abort | None = None) -> tuple[int, str]:
    """Write the body at ``url`` to ``out`` (rewound for each attempt); return (bytes, sha256 hex).

    Raises :class:`DownloadError`: on a 4xx answer, a body over ``limits.max_bytes``, an aborted download, or
    once the attempts or the deadline are used up on transient failures (5xx, resets, stalls, short bodies).
    """
    abort = abort or Abort()
    deadline = time.monotonic() + limits.deadline_s
    attempt = 0
    while True:
        attempt += 1
        out.seek(0)
        out.truncate()
        try:
            return _attempt(url, out, limits, abort, deadline)
        except DownloadError as exc:
            if abort.aborted:
                raise DownloadError(f"cannot fetch {url}: cancelled") from exc
            pause = limits.backoff_s * 2 ** (attempt - 1)
            if not exc.retriable or attempt >= limits.attempts or time.monotonic() + pause >= deadline:
                if exc.retriable and attempt > 1:
                    raise DownloadError(f"{exc} (after {attempt} attempts)") from exc
                raise
            time.sleep(pause)


def _attempt(url: str, out: BinaryIO, limits: FetchLimits, abort: Abort, deadline: float) -> tuple[int, str]:
    target = url
    for _ in range(MAX_REDIRECTS + 1):
        conn, sock, resp = _request(target, limits, abort, deadline)
        try:
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                target = urllib.parse.urljoin(target, resp.getheader("Location") or "")
                if limits.on_redirect is not None:
                    limits.on_redirect(target)
                continue
            if resp.status != 200:
                raise DownloadError(
                    f"cannot fetch {url}: HTTP {resp.status} {resp.reason}", retriable=resp.status in RETRY_STATUSES
                )
            return _read_body(url, sock, resp, out, limits, abort, deadline)
        finally:
            abort._attach(None)
            # the response owns the socket once the server said "Connection: close"
            resp.close()
            conn.close()
    raise DownloadError(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects")


def _remaining(url: str, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadError(f"cannot fetch {url}: the download's deadline passed")
    return left


def _request(
    url: str, limits: FetchLimits, abort: Abort, deadline: float
) -> tuple[http.client.HTTPConnection, socket.socket, http.client.HTTPResponse]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"cannot fetch {url}: not an http(s) URL")
    timeout = min(limits.read_timeout_s, _remaining(url, deadline))
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"Accept-Encoding": "identity", "User-Agent": "minifaas"}
    proxy = _proxy_for(parts)
    if proxy is None:
        conn = cls(parts.hostname, parts.port, timeout=timeout)
    else:
        # as urllib did: http_proxy/https_proxy/no_proxy from the environment, CONNECT for https
        auth = {}
        if proxy.username:
            creds = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
            auth = {"Proxy-Authorization": "Basic " + b64encode(creds.encode()).decode()}
        conn = cls(proxy.hostname or "", proxy.port, timeout=timeout)
        if parts.scheme == "https":
            conn.set_tunnel(parts.hostname, parts.port, headers=auth)
        else:
            path = urllib.parse.urlunsplit(parts._replace(fragment=""))
            headers.update(auth)
    try:
        conn.connect()
        # kept here: the connection forgets its socket when the answer says "Connection: close"
        sock = conn.sock
        assert isinstance(sock, socket.socket)
        abort._attach(sock)
        if abort.aborted:
            raise DownloadError(f"cannot fetch {url}: cancelled")
        conn.request("GET", path, headers=headers)
        return conn, sock, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        abort._attach(None)
        conn.close()
        raise DownloadError(f"cannot fetch {url}: {exc!r}", retriable=True) from exc
    except BaseException:
        abort._attach(None)
        conn.close()
        raise


def _proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _read_body(
    url: str,
    sock: socket.socket,
    resp: http.client.HTTPResponse,
    out: BinaryIO,
    limits: FetchLimits,
    abort: Abort,
    deadline: float,
) -> tuple[int, str]:
    length = resp.getheader("Content-Length")
    declared = int(length) if length and length.strip().isdigit() else None
    if declared is not None and declared > limits.max_bytes:
        raise DownloadError(f"{url} is {declared} bytes, over {limits.limit_name} of {limits.max_bytes}")
    h = hashlib.sha256()
    total = 0
    while True:
        # each read waits at most until the deadline, however slowly the bytes come
        sock.settimeout(min(limits.read_timeout_s, _remaining(url, deadline)))
        try:
            chunk = resp.read1(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            if abort.aborted:
                raise DownloadError(f"cannot fetch {url}: cancelled") from exc
            if time.monotonic() >= deadline:
                raise DownloadError(f"cannot fetch {url}: the download's deadline passed") from exc
            raise DownloadError(f"cannot fetch {url}: {exc!r}", retriable=True) from exc
        if abort.aborted:
            raise DownloadError(f"cannot fetch {url}: cancelled")
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_bytes:
            raise DownloadError(f"{url} is over {limits.limit_name} of {limits.max_bytes} bytes")
        h.update(chunk)
        out.write(chunk)
    if declared is not None and total != declared:
        raise DownloadError(f"cannot fetch {url}: got {total} of {declared} bytes", retriable=True)
    return total, h.hexdigest()
