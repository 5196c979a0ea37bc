"""Dying with the host: a sandbox (and the zygote) is SIGKILLed by the kernel the moment the host process ends.

The host holds the only write end of a pipe (``minifaas._core.lifeline``) and passes its read end to each zygote
and spawned sandbox (``--lifeline N``); a forked sandbox inherits the zygote's. :func:`arm` opens the pipe afresh
(an open file description of its own: the signal's owner is per description) and asks for SIGKILL to its process
group through the pipe's asynchronous notification (``O_ASYNC``, ``F_SETOWN``, ``F_SETSIG``): when the last
writer closes, the kernel signals every reader that asked, so no thread watches anything, a busy or stopped
process dies as well as an idle one, and whatever the sandbox started in its process group goes with it.

PR_SET_PDEATHSIG, used before, fires on the death of the *parent*, which for a forked sandbox is the zygote: a
zygote killed after a stall took every warm sandbox with it. The zygote is no longer the anchor; the host is.

A sandbox that is pid 1 of a PID namespace of its own (isolation="sandbox") cannot ask for SIGKILL: the kernel
drops a SIGKILL sent to a namespace's init unless it comes from an ancestor namespace as a kill() or a parent's
death, and a signal raised for an fd's notification never counts as either, so such a sandbox outlived the host.
Its init asks for ``INIT_SIG`` instead, whose handler is libc's ``_exit`` itself (C, not Python: it runs at once,
whatever the interpreter is doing); when pid 1 ends, the kernel kills everything else in its namespace. The
sandbox's seccomp filter refuses a new handler for ``INIT_SIG``, so a function cannot take that away.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
from typing import Final

__all__ = ("ARG", "INIT_SIG", "arm", "armed_fd")

#: the command-line option a zygote or a spawned sandbox gets the read end's fd number in
ARG: Final = "--lifeline"
F_SETOWN: Final = getattr(fcntl, "F_SETOWN", 8)
F_SETSIG: Final = getattr(fcntl, "F_SETSIG", 10)
#: what a PID namespace's init asks for instead of SIGKILL (which it would never get): a real-time signal that
#: neither Python's signal module (it saves and restores only the named ones) nor glibc uses
INIT_SIG: Final = int(signal.SIGRTMAX) - 1
#: what libc's signal() returns when it failed: (void *) -1
SIG_ERR: Final = ctypes.c_void_p(-1).value

_armed = -1


def armed_fd() -> int:
    """The fd this process watches the host through (-1: none); closing it disarms, so fd sweeps keep it."""
    return _armed


def arm(fd: int) -> int:
    """Have the kernel SIGKILL this process's group when the host's end of the lifeline ``fd`` closes; closes
    ``fd`` (and a lifeline armed before, e.g. the zygote's in a fresh fork) and returns the new one (-1: it could not
    be armed). Call it in the process group to kill (after ``setsid()``), and again in a process that became pid 1
    of a new PID namespace (it is then ended by ``INIT_SIG``, and its namespace with it). A host already gone kills
    the group at once."""
    global _armed
    init = os.getpid() == 1
    mine = -1
    try:
        if init:
            _exit_on(INIT_SIG)
            owner, sig = os.getpid(), INIT_SIG
        else:
            # 0 (a group outside this PID namespace) would silently turn the notification off
            group = os.getpgrp()
            owner, sig = (-group if group > 0 else os.getpid()), signal.SIGKILL
        mine = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(mine, F_SETOWN, owner)
        fcntl.fcntl(mine, F_SETSIG, sig)
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
        if init:
            os._exit(INIT_SIG)  # a SIGKILL from inside its own namespace would be dropped, as the notification's is
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return mine


def _exit_on(sig: int) -> None:
    """Make libc's ``_exit`` the C handler of ``sig``: the process ends the moment the signal arrives."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    handler = ctypes.cast(libc._exit, ctypes.c_void_p).value
    if libc.signal(sig, handler) == SIG_ERR:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"cannot handle signal {sig}: {os.strerror(err)}")
