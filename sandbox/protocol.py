"""Wire protocol between the host (minifaas) and a sandbox process (minifaas_sandbox).

Data flow::

    host process                                          sandbox process
    +--------------------------+   socketpair (fd N)      +---------------------------+
    | Scheduler -> SandboxProc | ----- INIT / RUN ------> | runtime.serve()           |
    |   reader task           <| ---- READY / RESULT ---- |   main(args) in the main  |
    |   host calls (models)   <| ---- CALL / REPLY -----> |   thread, stdout captured |
    +--------------------------+                          +---------------------------+
          ^      ^                                             |        |
          |      +------------- stderr pipe (fd 2) ------------+        |
          +-------------------- stdout pipe (fd 1) ---------------------+

The protocol channel is a private socket whose fd number the sandbox gets on its command line (or from the zygote).
It is never stdin/stdout: what a function prints is captured by the runtime and returned as that activation's logs;
whatever still reaches fd 1 or 2 (C extensions, child processes, a dying interpreter) is read by the host and
attributed to the activation running at the time.

Frame layout::

    +----------------------+----------------------------------------------+
    | length: uint32, big- | body: msgpack array [type: int, fields: map] |
    | endian, of the body  | (use_bin_type=True: bytes stay bytes)        |
    +----------------------+----------------------------------------------+

Message types (H = host, S = sandbox):

=====  ==========  ====  ==================================================================================
code   name        dir   fields
=====  ==========  ====  ==================================================================================
1      READY       S>H   pid, preload (list of modules imported before READY)
2      INIT        H>S   name, version, namespace, main, source {kind: code|file|dir, code, path, filename},
                         env (the function's own variables), concurrency, memory_mb, max_result_bytes,
                         max_log_bytes, style (openwhisk|lambda)
3      INIT_DONE   S>H   ok, error (message), init_ms
4      RUN         H>S   aid, args, deadline (epoch ms), version
5      RESULT      S>H   aid, status (success|application_error|developer_error), result (map), logs
                         (list of formatted lines), annotations (map), models (list of held model keys)
6      CALL        S>H   cid, method, args: the sandbox asks the host for a service (e.g. "model.fetch")
7      REPLY       H>S   cid, ok, value, error
8      SHUTDOWN    H>S   (none): finish and exit 0
=====  ==========  ====  ==================================================================================

Values: msgpack's own types, plus numpy arrays as extension type 1 (no JSON or list detour)::

    +--------------------------+-------------------------------------+----------------------------------+
    | header length: uint16 BE | msgpack [dtype.str, shape]          | the array's bytes, C order       |
    +--------------------------+-------------------------------------+----------------------------------+

numpy scalars travel as Python numbers; arrays of Python objects are refused (they would need pickle).

A RUN is answered by exactly one RESULT with the same ``aid``. With ``concurrency`` 1 the host sends one RUN at a
time; with more, up to that many may be outstanding and RESULTs come back in completion order.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack

READY: Final = 1
INIT: Final = 2
INIT_DONE: Final = 3
RUN: Final = 4
RESULT: Final = 5
CALL: Final = 6
REPLY: Final = 7
SHUTDOWN: Final = 8

NAMES: Final[dict[int, str]] = {
    READY: "READY",
    INIT: "INIT",
    INIT_DONE: "INIT_DONE",
    RUN: "RUN",
    RESULT: "RESULT",
    CALL: "CALL",
    REPLY: "REPLY",
    SHUTDOWN: "SHUTDOWN",
}

#: msgpack extension type code of a numpy array (layout in the module docstring)
NDARRAY_EXT: Final = 1
_NDARRAY_HEADER: Final = struct.Struct(">H")

HEADER: Final = struct.Struct(">I")
HEADER_BYTES: Final = HEADER.size
#: a frame larger than this is a protocol violation (payload and result limits are far below it)
MAX_FRAME_BYTES: Final = 256 << 20

Message = tuple[int, dict[str, Any]]


class ProtocolError(Exception):
    """Raised on either side when a frame is malformed or too large."""


def _default(obj: Any) -> Any:
    """numpy values for msgpack: arrays as NDARRAY_EXT, scalars as Python numbers; anything else is refused."""
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError("can not serialize 'ndarray' of dtype object (only numeric and string arrays cross)")
            arr = np.ascontiguousarray(obj)
            header = msgpack.packb([arr.dtype.str, list(arr.shape)], use_bin_type=True)
            return msgpack.ExtType(NDARRAY_EXT, _NDARRAY_HEADER.pack(len(header)) + header + arr.tobytes())
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        return msgpack.ExtType(code, data)
    import numpy as np

    (n,) = _NDARRAY_HEADER.unpack_from(data)
    dtype, shape = msgpack.unpackb(data[_NDARRAY_HEADER.size : _NDARRAY_HEADER.size + n], raw=False)
    # a writable array of its own: the frame's buffer is reused for the next frame
    return np.frombuffer(data, dtype=np.dtype(dtype), offset=_NDARRAY_HEADER.size + n).reshape(shape).copy()


def encode(kind: int, fields: dict[str, Any]) -> bytes:
    """One frame, header included. Raises TypeError/ValueError from msgpack when a value cannot be encoded."""
    body = msgpack.packb([kind, fields], use_bin_type=True, default=_default)
    return HEADER.pack(len(body)) + body


def encode_body(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, default=_default)


def decode_body(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, iterate over complete messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        buf = self._buf
        if not buf and len(data) > HEADER_BYTES and HEADER.unpack_from(data)[0] + HEADER_BYTES == len(data):
            # the common case, one whole frame in one read: decoded where it is, with no copy into the buffer
            try:
                kind, fields = msgpack.unpackb(
                    memoryview(data)[HEADER_BYTES:], raw=False, strict_map_key=False, ext_hook=_ext_hook
                )
            except Exception as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from exc
            yield kind, fields
            return
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_BYTES:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            end = pos + HEADER_BYTES + length
            if end > n:
                break
            try:
                kind, fields = msgpack.unpackb(
                    memoryview(buf)[pos + HEADER_BYTES : end], raw=False, strict_map_key=False, ext_hook=_ext_hook
                )
            except Exception as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from exc
            pos = end
            yield kind, fields
        if pos:
            del buf[:pos]


class BlockingChannel:
    """The sandbox's end of the channel: blocking reads and writes on a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = FrameDecoder()
        self._pending: list[Message] = []

    def send(self, kind: int, fields: dict[str, Any]) -> None:
        self.sock.sendall(encode(kind, fields))

    def send_frame(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def recv(self, *, on_idle: Callable[[], None] | None = None, idle_s: float = 0.0) -> Message | None:
        """The next message, or None at end of stream.

        Before blocking, it polls for ``spin_s``: a caller invoking in a loop sends the next RUN within tens of
        microseconds of a RESULT, and catching it awake saves the wake-up of a sleeping process on an idle core.
        With ``on_idle``, when nothing arrives during the spin nor ``idle_s`` after it, it calls ``on_idle`` once
        before blocking: housekeeping that only a process with nothing to do should pay for.
        """
        while not self._pending:
            data = self._spin() if self.spin_s > 0 else None
            if data is None and on_idle is not None:
                if not select.select([self.sock], [], [], idle_s)[0]:
                    on_idle()
                on_idle = None
            if data is None:
                data = self.sock.recv(1 << 16)
            if not data:
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    spin_s: float = 0.0

    def _spin(self) -> bytes | None:
        deadline = time.perf_counter() + self.spin_s
        while True:
            try:
                return self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return None
                # give the core to anything runnable (the host, on a busy machine): polling only uses idle time
                os.sched_yield()
