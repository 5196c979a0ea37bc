"""Linux inotify for the folder feed: which names were closed after writing or renamed in, without polling.

Only the few calls a folder watch needs, through ctypes (no dependency). ``DirWatch.open`` returns None where
inotify is missing (not Linux, a seccomp filter, the per-user watch limit): the feed then polls alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import sys
from pathlib import Path
from typing import Final

import anyio

__all__ = ("DirWatch",)

IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC
WATCH_MASK: Final = (
    IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")
READ_BYTES: Final = 64 * 1024


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


class DirWatch:
    """An inotify watch on one folder. ``changes()`` drains what happened since the last call.

    ``whole`` collects the names closed after writing or renamed in (complete now); ``touched`` every name
    created, written, renamed or deleted; ``overflow`` says the kernel dropped events (rescan everything).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.whole: set[str] = set()
        self.touched: set[str] = set()
        self.overflow = False
        self.lost = False  # the folder itself was deleted or moved: the watch is dead

    @classmethod
    def open(cls, path: Path) -> DirWatch | None:
        """A watch on ``path``, or None where inotify is unavailable."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        wd = libc.inotify_add_watch(fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            os.close(fd)
            return None
        return cls(fd)

    async def wait(self) -> None:
        """Return once there is something to read."""
        await anyio.wait_readable(self.fd)

    def read(self) -> None:
        """Read every queued event into ``whole``/``touched``/``overflow`` (non-blocking)."""
        while True:
            try:
                data = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                return
            if not data:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                if mask & IN_Q_OVERFLOW:
                    self.overflow = True
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    self.lost = True
                if not name:
                    continue
                self.touched.add(name)
                if mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                    self.whole.add(name)
                elif mask & (IN_MODIFY | IN_CREATE | IN_MOVED_FROM | IN_DELETE):
                    self.whole.discard(name)  # written again (or gone) after it was closed

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
