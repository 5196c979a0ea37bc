"""The host's end of the lifeline its zygotes and sandboxes die with (see ``minifaas_sandbox.lifeline``).

One pipe per host process: the write end stays here, close-on-exec, never written to (a write would signal every
reader); the read end is passed to each zygote and spawned sandbox. When this process ends, however it ends, the
kernel closes the write end and SIGKILLs every process group that armed the read end. A child forked from the host
without exec (multiprocessing's fork) closes its copy of the write end, so it does not keep sandboxes alive.
"""

from __future__ import annotations

import contextlib
import os
import threading

from minifaas_sandbox.lifeline import ARG

__all__ = ("ARG", "read_fd")

_lock = threading.Lock()
_fds: tuple[int, int] | None = None


def read_fd() -> int:
    """The read end to pass (``pass_fds``) to a zygote or a spawned sandbox, with ``ARG`` and its number."""
    global _fds
    with _lock:
        if _fds is None:
            _fds = os.pipe2(os.O_CLOEXEC)
        return _fds[0]


def _forget_in_child() -> None:
    global _fds
    if _fds is not None:
        for fd in _fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _fds = None


os.register_at_fork(after_in_child=_forget_in_child)
