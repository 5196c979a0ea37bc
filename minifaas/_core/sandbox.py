"""The host's handle on one sandbox process: start it, initialize a function, send RUNs, notice its death.

The hot path is callback driven: the channel socket is registered with the event loop (``add_reader``), and a RESULT
frame is handed to the scheduler's ``on_result`` callback from inside the reader callback, without waking a task.
Three tasks per sandbox, owned by the engine's task group, handle the slow paths: a watcher that collects the exit
status when the channel ends, and two pipe readers for whatever reaches fd 1 and 2 outside the runtime's capture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import math
import os
import select
import signal
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
from minifaas_sandbox import protocol as p

from .activation import log_line
from .launch import Launched, Launcher

__all__ = ("Sandbox", "SandboxDied", "describe_exit")

START_TIMEOUT_S: Final = 60.0
#: after the channel closes, how long to wait for the pipes to drain (a crash's last words on stderr)
DRAIN_TIMEOUT_S: Final = 0.5
SHUTDOWN_GRACE_S: Final = 2.0
#: the runtime ends an initialization that outlives the function's timeout itself, with its logs; the host kills a
#: sandbox whose INIT_DONE is this much later still (its code is stuck where a signal cannot reach it)
INIT_KILL_GRACE_S: Final = 1.0
#: how long a failed write may wait for the watcher to report the sandbox's exit status
DEATH_REPORT_TIMEOUT_S: Final = 5.0
#: after a SIGKILL, how long to wait for the exit status before reporting the death without it (a process in
#: uninterruptible sleep, a stalled zygote that has not reaped it): no wait after a kill is unbounded
KILL_WAIT_S: Final = 5.0
#: the states a sandbox goes through, in order; ``lost``: the host has seen it go (its channel ended or its process
#: exited) and is collecting its status; ``dead``: reported (``on_died`` called). Routing, sending and the
#: scheduler read this one field (``Sandbox.gone``), never the events, which are only for waiting
SANDBOX_STATES: Final = ("starting", "ready", "closing", "lost", "dead")
READ_CHUNK_BYTES: Final = 1 << 18
MAX_STRAY_LINES: Final = 1000
#: output that bypasses the runtime's capture (os.write to fd 1/2, C code) is kept per activation up to these caps,
#: so a sandbox flooding its pipes cannot grow the host's memory; a longer line is cut
MAX_STRAY_LINE_BYTES: Final = 8 << 10
MAX_STRAY_BYTES: Final = 1 << 20
STRAY_TRUNCATED_MESSAGE: Final = "minifaas: output written outside the log capture was truncated"
#: host service calls one sandbox may have outstanding; a legitimate runtime has at most its concurrency
MAX_CALLS_IN_FLIGHT: Final = 64

#: the argument a host service finds the calling function's key in (set by the host over what the sandbox sent)
CALLER_ARG: Final = "_caller"
HostService = Callable[[dict[str, Any]], Awaitable[Any]]
_ids = itertools.count(1)


class SandboxDied(Exception):
    """Internal: the sandbox ended before answering (carries the exit description)."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


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
        if not self.event.is_set():
            self.error = err
            self.event.set()

    async def get(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _PipeState:
    """What a pipe reader keeps between reads: the line not ended yet, and whether it is being skipped."""

    __slots__ = ("partial", "skipping", "stream")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.partial = b""
        #: the line being read was already cut at MAX_STRAY_LINE_BYTES: drop the rest of it
        self.skipping = False


class _Stray(list[str]):
    """One activation's stray output lines, and their size (capped at MAX_STRAY_BYTES)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


def _ignore_result(sb: Sandbox, fields: dict[str, Any]) -> None:
    return None


def _ignore_death(sb: Sandbox, reason: str, status: int | None) -> None:
    return None


class Sandbox:
    """One sandbox process dedicated to one function (after INIT)."""

    def __init__(self, fn_key: str, services: dict[str, HostService]) -> None:
        self.id = f"sb{next(_ids)}"
        self.fn_key = fn_key
        self.services = services
        self.proc: Launched | None = None
        self.state = "starting"  # see SANDBOX_STATES
        #: activation id -> the scheduler's job, for every RUN sent and not yet answered
        self.inflight: dict[str, Any] = {}
        #: jobs whose RUN was sent while another ran: the sandbox starts them in order (see the scheduler)
        self.prefetched: collections.deque[Any] = collections.deque()
        self.stray: dict[str, list[str]] = {}
        self.models: set[str] = set()
        self.created = time.monotonic()
        self.last_used = self.created
        self.runs = 0
        #: started ahead of demand (pre-warm, min_sandboxes): its first activation is not a cold start
        self.prewarmed = False
        #: when the keep-alive policy lets it go (pool clock); inf while busy or kept
        self.expires = math.inf
        self.init_ms = 0.0
        #: set by the scheduler: a backend whose start call can carry the first RUN (Ray: a cold start then crosses
        #: the cluster once) calls it for the RUN fields of the request the sandbox starts for (None: none waits)
        self.claim_first_run: Callable[[], dict[str, Any] | None] | None = None
        #: how long that first RUN had run when the start's answer came (ms): that part of the start's time is the
        #: run's, not the initialization's
        self.folded_run_ms = 0.0
        self.launch_how = ""
        self.from_spare = False
        self.exit_status: int | None = None
        self.died = anyio.Event()
        #: set once the process is reaped and every fd the host held for it is closed
        self.closed = anyio.Event()
        #: set by the scheduler: called from the reader callback for each RESULT frame
        self.on_result: Callable[[Sandbox, dict[str, Any]], None] = _ignore_result
        #: set by the scheduler: called once the process is gone, with the reason and exit status
        self.on_died: Callable[[Sandbox, str, int | None], None] = _ignore_death
        self.owner: Any = None
        #: the scheduler's deadline timer for the activations running here (one per sandbox)
        self.timer: asyncio.TimerHandle | None = None
        self._ready = _Waiter()
        self._init = _Waiter()
        self._out = bytearray()
        self._writer_wake = anyio.Event()
        #: set when the state becomes ``lost``: wakes the watcher
        self._gone = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = p.FrameDecoder()
        self._pipes_done = 0
        self._pipes_drained = anyio.Event()
        self._killed_reason: str | None = None
        self._reader_closed = False
        #: stop() asked it to exit: its end is expected
        self._stopping = False
        #: set (with ``_status``) once the process has exited
        self._exited = anyio.Event()
        self._status: int | None = None
        #: bytes handed to send() so far, and where each unanswered RUN's frame ends in that count
        self._sent = 0
        self._run_ends: dict[str, int] = {}
        #: activation ids whose RUN the sandbox never read (known once it is dead): they never started
        self.unstarted: set[str] = set()
        self._calls = 0
        #: fd -> state of the task reading that output pipe
        self._pipes: dict[int, _PipeState] = {}
        self._pipe_poll = select.poll()

    @property
    def gone(self) -> bool:
        """The sandbox has ended, whether or not its end is reported yet: nothing is routed or sent to it."""
        return self.state == "lost" or self.state == "dead"

    @property
    def killed_from_outside(self) -> bool:
        """It died of a SIGKILL the host did not send (an operator, a supervisor, the kernel's OOM killer): Python
        code cannot die so by accident, so it is no failure of the function's own code."""
        return (
            self.state == "dead"
            and self.exit_status == -signal.SIGKILL
            and self._killed_reason is None
            and not self._stopping
        )

    def _lose(self) -> None:
        if not self.gone:
            self.state = "lost"
        self._gone.set()
        self._writer_wake.set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(
        self, launcher: Launcher, env: dict[str, str], tg: anyio.abc.TaskGroup, *, wait_ready: bool = True
    ) -> float:
        """Launch and (unless ``wait_ready`` is false: :meth:`init` waits then) wait for READY; returns the launch
        time in ms."""
        t0 = time.perf_counter()
        self._tg = tg
        proc = await launcher.launch(env)
        if self.gone:
            # stopped (engine closing) while the launch was under way: do not let the new process outlive us
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
            proc.close()
            raise SandboxDied("the sandbox was stopped while starting", None)
        self.proc = proc
        self.launch_how = proc.how
        #: it was a zygote's spare, forked before it was asked for (its cold start skipped the fork)
        self.from_spare = bool(getattr(proc, "ahead", False))
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.proc.channel.fileno(), self._on_readable)
        tg.start_soon(self._watch, name=f"{self.id}-watch")
        tg.start_soon(self._watch_process, name=f"{self.id}-exit")
        tg.start_soon(self._read_pipe, self.proc.stdout_fd, "stdout", name=f"{self.id}-stdout")
        tg.start_soon(self._read_pipe, self.proc.stderr_fd, "stderr", name=f"{self.id}-stderr")
        tg.start_soon(self._write_loop, name=f"{self.id}-writer")
        if wait_ready:
            with anyio.fail_after(START_TIMEOUT_S):
                await self._ready.get()
        return (time.perf_counter() - t0) * 1000

    async def init(self, fields: dict[str, Any], timeout_s: float = math.inf) -> dict[str, Any]:
        """Send INIT and wait for INIT_DONE, up to ``timeout_s`` once the runtime is READY (then the sandbox is
        killed and the reply says so). Sent right after the launch, INIT waits in the channel for the runtime,
        which reads it as soon as it has sent READY: a cold start spares that round trip."""
        try:
            self.send(p.INIT, fields)
        except SandboxDied:
            # died before its INIT (e.g. killed from outside): its exit status says more than a broken pipe, and the
            # watcher fails the INIT with it once the process is reaped
            if self.proc is None:
                raise
            with anyio.move_on_after(DEATH_REPORT_TIMEOUT_S):
                await self.died.wait()
            if not self.died.is_set():
                raise
        with anyio.fail_after(START_TIMEOUT_S):
            await self._ready.get()
        reply: dict[str, Any] = {}
        with anyio.move_on_after(timeout_s + INIT_KILL_GRACE_S) as scope:
            reply = await self._init.get()
        if scope.cancelled_caught:
            ms = round(timeout_s * 1000)
            self.kill(f"its initialization exceeded its time limit of {ms} milliseconds")
            return {"ok": False, "error": f"the initialization exceeded its time limit of {ms} milliseconds"}
        if reply.get("ok") and self.state == "starting":
            self.state = "ready"
        return reply

    def kill(self, reason: str) -> None:
        if self._killed_reason is None:
            self._killed_reason = reason
        if self.state != "dead" and self.proc is not None:
            self.proc.kill()
            self._lose()

    async def stop(self) -> None:
        """Ask the sandbox to exit; kill it if it does not within the grace period."""
        if self.state == "dead":
            return
        if self.proc is None:
            self.state = "dead"
            self.died.set()
            self.closed.set()
            return
        self._stopping = True
        if not self.gone:
            self.state = "closing"
        with contextlib.suppress(SandboxDied):
            self.send(p.SHUTDOWN, {})
        with anyio.move_on_after(SHUTDOWN_GRACE_S):
            await self.died.wait()
        if not self.died.is_set():
            self.kill("shutdown")
            await self.died.wait()  # bounded: the watcher reports within KILL_WAIT_S of a kill

    def _never_read(self) -> set[str]:
        """The RUNs whose frame the sandbox had not read (completely) from the channel when it died: what it left
        in its end (which the host keeps a copy of, so a death does not discard it) plus what the host never got
        to write. Frames it read may have started; these certainly did not."""
        peer = getattr(self.proc, "peer", None)
        if peer is None or not self._run_ends:
            return set()
        try:
            unread = struct.unpack("i", fcntl.ioctl(peer.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return set()
        consumed = self._sent - len(self._out) - unread
        return {aid for aid, end in self._run_ends.items() if end > consumed}

    def take_stray(self, aid: str) -> list[str]:
        return self.stray.pop(aid, [])

    # -- I/O ----------------------------------------------------------------------------------------------------
    def send(self, kind: int, fields: dict[str, Any]) -> None:
        if self.gone or self.proc is None:
            raise SandboxDied("the sandbox is gone", self.exit_status)
        frame = p.encode(kind, fields)
        self._sent += len(frame)
        if kind == p.RUN:
            self._run_ends[fields["aid"]] = self._sent
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
        while not self.gone:
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

    def _on_readable(self) -> None:
        assert self.proc is not None
        sock = self.proc.channel
        while True:
            try:
                data = sock.recv(READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_reader()
                return
            try:
                for kind, fields in self._decoder.feed(data):
                    self._dispatch(kind, fields)
            except Exception as exc:
                # whatever a sandbox sends (its code can write to the channel too) must not break the host's
                # reader: a malformed frame ends the sandbox, and its death ends its activations
                self.kill(f"protocol error: {exc}")
                self._close_reader()
                return
            if len(data) < READ_CHUNK_BYTES:
                return  # drained: the loop calls back when more arrives (saves an EAGAIN recv per frame)

    def _close_reader(self) -> None:
        if self._loop is not None and self.proc is not None and not self._reader_closed:
            self._reader_closed = True
            self._loop.remove_reader(self.proc.channel.fileno())
        self._lose()

    def _dispatch(self, kind: int, fields: dict[str, Any]) -> None:
        if not isinstance(fields, dict):
            raise p.ProtocolError(f"frame of type {kind!r} has no field map")
        if kind == p.RESULT:
            self._run_ends.pop(fields.get("aid"), None)  # type: ignore[arg-type]
            self._drain_pipes()
            models = fields.get("models")
            if models is not None:
                self.models = {str(m) for m in models} if isinstance(models, list) else set()
            self.on_result(self, fields)
        elif kind == p.CALL:
            assert self._tg is not None
            if self._calls >= MAX_CALLS_IN_FLIGHT:
                with contextlib.suppress(SandboxDied, TypeError, ValueError, OverflowError):
                    self.send(p.REPLY, {"cid": fields.get("cid"), "ok": False, "error": "too many host calls"})
                return
            self._calls += 1
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
            args = fields.get("args")
            # who asks, as the host knows it: a sandbox cannot name another function
            value = await service({**(args if isinstance(args, dict) else {}), CALLER_ARG: self.fn_key})
            reply = {"cid": cid, "ok": True, "value": value}
        except Exception as exc:
            reply = {"cid": cid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self._calls -= 1
        with contextlib.suppress(SandboxDied, TypeError, ValueError, OverflowError):
            self.send(p.REPLY, reply)

    async def _read_pipe(self, fd: int, stream: str) -> None:
        state = self._pipes[fd] = _PipeState(stream)
        self._pipe_poll.register(fd, select.POLLIN)
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
                self._pipe_data(state, data)
        finally:
            del self._pipes[fd]
            with contextlib.suppress(KeyError, ValueError):
                self._pipe_poll.unregister(fd)
            if state.partial:
                self._stray_line(stream, state.partial)
            self._pipes_done += 1
            if self._pipes_done == 2:
                self._pipes_drained.set()

    def _pipe_data(self, state: _PipeState, data: bytes) -> None:
        # partial is at most one cut line long: no quadratic joining, however long a line a sandbox writes
        *lines, state.partial = (state.partial + data).split(b"\n")
        for line in lines:
            if state.skipping:
                state.skipping = False
            else:
                self._stray_line(state.stream, line)
        if state.skipping:
            state.partial = b""
        elif len(state.partial) > MAX_STRAY_LINE_BYTES:
            self._stray_line(state.stream, state.partial)
            state.partial = b""
            state.skipping = True

    def _drain_pipes(self) -> None:
        """Read what the sandbox wrote to fd 1/2 before a RESULT, so it lands in that activation's logs.

        The pipes and the channel are separate files: a line written just before ``main`` returned may still wait
        in its pipe when the RESULT is read (the pipe readers are tasks, woken after the channel's callback). One
        ``poll`` with a zero timeout tells whether there is anything to read at all.
        """
        if not self._pipes:
            return
        for fd, _ in self._pipe_poll.poll(0):
            state = self._pipes.get(fd)
            if state is None:
                continue
            while True:
                try:
                    data = os.read(fd, READ_CHUNK_BYTES)
                except OSError:
                    break  # nothing more now (EAGAIN), or the pipe is failing: its reader task will see
                if not data:
                    break  # end of file: its reader task will see
                self._pipe_data(state, data)
                if len(data) < READ_CHUNK_BYTES:
                    break

    def _stray_line(self, stream: str, raw: bytes) -> None:
        buckets: list[_Stray] = []
        for key in list(self.inflight) or ["-"]:
            bucket = self.stray.get(key)
            if bucket is None:
                bucket = self.stray[key] = _Stray()
            if isinstance(bucket, _Stray) and bucket.size < MAX_STRAY_BYTES:
                buckets.append(bucket)
        if not buckets:
            return  # a flood past the caps costs no formatting
        text = raw[:MAX_STRAY_LINE_BYTES].decode("utf-8", "replace")
        if len(raw) > MAX_STRAY_LINE_BYTES:
            text += f" [line cut at {MAX_STRAY_LINE_BYTES} bytes]"
        line = log_line(stream, text)
        for bucket in buckets:
            bucket.size += len(line)
            if bucket.size >= MAX_STRAY_BYTES or len(bucket) >= MAX_STRAY_LINES - 1:
                bucket.size = MAX_STRAY_BYTES
                bucket.append(log_line("stderr", STRAY_TRUNCATED_MESSAGE))
            else:
                bucket.append(line)

    async def _watch(self) -> None:
        """Wait for the sandbox to go (its channel ends, or its process exits while something it started still
        holds the channel), then collect the exit status and report the death once."""
        # shielded: a death is reported even when the engine's tasks are being cancelled (its close stops
        # every sandbox first, so this ends)
        with anyio.CancelScope(shield=True):
            await self._gone.wait()
            await self._on_gone()

    async def _watch_process(self) -> None:
        assert self.proc is not None
        try:
            with anyio.CancelScope(shield=True):
                self._status = await self.proc.wait()
        finally:
            self._exited.set()
        if not self._reader_closed:
            self._on_readable()  # a last RESULT may wait in the channel
            self._close_reader()

    async def _on_gone(self) -> None:
        proc = self.proc
        assert proc is not None
        if not self._stopping:
            # an unexpected end: make sure the whole process group is gone before collecting the status
            proc.kill()
        with anyio.move_on_after(KILL_WAIT_S):
            await self._exited.wait()
        status = self._status
        if status is None:
            proc.kill()
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            await self._pipes_drained.wait()
        proc.kill()  # stragglers in its process group keep no pipe open
        self.exit_status = status
        self.unstarted = self._never_read()
        self.state = "dead"
        reason = describe_exit(status)
        if self._killed_reason:
            reason = f"{reason} ({self._killed_reason})"
        err = SandboxDied(reason, status)
        self._ready.fail(err)
        self._init.fail(err)
        self.on_died(self, reason, status)
        self.died.set()
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            await self._pipes_drained.wait()
        for fd in (proc.stdout_fd, proc.stderr_fd, proc.channel.fileno()):
            if fd >= 0:
                anyio.notify_closing(fd)
        proc.close()
        self.closed.set()
