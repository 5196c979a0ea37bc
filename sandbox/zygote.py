"""The zygote: a fork server that imported the heavy libraries once, so a new sandbox is a fork, not a start.

Run by the host (``minifaas._core.zygote``) as::

    python -m minifaas_sandbox.zygote --fd N \
        --preload numpy,cv2,ai_edge_litert.interpreter,minifaas_sandbox.models,minifaas_sandbox.runtime

Data flow::

    host ZygoteLauncher                    zygote (one thread)                      forked sandbox
    +-----------------+  control socket  +-----------------------+  os.fork()   +-------------------------+
    | reader task    <|---- HELLO -------| import preload set     |------------->| spare: setsid, signals, |
    | launch()        |- LOAD_MODELS --->| read model bytes,      |  (ahead of   | close the zygote's fds, |
    |                 |                  | pre-build interpreters;|   demand)    | reseed, rehearse a cold |
    |                 |                  | discard the spare      |              | start, wait for request |
    |                 |- FORK + 3 fds -->| pass env + fds to the  |--- socket -->| fds 0/1/2, env,         |
    |                 |<-- FORKED pid ---| spare (or fork now);   |              | runtime.serve(channel)  |
    |                 |                  | in a lull, fork the    |              +-------------------------+
    |                 |                  | next spare             |
    |                <|---- EXITED ------| SIGCHLD -> waitpid     |
    +-----------------+                  +-----------------------+

Fork ahead: fork() of a process holding numpy, OpenCV and LiteRT takes 2-3 ms here, and the child runs only
after it. So the zygote keeps children forked ahead (spares), each waiting on a socket of its own; a FORK request
passes the oldest ready one the env and fds and is answered at once. How many: one by default, as many as the
host's SPARES message asks (it sizes them by the bursts of cold starts it has seen). A spare takes, before its
request, every step of becoming a sandbox that does not need it: reseeding, the runtime's set-up, and a rehearsal
(a no-op INIT and RUN), which pays the copy-on-write faults a fresh fork takes the first time it touches each shared
page; it takes them at nice +SPARE_NICE in the idle scheduling class (where the zygote may restore the priority),
so they use only the CPU that running sandboxes leave, and returns to the zygote's priority before it says it is
ready (its request wakes it at full priority, with no system call of its own on the launch path).

Order: requests first (a FORK that arrived is served before the zygote forks a spare, which it would wait for).
The zygote refills SPARE_REFORK_DELAY_S after the last launch, not at once: on two cores a fork competed with the
launched sandbox's first steps, and after a burst its spares served, eight forks at once took a core from the
burst's INITs; launches coming faster than that put a refill off at most MAX_REFILL_DEFER_S. Only when a launch
found no spare ready a moment ago (the burst outgrew the spares) does it fork the next ones at once, one per turn
of its loop, at full priority. One forked before a LOAD_MODELS is discarded, since it would not hold those models.

Control messages use :mod:`minifaas_sandbox.protocol` framing with their own type codes (below). A FORK
frame is sent together with three fds (SCM_RIGHTS): the child's channel socket, and the write ends of its
stdout and stderr pipes. On a stream socket the fds arrive with the first bytes of their frame, so the zygote
queues received fds and each complete FORK frame takes the next three.

No thread may exist in the zygote before it forks (a lock held by another thread would stay locked forever in
the child): the zygote is a single thread woken by a selector on the control socket and a SIGCHLD wake-up fd,
numeric libraries start with one thread (the host passes OMP/OPENBLAS_NUM_THREADS=1) and OpenCV's pool is
disabled. Model bytes read on LOAD_MODELS go to ``minifaas_sandbox._preloaded_models``, where the model cache
of a forked child finds them: the pages stay shared copy-on-write between the zygote and all its children.
When LiteRT is preloaded, each TFLite model also gets its interpreter built, allocated and run once here
(``models.prebuild``, one thread, no thread pool): a child's first ``models.load`` of the model's url adopts
it, and the weights XNNPACK repacked stay shared instead of being repacked into each child's private memory.
MODELS_LOADED reports the zygote's thread count after building, so the host can see it is still one.
When the host closes its end, the zygote exits; its children do not die with it but with the host
(``minifaas_sandbox.lifeline``), so a zygote retired or killed leaves its warm sandboxes serving.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import hashlib
import importlib
import math
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

import minifaas_sandbox
from minifaas_sandbox import lifeline
from minifaas_sandbox import protocol as p

# Control message types; distinct from the sandbox protocol's codes so a mixed-up socket fails loudly.
HELLO: Final = 101  # Z>H pid, preloaded (list), failed {module: error}, threads (OS threads before forking)
#: H>Z seq, paths (list), urls {path: [url a sandbox will load it by]} (optional), prebuild (default true)
LOAD_MODELS: Final = 102
#: Z>H seq, loaded {path: bytes}, errors {path: error}, prebuilt {path: ms}, prebuild_errors {path: error},
#: threads (OS threads of the zygote after loading)
MODELS_LOADED: Final = 103
FORK: Final = 104  # H>Z seq, env {name: value}; carries fds [channel, stdout w, stderr w]
#: Z>H seq, pid, ahead (true when a spare took it), cgroup (the spare's, or None); or seq, error
FORKED: Final = 105
EXITED: Final = 106  # Z>H pid, status (exit code, or minus the signal number)
#: H>Z n: keep this many spares forked ahead (the host sizes it by demand; 0 = fork on request only)
SPARES: Final = 107
#: Z>H pids (every spare, ready or not), ready (the pids of those waiting for a request): after each change
SPARES_STATE: Final = 108

NAMES: Final[dict[int, str]] = {
    HELLO: "HELLO",
    LOAD_MODELS: "LOAD_MODELS",
    MODELS_LOADED: "MODELS_LOADED",
    FORK: "FORK",
    FORKED: "FORKED",
    EXITED: "EXITED",
    SPARES: "SPARES",
    SPARES_STATE: "SPARES_STATE",
}

#: the runtime imports the model cache in every sandbox: importing it here spares each child that import
DEFAULT_PRELOAD: Final = (
    "numpy",
    "cv2",
    "ai_edge_litert.interpreter",
    "minifaas_sandbox.models",
    "minifaas_sandbox.runtime",
    # isolation="sandbox": its seccomp program is built once, here, and shared by every child
    "minifaas_sandbox.isolation",
    # functions deployed by value: unpickling them imports cloudpickle (19 ms), once here instead of per cold start
    "cloudpickle",
    "minifaas_sandbox.callables",
)
FDS_PER_FORK: Final = 3
#: after a launch, how long the zygote waits before forking the next spare: the launched sandbox's cold start
#: (INIT, first RUN: 2-4 ms here) runs meanwhile without a fork of the zygote competing for the CPU
SPARE_REFORK_DELAY_S: Final = 0.02
#: launches coming faster than that delay put a refill off at most this long after the first spare was taken
MAX_REFILL_DEFER_S: Final = 0.1
#: a launch forked on request (no spare ready) this recently means the burst outgrew the spares: refill at once
OUTGROWN_FOR_S: Final = 0.02
#: a spare takes its steps (cgroup, set-up, rehearsal) this much nicer than the zygote, so they use the CPU that
#: running sandboxes leave: on two cores, eight spares' 25-75 ms of rehearsals right after a burst took that much
#: from the burst's own sandboxes and a warm function running beside them. No launch waits for it (a launch takes
#: only a ready spare, else forks at once). Back to the zygote's own priority once ready (asleep); 0, or a host
#: without the right to raise a priority again (CAP_SYS_NICE or RLIMIT_NICE), keeps spares at the zygote's.
SPARE_NICE: Final = 10
#: lines LiteRT writes on fd 2 while the zygote builds interpreters that the host's terminal does not need
PREBUILD_QUIET_PREFIX: Final = b"INFO: "
RECV_BYTES: Final = 1 << 16
#: fds accepted per recvmsg (Linux's SCM_MAX_FD); several FORK frames may arrive in one read
MAX_FDS_PER_RECV: Final = 253
#: a forked child that fails before the runtime takes over exits with this (EX_SOFTWARE)
CHILD_FAILURE_EXIT: Final = 70
NUMPY_SEED_WORDS: Final = 4
#: a kind of spare (isolation="sandbox" or not) not asked for this long gets no spare of its own any more
SPARE_KIND_WINDOW_S: Final = 60.0
#: set to "sandbox" in a FORK's env by the host for isolation="sandbox": the child is forked as pid 1 of a PID
#: namespace of its own (minifaas._environ.ISOLATION_ENV)
ISOLATION_ENV: Final = "MINIFAAS_ISOLATION"
#: capability(7) number
CAP_SYS_NICE: Final = 23


#: OpenCV's default thread count, saved when the zygote turned its pool off (None: cv2 not preloaded)
_cv2_threads: int | None = None


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _preload(modules: list[str]) -> tuple[list[str], dict[str, str]]:
    loaded: list[str] = []
    failed: dict[str, str] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # a missing optional library is reported; the zygote still serves
            failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        if name == "cv2":
            # 0 = no thread pool at all: a pool created here would be dead (and its locks held) in every child;
            # each child gets OpenCV's own default back (its pool starts lazily, in the child)
            global _cv2_threads
            _cv2_threads = mod.getNumThreads()
            mod.setNumThreads(0)
        elif name == "minifaas_sandbox.isolation":
            # the seccomp program and the interpreter's folders, once for every child (a spare doing it took
            # ~1 ms longer to get ready)
            with contextlib.suppress(Exception):
                mod.prepare()
        elif name == "numpy":
            # numpy 2 imports numpy.random lazily, which would cost every child ~30 ms of its own
            importlib.import_module("numpy.random")
        loaded.append(name)
    return loaded, failed


def _load_models(paths: list[str], urls: dict[str, list[str]], *, prebuild: bool = True) -> dict[str, Any]:
    store = minifaas_sandbox._preloaded_models
    loaded: dict[str, int] = {}
    errors: dict[str, str] = {}
    prebuilt: dict[str, float] = {}
    prebuild_errors: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            errors[path] = f"{type(exc).__name__}: {exc}"
            continue
        # the model cache looks bytes up by the local path its fetcher returns: index every spelling of it
        spellings = {path, os.path.abspath(path), os.path.realpath(path)}
        for key in spellings:
            known = store.get(key)
            # the same content again (another function, a re-deploy): keep the copy children already share
            store[key] = known if known == data else data
        data = store[path]
        loaded[path] = len(data)
        if not prebuild:
            continue
        t0 = time.perf_counter()
        try:
            if _prebuild(data, spellings | set(urls.get(path, ()))):
                prebuilt[path] = round((time.perf_counter() - t0) * 1000, 3)
        except Exception as exc:  # the bytes still serve: a sandbox builds its own interpreter from them
            prebuild_errors[path] = f"{type(exc).__name__}: {exc}"
    return {
        "loaded": loaded,
        "errors": errors,
        "prebuilt": prebuilt,
        "prebuild_errors": prebuild_errors,
        "threads": _os_threads(),
    }


def _prebuild(data: bytes, names: set[str]) -> bool:
    models = sys.modules.get("minifaas_sandbox.models")
    if models is None:
        return False
    sha256 = hashlib.sha256(data).hexdigest()
    with _without_info_lines():
        return bool(models.prebuild(data, names, sha256=sha256))


@contextlib.contextmanager
def _without_info_lines() -> Iterator[None]:
    """Drop the ``INFO:`` lines LiteRT writes on fd 2 while building interpreters; pass anything else on.

    The zygote's fd 2 is the host's terminal: LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for
    CPU." (once per process) would land in the middle of whatever the host prints. Sandboxes need no such
    care: their fd 2 is captured into the activation's logs.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    captured = os.memfd_create("minifaas-prebuild-stderr")
    os.dup2(captured, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.lseek(captured, 0, os.SEEK_SET)
        with os.fdopen(captured, "rb") as f:
            kept = [line for line in f if not line.startswith(PREBUILD_QUIET_PREFIX)]
        if kept:
            os.write(2, b"".join(kept))


class Zygote:
    def __init__(
        self,
        control: socket.socket,
        preloaded: list[str],
        *,
        fork_ahead: bool = True,
        cgroup_parent: str | None = None,
        pids_max: int = 0,
        refork_delay_s: float = SPARE_REFORK_DELAY_S,
        spare_nice: int = SPARE_NICE,
    ) -> None:
        self.control = control
        self.preloaded = preloaded
        self.decoder = p.FrameDecoder()
        self.fds: collections.deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        # handlers as the interpreter and the preloaded libraries left them, restored in each child
        self.saved_handlers: dict[signal.Signals, Callable[..., Any] | int] = {}
        #: fork ahead: keep children forked and waiting, so a FORK request does not wait for fork() itself
        self.fork_ahead = fork_ahead
        #: how many (the host's SPARES message sets it: demand-sized), and the spares, oldest first
        self.want_spares = 1 if fork_ahead else 0
        self.spares: list[_Spare] = []
        #: when each kind of spare was last asked for (True: isolation="sandbox", forked as pid 1 of a PID namespace
        #: of its own); a kind asked for within SPARE_KIND_WINDOW_S keeps a spare of its own
        self.kind_asked: dict[bool, float] = {}
        #: spares that were discarded (stale after LOAD_MODELS) or died waiting, and their cgroups: their exits
        #: are nobody's business
        self.discarded: dict[int, str | None] = {}
        self.forks_ahead = 0
        #: monotonic time before which no spare is forked (set when a launch has just used the zygote)
        self.refork_at = 0.0
        #: since when there are fewer spares than wanted (refills wait for a lull, but not longer than a bound)
        self.deficit_since = math.inf
        #: when a launch last found no spare ready and was forked on request
        self.forked_on_request_at = -math.inf
        #: the spares changed since the host was last told (SPARES_STATE)
        self.spares_report_due = False
        self.refork_delay_s = refork_delay_s
        #: where a spare makes its own pids cgroup (the host's sandbox cgroups), None for none
        self.cgroup_parent = cgroup_parent
        self.pids_max = pids_max
        #: the zygote's priority, which every sandbox gets; spares that refill wait nicer while it can be restored
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.spare_nice = spare_nice if spare_nice > 0 and _may_renice(self.base_nice) else 0

    def install_sigchld(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        for sig in signal.valid_signals():
            if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError):
                    handler = signal.getsignal(sig)
                    # None: installed from C, which a child keeps as it is anyway
                    if handler is not None:
                        self.saved_handlers[sig] = handler
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # the wake-up fd is only written when a Python-level handler is installed
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "sigchld")

    def send(self, kind: int, fields: dict[str, Any]) -> None:
        self.control.sendall(p.encode(kind, fields))

    def serve(self) -> int:
        while True:
            self.flush_spares_report()
            timeout = None
            spare_due = outgrown = False
            if self.fork_ahead and len(self.spares) < self.spare_target():
                # between requests, off the path of any launch (the host is not waiting on this fork), and not
                # while the sandbox just launched takes its first steps: on two cores, forking this process (2-3 ms
                # of CPU) beside them delayed that sandbox's first result by as much; nor beside a burst's INITs
                # when its spares served it (eight forks at once took a core from them). But when a launch found
                # no spare ready a moment ago, the burst outgrew the spares and its next launches would wait for
                # forks anyway: fork now. And launches coming faster than the delay must not put refills off for
                # ever.
                now = time.monotonic()
                outgrown = self.want_spares > 1 and now - self.forked_on_request_at < OUTGROWN_FOR_S
                due = min(self.refork_at, self.deficit_since + max(MAX_REFILL_DEFER_S, self.refork_delay_s))
                timeout = 0.0 if outgrown else max(0.0, due - now)
                spare_due = timeout <= 0
            events = self.selector.select(timeout)
            if not events and spare_due:
                # requests first: one that came meanwhile is served before this fork, which it would wait for;
                # a spare forked in a lull takes its steps nicer, one a growing burst may take at full speed
                self.make_spare(nice=0 if outgrown else self.spare_nice)
                self.deficit_since = now if len(self.spares) < self.spare_target() else math.inf
                continue
            for key, _ in events:
                if isinstance(key.data, _Spare):
                    self.spare_status(key.data)
                elif key.data == "sigchld":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 512):
                            pass
                    self.reap()
                elif not self.read_control():
                    return 0

    def read_control(self) -> bool:
        try:
            data, fds, flags, _addr = socket.recv_fds(self.control, RECV_BYTES, MAX_FDS_PER_RECV)
        except (ConnectionResetError, BrokenPipeError):
            return False
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            # fds were dropped: every later FORK would get another request's pipes, so stop loudly
            raise p.ProtocolError("control message truncated: fds were lost")
        if not data:
            return False
        for kind, fields in self.decoder.feed(data):
            if kind == FORK:
                self.fork(fields)
            elif kind == SPARES:
                self.want_spares = max(0, int(fields.get("n") or 0)) if self.fork_ahead else 0
                while len(self.spares) > self.spare_target():
                    # the newest first: the oldest are the likeliest to be ready
                    self.discard_spare(self.spares[-1])
                self.report_spares()
            elif kind == LOAD_MODELS:
                urls = {str(k): [str(u) for u in v] for k, v in (fields.get("urls") or {}).items()}
                paths = [str(x) for x in fields.get("paths", [])]
                # a spare forked before these models were loaded would not have them
                for spare in list(self.spares):
                    self.discard_spare(spare)
                self.send_spares_state()  # now: loading the models may take seconds
                reply = _load_models(paths, urls, prebuild=fields.get("prebuild", True) is not False)
                self.send(MODELS_LOADED, {"seq": fields.get("seq"), **reply})
                gc.freeze()
            else:
                raise p.ProtocolError(f"unexpected control message {kind}")
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            died = next((s for s in self.spares if s.pid == pid), None)
            if died is not None:
                self.discard_spare(died)  # died waiting: the next round forks another
                self.report_spares()
            if pid in self.discarded:
                cgroup = self.discarded.pop(pid)
                if cgroup is not None:
                    with contextlib.suppress(OSError):
                        os.rmdir(cgroup)
                continue
            self.send(EXITED, {"pid": pid, "status": os.waitstatus_to_exitcode(status)})

    def fork(self, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        self.refork_at = now + self.refork_delay_s
        seq = fields.get("seq")
        if len(self.fds) < FDS_PER_FORK:
            raise p.ProtocolError(f"FORK {seq} arrived with {len(self.fds)} fds, expected {FDS_PER_FORK}")
        channel_fd, out_w, err_w = (self.fds.popleft() for _ in range(FDS_PER_FORK))
        env = {str(k): str(v) for k, v in (fields.get("env") or {}).items()}
        sandboxed = env.get(ISOLATION_ENV) == "sandbox"
        self.kind_asked[sandboxed] = now
        stale = [s for s in self.spares if s.sandboxed not in self.active_kinds()]
        for s in stale:
            self.discard_spare(s)  # a kind nobody asked for lately: its place goes to the kind asked for
        if stale:
            self.report_spares()
        spare = next((s for s in self.spares if s.ready and s.sandboxed == sandboxed), None)
        if spare is not None:
            self.spares.remove(spare)
            self._unwatch(spare)
            if self.deficit_since == math.inf:
                self.deficit_since = now  # a spare short from now on
            try:
                socket.send_fds(spare.sock, [p.encode(FORK, {"env": env})], [channel_fd, out_w, err_w])
            except OSError:
                self.discarded[spare.pid] = spare.cgroup  # it died: fork as usual below
            else:
                for fd in (channel_fd, out_w, err_w):
                    os.close(fd)
                self.forks_ahead += 1
                self.send(FORKED, {"seq": seq, "pid": spare.pid, "ahead": True, "cgroup": spare.cgroup})
                self.report_spares()
                return
            finally:
                spare.sock.close()
        self.forked_on_request_at = now
        _flush_std()
        try:
            pid = _fork(sandboxed=sandboxed)
        except OSError as exc:
            self.send(FORKED, {"seq": seq, "error": f"fork failed: {exc}"})
            pid = -1
        if pid == 0:
            _child_exit(lambda: self.become_sandbox(channel_fd, out_w, err_w, env))
        for fd in (channel_fd, out_w, err_w):
            os.close(fd)
        if pid > 0:
            self.send(FORKED, {"seq": seq, "pid": pid})

    def make_spare(self, nice: int = 0) -> None:
        """Fork a child that waits for a FORK request's fds and env, then becomes that sandbox (``nice``: its
        steps before that run this much nicer)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _flush_std()
        sandboxed = self.next_spare_kind()
        try:
            pid = _fork(sandboxed=sandboxed)
        except OSError:
            mine.close()
            theirs.close()
            self.fork_ahead = False  # out of processes or memory: fork on request only
            return
        if pid == 0:
            mine.close()
            _child_exit(lambda: self.spare_main(theirs, nice, sandboxed=sandboxed))
        theirs.close()
        spare = _Spare(pid, mine, sandboxed=sandboxed)
        self.spares.append(spare)
        self.selector.register(mine, selectors.EVENT_READ, spare)

    def active_kinds(self) -> list[bool]:
        """The kinds of spare asked for lately (process spares before any request)."""
        now = time.monotonic()
        kinds = [k for k, t in sorted(self.kind_asked.items()) if now - t < SPARE_KIND_WINDOW_S]
        return kinds or [False]

    def spare_target(self) -> int:
        """How many spares: the host's number, but at least one of each kind asked for lately."""
        return max(self.want_spares, len(self.active_kinds())) if self.want_spares > 0 else 0

    def next_spare_kind(self) -> bool:
        """The kind asked for lately with the fewest spares (the latest asked for among equals)."""
        kinds = self.active_kinds()
        count = {k: sum(1 for s in self.spares if s.sandboxed == k) for k in kinds}
        return min(kinds, key=lambda k: (count[k], -self.kind_asked.get(k, 0.0)))

    def spare_main(self, sock: socket.socket, nice: int = 0, *, sandboxed: bool = False) -> int:
        """A spare's life: detach, join its cgroup, do every step of becoming a sandbox that does not need the
        request (``nice`` this much nicer), go back to the zygote's priority, say it is ready, wait for its request,
        become that sandbox."""
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, self.base_nice + nice))
            # and SCHED_IDLE: eight spares at nice +10 still weigh almost as much as one busy process at nice 0
            # (8 x 110 against 1024), so right after a burst they took a third of the core of a warm function
            # running beside it; idle-class tasks run only on what is left
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        self.detach()
        # the move into a cgroup takes milliseconds on cgroup v1 (an RCU grace period): done now, while nobody
        # waits, it is off the path of the launch that will take this spare
        cgroup = _join_cgroup(self.cgroup_parent, self.pids_max) if self.cgroup_parent else None
        # so is the rest (measured 1.5-2.5 ms on the launch path: reseeding, the runtime's set-up, and the
        # copy-on-write faults each of them takes in a fresh child)
        _close_fds_above_stdio_but(sock.fileno())
        _ready_child(rehearse=True)
        if sandboxed:
            # isolation="sandbox": the part of its root every function shares, off the request's path
            isolation = sys.modules.get("minifaas_sandbox.isolation")
            if isolation is not None:
                isolation.prepare_root()
        if nice:
            # back to the zygote's priority now, while nobody waits: a spare asleep on its socket costs no CPU at
            # any priority, and one woken by its request at nice +10 waited behind busier processes for up to a
            # millisecond, then paid this setpriority on the launch path
            with contextlib.suppress(OSError, AttributeError):  # allowed (_may_renice): else it still serves
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, self.base_nice)
        try:
            sock.sendall(b"A" + cgroup.encode() if cgroup else b"N")
        except (BrokenPipeError, ConnectionResetError):
            return 0  # discarded (or the zygote ended) while it got ready
        request = _await_request(sock)
        if request is None:
            return 0  # the zygote ended or discarded this spare
        (channel_fd, out_w, err_w), env = request
        _take_fds(channel_fd, out_w, err_w, env)
        return self._serve(channel_fd)

    def spare_status(self, spare: _Spare) -> None:
        """The spare says it is ready to serve, and in which cgroup it is (A<path>), or that it has none (N)."""
        try:
            data = spare.sock.recv(RECV_BYTES)
        except OSError:
            data = b""
        if data[:1] == b"A":
            spare.cgroup = data[1:].decode()
        if data:
            spare.ready = True
            self.report_spares()
        # at the end of the stream it died: reap() hears of it
        self._unwatch(spare)

    def _unwatch(self, spare: _Spare) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(spare.sock)

    def discard_spare(self, spare: _Spare) -> None:
        with contextlib.suppress(ValueError):
            self.spares.remove(spare)
        self.discarded[spare.pid] = spare.cgroup
        self._unwatch(spare)
        spare.sock.close()  # it reads the end of the stream and exits

    def report_spares(self) -> None:
        """Tell the host which spares exist (it measures their memory and counts it in its budget): once the
        zygote has nothing else to do (:meth:`flush_spares_report`), not after each change. A burst's FORKs hand
        over several spares in a row, and a message per hand-over woke the host's event loop once more per cold
        start, beside the FORKED it waits for."""
        self.spares_report_due = True

    def flush_spares_report(self) -> None:
        """Send the SPARES_STATE :meth:`report_spares` asked for, unless more requests wait (then after them)."""
        if self.spares_report_due and not self.selector.select(0):
            self.send_spares_state()

    def send_spares_state(self) -> None:
        self.spares_report_due = False
        self.send(
            SPARES_STATE, {"pids": [s.pid for s in self.spares], "ready": [s.pid for s in self.spares if s.ready]}
        )

    def detach(self) -> None:
        """The first steps of a child: its own session, default signal handling, none of the zygote's fds."""
        # own session and process group, so the host can kill the sandbox and whatever it starts with killpg
        os.setsid()
        if lifeline.armed_fd() >= 0:
            # it dies with the host, not with the zygote (which may be retired or killed while it serves on)
            lifeline.arm(lifeline.armed_fd())
        signal.set_wakeup_fd(-1)
        for sig, handler in self.saved_handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self.selector.close()
        # the host must see the zygote's end of the control socket close when the zygote dies, not when its
        # last child does
        self.control.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        # the zygote's ends of the other spares' sockets: a spare must see the end of its stream when the zygote
        # discards it, which it would not while a sibling held the zygote's end open
        for spare in self.spares:
            spare.sock.close()

    def become_sandbox(self, channel_fd: int, out_w: int, err_w: int, env: dict[str, str]) -> int:
        """A child forked for a request (no spare was ready): all the steps, in a row."""
        self.detach()
        _take_fds(channel_fd, out_w, err_w, env)
        _ready_child()
        return self._serve(channel_fd)

    def _serve(self, channel_fd: int) -> int:
        from minifaas_sandbox import runtime

        return runtime.serve(channel_fd, preloaded=tuple(self.preloaded), prepared=True)


def _ready_child(*, rehearse: bool = False) -> None:
    """The steps of becoming a sandbox that need no request (a spare also rehearses a cold start's)."""
    sys.argv = sys.argv[:1]
    _reseed()
    if _cv2_threads is not None:
        # a sandbox decodes and resizes as fast as any process on this machine would
        sys.modules["cv2"].setNumThreads(_cv2_threads)
    from minifaas_sandbox import runtime

    runtime.prepare(rehearse=rehearse)


def _take_fds(channel_fd: int, out_w: int, err_w: int, env: dict[str, str]) -> None:
    """A request's fds become the sandbox's stdio (stdin: /dev/null), and its env the process's."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    # everything else inherited (other requests' fds, library handles) is not this sandbox's business
    _close_fds_above_stdio_but(channel_fd)
    os.environ.clear()
    os.environ.update(env)


def _close_fds_above_stdio_but(keep: int) -> None:
    low = 3
    # the host's lifeline stays: closing it would disarm it
    for fd in sorted({keep, lifeline.armed_fd()} - {-1}):
        os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _flush_std() -> None:
    # a fork copies unflushed buffers: the zygote's pending output would be written twice
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _child_exit(body: Callable[[], int]) -> NoReturn:
    """Run a forked child's ``body`` and exit with its code: whatever happens, a child never returns to the
    zygote's loop."""
    code = CHILD_FAILURE_EXIT
    try:
        code = body()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        _flush_std()
        os._exit(code)


class _Spare:
    """A child forked ahead of demand, and the zygote's end of the socket it waits on."""

    __slots__ = ("cgroup", "pid", "ready", "sandboxed", "sock")

    def __init__(self, pid: int, sock: socket.socket, *, sandboxed: bool = False) -> None:
        self.pid = pid
        self.sock = sock
        #: forked as pid 1 of a PID namespace of its own, for an isolation="sandbox" request
        self.sandboxed = sandboxed
        #: it has said it waits for a request (after joining its cgroup)
        self.ready = False
        self.cgroup: str | None = None


def _may_renice(base: int) -> bool:
    """Whether a process of ours may go back to priority ``base`` after being nicer: with CAP_SYS_NICE, or an
    RLIMIT_NICE that allows it (setpriority(2))."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - base:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        return bool(int(caps.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, StopIteration, ValueError, IndexError):
        return False


def _join_cgroup(parent: str, pids_max: int) -> str | None:
    """Move this process into ``<parent>/sb-<pid>`` with its process cap; None when that fails (the host then
    attaches it itself)."""
    # the pid the host knows (a sandboxed spare is pid 1 of its own namespace; the zygote's /proc is the host's)
    path = os.path.join(parent, f"sb-{os.readlink('/proc/self')}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(pids_max))
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")  # the writer itself, whatever its pid in its own namespace
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return None
    return path


def _await_request(sock: socket.socket) -> tuple[tuple[int, int, int], dict[str, str]] | None:
    """In a spare: wait for its FORK (one frame, with the channel and the two pipe ends); None at end of stream."""
    decoder = p.FrameDecoder()
    fds: list[int] = []
    while True:
        try:
            data, received, _flags, _addr = socket.recv_fds(sock, RECV_BYTES, FDS_PER_FORK)
        except ConnectionResetError:
            data, received = b"", []  # the zygote closed its end before reading our status: discarded
        fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        for _kind, fields in decoder.feed(data):
            sock.close()
            if len(fds) != FDS_PER_FORK:
                raise p.ProtocolError(f"a spare got {len(fds)} fds, expected {FDS_PER_FORK}")
            env = {str(k): str(v) for k, v in (fields.get("env") or {}).items()}
            return (fds[0], fds[1], fds[2]), env


def _fork(*, sandboxed: bool) -> int:
    """os.fork(); for isolation="sandbox", into a PID namespace of its own where the zygote may make one (as root):
    elsewhere the child makes it at INIT (minifaas_sandbox.isolation.enter), at the cost of a second fork."""
    if sandboxed:
        isolation = sys.modules.get("minifaas_sandbox.isolation")
        if isolation is not None:
            with contextlib.suppress(PermissionError):
                return int(isolation.fork_in_pid_namespace())
    return os.fork()


def _reseed() -> None:
    """Forked children would otherwise all draw the same "random" numbers as their zygote."""
    random.seed()
    # not imported yet: the child's own import will seed from the OS
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed([int.from_bytes(os.urandom(4), "little") for _ in range(NUMPY_SEED_WORDS)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minifaas_sandbox.zygote")
    parser.add_argument("--fd", type=int, required=True, help="fd of the control socket (AF_UNIX stream)")
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD), help="comma-separated modules to import")
    parser.add_argument("--no-fork-ahead", action="store_true", help="fork on request only, keep no spare child")
    parser.add_argument("--cgroup-parent", default=None, help="pids cgroup directory where a spare makes its own")
    parser.add_argument("--pids-max", type=int, default=0, help="pids.max of a spare's cgroup")
    parser.add_argument(
        "--refork-delay-ms",
        type=float,
        default=SPARE_REFORK_DELAY_S * 1000,
        help="after a launch, wait this long before forking the next spare",
    )
    parser.add_argument(
        "--spare-nice", type=int, default=SPARE_NICE, help="a refilling spare's steps run this much nicer (0: not)"
    )
    parser.add_argument(lifeline.ARG, type=int, default=None, help="fd of the host's lifeline (read end)")
    ns = parser.parse_args(argv)
    if ns.lifeline is not None:
        # the zygote (started in a session of its own) dies with the host even while stopped or busy pre-building
        lifeline.arm(ns.lifeline)
    control = socket.socket(fileno=ns.fd)
    control.setblocking(True)
    preloaded, failed = _preload([m for m in ns.preload.split(",") if m])
    zygote = Zygote(
        control,
        preloaded,
        fork_ahead=not ns.no_fork_ahead,
        refork_delay_s=max(0.0, ns.refork_delay_ms / 1000),
        spare_nice=max(0, ns.spare_nice),
        cgroup_parent=ns.cgroup_parent,
        pids_max=ns.pids_max,
    )
    zygote.install_sigchld()
    # objects that exist now are never collected: a collection in a child would dirty (copy) their pages
    gc.freeze()
    try:
        zygote.send(HELLO, {"pid": os.getpid(), "preloaded": preloaded, "failed": failed, "threads": _os_threads()})
        return zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
