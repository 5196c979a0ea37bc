"""The host's handle on one sandbox process: start it, initialize a function, run activations, notice its death.

Each sandbox owns three tasks in the engine's task group: a channel reader (frames from the sandbox), and two pipe
readers (whatever reaches fd 1 and 2 outside the runtime's capture). When the channel ends, the reader collects the
exit status and ends every activation still in flight on this sandbox with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc

from minifaas_sandbox import protocol as p

from ._activation import log_line
from ._launch import Launched, Launcher

__all__ = ("RunOutcome", "Sandbox", "SandboxDied")

START_TIMEOUT_S: Final = 60.0
#: after the channel closes, how long to wait for the pipes to drain (a crash's last words on stderr)
DRAIN_TIMEOUT_S: Final = 0.5
SHUTDOWN_GRACE_S: Final = 2.0
READ_CHUNK_BYTES: Final = 1 << 16
MAX_STRAY_LINES: Final = 1000

HostService = Callable[[dict[str, Any]], Awaitable[Any]]
_ids = itertools.count(1)


class SandboxDied(Exception):
    """Internal: the sandbox ended before answering (carries the exit description)."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclasses.dataclass(slots=True)
class RunOutcome:
    status: str
    result: dict[str, Any]
    logs: list[str]
    annotations: dict[str, Any]
    run_ms: float


def describe_exit(status: int | None) -> str:
    if status is None:
        return "the sandbox process ended"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"the sandbox process was killed by {name} (signal {-status})"
    return f"the sandbox process exited with code {status}"


class _Waiter:
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None
        self.error: SandboxDied | None = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()

    def fail(self, err: SandboxDied) -> None:
        self.error = err
        self.event.set()

    async def get(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Sandbox:
    """One sandbox process dedicated to one function (after INIT)."""

    def __init__(self, fn_key: str, services: dict[str, HostService]) -> None:
        self.id = f"sb{next(_ids)}"
        self.fn_key = fn_key
        self.services = services
        self.proc: Launched | None = None
        self.state = "starting"  # starting -> ready -> closing -> dead
        self.inflight: dict[str, _Waiter | None] = {}
        self.stray: dict[str, list[str]] = {}
        self.models: set[str] = set()
        self.created = time.monotonic()
        self.last_used = self.created
        self.runs = 0
        self.init_ms = 0.0
        self.launch_how = ""
        self.exit_status: int | None = None
        self.died = anyio.Event()
        self._ready = _Waiter()
        self._init = _Waiter()
        self._out = bytearray()
        self._writer_wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._pipes_done = 0
        self._pipes_drained = anyio.Event()
        self._killed_reason: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self, launcher: Launcher, env: dict[str, str], tg: anyio.abc.TaskGroup) -> float:
        """Launch and wait for READY; returns the launch time in ms."""
        t0 = time.perf_counter()
        self._tg = tg
        self.proc = await launcher.launch(env)
        self.launch_how = self.proc.how
        tg.start_soon(self._read_channel, name=f"{self.id}-channel")
        tg.start_soon(self._read_pipe, self.proc.stdout_fd, "stdout", name=f"{self.id}-stdout")
        tg.start_soon(self._read_pipe, self.proc.stderr_fd, "stderr", name=f"{self.id}-stderr")
        tg.start_soon(self._write_loop, name=f"{self.id}-writer")
        with anyio.fail_after(START_TIMEOUT_S):
            await self._ready.get()
        return (time.perf_counter() - t0) * 1000

    async def init(self, fields: dict[str, Any]) -> dict[str, Any]:
        self._send(p.INIT, fields)
        reply: dict[str, Any] = await self._init.get()
        if reply.get("ok"):
            self.state = "ready"
        return reply

    def kill(self, reason: str) -> None:
        if self._killed_reason is None:
            self._killed_reason = reason
        if self.proc is not None:
            self.proc.kill()

    async def stop(self) -> None:
        """Ask the sandbox to exit; kill it if it does not within the grace period."""
        if self.state == "dead":
            return
        self.state = "closing"
        with contextlib.suppress(Exception):
            self._send(p.SHUTDOWN, {})
        with anyio.move_on_after(SHUTDOWN_GRACE_S):
            await self.died.wait()
        if not self.died.is_set():
            self.kill("shutdown")
            await self.died.wait()

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self, aid: str, args_packed: bytes, deadline_ms: int, version: str) -> RunOutcome:
        if self.state != "ready":
            raise SandboxDied("the sandbox is not ready", self.exit_status)
        waiter = _Waiter()
        self.inflight[aid] = waiter
        self.runs += 1
        try:
            self._send(p.RUN, {"aid": aid, "args": args_packed, "deadline": deadline_ms, "version": version})
            fields: dict[str, Any] = await waiter.get()
        finally:
            self.inflight.pop(aid, None)
            stray = self.stray.pop(aid, None)
        logs = fields.get("logs") or []
        if stray:
            logs = [*logs, *stray]
        models = fields.get("models")
        if models is not None:
            self.models = set(models)
        return RunOutcome(
            status=str(fields.get("status", "developer_error")),
            result=fields.get("result") if isinstance(fields.get("result"), dict) else {},
            logs=logs,
            annotations=fields.get("annotations") or {},
            run_ms=float(fields.get("run_ms") or 0.0),
        )

    def take_stray(self, aid: str) -> list[str]:
        return self.stray.pop(aid, [])

    # -- I/O ----------------------------------------------------------------------------------------------------
    def _send(self, kind: int, fields: dict[str, Any]) -> None:
        if self.state == "dead" or self.proc is None:
            raise SandboxDied("the sandbox is gone", self.exit_status)
        frame = p.encode(kind, fields)
        if not self._out:
            try:
                n = self.proc.channel.send(frame)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise SandboxDied(f"cannot write to the sandbox: {exc}", self.exit_status) from exc
            if n == len(frame):
                return
            frame = frame[n:]
        self._out += frame
        self._writer_wake.set()

    async def _write_loop(self) -> None:
        assert self.proc is not None
        sock = self.proc.channel
        while self.state != "dead":
            if not self._out:
                await self._writer_wake.wait()
                self._writer_wake = anyio.Event()
                continue
            try:
                n = sock.send(self._out)
            except BlockingIOError:
                n = 0
            except OSError:
                return
            del self._out[:n]
            if self._out:
                try:
                    with anyio.move_on_after(1.0):
                        await anyio.wait_writable(sock)
                except anyio.ClosedResourceError:
                    return

    async def _read_channel(self) -> None:
        assert self.proc is not None
        sock: socket.socket = self.proc.channel
        decoder = p.FrameDecoder()
        try:
            while True:
                try:
                    data = sock.recv(READ_CHUNK_BYTES)
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                except OSError:
                    break
                if not data:
                    break
                for kind, fields in decoder.feed(data):
                    self._dispatch(kind, fields)
        except p.ProtocolError as exc:
            self.kill(f"protocol error: {exc}")
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_channel_closed()

    def _dispatch(self, kind: int, fields: dict[str, Any]) -> None:
        if kind == p.RESULT:
            waiter = self.inflight.get(str(fields.get("aid")))
            if waiter is not None:
                waiter.set(fields)
        elif kind == p.CALL:
            assert self._tg is not None
            self._tg.start_soon(self._serve_call, fields)
        elif kind == p.READY:
            self._ready.set(fields)
        elif kind == p.INIT_DONE:
            self._init.set(fields)

    async def _serve_call(self, fields: dict[str, Any]) -> None:
        cid = fields.get("cid")
        method = str(fields.get("method"))
        service = self.services.get(method)
        try:
            if service is None:
                raise LookupError(f"unknown host service {method!r}")
            value = await service(fields.get("args") or {})
            reply = {"cid": cid, "ok": True, "value": value}
        except Exception as exc:  # noqa: BLE001 - reported to the sandbox, which raises it in the function
            reply = {"cid": cid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(SandboxDied):
            self._send(p.REPLY, reply)

    async def _read_pipe(self, fd: int, stream: str) -> None:
        partial = b""
        try:
            while True:
                try:
                    data = os.read(fd, READ_CHUNK_BYTES)
                except BlockingIOError:
                    try:
                        await anyio.wait_readable(fd)
                    except anyio.ClosedResourceError:
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    self._stray_line(stream, line)
        finally:
            if partial:
                self._stray_line(stream, partial)
            self._pipes_done += 1
            if self._pipes_done == 2:
                self._pipes_drained.set()

    def _stray_line(self, stream: str, raw: bytes) -> None:
        line = log_line(stream, raw.decode("utf-8", "replace"))
        keys = list(self.inflight) or ["-"]
        for key in keys:
            bucket = self.stray.setdefault(key, [])
            if len(bucket) < MAX_STRAY_LINES:
                bucket.append(line)

    async def _on_channel_closed(self) -> None:
        proc = self.proc
        assert proc is not None
        if self.state != "closing":
            # an unexpected end: make sure the whole process group is gone before collecting the status
            proc.kill()
        status = await proc.wait()
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            await self._pipes_drained.wait()
        proc.kill()  # stragglers in its process group keep no pipe open
        self.exit_status = status
        self.state = "dead"
        reason = describe_exit(status)
        if self._killed_reason:
            reason = f"{reason} ({self._killed_reason})"
        err = SandboxDied(reason, status)
        for waiter in list(self.inflight.values()):
            if waiter is not None:  # None: reserved by the scheduler, not yet sent
                waiter.fail(err)
        self._ready.fail(err)
        self._init.fail(err)
        self._writer_wake.set()
        # the pipe readers may still be blocked on a descendant that escaped the process group
        self.died.set()
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            await self._pipes_drained.wait()
        for fd in (proc.stdout_fd, proc.stderr_fd, proc.channel.fileno()):
            if fd >= 0:
                anyio.notify_closing(fd)
        proc.close()
