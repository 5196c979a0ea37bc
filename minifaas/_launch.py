"""Starting sandbox processes.

A launcher turns "I need a sandbox" into a running process that speaks the protocol on a private socket. Two
launchers exist: :class:`SpawnLauncher` (a fresh ``sys.executable``) and the zygote launcher in ``_zygote.py``
(a fork of a process that already imported the heavy libraries). Both hand back a :class:`Launched`: the host end of
the channel, the read ends of the child's stdout and stderr pipes, and a way to wait for and kill the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Final, Protocol

import anyio

__all__ = ("Launched", "Launcher", "SpawnLauncher", "make_pipes", "scrubbed_env")

#: host variables a sandbox may inherit; everything else (tokens, keys, cloud credentials) is dropped
ENV_ALLOW: Final[frozenset[str]] = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "PYTHONHASHSEED",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "SYSTEMROOT",
        "MINIFAAS_MODEL_CACHE",
    }
)
#: thread pools of numeric libraries are pinned to one thread per sandbox: sandboxes, not threads, give parallelism
SANDBOX_ENV_DEFAULTS: Final[dict[str, str]] = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW}
    env.update(SANDBOX_ENV_DEFAULTS)
    if extra:
        env.update(extra)
    return env


def make_pipes() -> tuple[socket.socket, socket.socket, tuple[int, int], tuple[int, int]]:
    """(host channel, child channel, (stdout r, w), (stderr r, w)); read ends and the host channel are non-blocking."""
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host.setblocking(False)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    return host, child, (out_r, out_w), (err_r, err_w)


class Launched(Protocol):
    """A started sandbox process, as the pool sees it."""

    pid: int
    channel: socket.socket
    stdout_fd: int
    stderr_fd: int
    #: "spawn" or "fork"
    how: str

    async def wait(self) -> int:
        """The exit status, as subprocess reports it: the exit code, or minus the signal number."""
        ...

    def kill(self) -> None:
        """SIGKILL the sandbox and everything it started (its process group); safe to call twice."""
        ...

    def close(self) -> None:
        """Release the host's fds once the process has ended."""
        ...


class Launcher(Protocol):
    name: str

    async def launch(self, env: Mapping[str, str]) -> Launched: ...

    async def aclose(self) -> None: ...


class _SpawnedProcess:
    def __init__(self, proc: subprocess.Popen[bytes], channel: socket.socket, out_r: int, err_r: int) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.stdout_fd = out_r
        self.stderr_fd = err_r
        self.how = "spawn"
        self._pidfd = os.pidfd_open(proc.pid)
        self._status: int | None = None

    async def wait(self) -> int:
        while self._status is None:
            status = self._proc.poll()
            if status is not None:
                self._status = status
                break
            await anyio.wait_readable(self._pidfd)
        return self._status

    def kill(self) -> None:
        if self._status is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        for fd in (self._pidfd, self.stdout_fd, self.stderr_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfd = self.stdout_fd = self.stderr_fd = -1
        self.channel.close()


class SpawnLauncher:
    """A fresh interpreter per sandbox: ``sys.executable -m minifaas_sandbox`` (slow, but needs nothing else)."""

    name = "spawn"

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        self.preload = preload

    async def launch(self, env: Mapping[str, str]) -> Launched:
        host, child, (out_r, out_w), (err_r, err_w) = make_pipes()
        argv = [sys.executable, "-m", "minifaas_sandbox", "--fd", str(child.fileno())]
        if self.preload:
            argv += ["--preload", ",".join(self.preload)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(child.fileno(),),
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            host.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            child.close()
            os.close(out_w)
            os.close(err_w)
        return _SpawnedProcess(proc, host, out_r, err_r)

    async def aclose(self) -> None:
        return None
