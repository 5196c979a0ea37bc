"""Session records of composition runs, and where they are kept.

A :class:`Session` is one run of a composition: what OpenWhisk calls the conductor's primary activation plus
the trace the IBM Cloud Functions shell draws as a flow graph (which node ran, with which activation, what was
not taken). Its ``session_id`` is the primary activation's id; every step's activation has
``cause == session_id``.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import queue
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final, Literal

from .._errors import ActivationNotFound

__all__ = ("MAX_SESSIONS", "Session", "SessionStatus", "SessionStore", "Step", "StepKind", "StepStatus")

logger = logging.getLogger("minifaas.sessions")

#: sessions kept in memory by default; the oldest are dropped first
MAX_SESSIONS: Final[int] = 1000
#: trace bytes of the sessions kept in memory (each trace is at most the conductor's SESSION_TRACE_MAX_BYTES)
MAX_MEMORY_BYTES: Final[int] = 256 * 1024 * 1024
#: sessions kept in the SQLite file by default (pruned every PRUNE_EVERY_PUTS puts)
MAX_PERSISTED_SESSIONS: Final[int] = 100_000
PRUNE_EVERY_PUTS: Final[int] = 500
#: how many sessions ``list`` returns by default (OpenWhisk's activation list default)
DEFAULT_LIST_LIMIT: Final[int] = 30

StepKind = Literal["action", "function", "literal", "dynamic", "async"]
StepStatus = Literal["running", "success", "application_error", "developer_error", "internal_error"]
SessionStatus = Literal["running", "success", "application_error", "internal_error"]


@dataclasses.dataclass(slots=True)
class Step:
    """One leaf of a composition that ran. Times: ``start`` epoch ms, ``duration_ms`` milliseconds.

    ``name`` is the function name for action/dynamic/async steps and the ``module:qualname`` of a function
    step; ``activation_id`` is set for action, dynamic and async steps. ``input``/``output`` are JSON
    snapshots (large payloads are replaced by ``{"$truncated": true, "bytes": n}``).
    """

    path: str
    kind: StepKind
    name: str | None = None
    activation_id: str | None = None
    input: Any = None
    output: Any = None
    start: int = 0
    duration_ms: float = 0.0
    status: StepStatus = "running"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(slots=True)
class Session:
    """One run of a composition. ``start``/``end`` epoch ms, ``duration`` ms (like an Activation).

    ``steps`` are in the order they started; ``activation_ids`` are the steps' activation ids in that order
    (the primary activation's logs); ``not_taken`` lists paths of branches that never ran (the other arm of an
    ``if_``, the handler of a ``try_`` whose body succeeded, the body of a loop whose test was false at once).
    """

    session_id: str
    name: str = ""
    status: SessionStatus = "running"
    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    start: int = 0
    end: int | None = None
    duration: int | None = None
    steps: list[Step] = dataclasses.field(default_factory=list)
    not_taken: list[str] = dataclasses.field(default_factory=list)
    activation_ids: list[str] = dataclasses.field(default_factory=list)
    #: rough bytes of step inputs/outputs the trace holds (the conductor's count; not persisted)
    trace_bytes: int = dataclasses.field(default=0, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def success(self) -> bool:
        return self.status == "success"

    def _repr_html_(self) -> str:
        """Jupyter shows a session as its flow graph (the path taken, the branches not taken) and its outcome."""
        import html

        from .graph import session_graph, to_svg

        return (
            f"<div class='minifaas-session'><b>{html.escape(self.name or 'session')}</b> "
            f"<code>{html.escape(self.session_id)}</code> {html.escape(self.status)}"
            f"{f' · {self.duration} ms' if self.duration is not None else ''} · {len(self.steps)} steps<br>"
            f"{to_svg(session_graph(self))}</div>"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "name": self.name,
            "status": self.status,
            "result": self.result,
            "start": self.start,
            "end": self.end,
            "duration": self.duration,
            "steps": [s.to_dict() for s in self.steps],
            "not_taken": list(self.not_taken),
            "activation_ids": list(self.activation_ids),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        return cls(
            session_id=d["session_id"],
            name=d.get("name", ""),
            status=d.get("status", "running"),
            result=d.get("result") or {},
            start=d.get("start", 0),
            end=d.get("end"),
            duration=d.get("duration"),
            steps=[Step.from_dict(s) for s in d.get("steps") or ()],
            not_taken=list(d.get("not_taken") or ()),
            activation_ids=list(d.get("activation_ids") or ()),
        )


def _json_default(o: object) -> object:
    # results of sandboxes may hold bytes (msgpack); a session record only needs to say they were there
    if isinstance(o, bytes | bytearray | memoryview):
        return {"$bytes": len(o)}
    return repr(o)


def dumps(obj: object) -> str:
    """JSON text of a record, tolerant of bytes and other non-JSON leaves."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"))


class SessionStore:
    """Sessions by id: the newest ``max_sessions`` (and ``max_bytes`` of traces) in memory, and (up to a bound)
    all in SQLite at ``path``.

    Methods are synchronous and cheap (a dict look-up; ``put`` queues the SQLite write for the store's writer
    thread, which serializes the session there), so the engine may call them from its event loop. ``list`` and
    ``len`` wait for queued writes first; ``close`` drains them.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_sessions: int = MAX_SESSIONS,
        max_persisted: int = MAX_PERSISTED_SESSIONS,
        max_bytes: int = MAX_MEMORY_BYTES,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._mem: OrderedDict[str, Session] = OrderedDict()
        self._mem_sizes: dict[str, int] = {}
        self._mem_bytes = 0
        self._max_bytes = max_bytes
        self._max = max_sessions
        self._max_persisted = max_persisted
        self._puts = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._queue: queue.Queue[Session | None] | None = None
        self._pending: dict[str, Session] = {}
        self._writer: threading.Thread | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, name TEXT NOT NULL, "
                "start INTEGER NOT NULL, data TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS sessions_start ON sessions (start)")
            # owned by the store: close() drains it and joins it
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_loop, name="minifaas-sessions-writer", daemon=True)
            self._writer.start()

    def put(self, session: Session) -> None:
        """Record (or replace) a session."""
        with self._lock:
            self._mem_bytes += session.trace_bytes - self._mem_sizes.get(session.session_id, 0)
            self._mem_sizes[session.session_id] = session.trace_bytes
            self._mem[session.session_id] = session
            self._mem.move_to_end(session.session_id)
            self._evict()
            if self._queue is not None:
                self._pending[session.session_id] = session
                self._queue.put(session)

    def _evict(self) -> None:
        """Drop the oldest sessions from memory past ``max_sessions`` or ``max_bytes`` (running ones stay)."""
        for sid in list(self._mem):
            if len(self._mem) <= self._max and self._mem_bytes <= self._max_bytes:
                return
            if not self._mem[sid].done and len(self._mem) <= self._max:
                continue  # a live record readers follow; it ends (and is counted) soon
            del self._mem[sid]
            self._mem_bytes -= self._mem_sizes.pop(sid, 0)

    def _write_loop(self) -> None:
        """The writer thread: serialize and store what ``put`` queued, in order (a big trace costs the loop
        nothing)."""
        assert self._queue is not None
        while (session := self._queue.get()) is not None:
            try:
                data = dumps(session.to_dict())
            except (RuntimeError, ValueError, TypeError):  # changed while serialized: its next put writes it
                logger.warning("session %s could not be serialized this time", session.session_id, exc_info=True)
                data = None
            with self._lock:
                if data is not None and self._db is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                        (session.session_id, session.name, session.start, data),
                    )
                    self._puts += 1
                    if self._puts % PRUNE_EVERY_PUTS == 0:
                        self._db.execute(
                            "DELETE FROM sessions WHERE session_id NOT IN "
                            "(SELECT session_id FROM sessions ORDER BY start DESC LIMIT ?)",
                            (self._max_persisted,),
                        )
                if self._pending.get(session.session_id) is session:
                    del self._pending[session.session_id]
            self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued write is in the database."""
        if self._queue is not None and self._writer is not None and self._writer.is_alive():
            self._queue.join()

    def recover(self, message: str) -> int:
        """End the sessions a dead host left ``running`` as ``internal_error`` with ``message``; how many."""
        if self._db is None:
            return 0
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM sessions WHERE json_extract(data, '$.status') = 'running'"
            ).fetchall()
            for (data,) in rows:
                session = Session.from_dict(json.loads(data))
                session.status = "internal_error"
                session.result = {"error": message}
                if session.end is None:
                    last = max((s.start + round(s.duration_ms) for s in session.steps), default=session.start)
                    session.end = max(last, session.start)
                    session.duration = session.end - session.start
                for step in session.steps:
                    if step.status == "running":
                        step.status = "internal_error"
                self._db.execute(
                    "UPDATE sessions SET data = ? WHERE session_id = ?",
                    (dumps(session.to_dict()), session.session_id),
                )
        return len(rows)

    def get(self, session_id: str) -> Session:
        """The session with this id; raises ActivationNotFound (a session id is an activation id)."""
        with self._lock:
            s = self._mem.get(session_id) or self._pending.get(session_id)
            if s is not None:
                return s
            if self._db is not None:
                row = self._db.execute("SELECT data FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
                if row is not None:
                    return Session.from_dict(json.loads(row[0]))
        raise ActivationNotFound(f"no session {session_id!r}")

    def __contains__(self, session_id: object) -> bool:
        if not isinstance(session_id, str):
            return False
        try:
            self.get(session_id)
        except ActivationNotFound:
            return False
        return True

    def list(
        self, name: str | None = None, *, limit: int = DEFAULT_LIST_LIMIT, skip: int = 0
    ) -> builtins.list[Session]:
        """Newest first (by start time), optionally only those of composition ``name``."""
        self.flush()
        with self._lock:
            if self._db is not None:
                q = "SELECT data FROM sessions"
                args: list[Any] = []
                if name is not None:
                    q += " WHERE name = ?"
                    args.append(name)
                q += " ORDER BY start DESC LIMIT ? OFFSET ?"
                args += [limit, skip]
                return [Session.from_dict(json.loads(r[0])) for r in self._db.execute(q, args)]
            found = [s for s in self._mem.values() if name is None or s.name == name]
        found.sort(key=lambda s: s.start, reverse=True)
        return found[skip : skip + limit]

    def __len__(self) -> int:
        self.flush()
        with self._lock:
            if self._db is not None:
                return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
            return len(self._mem)

    def close(self) -> None:
        if self._queue is not None and self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
