"""Starting sandbox processes.

A launcher turns "I need a sandbox" into a running process that speaks the protocol on a private socket. Two
launchers exist: :class:`SpawnLauncher` (a fresh ``sys.executable``) and the zygote launcher in ``_zygote.py``
(a fork of a process that already imported the heavy libraries). Both hand back a :class:`Launched`: the host end of
the channel, the read ends of the child's stdout and stderr pipes, and a way to wait for and kill the process.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol

import anyio

from .._environ import scrubbed_env
from . import lifeline

__all__ = ("PIDS", "Launched", "Launcher", "PidsCgroups", "SpawnLauncher", "make_pipes", "scrubbed_env")

#: tasks (processes and threads) one sandbox may have at once where a pids cgroup is available: a fork bomb stops
#: there. RLIMIT_NPROC cannot do this: it does not bind root, and it counts per user, not per sandbox
MAX_PIDS_PER_SANDBOX: Final = 256
CGROUP_PREFIX: Final = "minifaas-"
#: rounds of "list the cgroup's processes, SIGKILL the new ones" before leaving a cgroup that keeps refilling
CGROUP_KILL_ROUNDS: Final = 100


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
    #: the host's copy of the sandbox's end of the channel (None where the launcher keeps none)
    peer: socket.socket | None

    async def wait(self) -> int | None:
        """The exit status, as subprocess reports it: the exit code, or minus the signal number (None: unknown, a
        forked sandbox whose end only its zygote saw, and the zygote is gone)."""
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


def _pids_hierarchy() -> tuple[Path, bool]:
    """This process's own pids cgroup directory, and whether it is cgroup v2; OSError when there is none."""
    v1_path: str | None = None
    v2_path: str | None = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if "pids" in controllers.split(","):
                v1_path = path
            elif hid == "0" and not controllers:
                v2_path = path
    v2_dir: Path | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, mountpoint, fstype, superopts = fields[3], fields[4], tail[0], tail[2]
            own = v1_path if fstype == "cgroup" and "pids" in superopts.split(",") else None
            own = v2_path if fstype == "cgroup2" else own
            if own is None or not (own + "/").startswith(root.rstrip("/") + "/"):
                continue
            where = Path(mountpoint) / own[len(root.rstrip("/")) :].lstrip("/")
            if fstype == "cgroup":
                return where, False
            v2_dir = where
    if v2_dir is not None and "pids" in (v2_dir / "cgroup.controllers").read_text().split():
        return v2_dir, True
    raise OSError(errno.ENOENT, "no pids cgroup hierarchy is mounted")


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in a sandbox's cgroup, including those that left its process group (setsid)."""
    with contextlib.suppress(OSError):
        with open(os.path.join(path, "cgroup.kill"), "w") as f:  # cgroup v2, Linux 5.14+: atomic
            f.write("1")
        return
    killed: set[int] = set()
    # a process may fork between the listing and its SIGKILL; the next round catches the child, and pids.max
    # bounds how many there can be
    for _ in range(CGROUP_KILL_ROUNDS):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                listed = {int(x) for x in f.read().split()}
        except (OSError, ValueError):
            return
        fresh = listed - killed
        if not fresh:
            return
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed |= fresh


def _remove_cgroup_tree(parent: Path) -> None:
    for child in parent.glob("sb-*"):
        kill_cgroup(str(child))
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        parent.rmdir()


def _remove_own_cgroup_tree(parent: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that inherited the registration
        _remove_cgroup_tree(parent)


class PidsCgroups:
    """One pids cgroup per sandbox: ``<this process's cgroup>/minifaas-<host pid>/sb-<sandbox pid>``.

    Whatever a sandbox starts stays in its cgroup, even after ``setsid()``, so the host can cap their number
    (``pids.max`` = :data:`MAX_PIDS_PER_SANDBOX`) and kill them all when the sandbox ends. It needs a writable
    pids hierarchy (cgroup v1, or v2 with the controller delegated), in practice root: without one, ``attach``
    returns None, sandboxes have no process cap, and their end kills their process group only. Cgroups left by
    a host that was killed are removed (their processes killed) when the next host on the machine starts one.
    """

    def __init__(self) -> None:
        self._probed = False
        self._parent: Path | None = None
        self._leftover: set[str] = set()
        #: why sandboxes run without a process cap (None while they have one, or before the first sandbox)
        self.error: str | None = None

    @property
    def parent(self) -> Path | None:
        """The host's cgroup directory holding the sandboxes' ones, None when unavailable."""
        if not self._probed:
            self._probed = True
            self._parent = self._setup()
        return self._parent

    def _setup(self) -> Path | None:
        try:
            base, v2 = _pids_hierarchy()
            for stale in base.glob(f"{CGROUP_PREFIX}*"):
                owner = stale.name.removeprefix(CGROUP_PREFIX)
                if owner.isdigit() and int(owner) != os.getpid() and not os.path.exists(f"/proc/{owner}"):
                    _remove_cgroup_tree(stale)
            parent = base / f"{CGROUP_PREFIX}{os.getpid()}"
            parent.mkdir(exist_ok=True)
            if v2:
                (parent / "cgroup.subtree_control").write_text("+pids")
        except OSError as exc:
            self.error = f"no pids cgroup for sandboxes: {exc}"
            return None
        atexit.register(_remove_own_cgroup_tree, parent, os.getpid())
        return parent

    def attach(self, pid: int) -> str | None:
        """Move a new sandbox (before it runs any function code) into a cgroup of its own; its path, or None."""
        parent = self.parent
        if parent is None:
            return None
        for old in list(self._leftover):
            self.remove(old)
        path = parent / f"sb-{pid}"
        try:
            path.mkdir(exist_ok=True)
            (path / "pids.max").write_text(str(MAX_PIDS_PER_SANDBOX))
            (path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            self.error = f"cannot attach sandbox {pid} to {path}: {exc}"
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return str(path)

    def adopt(self, pid: int, path: str | None) -> str | None:
        """Take over the cgroup a sandbox moved itself into (a zygote's spare does, ahead of demand, since the
        move can take milliseconds); attach it here when it did not."""
        joined = self.joined(pid, path)
        return joined if joined is not None else self.attach(pid)

    def joined(self, pid: int, path: str | None) -> str | None:
        """``path`` when it is the cgroup of its own a sandbox moved itself into (one read, no move), else None."""
        parent = self.parent
        if path is not None and parent is not None and path == str(parent / f"sb-{pid}"):
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    if str(pid) in f.read().split():
                        return path
            except OSError:
                pass
        return None

    def remove(self, path: str) -> None:
        """Drop a sandbox's cgroup once it is empty; one whose last processes are still dying is retried later."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            self._leftover.add(path)
            return
        self._leftover.discard(path)


#: the process-wide registry of sandbox cgroups (every launcher of this host shares one parent)
PIDS: Final = PidsCgroups()


class _SpawnedProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], channel: socket.socket, out_r: int, err_r: int, peer: socket.socket
    ) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.peer: socket.socket | None = peer
        self.stdout_fd = out_r
        self.stderr_fd = err_r
        self.how = "spawn"
        self._pidfd = os.pidfd_open(proc.pid)
        self._status: int | None = None
        #: the sandbox's pids cgroup (None where unavailable): it also holds what the sandbox started
        self.cgroup = PIDS.attach(proc.pid)

    async def wait(self) -> int:
        while self._status is None:
            status = self._proc.poll()
            if status is not None:
                self._status = status
                break
            await anyio.wait_readable(self._pidfd)
        return self._status

    def kill(self) -> None:
        if self.cgroup is not None:
            # also after the sandbox itself ended: what it started may live on, in or out of its process group
            kill_cgroup(self.cgroup)
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
        if self.peer is not None:
            self.peer.close()
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
            PIDS.remove(self.cgroup)


class SpawnLauncher:
    """A fresh interpreter per sandbox: ``sys.executable -m minifaas_sandbox`` (slow, but needs nothing else)."""

    name = "spawn"

    def __init__(self, preload: tuple[str, ...] = (), *, python: str | None = None) -> None:
        self.preload = preload
        #: the interpreter to start, e.g. a function's venv python; None = the host's
        self.python = python or sys.executable

    async def launch(self, env: Mapping[str, str]) -> Launched:
        host, child, (out_r, out_w), (err_r, err_w) = make_pipes()
        # it dies with this process, not with whichever thread started it (PR_SET_PDEATHSIG's anchor)
        life = lifeline.read_fd()
        argv = [self.python, "-m", "minifaas_sandbox", "--fd", str(child.fileno()), lifeline.ARG, str(life)]
        if self.preload:
            argv += ["--preload", ",".join(self.preload)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(child.fileno(), life),
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            host.close()
            child.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        # the host keeps the sandbox's end too: after a death, what it left unread there is known (see Sandbox)
        return _SpawnedProcess(proc, host, out_r, err_r, peer=child)

    async def aclose(self) -> None:
        return None
