"""The sandbox runtime: receives INIT and RUN frames, runs the function, answers with RESULT frames.

It runs the function in the main thread when the function's concurrency is 1 (the default: no threads, so a sandbox
forked from a zygote stays fork-safe and signals behave), or in a thread pool of that size otherwise. Whatever the
function prints through ``sys.stdout``/``sys.stderr`` is captured per activation and returned in its RESULT; nothing
but the protocol ever goes over the channel.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import importlib.util
import os
import resource
import signal
import site
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

import minifaas_sandbox
from minifaas_sandbox import protocol as p

if TYPE_CHECKING:
    # imported when an async main first runs: importing asyncio costs every spawned sandbox's start ~20-150 ms
    import asyncio

DEFAULT_MAX_LOG_BYTES: Final = 10 << 20
DEFAULT_MAX_RESULT_BYTES: Final = 1 << 20
MAX_OPEN_FILES: Final = 1024
MODULE_NAME: Final = "__minifaas_function__"
#: what a spare runs once before its request, to take a cold start's first-touch costs ahead of it
REHEARSAL_CODE: Final = "def main(args):\n    return {'ok': bool(args)}\n"
PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG: Final = 1
#: the name of a sandbox's working dir (under the temp dir; the host removes those it finds the sandbox made)
SCRATCH_PREFIX: Final = "minifaas-cwd-"
#: the environment variables tempfile takes its folder from, in its order
TEMPDIR_VARS: Final = ("TMPDIR", "TEMP", "TMP")
#: a sandbox's private /tmp (isolation="sandbox"): a primed tempfile folder of that name is still right in it
SANDBOX_TMP: Final = "/tmp"
#: after answering, poll this long for the next frame before blocking (see BlockingChannel.recv)
SPIN_BEFORE_BLOCK_S: Final = 100e-6
#: the longest poll a RUN may ask for (a host that writes its records durably asks for more: see the scheduler)
SPIN_MAX_S: Final = 0.001
#: a sandbox that got no RUN for this long after an activation returns its free heap to the OS (malloc_trim): a busy
#: one keeps it, since each activation would fault it back (pose-crop: ~1000 faults, +2 ms of a 37 ms activation),
#: an idle one gives back what its activations' temporaries left (pose-crop: ~3.5 MiB of private memory)
IDLE_TRIM_AFTER_S: Final = 1.0
#: a loaded TFLite model takes about this many times its file size in memory (measured on the pose models)
MODEL_MEMORY_FACTOR: Final = 10
MIN_MODEL_CACHE_BYTES: Final = 16 << 20
CLONE_NEWNET: Final = 0x40000000
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
#: innermost frames of a traceback put in the logs: formatting all of a 500,000-frame one takes longer than a timeout
MAX_TRACEBACK_FRAMES: Final = 100
TRUNCATED_MESSAGE: Final = "Logs were truncated because the total bytes size exceeds the limit of {} bytes."
#: the variables OpenWhisk sets per activation; with concurrency > 1 each activation sees its own (ActivationEnviron)
OW_VAR_PREFIX: Final = "__OW_"

#: the log buffer of the activation this context runs, when activations run in threads (concurrency > 1)
_ACTIVATION_LOGS: contextvars.ContextVar[LogBuffer | None] = contextvars.ContextVar("minifaas_logs", default=None)
#: the __OW_* variables of the activation this context runs, when activations run in threads (concurrency > 1)
_ACTIVATION_ENV: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("minifaas_env", default=None)


def _now_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class LogBuffer:
    """One activation's log lines, formatted as OpenWhisk does, capped by bytes with a truncation line."""

    __slots__ = ("_lock", "_partial", "_pending", "_size", "closed", "lines", "max_bytes", "truncated")

    def __init__(self, max_bytes: int) -> None:
        #: the function's own threads print too: without it lines were lost, merged, or write raised KeyError
        self._lock = threading.Lock()
        self.closed = False
        self.lines: list[str] = []
        self.max_bytes = max_bytes
        self._size = 0
        #: per stream and thread, the pieces of a line not ended yet (joining them at every write would be quadratic);
        #: per thread, so that two threads printing pieces of lines never merge them into one
        self._partial: dict[tuple[str, int], list[str]] = {}
        self._pending = 0
        self.truncated = False

    def write(self, stream: str, text: str) -> bool:
        """Add text; False once the activation's logs are finished (the caller sends the text elsewhere)."""
        with self._lock:
            if self.closed:
                return False
            self._write(stream, text)
            return True

    def _write(self, stream: str, text: str) -> None:
        if self.truncated or not text:
            return
        key = (stream, threading.get_ident())
        parts = self._partial.setdefault(key, [])
        parts.append(text)
        if "\n" not in text:
            self._pending += len(text)
            if self._size + self._pending > self.max_bytes:
                self._truncate()
            return
        pending = "".join(parts)
        del self._partial[key]
        self._pending -= len(pending) - len(text)
        *complete, rest = pending.split("\n")
        ts = _now_iso(time.time())
        for line in complete:
            self._add(f"{ts} {stream}: {line}")
        if rest and not self.truncated:
            self._partial[key] = [rest]
            self._pending += len(rest)
            if self._size + self._pending > self.max_bytes:
                self._truncate()

    def _add(self, line: str) -> None:
        if self.truncated:
            return
        self._size += len(line) + 1
        if self._size > self.max_bytes:
            self._truncate()
            return
        self.lines.append(line)

    def _truncate(self) -> None:
        self.truncated = True
        self._partial.clear()
        self._pending = 0
        self.lines.append(f"{_now_iso(time.time())} stderr: {TRUNCATED_MESSAGE.format(self.max_bytes)}")

    def finish(self) -> list[str]:
        with self._lock:
            self.closed = True
            return self._finish()

    def _finish(self) -> list[str]:
        for (stream, _thread), parts in list(self._partial.items()):
            self._add(f"{_now_iso(time.time())} {stream}: {''.join(parts)}")
        self._partial.clear()
        self._pending = 0
        return self.lines


class _Capture:
    """Stands in for sys.stdout/sys.stderr: routes text to the log buffer of the activation running in this thread."""

    def __init__(self, stream: str, runtime: Runtime, fallback: TextIO) -> None:
        self._stream = stream
        self._runtime = runtime
        self._fallback = fallback
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, text: str) -> int:
        buf = self._runtime.current_logs()
        if buf is None or not buf.write(self._stream, text):
            # outside any activation, or a thread printing after its activation ended: the host reads fd 1/2
            return self._fallback.write(text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._runtime.current_logs() is None:
            self._fallback.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fallback.fileno()

    @property
    def buffer(self) -> Any:
        return self._fallback.buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


class LambdaContext:
    """AWS Lambda's context object, for functions deployed with ``style="lambda"``."""

    def __init__(self, aid: str, name: str, version: str, memory_mb: int, deadline_ms: int) -> None:
        self.aws_request_id = aid
        self.function_name = name
        self.function_version = version
        self.memory_limit_in_mb = memory_mb
        self.invoked_function_arn = f"arn:minifaas:function:{name}:{version}"
        self.log_group_name = f"/minifaas/{name}"
        self.log_stream_name = aid
        # set by AWS only for mobile SDK callers; handlers still read them
        self.identity: Any = None
        self.client_context: Any = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - time.time_ns() // 1_000_000)


class Runtime:
    def __init__(self, channel: p.BlockingChannel | None) -> None:
        self.channel = channel
        self.send_lock = threading.Lock()
        self.fn: Callable[..., Any] | None = None
        self.config: dict[str, Any] = {}
        self._main_logs: LogBuffer | None = None
        self._init_logs: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._next_cid = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._reply_events: dict[int, threading.Event] = {}
        self._deferred: list[p.Message] = []
        self._threaded = False
        #: an activation ran since the heap was last trimmed
        self._trim_due = False
        #: a deployed class's teardown(), run at SHUTDOWN
        self._teardown: Callable[[], None] | None = None
        #: runs ``async def main`` in the main thread (concurrency 1): kept, so what a call leaves scheduled lives on
        self._loop: asyncio.AbstractEventLoop | None = None
        #: runs ``async def main`` for activation threads (concurrency > 1), or in-process under a running loop
        self._loop_thread: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        #: isolation="sandbox" (pid 1 of its PID namespace): waits for exited orphans whenever no activation runs
        self._reaps_orphans: Callable[[], int] | None = None
        #: activations submitted to the pool and not yet answered (concurrency > 1 with a reaper)
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        #: per pool thread: ``counted`` while its activation is in ``_inflight`` (see ``_send_result``)
        self._activation = threading.local()

    # -- logs -----------------------------------------------------------------------------------------------------
    def current_logs(self) -> LogBuffer | None:
        if self._threaded:
            # a context variable, not a thread-local: an async main's tasks run on the loop thread with a copy of it
            return _ACTIVATION_LOGS.get()
        return self._main_logs

    def _set_logs(self, buf: LogBuffer | None) -> None:
        if self._threaded:
            _ACTIVATION_LOGS.set(buf)
        else:
            self._main_logs = buf

    # -- sending ------------------------------------------------------------------------------------------------
    def send(self, kind: int, fields: dict[str, Any]) -> None:
        frame = p.encode(kind, fields)
        assert self.channel is not None
        with self.send_lock:
            self.channel.send_frame(frame)

    # -- host calls -----------------------------------------------------------------------------------------------
    def host_call(self, method: str, args: dict[str, Any]) -> Any:
        if self.channel is None:
            raise RuntimeError("no host to call: running in-process")
        with self.send_lock:
            self._next_cid += 1
            cid = self._next_cid
        if self._threaded:
            ev = threading.Event()
            self._reply_events[cid] = ev
            self.send(p.CALL, {"cid": cid, "method": method, "args": args})
            ev.wait()
            reply = self._replies.pop(cid)
        else:
            self.send(p.CALL, {"cid": cid, "method": method, "args": args})
            while True:
                msg = self.channel.recv()
                if msg is None:
                    raise RuntimeError("host closed the channel during a host call")
                kind, fields = msg
                if kind == p.REPLY and fields.get("cid") == cid:
                    reply = fields
                    break
                self._deferred.append(msg)
        if not reply.get("ok"):
            raise RuntimeError(f"host call {method} failed: {reply.get('error')}")
        return reply.get("value")

    # -- init ---------------------------------------------------------------------------------------------------
    def init(self, fields: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.config = fields
        buf = LogBuffer(int(fields.get("max_log_bytes") or DEFAULT_MAX_LOG_BYTES))
        self._main_logs = buf
        try:
            if not in_process:
                if fields.get("style") == "lambda":
                    os.environ.update(_lambda_env(fields))
                os.environ.update({str(k): str(v) for k, v in (fields.get("env") or {}).items()})
                if int(fields.get("concurrency") or 1) > 1:
                    # before the function's import, so that its `from os import environ` gets the per-activation view
                    install_activation_environ()
                view = fields.get("isolation")
                if view is not None:
                    # before any of the function's code runs, and before any thread exists (a user namespace
                    # needs a single-threaded process); it includes network=False's namespace
                    from minifaas_sandbox import isolation

                    isolation.enter(
                        view, network=fields.get("network") is not False, memory_mb=int(fields.get("memory_mb") or 0)
                    )
                    if os.getpid() == 1:
                        self._reaps_orphans = isolation.reap_orphans
                    _forget_tempdir_unless(SANDBOX_TMP)
                elif fields.get("network") is False:
                    # before any of the function's code runs, and before any thread exists (a namespace is per
                    # thread until then)
                    isolate_network()
            _prepend_sys_path([str(e) for e in fields.get("sys_path") or ()])
            with _init_time_limit(0 if in_process else int(fields.get("timeout_ms") or 0)):
                if fields["source"].get("kind") == "pickle":
                    from minifaas_sandbox import callables

                    if not in_process:
                        enter_scratch(None)
                    # a class's setup() runs here: it is the cold start's init, under the same time limit
                    self.fn, self._teardown = callables.load(fields["source"], self._await)
                else:
                    self.fn = _load_function(fields, chdir=not in_process)
        except BaseException as exc:
            self._main_logs = None
            tb = _format_exception(exc, None)
            for line in tb.rstrip().splitlines():
                buf.write("stderr", line + "\n")
            self._init_logs = buf.finish()
            return {
                "ok": False,
                "error": _describe(exc),
                "logs": self._init_logs,
                "init_ms": (time.perf_counter() - t0) * 1000,
                "scratch": scratch_dir,
            }
        self._main_logs = None
        self._init_logs = buf.finish()
        concurrency = int(fields.get("concurrency") or 1)
        if concurrency > 1:
            self._threaded = True
            self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="minifaas-activation")
        if not in_process:
            memory_mb = int(fields.get("memory_mb") or 0)
            _size_model_cache(memory_mb)
            _apply_limits(memory_mb)
        return {"ok": True, "init_ms": (time.perf_counter() - t0) * 1000, "scratch": scratch_dir}

    # -- run ----------------------------------------------------------------------------------------------------
    def run(self, fields: dict[str, Any]) -> None:
        """Answer one RUN with exactly one RESULT, whatever the function did (a RUN left unanswered hangs its caller
        to the timeout, and the kill then takes the sandbox's other activations with it)."""
        try:
            self._run(fields)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except BaseException as exc:
            out = {
                "aid": fields.get("aid", ""),
                "status": "developer_error",
                "result": {"error": f"the sandbox runtime failed to answer: {type(exc).__name__}"},
                "logs": [],
                "annotations": {},
                "run_ms": 0.0,
                "models": [],
                "retire": True,
            }
            self._send_result(p.encode(p.RESULT, out))

    def _run_then_reap(self, fields: dict[str, Any]) -> None:
        """run() on a pool thread; the last activation to end reaps (none of the function's code runs then, so no
        child's status is taken from under a wait of its own)."""
        self._activation.counted = True
        try:
            self.run(fields)
        finally:
            self._end_counted()  # no RESULT went out (the channel broke)

    def _end_counted(self) -> None:
        if not getattr(self._activation, "counted", False):
            return
        self._activation.counted = False
        with self._inflight_lock:
            self._inflight -= 1
            if self._inflight == 0 and self._reaps_orphans is not None:
                self._reaps_orphans()

    def _send_result(self, frame: bytes) -> None:
        # the activation ends (and the last one reaps) before its RESULT leaves: the host may send the next RUN the
        # moment it has the RESULT, and that RUN, counted first, kept this end from reaping (its zombies stayed)
        self._end_counted()
        assert self.channel is not None
        with self.send_lock:
            self.channel.send_frame(frame)

    def _run(self, fields: dict[str, Any]) -> None:
        assert self.channel is not None
        out = self.execute(fields)
        max_result = int(self.config.get("max_result_bytes") or DEFAULT_MAX_RESULT_BYTES)
        error = ""
        frame = b""
        try:
            frame = p.encode(p.RESULT, out)
            if len(frame) > max_result:
                # the frame also carries logs: only the result itself counts against the limit; the frame goes
                # first, so a big result is never held in three copies
                frame = b""
                size = len(p.encode_body(out["result"]))
                if size > max_result:
                    error = "The action produced a response that exceeded the allowed length: "
                    error += f"{size} > {max_result} bytes."
        except (TypeError, ValueError, OverflowError) as exc:
            error = f"The action returned a result that cannot be serialized: {_describe(exc)}"
        except MemoryError:
            # a result that fits in memory once but not twice: answer instead of dying
            error = f"memory limit exceeded ({self.config.get('memory_mb')} MB) while encoding the result"
        if error:
            out["status"] = "developer_error"
            out["result"] = {"error": error}
            out["retire"] = out.get("retire") or error.startswith("memory limit")
        if error or not frame:
            frame = p.encode(p.RESULT, out)
        self._send_result(frame)

    def execute(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Run one activation and return the RESULT fields (also used in-process by minifaas.testing)."""
        aid: str = fields["aid"]
        cfg = self.config
        buf = LogBuffer(int(cfg.get("max_log_bytes") or DEFAULT_MAX_LOG_BYTES))
        if self._init_logs:
            buf.lines.extend(self._init_logs)
            self._init_logs = []
        self._set_logs(buf)
        deadline = int(fields.get("deadline") or 0)
        version = str(fields.get("version") or cfg.get("version") or "")
        if not self._threaded:
            environ = os.environ
            environ["__OW_ACTIVATION_ID"] = aid
            environ["__OW_DEADLINE"] = str(deadline)
            if environ.get("__OW_ACTION_VERSION") != version:
                environ["__OW_ACTION_NAME"] = f"/{cfg.get('namespace', 'guest')}/{cfg.get('name', '')}"
                environ["__OW_ACTION_VERSION"] = version
                environ["__OW_NAMESPACE"] = str(cfg.get("namespace", "guest"))
        else:
            _ACTIVATION_ENV.set(
                {
                    "__OW_ACTIVATION_ID": aid,
                    "__OW_DEADLINE": str(deadline),
                    "__OW_ACTION_NAME": f"/{cfg.get('namespace', 'guest')}/{cfg.get('name', '')}",
                    "__OW_ACTION_VERSION": version,
                    "__OW_NAMESPACE": str(cfg.get("namespace", "guest")),
                }
            )
        status = "success"
        result: Any = None
        out_of_memory = broken = False
        t0 = time.perf_counter()
        try:
            assert self.fn is not None
            args = fields.get("args")
            # the host encodes the arguments once, at submit, and ships them as one msgpack blob
            args = p.decode_body(args) if isinstance(args, bytes) else (args or {})
            if cfg.get("style") == "lambda":
                ctx = LambdaContext(aid, str(cfg.get("name", "")), version, int(cfg.get("memory_mb") or 0), deadline)
                result = self.fn(args, ctx)
                if _is_awaitable(result):
                    result = self._await(result)
                if not isinstance(result, dict):
                    # a Lambda handler may return any JSON value (None, for event processors): keep it whole
                    result = {"result": result}
            else:
                result = self.fn(args)
                if _is_awaitable(result):
                    result = self._await(result)
            if not isinstance(result, dict):
                status = "developer_error"
                result = {"error": f"The action did not return a dictionary (returned {type(result).__name__})."}
            elif "error" in result and cfg.get("style") != "lambda":
                # OpenWhisk: a result with an `error` key is an application error (status code 1)
                status = "application_error"
        except MemoryError:
            # answer only after leaving the handler: until then the traceback keeps every frame of the function
            # alive (a deep recursion fills the memory with them), and formatting the answer would fail again
            out_of_memory = True
        except RecursionError as exc:
            status = "application_error"
            result = {"error": f"RecursionError: {exc}"}
            buf.write("stderr", _format_exception(exc, -20))
        except SystemExit as exc:
            status = "developer_error"
            result = {"error": f"The action called sys.exit({exc.code!r})."}
        except BaseException as exc:
            status = "application_error"
            result = {"error": _describe(exc)}
            # CPython's own failure, e.g. a frame it could not allocate at the memory limit: do not trust it again
            broken = isinstance(exc, SystemError)
            if cfg.get("style") == "lambda":
                result.update(errorMessage=_safe_str(exc), errorType=type(exc).__name__)
            buf.write("stderr", _format_exception(exc, -MAX_TRACEBACK_FRAMES))
        if out_of_memory:
            status = "developer_error"
            result = {"error": f"memory limit exceeded ({cfg.get('memory_mb')} MB)"}
            buf.write("stderr", "MemoryError: memory limit exceeded\n")
        run_ms = (time.perf_counter() - t0) * 1000
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self._set_logs(None)
        if self._threaded:
            _ACTIVATION_ENV.set(None)
        out = {
            "aid": aid,
            "status": status,
            "result": result,
            "logs": buf.finish(),
            "annotations": _model_annotations(),
            "run_ms": run_ms,
            "models": _held_models(),
        }
        if out_of_memory or broken:
            # the function may keep its memory in globals, or have left the interpreter damaged: ask the host to
            # give its next activations a fresh sandbox
            out["retire"] = True
        return out

    def teardown(self) -> None:
        """A deployed class's ``teardown()``, once; what it raises is printed to the sandbox's stderr."""
        end, self._teardown = self._teardown, None
        if end is None:
            return
        try:
            end()
        except BaseException:
            traceback.print_exc(file=sys.__stderr__)

    def _await(self, awaitable: Awaitable[Any]) -> Any:
        """Run what an ``async def main`` returned to completion on an event loop of the sandbox's own."""
        import asyncio

        if not self._threaded and not _loop_running_here():
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_as_coroutine(awaitable))
        # one loop for every activation thread: their coroutines share it as async code expects; the task gets a
        # copy of this thread's context, so it sees this activation's logs and __OW_* variables
        if self._loop_thread is None:
            with self.send_lock:
                if self._loop_thread is None:
                    loop = asyncio.new_event_loop()
                    thread = threading.Thread(target=loop.run_forever, name="minifaas-asyncio", daemon=True)
                    thread.start()
                    self._loop_thread = (loop, thread)
        loop = self._loop_thread[0]
        return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop).result()

    def _trim_heap(self) -> None:
        """Return the free heap to the OS: glibc keeps it (MALLOC_TRIM_THRESHOLD_) so busy activations reuse it."""
        self._trim_due = False
        trim = getattr(_libc(), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)

    # -- main loop ----------------------------------------------------------------------------------------------
    def loop(self) -> int:
        assert self.channel is not None
        while True:
            if self._deferred:
                msg: p.Message | None = self._deferred.pop(0)
            else:
                on_idle = self._trim_heap if self._trim_due else None
                msg = self.channel.recv(on_idle=on_idle, idle_s=IDLE_TRIM_AFTER_S)
            if msg is None:
                return 0
            kind, fields = msg
            if kind == p.RUN:
                if self._pool is not None:
                    if self._reaps_orphans is not None:
                        with self._inflight_lock:
                            self._inflight += 1
                        self._pool.submit(self._run_then_reap, fields)
                    else:
                        self._pool.submit(self.run, fields)
                else:
                    self.run(fields)
                    if self._reaps_orphans:
                        # pid 1 of its PID namespace inherits what the function's children left: a zombie holds a
                        # pid of the sandbox's cap. Between activations, so a function's own child is not taken
                        # from it while it runs (one it waits for in a later activation finds it gone)
                        self._reaps_orphans()
                    # the host marks RUNs with nothing queued behind them: poll briefly for the next one then
                    self.channel.spin_s = _spin_s(fields.get("spin"))
                    self._trim_due = True
            elif kind == p.REPLY:
                cid = int(fields.get("cid", 0))
                ev = self._reply_events.pop(cid, None)
                if ev is not None:
                    self._replies[cid] = fields
                    ev.set()
            elif kind == p.INIT:
                self.send(p.INIT_DONE, self.init(fields))
            elif kind == p.SHUTDOWN:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self.teardown()
                if self._loop_thread is not None:
                    loop, thread = self._loop_thread
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(timeout=1.0)
                return 0


def _spin_s(spin: object) -> float:
    """How long to poll for the next RUN: ``spin`` is True (the default poll), a number of microseconds (a host
    whose next RUN comes later than usual: it waits for its record store), or false (no poll)."""
    if isinstance(spin, bool) or not isinstance(spin, int | float):
        return SPIN_BEFORE_BLOCK_S if spin else 0.0
    return min(max(float(spin), 0.0) / 1e6, SPIN_MAX_S)


def _lambda_env(fields: dict[str, Any]) -> dict[str, str]:
    """The variables AWS Lambda sets that handlers commonly read."""
    name = str(fields.get("name", ""))
    return {
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_VERSION": str(fields.get("version", "")),
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fields.get("memory_mb") or ""),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/minifaas/{name}",
    }


def _prepend_sys_path(entries: list[str]) -> None:
    """Put the function's own site-packages first, with their .pth files processed (as site does)."""
    if not entries:
        return
    before = list(sys.path)
    for entry in entries:
        site.addsitedir(entry)
    added = [e for e in sys.path if e not in before]
    sys.path[:] = added + before
    importlib.invalidate_caches()


def _safe_str(exc: BaseException) -> str:
    """str(exc), or a note saying it failed: describing an error must never raise (a user's __str__ can)."""
    try:
        msg = str(exc)
    except BaseException as err:
        return f"<{type(exc).__name__}: str() raised {type(err).__name__}>"
    return msg if isinstance(msg, str) else type(exc).__name__


class InitTimeout(BaseException):
    """The function's module-level code outlived its time limit (a BaseException: ``except Exception`` in the
    function's code must not swallow it)."""


@contextlib.contextmanager
def _init_time_limit(timeout_ms: int) -> Iterator[None]:
    """Interrupt the import after ``timeout_ms`` (as OpenWhisk applies the action's timeout to /init), so its
    record ends with the logs written so far; code stuck in C is killed by the host a little later."""
    if timeout_ms <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: types.FrameType | None) -> None:
        raise InitTimeout(f"the initialization exceeded its time limit of {timeout_ms} milliseconds")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_ms / 1000)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _describe(exc: BaseException) -> str:
    msg = _safe_str(exc)
    return msg if msg else type(exc).__name__


def _format_exception(exc: BaseException, limit: int | None) -> str:
    """The traceback as text; traceback guards a failing __str__ only against Exception, so guard the rest here."""
    try:
        return "".join(traceback.format_exception(exc, limit=limit))
    except BaseException as err:
        return f"{type(exc).__name__} (its traceback could not be formatted: {type(err).__name__})\n"


def _is_awaitable(value: object) -> bool:
    # what an `async def` returns; a dict (every regular result) is never one
    return not isinstance(value, dict) and hasattr(type(value), "__await__")


def _loop_running_here() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class ActivationEnviron(os._Environ):  # type: ignore[type-arg]
    """``os.environ`` for a sandbox that runs activations in threads (concurrency > 1): the ``__OW_*`` variables
    come from the activation running in the calling context (a context variable), everything else from the process
    environment, shared as before. ``os.getenv``, ``os.environ.get/[]/in/copy()`` all see this view; child processes
    and ``os.environb`` see the process environment only, which holds no per-activation values."""

    def __init__(self, base: os._Environ[str]) -> None:
        # share the process environment's dict: a change through either object is seen by both
        super().__init__(base._data, base.encodekey, base.decodekey, base.encodevalue, base.decodevalue)  # type: ignore[attr-defined]

    def __getitem__(self, key: str) -> str:
        own = _ACTIVATION_ENV.get()
        if own is not None and key in own:
            return own[key]
        return super().__getitem__(key)  # type: ignore[no-any-return]

    def __setitem__(self, key: str, value: str) -> None:
        own = _ACTIVATION_ENV.get()
        if own is not None and key.startswith(OW_VAR_PREFIX):
            if not isinstance(value, str):
                raise TypeError(f"str expected, not {type(value).__name__}")
            own[key] = value
            return
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        own = _ACTIVATION_ENV.get()
        if own is not None and key in own:
            del own[key]
            return
        super().__delitem__(key)

    def __iter__(self) -> Iterator[str]:
        own = _ACTIVATION_ENV.get()
        if own is None:
            yield from super().__iter__()
            return
        yield from own
        for key in list(super().__iter__()):
            if key not in own:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def install_activation_environ() -> None:
    """Put :class:`ActivationEnviron` in place of ``os.environ`` (once)."""
    if not isinstance(os.environ, ActivationEnviron):
        # the same variables, seen through a per-activation overlay: nothing to clear
        os.environ = ActivationEnviron(os.environ)  # noqa: B003


#: the working dir of this sandbox (:func:`enter_scratch`), None before INIT
scratch_dir: str | None = None
#: the variables tempfile chose its folder by when :func:`_prime_tempdir` ran (None: not primed, or forgotten)
_tempdir_primed_for: tuple[str | None, ...] | None = None


def _tempdir_env() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in TEMPDIR_VARS)


def _prime_tempdir() -> None:
    """Have tempfile choose its folder now: it writes and removes a probe file in each candidate, 0.3-0.5 ms of a
    cold start's path when :func:`enter_scratch` made it do so at INIT."""
    global _tempdir_primed_for
    import tempfile

    with contextlib.suppress(Exception):
        tempfile.gettempdir()
        _tempdir_primed_for = _tempdir_env()


def _forget_tempdir_unless(folder: str) -> None:
    """After the sandbox's new root: a folder tempfile chose outside it may not be there any more."""
    global _tempdir_primed_for
    import tempfile

    if tempfile.tempdir != folder:
        _tempdir_primed_for = None


def enter_scratch(folder: str | None) -> str:
    """Make a working dir of this sandbox's own and enter it, with the bundle folder's entries linked in it: the
    function opens its own files by relative names, as in OpenWhisk's action folder, and what it creates there is
    its own, not written into the staged bundle every function and version with that content shares. Under the
    temp dir (a sandbox's private /tmp under isolation="sandbox"); the host removes it when the sandbox ends."""
    global scratch_dir
    import tempfile

    if _tempdir_primed_for != _tempdir_env():
        tempfile.tempdir = None  # primed for other variables than this sandbox's: let tempfile look again
    work = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    if folder is not None:
        for name in os.listdir(folder):
            os.symlink(os.path.join(folder, name), os.path.join(work, name))
    os.chdir(work)
    scratch_dir = work
    return work


def _load_function(fields: dict[str, Any], *, chdir: bool = True) -> Callable[..., Any]:
    source: dict[str, Any] = fields["source"]
    main_name = str(fields.get("main") or "main")
    kind = source.get("kind")
    module = types.ModuleType(MODULE_NAME)
    if kind == "code":
        if chdir:
            with contextlib.suppress(OSError):
                enter_scratch(None)
        filename = str(source.get("filename") or "__main__.py")
        module.__file__ = filename
        sys.modules[MODULE_NAME] = module
        exec(compile(source["code"], filename, "exec"), module.__dict__)
    elif kind in ("file", "dir"):
        path = str(source["path"])
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        if chdir:
            # before the import, as OpenWhisk runs init in the action's folder: module-level code opens its own files
            with contextlib.suppress(OSError):
                enter_scratch(folder if kind == "dir" else None)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    fn = getattr(module, main_name, None)
    if not callable(fn):
        raise AttributeError(f"the function has no callable {main_name!r}")
    return fn  # type: ignore[no-any-return]


def _size_model_cache(memory_mb: int) -> None:
    """Bound the model cache by what fits under the memory limit: a TFLite interpreter holds about 7-10x its
    file's bytes once its tensors are allocated, and the cache counts file bytes."""
    if memory_mb <= 0:
        return
    from minifaas_sandbox import models

    budget = max(MIN_MODEL_CACHE_BYTES, (memory_mb << 20) // MODEL_MEMORY_FACTOR)
    models.configure(max_bytes=min(models.MODEL_CACHE_MAX_BYTES, budget))


def _apply_limits(memory_mb: int) -> None:
    """Cap this sandbox's address space at what it uses after init plus the function's memory limit."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb <= 0:
        return
    limit = _vm_bytes() + (memory_mb << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _vm_bytes() -> int:
    """This process's address space size (VmSize), 0 when unknown; statm is the cheapest place to read it."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * PAGE_BYTES
    return 0


def _model_annotations() -> dict[str, Any]:
    models = sys.modules.get("minifaas_sandbox.models")
    take = getattr(models, "take_activation_info", None)
    if take is None:
        return {}
    try:
        info = take()
    except Exception:
        return {}
    return dict(info) if isinstance(info, dict) else {}


def _held_models() -> list[str]:
    models = sys.modules.get("minifaas_sandbox.models")
    held = getattr(models, "held", None)
    if held is None:
        return []
    try:
        return [str(k) for k in held()]
    except Exception:
        return []


@functools.cache
def _libc() -> ctypes.CDLL:
    # loaded once, in the zygote before it forks: importing ctypes costs every cold start ~2 ms otherwise
    return ctypes.CDLL(None, use_errno=True)


def isolate_network() -> None:
    """Move this process into a new network namespace: no interface but a loopback of its own.

    Needs root or CAP_SYS_ADMIN; raises OSError otherwise, so a function deployed without network fails to
    initialize instead of silently running with it.
    """
    import fcntl
    import struct

    libc = _libc()
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot run without network: unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    # the new loopback starts down; up, local servers inside the function work (the host's stay out of reach)
    ifreq = struct.Struct("16sH14x")
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = ifreq.unpack(fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq.pack(b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, ifreq.pack(b"lo", flags | IFF_UP))


_libc()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed host leaves no sandbox behind: only for
    a runtime started without the host's lifeline (``minifaas_sandbox.lifeline``), which a zygote's child has."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        _libc().prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent or parent == 1:
        os._exit(0)


def prepare(*, rehearse: bool = False) -> None:
    """What a sandbox process does before it has a channel (a zygote's spare does it ahead of its request); with
    ``rehearse``, it also runs a cold start's steps once (:func:`_rehearse`)."""
    from minifaas_sandbox import lifeline

    if lifeline.armed_fd() < 0:
        # not with a forked sandbox's parent, the zygote: it may be retired or killed while its sandboxes serve on
        die_with_parent()
    from minifaas_sandbox import models

    models.set_fetcher(models.host_fetcher)
    with contextlib.suppress(Exception):
        # isolation="sandbox"'s seccomp program and the interpreter's folders, once, ahead of the request
        from minifaas_sandbox import isolation

        isolation.prepare()
    _prime_tempdir()
    if rehearse:
        # only ever a head start: a spare that could not rehearse still serves (and the zygote must not keep
        # forking spares that die)
        with contextlib.suppress(Exception):
            _rehearse()


def _rehearse() -> None:
    """Run a no-op INIT and RUN on a throwaway runtime, and read the process's size as INIT does.

    A fresh fork pays a copy-on-write fault the first time it writes each page it shares with the zygote (every
    object it touches: reference counts), so its first INIT and RUN took 0.6-0.8 and 0.2 ms here where later
    ones take a tenth of that. A spare pays them while it waits; what it leaves (the environment this sets, the
    module) is replaced by its request's.
    """
    rt = Runtime(None)
    rt.init({"source": {"kind": "code", "code": REHEARSAL_CODE, "filename": "<rehearsal>"}}, in_process=True)
    out = rt.execute({"aid": "rehearsal", "args": p.encode_body({"rehearsal": True}), "deadline": 0})
    decoder = p.FrameDecoder()
    for _kind, _fields in decoder.feed(p.encode(p.RESULT, out)):
        pass
    _vm_bytes()
    sys.modules.pop(MODULE_NAME, None)
    from minifaas_sandbox import models

    models.configure()  # what INIT's sizing of the cache does, at the default size it keeps without a limit


def serve(channel_fd: int, *, preloaded: tuple[str, ...] = (), prepared: bool = False) -> int:
    """Run the sandbox on an inherited channel fd until the host closes it or sends SHUTDOWN."""
    if not prepared:
        prepare()
    # nothing the function starts inherits the channel (a daemon holding it would make the sandbox look alive)
    os.set_inheritable(channel_fd, False)
    sock = socket.socket(fileno=channel_fd)
    sock.setblocking(True)
    channel = p.BlockingChannel(sock)
    rt = Runtime(channel)
    # the model fetcher set in prepare() asks the host's store through this: once per machine, shared by all
    minifaas_sandbox._host_call = rt.host_call
    sys.stdout = _Capture("stdout", rt, sys.__stdout__ or sys.stdout)
    sys.stderr = _Capture("stderr", rt, sys.__stderr__ or sys.stderr)
    rt.send(p.READY, {"pid": os.getpid(), "preload": list(preloaded)})
    try:
        return rt.loop()
    except (BrokenPipeError, ConnectionResetError):
        return 0
