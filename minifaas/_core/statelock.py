"""One engine per state dir: an exclusive lock held for the engine's lifetime.

Two engines on one state dir would end each other's live activations (``recover()`` marks every pending record
failed). The lock is an ``flock`` on ``<state_dir>/engine.lock``: the kernel drops it when the holder dies (even
by kill -9), so a crashed host never leaves a stale lock behind, and the next engine recovers its records.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

from .._errors import StateDirLocked

__all__ = ("LOCK_FILE_NAME", "StateDirLock")

LOCK_FILE_NAME: Final = "engine.lock"


class StateDirLock:
    """Held from :meth:`acquire` to :meth:`release`; the file says which process holds it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE_NAME
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StateDirLocked(
                f"the state dir {self.path.parent} is in use by another engine (process {holder}); "
                "stop it or use another state dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = -1
