"""Starting sandboxes by forking a zygote that already imported numpy, OpenCV, LiteRT and the runtime.

A fresh interpreter spends most of its start importing libraries; a fork of a process that already did costs a
few milliseconds (SOCK, ATC'18). The zygote is ``minifaas_sandbox.zygote``; this module is the host side::

    ZygoteLauncher (task group: one reader task per zygote)
        launch(env) --FORK + fds--> zygote --fork--> sandbox (its own session; speaks the sandbox protocol)
                   <--FORKED pid--         <-SIGCHLD-
        Launched.wait() <--EXITED pid, status--

Failure handling: a dead zygote is restarted by the next ``launch``; when a restart fails too (the zygote dies
before it serves a fork, e.g. a broken preload), launches fall back to :class:`SpawnLauncher` for a back-off
period, and :meth:`ZygoteLauncher.stats` counts it. A zygote that stalls is retired (no more work; stopped once
its sandboxes have ended). Sandboxes do not depend on their zygote: they and the zygote die with the *host*
(the kernel SIGKILLs them when the host's end of a lifeline pipe closes, ``minifaas_sandbox.lifeline``), so a
zygote killed or retired leaves its warm sandboxes serving, and a killed host leaves nothing behind. The host sees
a sandbox end on its pidfd and reads its exit status from the zombie, without waiting for the zygote's report.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from minifaas_sandbox import protocol as p
from minifaas_sandbox import zygote as z

from .._errors import MinifaasError
from . import lifeline
from .launch import MAX_PIDS_PER_SANDBOX, PIDS, Launched, SpawnLauncher, kill_cgroup, make_pipes, scrubbed_env
from .spares import SpareSizer

__all__ = ("DEFAULT_PRELOAD", "ZygoteError", "ZygoteLauncher", "ZygotePool")

DEFAULT_PRELOAD: Final[tuple[str, ...]] = z.DEFAULT_PRELOAD
#: importing the preload set and reading the model files
ZYGOTE_START_TIMEOUT_S: Final = 60.0
#: a healthy zygote answers a FORK in milliseconds; silence this long means it is wedged
FORK_TIMEOUT_S: Final = 10.0
#: after the host closes the control socket, how long the zygote gets to exit before SIGKILL
ZYGOTE_EXIT_GRACE_S: Final = 2.0
RESTART_BACKOFF_MIN_S: Final = 1.0
RESTART_BACKOFF_MAX_S: Final = 60.0
#: tries of zygote-then-fork per launch before spawning (the second try restarts a zygote that just died)
FORK_ATTEMPTS: Final = 2
RECV_BYTES: Final = 1 << 16
#: exit status reported for a sandbox whose end nobody the host can ask saw (its zygote died, and whoever
#: adopted it reaped it before the host read the zombie): unknown
ORPHAN_EXIT_STATUS: Final = None
#: /proc/<pid>/stat: the state (3rd field) and the exit status as waitpid reports it (52nd), counted after the
#: command's closing parenthesis (the command may hold spaces)
STAT_STATE_FIELD: Final = 0
STAT_EXIT_CODE_FIELD: Final = 49
#: the most spares a zygote keeps by default (a burst of more cold starts waits for forks beyond these)
DEFAULT_MAX_SPARES: Final = 8
#: how much nicer a refilling spare takes its steps (the zygote's SPARE_NICE; a bench sets 0 to compare)
SPARE_NICE: Final = z.SPARE_NICE
#: a spare's private memory before the first measurement (measured here: 2-4 MiB of PSS)
SPARE_MB_ESTIMATE: Final = 4.0
SPARE_PSS_READ_INTERVAL_S: Final = 5.0
#: how often to look for the first ready spare to measure
SPARE_PSS_FIRST_READ_S: Final = 0.5
#: spares measured each time (they are alike: forks of one zygote that took the same steps)
SPARE_PSS_SAMPLES: Final = 2
#: once a forked sandbox's pidfd says it ended, how long to wait for its zygote to report the exit status
EXIT_REPORT_WAIT_S: Final = 1.0
#: how often a retired zygote is checked for children still running
RETIRED_POLL_S: Final = 0.5
FORK_AVAILABLE: Final = hasattr(os, "fork") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


class ZygoteError(MinifaasError, RuntimeError):
    """Raised by ``ZygoteLauncher``/``ZygotePool`` methods used outside their ``async with`` block, and by
    ``ZygoteLauncher.load_models`` when no zygote runs; a zygote failing during ``launch`` is not raised but
    answered by spawning."""


ZygoteError.__module__ = "minifaas"


def _backoff_s(failures: int) -> float:
    # the first failure restarts at once; only a zygote that fails again is left alone for a while
    if failures <= 1:
        return 0.0
    return float(min(RESTART_BACKOFF_MIN_S * 2 ** (failures - 2), RESTART_BACKOFF_MAX_S))


class _ForkedProcess:
    """A sandbox forked by a zygote (implements :class:`~minifaas._core.launch.Launched`)."""

    how = "fork"

    def __init__(
        self,
        pid: int,
        channel: socket.socket,
        out_r: int,
        err_r: int,
        zygote: _Zygote,
        cgroup: str | None = None,
        peer: socket.socket | None = None,
    ) -> None:
        self.pid = pid
        self.channel = channel
        self.peer = peer
        self.stdout_fd = out_r
        self.stderr_fd = err_r
        self._zygote = zygote
        #: it was the zygote's spare, forked before it was asked for
        self.ahead = False
        self._status: int | None = None
        self._orphaned = False
        self._killed = False
        self._changed = anyio.Event()
        self._pidfd_lock = anyio.Lock()
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            # already reaped by the zygote: its EXITED report is on the way
            self._pidfd = -1
        #: the sandbox's pids cgroup (None where unavailable), joined before the host sends it any function code
        self.cgroup = PIDS.joined(pid, cgroup) if self._pidfd >= 0 else None
        #: still to be moved into a cgroup (a child forked on request, not a spare that joined its own): the
        #: launcher does it in a worker thread before the launch returns (see ``_Zygote.fork``)
        self.unattached = self._pidfd >= 0 and self.cgroup is None

    def _exited(self, status: int) -> None:
        if self._status is None:
            self._status = status
        self._changed.set()

    def _orphan(self) -> None:
        self._orphaned = True
        self._changed.set()

    async def wait(self) -> int | None:
        """The exit status (None: unknown). The end itself is seen on the pidfd, and the status read from the
        zombie, not through the zygote: a stalled zygote (which does not reap) delays nothing. Only a sandbox
        reaped before the host read it waits for the zygote's report, at most ``EXIT_REPORT_WAIT_S``."""
        if self._status is None:
            async with self._pidfd_lock:
                if self._status is None and self._pidfd >= 0:
                    await anyio.wait_readable(self._pidfd)
            if self._status is None:
                self._status = _zombie_status(self.pid, self._pidfd)
            # reaped already: by a live zygote, which reports at once, or by whoever adopted an orphan
            if self._status is None and not self._orphaned:
                with anyio.move_on_after(EXIT_REPORT_WAIT_S):
                    await self._changed.wait()
            if self._status is None:
                self._status = -signal.SIGKILL if self._killed else ORPHAN_EXIT_STATUS
        return self._status

    def kill(self) -> None:
        if self.cgroup is not None:
            # also after the sandbox itself ended: what it started may live on, in or out of its process group
            kill_cgroup(self.cgroup)
        if self._status is not None:
            return
        self._killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        # before the child's setsid() there is no such group yet; the pidfd cannot hit a recycled pid
        with contextlib.suppress(ProcessLookupError, OSError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        for fd in (self._pidfd, self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self.stdout_fd = self.stderr_fd = -1
        self.channel.close()
        if self.peer is not None:
            self.peer.close()
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
            PIDS.remove(self.cgroup)
        self._zygote.children.pop(self.pid, None)
        if self._status is None:
            # its EXITED report may still come: drop it then instead of keeping it for an unknown pid
            self._zygote.abandoned_pids.add(self.pid)


def _zombie_status(pid: int, pidfd: int) -> int | None:
    """The exit status of an ended process the host is not the parent of, read while it is a zombie; None once
    it has been reaped (then its pid may name another process, which the pidfd tells apart)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        # still not reaped now, so the stat read before was this process's, not a successor's with its pid
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return None
    if fields[STAT_STATE_FIELD] != b"Z" or len(fields) <= STAT_EXIT_CODE_FIELD:
        return None
    return os.waitstatus_to_exitcode(int(fields[STAT_EXIT_CODE_FIELD]))


class _Request:
    """One outstanding control request; for a FORK it holds the host ends until the child exists."""

    __slots__ = ("abandoned", "error", "event", "fds", "fields", "host", "peer", "value")

    def __init__(
        self, host: socket.socket | None = None, fds: tuple[int, int] = (-1, -1), peer: socket.socket | None = None
    ) -> None:
        self.event = anyio.Event()
        #: the host's copy of the child's end of the channel (kept, see Sandbox.unstarted)
        self.peer = peer
        self.fields: dict[str, Any] = {}
        self.error: str | None = None
        self.value: _ForkedProcess | None = None
        self.host = host
        self.fds = fds
        self.abandoned = False

    def close_fds(self) -> None:
        """Idempotent: an fd number closed twice could by then belong to someone else."""
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = (-1, -1)

    async def result(self) -> dict[str, Any]:
        await self.event.wait()
        if self.error is not None:
            raise ZygoteError(self.error)
        return self.fields


class _Zygote:
    """One zygote process and its control connection; a restart makes a new one."""

    def __init__(self, proc: subprocess.Popen[bytes], stream: anyio.abc.UNIXSocketStream) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        self.stream = stream
        self.decoder = p.FrameDecoder()
        self.hello = _Request()
        self.pending: dict[int, _Request] = {}
        self.children: dict[int, _ForkedProcess] = {}
        self.early_exits: dict[int, int] = {}
        self.abandoned_pids: set[int] = set()
        self.gone = anyio.Event()
        self.ended_at = 0.0
        self.forks = 0
        self.send_lock = anyio.Lock()
        self.seq = itertools.count(1)
        #: path -> bytes the zygote holds, and path -> ms it took to pre-build its interpreter
        self.model_sizes: dict[str, int] = {}
        self.prebuilt: dict[str, float] = {}
        self.prebuild_errors: dict[str, str] = {}
        #: OS threads the zygote reported last (at HELLO, then after each LOAD_MODELS)
        self.threads = 0
        #: the spares it holds (SPARES_STATE), and those of them that wait ready for a request
        self.spare_pids: list[int] = []
        self.ready_spare_pids: list[int] = []
        #: stalled (a fork request timed out): it gets no more work and is stopped once its children are gone
        self.retired = False

    # -- requests --------------------------------------------------------------------------------------------
    async def _send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        # shielded: a frame cut in half by a cancellation would desynchronise the control stream
        with anyio.CancelScope(shield=True):
            async with self.send_lock:
                if fds:
                    await self.stream.send_fds(frame, fds)
                else:
                    await self.stream.send(frame)

    async def load_models(
        self, paths: Sequence[str], urls: Mapping[str, Sequence[str]], *, prebuild: bool
    ) -> dict[str, Any]:
        seq = next(self.seq)
        req = self.pending[seq] = _Request()
        fields = {
            "seq": seq,
            "paths": list(paths),
            "urls": {k: list(v) for k, v in urls.items()},
            "prebuild": prebuild,
        }
        try:
            await self._send(p.encode(z.LOAD_MODELS, fields))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self.pending.pop(seq, None)
            self.terminate()
            self._lost()
            raise ZygoteError(f"zygote {self.pid} is gone") from exc
        reply = await req.result()
        self.model_sizes.update({str(k): int(v) for k, v in (reply.get("loaded") or {}).items()})
        for path, ms in (reply.get("prebuilt") or {}).items():
            # a path loaded again reports the (short) time to find its interpreter; keep the build's
            self.prebuilt.setdefault(str(path), float(ms))
        self.prebuild_errors.update({str(k): str(v) for k, v in (reply.get("prebuild_errors") or {}).items()})
        self.threads = int(reply.get("threads") or self.threads)
        return reply

    async def set_spares(self, n: int) -> None:
        """Ask the zygote to keep ``n`` spares forked ahead (no answer: SPARES_STATE reports what it holds)."""
        try:
            await self._send(p.encode(z.SPARES, {"n": n}))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.terminate()
            self._lost()

    async def fork(self, env: Mapping[str, str]) -> _ForkedProcess:
        if self.gone.is_set():
            raise ZygoteError(f"zygote {self.pid} is gone")
        host, child, (out_r, out_w), (err_r, err_w) = make_pipes()
        seq = next(self.seq)
        req = self.pending[seq] = _Request(host, (out_r, err_r), child)
        try:
            await self._send(p.encode(z.FORK, {"seq": seq, "env": dict(env)}), (child.fileno(), out_w, err_w))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.pending.pop(seq, None)
            req.close_fds()
            # mark it dead now, not when the reader gets to the end of the stream: a retry must restart it
            self.terminate()
            self._lost()
            raise ZygoteError(f"cannot send a fork request to zygote {self.pid}: {exc}") from exc
        finally:
            # the zygote holds its own copies now (SCM_RIGHTS duplicates them in flight); the host keeps its
            # copy of the channel's child end (req.peer)
            os.close(out_w)
            os.close(err_w)
        try:
            with anyio.fail_after(FORK_TIMEOUT_S):
                await req.result()
        except TimeoutError:
            self._abandon(seq, req)
            # retired, not killed: its children (warm sandboxes of other functions) would die with it
            self.retired = True
            raise ZygoteError(f"zygote {self.pid} did not answer a fork within {FORK_TIMEOUT_S} s") from None
        except ZygoteError:
            req.close_fds()
            raise
        except BaseException:
            self._abandon(seq, req)
            raise
        assert req.value is not None
        forked = req.value
        if forked.unattached:
            # a write to cgroup.procs waits for an RCU grace period on cgroup v1 (2-3 ms here): on the event loop
            # it stalled every other activation (a warm function's calls) once per cold start forked on request
            try:
                forked.cgroup = await anyio.to_thread.run_sync(PIDS.attach, forked.pid)
                forked.unattached = False
            except BaseException:
                self._abandon(seq, req)
                raise
        self.forks += 1
        return forked

    def _abandon(self, seq: int, req: _Request) -> None:
        """The caller gave up waiting: whatever the zygote forks for it must not live on unowned."""
        self.pending.pop(seq, None)
        if req.value is not None:
            req.value.kill()
            self.abandoned_pids.add(req.value.pid)
            req.value.close()
        elif req.event.is_set():
            req.close_fds()
        else:
            req.abandoned = True
            self.pending[seq] = req

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    # -- reader ----------------------------------------------------------------------------------------------
    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._receive()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
                if not data:
                    break
                for kind, fields in self.decoder.feed(data):
                    self._dispatch(kind, fields)
        except p.ProtocolError:
            self.terminate()
        finally:
            self._lost()
            with anyio.CancelScope(shield=True):
                await self._reap()

    async def _receive(self) -> bytes:
        """What the zygote sent next (b"": the end of the stream). Not ``self.stream.receive()``: anyio's UNIX
        stream wakes its reader through the bare future's ``set_result`` as the selector's callback, which raises
        InvalidStateError inside the event loop when the reader is cancelled in the very turn its data arrives (the
        launcher closed, or a scope cancelled, while the zygote sends); ``anyio.wait_readable``'s callback checks."""
        sock = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return sock.recv(RECV_BYTES)
            except BlockingIOError:
                await anyio.wait_readable(sock)

    def _dispatch(self, kind: int, fields: dict[str, Any]) -> None:
        if kind == z.EXITED:
            pid, status = int(fields["pid"]), int(fields["status"])
            child = self.children.get(pid)
            if child is not None:
                child._exited(status)
            elif pid in self.abandoned_pids:
                self.abandoned_pids.discard(pid)
            else:
                self.early_exits[pid] = status
            return
        if kind == z.SPARES_STATE:
            self.spare_pids = [int(x) for x in fields.get("pids") or ()]
            self.ready_spare_pids = [int(x) for x in fields.get("ready") or ()]
            return
        if kind == z.HELLO:
            req = self.hello
        else:
            found = self.pending.pop(int(fields.get("seq") or 0), None)
            if found is None:
                return
            req = found
        req.fields = fields
        if kind == z.FORKED:
            self._forked(req, fields)
        req.event.set()

    def _forked(self, req: _Request, fields: dict[str, Any]) -> None:
        pid = fields.get("pid")
        if pid is None:
            req.error = str(fields.get("error") or "the zygote could not fork")
            return
        assert req.host is not None
        cgroup = fields.get("cgroup")
        child = _ForkedProcess(
            int(pid), req.host, req.fds[0], req.fds[1], self, cgroup if isinstance(cgroup, str) else None, req.peer
        )
        req.peer = None
        child.ahead = fields.get("ahead") is True
        self.children[child.pid] = child
        status = self.early_exits.pop(child.pid, None)
        if status is not None:
            child._exited(status)
        req.value = child
        if req.abandoned:
            child.kill()
            self.abandoned_pids.add(child.pid)
            child.close()

    def _lost(self) -> None:
        if not self.gone.is_set():
            self.ended_at = time.monotonic()
            self.gone.set()
        for req in [self.hello, *self.pending.values()]:
            if not req.event.is_set():
                req.error = f"zygote {self.pid} ended"
                req.close_fds()
                req.event.set()
        self.pending.clear()
        for child in self.children.values():
            child._orphan()

    async def retire_when_idle(self) -> None:
        """Stop a retired zygote once the sandboxes it forked have ended (it cannot outlive the launcher: its
        reader task, in the same task group, stops it at close)."""
        while self.children and not self.gone.is_set():
            await anyio.sleep(RETIRED_POLL_S)
        self.terminate()

    async def _reap(self) -> None:
        # closing our end is what tells a live zygote to exit
        await self.stream.aclose()
        with anyio.move_on_after(ZYGOTE_EXIT_GRACE_S):
            await anyio.wait_readable(self.pidfd)
        if self.proc.poll() is None:
            self.terminate()
            with anyio.move_on_after(ZYGOTE_EXIT_GRACE_S):
                await anyio.wait_readable(self.pidfd)
        self.proc.poll()
        os.close(self.pidfd)
        self.pidfd = -1


class ZygoteLauncher:
    """Launch sandboxes as forks of a zygote that imported ``preload`` and read ``models`` (a Launcher).

    Use it inside ``async with`` (it owns a task group: the zygote's reader task), or let a
    :class:`ZygotePool` own it. ``env`` is the zygote's own environment (default: :func:`scrubbed_env`, which
    keeps numeric libraries single-threaded); each sandbox gets the env passed to :meth:`launch`.
    ``prebuild`` (read at each model load): build TFLite interpreters in the zygote, not only share the bytes.
    ``fork_ahead``: the zygote keeps one child forked ahead of demand, so a launch does not wait for fork();
    ``refork_delay_s`` after a launch, it forks the next one (the launched sandbox's first steps go first).
    """

    name = "zygote"

    def __init__(
        self,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        models: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        prebuild: bool = True,
        fork_ahead: bool = True,
        refork_delay_s: float = z.SPARE_REFORK_DELAY_S,
        min_spares: int = 1,
        max_spares: int = DEFAULT_MAX_SPARES,
        room: Callable[[float], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refork_delay_s < 0:
            raise ValueError(f"refork_delay_s must be >= 0, got {refork_delay_s}")
        self.preload = tuple(preload)
        self.fork_ahead = fork_ahead and max_spares > 0
        #: how many spares, by demand (see minifaas._core.spares); ``room(spare_mb)`` caps it by the memory budget
        self.sizer = SpareSizer(min_spares=min(min_spares, max_spares), max_spares=max_spares)
        self.room = room
        #: the time the spares' demand is read at (a test passes a clock it moves)
        self.clock = clock
        self._spares_sent: int | None = None
        self._spares_changed = anyio.Event()
        #: a spare's private memory (PSS, MiB), measured now and then; an estimate until the first reading
        self._spare_mb = SPARE_MB_ESTIMATE
        self.refork_delay_s = refork_delay_s
        self.models = tuple(models)
        self.prebuild = prebuild
        #: model path -> urls sandboxes will load it by (sent along, so the zygote's interpreters are found)
        self.model_urls: dict[str, tuple[str, ...]] = {}
        self._env = dict(env) if env is not None else scrubbed_env()
        self._spawn = SpawnLauncher(preload=self.preload)
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._service_done = anyio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._zygote: _Zygote | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self._starts = 0
        self._failures = 0
        self._retry_at = 0.0
        self._forks = 0
        self._forks_ahead = 0
        self._spawns_fallback = 0
        self._restarts = 0
        self._retired = 0
        self._hello: dict[str, Any] = {}
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def __aenter__(self) -> ZygoteLauncher:
        async with contextlib.AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            await self.start_in(tg)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.__aexit__(exc_type, exc, tb)

    async def start_in(self, tg: anyio.abc.TaskGroup) -> None:
        """Run this launcher's tasks in ``tg`` (owned by the caller); the zygote starts in the background."""
        if self._tg is not None or self._closed:
            raise ZygoteError("a ZygoteLauncher is started once")
        await tg.start(self._service)

    async def _service(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    task_status.started()
                    # warm up now, so the first launch finds the zygote ready
                    tg.start_soon(self._ensure_zygote)
                    if self.fork_ahead:
                        tg.start_soon(self._size_spares)
                        tg.start_soon(self._measure_spares)
                    await anyio.sleep_forever()
        finally:
            self._tg = None
            self._service_done.set()

    async def aclose(self) -> None:
        """Stop the zygote (and with it any sandbox it forked that is still running) and end the tasks."""
        if self._closed:
            return
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
            await self._service_done.wait()
        self._zygote = None

    # -- launching -------------------------------------------------------------------------------------------
    async def launch(self, env: Mapping[str, str]) -> Launched:
        if self._tg is None:
            raise ZygoteError("ZygoteLauncher.launch needs the launcher entered (async with) and not closed")
        if self.fork_ahead:
            self.sizer.record(self.clock())
        for _ in range(FORK_ATTEMPTS):
            zyg = await self._ensure_zygote()
            if zyg is None:
                break
            if self.fork_ahead and self._spares_target() != self._spares_sent:
                # before this fork: a burst's next launches find spares being forked already
                await self._send_spares(zyg)
                # the sizing task plans the decay from this demand (a launch that changed no target needs it not)
                self._spares_changed.set()
            try:
                child = await zyg.fork(env)
            except ZygoteError as exc:
                self.last_error = str(exc)
                continue
            self._forks += 1
            self._forks_ahead += child.ahead
            self._failures = 0
            return child
        if self._closed:
            raise ZygoteError("the ZygoteLauncher was closed during this launch")
        self._spawns_fallback += 1
        return await self._spawn.launch(env)

    async def load_models(self, paths: Sequence[str], urls: Sequence[str] | None = None) -> dict[str, Any]:
        """Read more model files into the zygote (and every zygote started after a restart); sandboxes forked
        from now on find them in ``minifaas_sandbox._preloaded_models`` under their path.

        When the zygote preloaded LiteRT, it also builds each TFLite model's interpreter before forking, and a
        sandbox's first ``models.load`` of ``urls[i]`` (the url it will pass; or of ``paths[i]``) adopts it
        from there. Raises ValueError when ``urls`` is not one url per path.
        """
        if urls is not None and len(urls) != len(paths):
            raise ValueError(f"load_models got {len(paths)} paths but {len(urls)} urls")
        for path, url in zip(paths, urls or (), strict=False):
            self.model_urls[path] = tuple(dict.fromkeys((*self.model_urls.get(path, ()), url)))
        self.models = tuple(dict.fromkeys((*self.models, *paths)))
        zyg = await self._ensure_zygote()
        if zyg is None:
            raise ZygoteError(f"no zygote is running: {self.last_error}")
        return await zyg.load_models(list(paths), self._urls_of(paths), prebuild=self.prebuild)

    # -- spares sized by demand -------------------------------------------------------------------------------
    def _spares_target(self) -> int:
        room = self.room(self.spare_mb()) if self.room is not None else None
        return self.sizer.target(self.clock(), room)

    async def _send_spares(self, zyg: _Zygote) -> None:
        n = self._spares_target()
        self._spares_sent = n
        await zyg.set_spares(n)

    def resize_spares(self) -> None:
        """Re-read the demand now (the sizing task wakes by itself when it decays; a moved clock needs this)."""
        self._spares_changed.set()

    async def _size_spares(self) -> None:
        """Lower the spares as bursts decay (and raise them when a launch says so): sleeps while nothing changes."""
        while True:
            wait = self.sizer.next_change_s(self.clock())
            with anyio.move_on_after(math.inf if wait is None else wait):
                await self._spares_changed.wait()
            self._spares_changed = anyio.Event()
            zyg = self._zygote
            if zyg is not None and not zyg.gone.is_set() and self._spares_target() != self._spares_sent:
                await self._send_spares(zyg)

    def spare_mb(self) -> float:
        """A spare's private memory in MiB: the mean PSS of ready spares, as last measured (:meth:`_measure_spares`)."""
        return self._spare_mb

    async def _measure_spares(self) -> None:
        """Read a few ready spares' PSS every few seconds, in a worker thread: smaps_rollup takes 0.8 ms of CPU per
        spare here, and read on the launch path (the budget asks for the spare's size), eight of them held up the
        first launch of a burst by 7 ms."""
        while True:
            zyg = self._zygote
            pids = list(zyg.ready_spare_pids[:SPARE_PSS_SAMPLES]) if zyg is not None else []
            if pids:
                readings = [kib for kib in await anyio.to_thread.run_sync(_pss_kibs, pids) if kib > 0]
                if readings:
                    self._spare_mb = sum(readings) / len(readings) / 1024
            await anyio.sleep(SPARE_PSS_READ_INTERVAL_S if pids else SPARE_PSS_FIRST_READ_S)

    def zygote_pids(self) -> list[int]:
        """The running zygote's pid (a list: none while it restarts)."""
        zyg = self._zygote
        return [zyg.pid] if zyg is not None and not zyg.gone.is_set() else []

    def spares_mb(self) -> int:
        """Memory the idle spares hold (MiB, rounded up): counted in the engine's memory budget."""
        zyg = self._zygote
        count = len(zyg.spare_pids) if zyg is not None and not zyg.gone.is_set() else 0
        return math.ceil(count * self.spare_mb()) if count else 0

    def _urls_of(self, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
        return {path: self.model_urls[path] for path in paths if path in self.model_urls}

    def stats(self) -> dict[str, Any]:
        zyg = self._zygote
        alive = zyg is not None and not zyg.gone.is_set()
        live = zyg if alive else None
        return {
            "forks": self._forks,
            #: forks served by a child the zygote had forked ahead of the request
            "forks_ahead": self._forks_ahead,
            "spawns_fallback": self._spawns_fallback,
            "zygote_restarts": self._restarts,
            #: zygotes that stalled and were replaced, their sandboxes left running
            "zygotes_retired": self._retired,
            "zygote_pid": zyg.pid if alive and zyg is not None else None,
            "preload_failed": dict(self._hello.get("failed") or {}),
            #: OS threads the zygote had when it last reported (start, then after each model load): anything but
            #: 1 makes forking unsafe
            "zygote_threads": live.threads if live is not None else int(self._hello.get("threads") or 0),
            "model_bytes": sum(live.model_sizes.values()) if live is not None else 0,
            #: model path -> ms the zygote took to build (and warm) its interpreter before forking
            "prebuilt_models": dict(live.prebuilt) if live is not None else {},
            "prebuild_errors": dict(live.prebuild_errors) if live is not None else {},
            #: spares: how many the demand asks for now, how many exist and wait ready, and their private memory
            "spares_target": self._spares_target() if self.fork_ahead else 0,
            "spares": len(live.spare_pids) if live is not None else 0,
            "spares_ready": list(live.ready_spare_pids) if live is not None else [],
            "spares_pss_kib": [_pss_kib(pid) for pid in live.spare_pids] if live is not None else [],
            "spares_demand": round(self.sizer.demand(self.clock()), 2),
        }

    async def _ensure_zygote(self) -> _Zygote | None:
        """The running zygote, a restarted one, or None while restarting is pointless (back-off)."""
        async with self._lock:
            zyg = self._zygote
            if zyg is not None and zyg.retired and not zyg.gone.is_set() and self._tg is not None:
                self._tg.start_soon(zyg.retire_when_idle, name=f"zygote-{zyg.pid}-retired")
                self._retired += 1
                self._zygote = zyg = None
            if zyg is not None and not zyg.gone.is_set():
                return zyg
            if zyg is not None:
                self._zygote = None
                if zyg.forks == 0:
                    self._failures += 1
                self._retry_at = zyg.ended_at + _backoff_s(self._failures)
            if self._closed or self._tg is None or not FORK_AVAILABLE or time.monotonic() < self._retry_at:
                return None
            if self._starts:
                self._restarts += 1
            self._starts += 1
            try:
                zyg = await self._start_zygote(self._tg)
            except (ZygoteError, OSError) as exc:
                self.last_error = str(exc)
                self._failures += 1
                self._retry_at = time.monotonic() + _backoff_s(self._failures)
                return None
            self._zygote = zyg
            return zyg

    async def _start_zygote(self, tg: anyio.abc.TaskGroup) -> _Zygote:
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        life = lifeline.read_fd()
        argv = [sys.executable, "-m", "minifaas_sandbox.zygote", "--fd", str(child.fileno()), lifeline.ARG, str(life)]
        argv += ["--preload", ",".join(self.preload)]
        if not self.fork_ahead:
            argv.append("--no-fork-ahead")
        elif PIDS.parent is not None:
            # its spare moves itself into a cgroup of its own while nobody waits for it
            argv += ["--cgroup-parent", str(PIDS.parent), "--pids-max", str(MAX_PIDS_PER_SANDBOX)]
        argv += ["--refork-delay-ms", str(self.refork_delay_s * 1000), "--spare-nice", str(SPARE_NICE)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(child.fileno(), life),
                env=self._env,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            host.close()
            raise
        finally:
            child.close()
        zyg = _Zygote(proc, await anyio.abc.UNIXSocketStream.from_socket(host))
        tg.start_soon(zyg.read_loop, name=f"zygote-{zyg.pid}-reader")
        try:
            with anyio.fail_after(ZYGOTE_START_TIMEOUT_S):
                self._hello = await zyg.hello.result()
                zyg.threads = int(self._hello.get("threads") or 0)
                if self.fork_ahead:
                    self._spares_sent = None  # a new zygote starts with one: tell it what demand says
                    await self._send_spares(zyg)
                if self.models:
                    await zyg.load_models(self.models, self._urls_of(self.models), prebuild=self.prebuild)
        except TimeoutError:
            zyg.terminate()
            raise ZygoteError(f"zygote {zyg.pid} did not start within {ZYGOTE_START_TIMEOUT_S} s") from None
        except BaseException:
            zyg.terminate()
            raise
        return zyg


class ZygotePool:
    """One zygote per preload set (SOCK's tree of zygotes, one level deep), created on first use."""

    def __init__(self, *, models: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.models = tuple(models)
        self._env = dict(env) if env is not None else None
        self._launchers: dict[tuple[str, ...], ZygoteLauncher] = {}
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> ZygotePool:
        async with contextlib.AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.__aexit__(exc_type, exc, tb)

    async def get(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> ZygoteLauncher:
        """The launcher for this preload set (order matters: imports run in that order)."""
        if self._tg is None:
            raise ZygoteError("ZygotePool.get needs the pool entered (async with) and not closed")
        key = tuple(preload)
        async with self._lock:
            launcher = self._launchers.get(key)
            if launcher is None:
                launcher = ZygoteLauncher(key, self.models, env=self._env)
                await launcher.start_in(self._tg)
                self._launchers[key] = launcher
        return launcher

    def stats(self) -> dict[tuple[str, ...], dict[str, Any]]:
        return {key: launcher.stats() for key, launcher in self._launchers.items()}

    async def aclose(self) -> None:
        self._tg = None
        for launcher in self._launchers.values():
            await launcher.aclose()


def _pss_kibs(pids: Sequence[int]) -> list[int]:
    return [_pss_kib(pid) for pid in pids]


def _pss_kib(pid: int) -> int:
    """A process's proportional set size (KiB; 0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
