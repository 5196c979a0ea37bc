"""Connection limits of the dev server: idle or half-sent connections cannot pile up until file descriptors run out.

uvicorn only times out a keep-alive connection *between* requests; one that never sends (or never finishes)
its request head stays open for ever, and a thousand of them exhaust ``ulimit -n``, so the server stops
accepting anything. Here every connection must deliver a request head within ``header_timeout_s`` of being
opened or of its previous response; connections beyond ``max_connections`` are answered 503 and closed at once.
The soft ``RLIMIT_NOFILE`` is raised to the hard one at start-up, and the connection cap is sized from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Any, Final

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ("connection_cap", "guarded_protocol", "raise_fd_limit")

#: what a request head must arrive within (slow clients on loopback send it in microseconds)
HEADER_TIMEOUT_S: Final = 10.0
#: the soft fd limit we ask for at start-up (bounded by the hard one)
NOFILE_WANTED: Final = 65_536
#: descriptors kept for the engine: sandboxes' pipes, the state dir's databases, bundles, model files
FDS_RESERVED: Final = 256
#: bounds of the connection cap, whatever the fd limit
MIN_CONNECTIONS: Final = 16
MAX_CONNECTIONS: Final = 4_096
_BUSY_BODY: Final = b'{"error":"Too many connections; retry later.","code":"' + b"0" * 32 + b'"}'
BUSY_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


def connection_cap(nofile: int) -> int:
    """How many client connections fit beside the engine's own descriptors under an fd limit of ``nofile``."""
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, (nofile - FDS_RESERVED) // 2))


def guarded_protocol(*, max_connections: int, header_timeout_s: float = HEADER_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap."""

    class Guarded(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head has the same deadline

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_overdue)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_overdue(self) -> None:
            self._head_deadline = None
            cycle: Any = self.cycle
            if self.transport.get_protocol() is not self:
                return  # upgraded (websocket): no longer an HTTP request's business
            # no request in progress: the client has not sent a whole request head in time
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Guarded
