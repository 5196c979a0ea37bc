"""Dying with the host: a sandbox (and the zygote) is SIGKILLed by the kernel the moment the host process ends.

The host holds the only write end of a pipe (``minifaas._core.lifeline``) and passes its read end to each zygote
and spawned sandbox (``--lifeline N``); a forked sandbox inherits the zygote's. :func:`arm` opens the pipe afresh
(an open file description of its own: the signal's owner is per description) and asks for SIGKILL to its process
group through the pipe's asynchronous notification (``O_ASYNC``, ``F_SETOWN``, ``F_SETSIG``): when the last
writer closes, the kernel signals every reader that asked, so no thread watches anything, a busy or stopped
process dies as well as an idle one, and whatever the sandbox started in its process group goes with it.

PR_SET_PDEATHSIG, used before, fires on the death of the *parent*, which for a forked sandbox is the zygote: a
zygote killed after a stall took every warm sandbox with it. The zygote is no longer the anchor; the host is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
from typing import Final

__all__ = ("ARG", "arm", "armed_fd")

#: the command-line option a zygote or a spawned sandbox gets the read end's fd number in
ARG: Final = "--lifeline"
F_SETOWN: Final = getattr(fcntl, "F_SETOWN", 8)
F_SETSIG: Final = getattr(fcntl, "F_SETSIG", 10)

_armed = -1


def armed_fd() -> int:
    """The fd this process watches the host through (-1: none); closing it disarms, so fd sweeps keep it."""
    return _armed


def arm(fd: int) -> int:
    """Have the kernel SIGKILL this process's group when the host's end of the lifeline ``fd`` closes; closes
    ``fd`` (and a lifeline armed before, e.g. the zygote's in a fresh fork) and returns the new one (-1: it could not
    be armed). Call it in the process group to kill (after ``setsid()``). A host already gone kills the group at
    once."""
    global _armed
    mine = -1
    try:
        mine = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(mine, F_SETOWN, -os.getpgrp())
        fcntl.fcntl(mine, F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(mine, fcntl.F_SETFL, fcntl.fcntl(mine, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError:
        # no /proc, or a kernel without it: unarmed, the runtime falls back to PR_SET_PDEATHSIG (its parent's death)
        if mine >= 0:
            os.close(mine)
        mine = -1
    for old in {fd, _armed} - {-1, mine}:
        with contextlib.suppress(OSError):
            os.close(old)
    _armed = mine
    if mine < 0:
        return mine
    # the notification comes when the last writer goes: one gone before we asked must be checked by hand
    poller = select.poll()
    poller.register(mine, select.POLLIN)
    if any(events & select.POLLHUP for _, events in poller.poll(0)):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return mine
