"""Activation stores: bounded in memory by default, SQLite (WAL) under a ``state_dir``.

Records are written when an invocation is accepted (status ``pending``) and again when it ends, so a host that dies
leaves its in-flight records behind; the next engine on the same ``state_dir`` marks them failed instead of losing them.

The SQLite store never writes on the event loop: ``put`` encodes the record into flat columns and hands the row to
one writer thread (through a queue, without a lock), which commits every row that arrived while the previous
transaction committed in one transaction (group commit), then calls each row's ``on_durable`` back on the loop (one
wake-up per transaction). Until then ``get`` answers from memory. A record not ended that nobody waits for (the
accepted record of ``call``; ``submit`` waits for its accepted record) is written once it is ``LAZY_ROW_DELAY_S`` old:
on the loop it waits there, not even encoded, so a call that ends sooner is encoded and written once, at its end, and
one still running after that is on record for the next engine to mark failed if the host dies. A
write that fails (the database locked by another connection, a full disk) is retried by the writer with a capped
back-off and reported (``stats()``, the ``minifaas`` logger); the records wait in memory meanwhile, so nothing is
lost and nothing waits for ever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack

from .activation import Activation, now_ms, summarize_value

__all__ = ("ActivationStore", "MemoryStore", "SQLiteStore", "open_store", "read_count", "read_one", "read_page")

MEMORY_STORE_MAX_RECORDS: Final = 10_000
#: statuses of records whose activation has not ended (every other status is final)
UNENDED_STATUSES: Final = ("pending", "running")
HOST_DIED_MESSAGE: Final = "the host process ended while this activation was in flight"
DB_FILE_NAME: Final = "activations.sqlite3"
#: the writer's own wait for a lock held by another connection, before the write counts as failed (callers
#: waiting for it are then released and the writer keeps retrying)
WRITE_BUSY_TIMEOUT_S: Final = 1.0
#: back-off between retries of a failed write: doubles from the first to the last
RETRY_FIRST_S: Final = 0.05
RETRY_MAX_S: Final = 2.0
#: at close, how long the writer may keep retrying rows it could not write yet before they are given up (reported)
CLOSE_FLUSH_TIMEOUT_S: Final = 5.0
#: a read on the event loop waits at most this for a lock (WAL readers are not blocked by writers in practice)
READ_BUSY_TIMEOUT_S: Final = 0.2
#: a record not ended that nobody waits for (the accepted record of ``call``) is written once it is this old: most
#: warm calls end sooner, and then only their final record is written, in one transaction instead of two
LAZY_ROW_DELAY_S: Final = 0.02
#: the writer asks the checkpointer thread to copy the log (WAL) into the database after this many commits. SQLite
#: would do it inside a commit every 1,000 pages (``wal_autocheckpoint``), with two fsyncs that make that commit, and
#: every caller waiting on it, take milliseconds; beside the writer, a passive checkpoint holds up no commit
CHECKPOINT_EVERY_COMMITS: Final = 200
#: a writer with nothing to write for this long asks for a checkpoint of what it wrote since the last one (a quiet
#: moment: under a steady load a passive checkpoint may never catch up with the writer, and only a checkpoint that
#: did lets the log start over)
CHECKPOINT_QUIET_S: Final = 0.1
#: a log grown past this all the same (a load that never pauses) is emptied by the writer between two transactions
WAL_MAX_BYTES: Final = 64 << 20
#: after a checkpoint let the log start over, SQLite cuts it down to this
WAL_KEEP_BYTES: Final = 16 << 20
#: after a commit of one record someone waited for, the writer polls this long for the next rows before it sleeps: a
#: caller invoking in a loop puts its next final record within tens of microseconds, and a sleeping thread takes
#: 40-300 us to wake on a VM
WRITER_SPIN_S: Final = 0.0003
#: the writer polls only while its transactions hold fewer rows than this on average (over about
#: ``SPIN_AVERAGE_COMMITS``): more, and records arrive faster than it can poll for them one by one
SPIN_MAX_ROWS_PER_COMMIT: Final = 1.5
SPIN_AVERAGE_COMMITS: Final = 8
#: on a busy host (transactions of at least ``GATHER_MIN_ROWS_PER_COMMIT`` rows on average) the writer waits this
#: long after a commit before it takes the next rows, so that a transaction holds tens of rows rather than two
COMMIT_GATHER_S: Final = 0.001
GATHER_MIN_ROWS_PER_COMMIT: Final = 1.5

_log = logging.getLogger("minifaas.store")
OnDurable = Callable[[], None]

_COLUMNS: Final = (
    "activation_id",
    "name",
    "namespace",
    "version",
    "ts",
    "status",
    "start",
    "end",
    "duration",
    "wait_time",
    "init_time",
    "accepted",
    "cause",
    "result",
    "logs",
    "annotations",
)
_SELECT: Final = "SELECT " + ", ".join(f'"{c}"' for c in _COLUMNS) + " FROM records"
#: rows written by one statement (16 values each, far under SQLite's limit of 32,766 variables)
UPSERT_MAX_ROWS: Final = 64
_UPSERT_SQL: dict[int, str] = {}


#: columns that may be NULL. The writer binds them as ``NULL_INT`` rather than None, and the blobs as bytearrays
#: rather than bytes: Python's sqlite3 binds int, float, str and bytearray directly, but None and bytes only after
#: a failed look-up for an adapter (measured here: 0.3 us for a None, 0.4-1 us for bytes, 0.04 us for an int), and
#: binding runs on the writer thread holding the GIL the event loop needs
_NULLABLE: Final = frozenset({"end", "duration", "wait_time", "init_time", "cause"})
#: stands for NULL in a bound row (no record time or duration comes near it)
NULL_INT: Final = -(1 << 62)
_VALUES: Final = "(" + ", ".join(f"NULLIF(?, {NULL_INT})" if c in _NULLABLE else "?" for c in _COLUMNS) + ")"


def _upsert_sql(n_rows: int) -> str:
    """One statement writing ``n_rows`` rows (the newest record of each activation wins)."""
    sql = _UPSERT_SQL.get(n_rows)
    if sql is None:
        values = _VALUES
        sql = _UPSERT_SQL[n_rows] = (
            "INSERT INTO records VALUES "
            + ", ".join([values] * n_rows)
            + " ON CONFLICT(activation_id) DO UPDATE SET "
            + ", ".join(f'"{c}" = excluded."{c}"' for c in _COLUMNS[1:])
        )
    return sql


#: shared by every row: the writer only reads them
_EMPTY_MAP: Final = bytearray(msgpack.packb({}))
_EMPTY_LIST: Final = bytearray(msgpack.packb([]))


class ActivationStore(Protocol):
    def put(self, act: Activation, on_durable: OnDurable | None = None) -> None:
        """Record ``act`` as it is now; ``on_durable`` is called (on the event loop) once it is stored."""
        ...

    def get(self, activation_id: str, *, namespace: str | None = None) -> Activation | None:
        """The record, or None; with ``namespace``, None too for a record of another namespace (not revealed)."""
        ...

    def list(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        limit: int = 30,
        skip: int = 0,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> list[Activation]:
        """Newest first; ``ended`` leaves out records of activations still pending or running."""
        ...

    def count(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> int:
        """How many records ``list`` would walk through without a limit."""
        ...

    def recover(self) -> int:
        """Mark records left pending/running by a dead host as failed; returns how many."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _matches(
    act: Activation,
    name: str | None,
    namespace: str | None,
    since: int | None,
    upto: int | None,
    ended: bool = False,
    cause: str | None = None,
) -> bool:
    if cause is not None and act.cause != cause:
        return False
    if ended and not act.done:
        return False
    if name is not None and act.name != name:
        return False
    if namespace is not None and act.namespace != namespace:
        return False
    ts = act.start or act.accepted
    if since is not None and ts < since:
        return False
    return not (upto is not None and ts > upto)


class MemoryStore:
    """The newest ``max_records`` activations, in insertion order."""

    def __init__(self, max_records: int = MEMORY_STORE_MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: OrderedDict[str, Activation] = OrderedDict()

    def put(self, act: Activation, on_durable: OnDurable | None = None) -> None:
        records = self._records
        if act.activation_id not in records:
            records[act.activation_id] = act
            while len(records) > self.max_records:
                records.popitem(last=False)
        else:
            records[act.activation_id] = act
        if on_durable is not None:
            on_durable()

    def get(self, activation_id: str, *, namespace: str | None = None) -> Activation | None:
        act = self._records.get(activation_id)
        if act is None or (namespace is not None and act.namespace != namespace):
            return None
        return act

    def list(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        limit: int = 30,
        skip: int = 0,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> list[Activation]:
        out: list[Activation] = []
        skipped = 0
        for act in reversed(self._records.values()):
            if not _matches(act, name, namespace, since, upto, ended, cause):
                continue
            if skipped < skip:
                skipped += 1
                continue
            out.append(act)
            if len(out) >= limit:
                break
        return out

    def count(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> int:
        return sum(1 for act in self._records.values() if _matches(act, name, namespace, since, upto, ended, cause))

    def recover(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"kind": "memory", "records": len(self._records)}

    def close(self) -> None:
        self._records.clear()


#: one packer per thread: ``msgpack.packb`` makes a new one per call, half the cost of packing an annotations dict
_packers = threading.local()


def _pack(obj: Any) -> bytearray:
    if not obj:
        return _EMPTY_MAP if isinstance(obj, dict) else _EMPTY_LIST
    packer: msgpack.Packer | None = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_fallback)
    return bytearray(packer.pack(obj))


def _row(act: Activation) -> tuple[Any, ...]:
    """The record as flat column values, in the form the writer binds fastest (see ``_NULLABLE``); a snapshot:
    the record object may change after this."""
    end, duration, wait_time, init_time, cause = act.end, act.duration, act.wait_time, act.init_time, act.cause
    return (
        act.activation_id,
        act.name,
        act.namespace,
        act.version,
        act.start or act.accepted,
        act.status,
        act.start,
        NULL_INT if end is None else end,
        NULL_INT if duration is None else duration,
        NULL_INT if wait_time is None else wait_time,
        NULL_INT if init_time is None else init_time,
        act.accepted,
        NULL_INT if cause is None else cause,
        _pack(act.result),
        _pack(act.logs),
        _pack(act.annotations),
    )


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _from_row(row: tuple[Any, ...]) -> Activation:
    aid, name, namespace, version, _, status, start, end, duration, wait, init, accepted, cause, res, logs, ann = row
    return Activation(
        activation_id=aid,
        name=name,
        version=version,
        namespace=namespace,
        start=start,
        end=end,
        duration=duration,
        wait_time=wait,
        init_time=init,
        status=status,
        result=_unpack(res),
        logs=_unpack(logs),
        annotations=_unpack(ann),
        cause=cause,
        accepted=accepted,
    )


def _connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    # a commit reaches the OS before the callers are told, so a killed host loses nothing; fsync per commit is
    # not needed for that and would cost milliseconds
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS records ("
        " activation_id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL, version TEXT NOT NULL,"
        ' ts INTEGER NOT NULL, status TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER, duration INTEGER,'
        " wait_time INTEGER, init_time INTEGER, accepted INTEGER NOT NULL, cause TEXT,"
        " result BLOB NOT NULL, logs BLOB NOT NULL, annotations BLOB NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS records_ts ON records (ts)")
    db.execute("CREATE INDEX IF NOT EXISTS records_name_ts ON records (name, ts)")
    old = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'activations'").fetchone()
    if old is not None:
        # a state dir written before records had columns: one blob per record
        db.execute("BEGIN IMMEDIATE")
        for (blob,) in db.execute("SELECT record FROM activations ORDER BY rowid").fetchall():
            db.execute(_upsert_sql(1), _row(Activation.from_dict(_unpack(blob))))
        db.execute("DROP TABLE activations")
        db.execute("COMMIT")


#: what ``put`` hands the writer: activation id, row, seq, callback, and when the row is due (0.0: at once)
_Handed = tuple[str, tuple[Any, ...], int, OnDurable | None, float]


class SQLiteStore:
    """Records and logs in ``<state_dir>/activations.sqlite3``; survives a restart (or a kill -9) of the host.

    Writes go through one writer thread (see the module's docstring); reads run on the caller's thread on a
    connection of their own and see the records not written yet from memory.
    """

    #: ``put``'s callback comes later, from the writer
    writes_later: Final = True

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._wdb = _connect(path, WRITE_BUSY_TIMEOUT_S)
        _create_schema(self._wdb)
        self._wdb.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread's job (CHECKPOINT_EVERY_COMMITS)
        self._wdb.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self._wal = Path(f"{path}-wal")
        self._checkpoint_due = threading.Event()
        #: held by whoever checkpoints (the checkpointer, or the writer emptying an oversized log)
        self._checkpointing = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._commits_since_checkpoint = 0
        self._db = _connect(path, READ_BUSY_TIMEOUT_S)
        #: activation id -> the record object, for records put and not committed yet
        self._unwritten: dict[str, Activation] = {}
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        self._cond = threading.Condition()
        #: rows handed over by ``put``, in order. Appending to a deque and popping from it are atomic: ``put`` takes
        #: no lock (a lock per record cost the event loop more than the rest of ``put``), and wakes the writer only
        #: when it sleeps (``_asleep``, set under ``_cond`` before the writer looks at the queue a last time)
        self._queue: collections.deque[_Handed] = collections.deque()
        #: the writer's own: activation id -> (when it is due, row, seq), rows that wait for their turn or their
        #: final record; changed under ``_cond`` (``stats`` counts them)
        self._lazy: dict[str, tuple[float, tuple[Any, ...], int]] = {}
        #: on an event loop, the loop's own: activation id -> when it is due, for records not ended that wait for
        #: their final record or their turn (LAZY_ROW_DELAY_S), not encoded until then (most never are: their final
        #: record comes first); None off a loop, where the writer keeps them (``_lazy``)
        self._waiting: dict[str, float] | None = None
        self._waiting_timer: asyncio.TimerHandle | None = None
        self._loop_thread = 0
        #: the writer sleeps on ``_cond`` (it polls for a while after each commit: see WRITER_SPIN_S)
        self._asleep = False
        self._closing = False
        self._close_deadline = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._counts = {"rows_written": 0, "commits": 0, "checkpoints": 0, "write_errors": 0, "rows_lost": 0}
        self.last_error: str | None = None
        #: the last write failed and its rows wait in memory for a retry
        self.failing = False

    # -- writing ----------------------------------------------------------------------------------------------
    def put(self, act: Activation, on_durable: OnDurable | None = None) -> None:
        aid = act.activation_id
        self._next_seq = seq = self._next_seq + 1
        self._seq[aid] = seq  # a row of it the writer commits meanwhile is not this one
        self._unwritten[aid] = act
        if self._thread is None:
            self._ensure_writer()
        waiting = self._waiting
        # nobody waits for a record not ended: it waits for its final record, or its turn (see LAZY_ROW_DELAY_S)
        due = 0.0
        if on_durable is None and act.status in UNENDED_STATUSES:
            due = time.monotonic() + LAZY_ROW_DELAY_S
            if waiting is not None and threading.get_ident() == self._loop_thread:
                if not waiting and self._waiting_timer is None:
                    self._waiting_timer = self._loop.call_later(LAZY_ROW_DELAY_S, self._hand_waiting)  # type: ignore[union-attr]
                waiting.setdefault(aid, due)
                return
        elif waiting:
            waiting.pop(aid, None)
        self._hand(aid, _row(act), seq, on_durable, due)

    def _hand(self, aid: str, row: tuple[Any, ...], seq: int, on_durable: OnDurable | None, due: float) -> None:
        self._queue.append((aid, row, seq, on_durable, due))
        if self._asleep:
            with self._cond:
                self._cond.notify()

    def _hand_waiting(self) -> None:
        """On the loop: records whose turn came (see LAZY_ROW_DELAY_S) go to the writer as they are now."""
        self._waiting_timer = None
        waiting = self._waiting
        if not waiting:
            return
        now = time.monotonic()
        with self._cond:  # close() takes what is left under the lock: a record is handed over by one of the two
            if self._closing:
                return
            due_ids = []
            for aid, due in waiting.items():
                if due > now:
                    break
                due_ids.append(aid)
            for aid in due_ids:
                del waiting[aid]
                act = self._unwritten.get(aid)
                seq = self._seq.get(aid)
                if act is not None and seq is not None:
                    self._queue.append((aid, _row(act), seq, None, 0.0))
            self._cond.notify()
        if waiting and self._loop is not None:
            first_due = next(iter(waiting.values()))
            self._waiting_timer = self._loop.call_later(max(0.0, first_due - now), self._hand_waiting)

    def _ensure_writer(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._waiting = {}
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            self._loop = None  # used off a loop (a script, a test): callbacks run on the writer thread
        self._thread = threading.Thread(target=self._write_loop, name="minifaas-store-writer", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="minifaas-store-checkpointer", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = _connect(self.path, WRITE_BUSY_TIMEOUT_S)
        try:
            while True:
                self._checkpoint_due.wait()
                self._checkpoint_due.clear()
                if self._closing:
                    return
                try:
                    # passive: copies what it can without waiting for the writer or readers, and never blocks them
                    with self._checkpointing:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    _log.warning("checkpoint of the activation records failed (tried again later): %s", exc)
                    continue
                self._counts["checkpoints"] += 1
        finally:
            db.close()

    def _wait(self, spin: bool) -> bool:
        """Wait until there are rows to look at: handed over, or lazy ones due; False when the writer is to stop.
        Polls first for ``WRITER_SPIN_S`` with ``spin``."""
        cond = self._cond
        queue = self._queue
        spin_until = time.monotonic() + WRITER_SPIN_S if spin else 0.0
        #: since when nothing was written, while there is something to checkpoint
        quiet_since: float | None = None
        while True:
            # polling without the lock is safe: a row put meanwhile is seen on the next look or under the lock
            while not queue and time.monotonic() < spin_until and not self._closing:
                os.sched_yield()
            if queue:
                return True
            with cond:
                now = time.monotonic()
                lazy = self._lazy
                if self._closing:
                    return bool(queue or lazy)
                first_due = next(iter(lazy.values()))[0] if lazy else math.inf
                if first_due <= now:
                    return True
                if quiet_since is not None and now - quiet_since >= CHECKPOINT_QUIET_S:
                    self._commits_since_checkpoint = 0
                    self._checkpoint_due.set()  # a quiet moment
                    quiet_since = None
                elif quiet_since is None and self._commits_since_checkpoint:
                    quiet_since = now
                timeout = first_due - now
                if quiet_since is not None:
                    timeout = min(timeout, quiet_since + CHECKPOINT_QUIET_S - now)
                self._asleep = True
                if not queue:  # a last look, now that put() sees _asleep
                    cond.wait(max(0.0, timeout) if timeout < math.inf else None)
                self._asleep = False
            spin_until = 0.0  # woken: no more polling until the next commit

    def _take(self, batch: dict[str, tuple[Any, ...]], seqs: dict[str, int], callbacks: list[OnDurable]) -> None:
        """Add what was handed over, and the lazy rows that are due (all of them when closing), to the next
        transaction (a newer row of a record replaces the older and goes last)."""
        queue = self._queue
        lazy = self._lazy
        with self._cond:
            while queue:
                aid, row, seq, on_durable, due = queue.popleft()
                if due:
                    lazy.pop(aid, None)  # keep the lazy rows in the order they are due
                    lazy[aid] = (due, row, seq)
                    continue
                if lazy:
                    lazy.pop(aid, None)
                batch.pop(aid, None)
                batch[aid] = row
                seqs[aid] = seq
                if on_durable is not None:
                    callbacks.append(on_durable)
            if lazy:
                now = math.inf if self._closing else time.monotonic()
                due_ids = []
                for aid, (due, _, _) in lazy.items():
                    if due > now:
                        break
                    due_ids.append(aid)
                for aid in due_ids:
                    _, row, seq = lazy.pop(aid)
                    batch.pop(aid, None)
                    batch[aid] = row
                    seqs[aid] = seq

    def _write_loop(self) -> None:
        delay = RETRY_FIRST_S
        failing = False
        batch: dict[str, tuple[Any, ...]] = {}
        seqs: dict[str, int] = {}
        callbacks: list[OnDurable] = []
        spin = gather = False
        #: moving average of the rows in a transaction
        rows_per_commit = 1.0
        while True:
            if gather and not self._closing:
                # rows come faster than one by one (a busy host): let more of them join the next transaction. Each
                # commit costs the writer tens of microseconds however few rows it holds, wakes the event loop
                # once, and appends the same tree pages to the log again; on a busy host that is CPU the
                # sandboxes and the loop need
                time.sleep(COMMIT_GATHER_S)
            if not batch and not self._wait(spin):
                return
            self._take(batch, seqs, callbacks)
            if not batch:
                gather = False
                continue  # only rows whose turn has not come
            try:
                self._commit(list(batch.values()))
            except sqlite3.Error as exc:
                self._counts["write_errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.failing = True
                if not failing:
                    failing = True
                    _log.error("cannot write %d activation records (kept in memory, retrying): %s", len(batch), exc)
                # the callers are not kept waiting on a database that may stay locked: their records are final in
                # memory, readable through get(), and written as soon as the database lets the writer
                self._done(callbacks, {})
                callbacks = []
                if self._closing and time.monotonic() >= self._close_deadline:
                    self._counts["rows_lost"] += len(batch)
                    _log.error("gave up writing %d activation records at close: %s", len(batch), exc)
                    return
                with self._cond:
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                gather = False
                continue
            if failing:
                failing = self.failing = False
                _log.warning("activation records are written again after: %s", self.last_error)
            delay = RETRY_FIRST_S
            self._counts["rows_written"] += len(batch)
            self._counts["commits"] += 1
            self._commits_since_checkpoint += 1
            if self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS:
                self._commits_since_checkpoint = 0
                self._checkpoint_due.set()
                self._bound_log()
            self._done(callbacks, seqs)
            # about one record a transaction, callers waiting: a caller in a loop, whose next record comes soon.
            # More: a busy host, where polling would take the core from the sandboxes and the rows pile up anyway
            rows_per_commit += (len(batch) - rows_per_commit) / SPIN_AVERAGE_COMMITS
            spin = bool(callbacks) and rows_per_commit < SPIN_MAX_ROWS_PER_COMMIT
            gather = COMMIT_GATHER_S > 0 and rows_per_commit >= GATHER_MIN_ROWS_PER_COMMIT
            batch, seqs, callbacks = {}, {}, []

    def _bound_log(self) -> None:
        """A log that a load without pauses kept growing (a passive checkpoint never caught up with the writer) is
        emptied by the writer itself, between two of its transactions: a checkpoint that holds it up once."""
        try:
            if self._wal.stat().st_size <= WAL_MAX_BYTES:
                return
        except OSError:
            return
        self._checkpointing.acquire()  # after the checkpointer's passive checkpoint, if one runs
        try:
            self._wdb.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            _log.warning("the activation records' log is over %d MiB, not emptied: %s", WAL_MAX_BYTES >> 20, exc)
        finally:
            self._checkpointing.release()

    def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        db = self._wdb
        if len(rows) <= UPSERT_MAX_ROWS:
            # one statement is one transaction, and one call into SQLite: the writer takes the GIL back once per
            # commit, not once per row and statement as with BEGIN, executemany and COMMIT (each time from the
            # event loop, which then waits for it)
            db.execute(_upsert_sql(len(rows)), [value for row in rows for value in row])
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for at in range(0, len(rows), UPSERT_MAX_ROWS):
                chunk = rows[at : at + UPSERT_MAX_ROWS]
                db.execute(_upsert_sql(len(chunk)), [value for row in chunk for value in row])
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _done(self, callbacks: list[OnDurable], seqs: dict[str, int]) -> None:
        if not callbacks and not seqs:
            return
        loop = self._loop
        if loop is None:
            self._on_loop(callbacks, seqs)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(self._on_loop, callbacks, seqs)

    def _on_loop(self, callbacks: list[OnDurable], seqs: dict[str, int]) -> None:
        for aid, seq in seqs.items():
            if self._seq.get(aid) == seq:  # not put again since
                del self._seq[aid]
                self._unwritten.pop(aid, None)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("an activation record's on_durable callback failed")

    # -- reading ----------------------------------------------------------------------------------------------
    def get(self, activation_id: str, *, namespace: str | None = None) -> Activation | None:
        return read_one(self._db, self._unwritten, activation_id, namespace)

    def list(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        limit: int = 30,
        skip: int = 0,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> list[Activation]:
        return read_page(self._db, dict(self._unwritten), limit, skip, name, namespace, since, upto, ended, cause)

    def count(
        self,
        *,
        name: str | None = None,
        namespace: str | None = None,
        since: int | None = None,
        upto: int | None = None,
        ended: bool = False,
        cause: str | None = None,
    ) -> int:
        return read_count(self._db, dict(self._unwritten), name, namespace, since, upto, ended, cause)

    def recover(self) -> int:
        """Runs at start, before anything else uses the store (the writer thread is not running yet)."""
        rows = self._wdb.execute(_SELECT + " WHERE status IN ('pending', 'running')").fetchall()
        end = now_ms()
        fixed = []
        for row in rows:
            act = _from_row(row)
            act.status = "internal_error"
            act.result = {"error": HOST_DIED_MESSAGE}
            act.end = end
            act.annotations["recovered"] = True
            fixed.append(_row(act))
        if fixed:
            self._commit(fixed)
        return len(rows)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = len(self._queue) + len(self._lazy) + len(self._waiting or ())
        return {
            "kind": "sqlite",
            **self._counts,
            "unwritten": len(self._unwritten),
            "queued": queued,
            "failing": self.failing,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Write what is left (retrying up to ``CLOSE_FLUSH_TIMEOUT_S``), stop the writer, close the database."""
        thread = self._thread
        if thread is not None:
            with self._cond:
                self._closing = True
                self._close_deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT_S
                # records still waiting for their turn are written now, as they are (close runs on the loop's
                # behalf, often from a worker thread while the loop waits for it; list() copies in one step)
                for aid in list(self._waiting or ()):
                    act = self._unwritten.get(aid)
                    seq = self._seq.get(aid)
                    if act is not None and seq is not None:
                        self._queue.append((aid, _row(act), seq, None, 0.0))
                self._cond.notify()
            thread.join()
            if self._checkpointer is not None:
                self._checkpoint_due.set()  # it sees _closing and leaves; the last connection's close checkpoints
                self._checkpointer.join()
        else:
            batch: dict[str, tuple[Any, ...]] = {}
            self._closing = True
            self._take(batch, {}, [])
            if batch:
                self._commit(list(batch.values()))
        self._wdb.close()
        self._db.close()


def _where(
    name: str | None, namespace: str | None, since: int | None, upto: int | None, ended: bool, cause: str | None = None
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or empty) and arguments of a listing or a count."""
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("name = ?", name),
        ("namespace = ?", namespace),
        ("ts >= ?", since),
        ("ts <= ?", upto),
        ("cause = ?", cause),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    if ended:
        clauses.append(f"status NOT IN ({', '.join('?' * len(UNENDED_STATUSES))})")
        args += UNENDED_STATUSES
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def read_one(
    db: sqlite3.Connection | None, overlay: Mapping[str, Activation], activation_id: str, namespace: str | None
) -> Activation | None:
    """A record from ``overlay`` (records whose latest state is not in the table: not written yet) or else from the
    table (``db`` None: there is none); with ``namespace``, None for a record of another namespace."""
    act = overlay.get(activation_id)
    if act is not None:
        return act if namespace is None or act.namespace == namespace else None
    if db is None:
        return None
    sql = _SELECT + " WHERE activation_id = ?"
    args = [activation_id]
    if namespace is not None:
        sql += " AND namespace = ?"
        args.append(namespace)
    row = db.execute(sql, args).fetchone()
    return _from_row(row) if row else None


def read_page(
    db: sqlite3.Connection | None,
    overlay: Mapping[str, Activation],
    limit: int,
    skip: int,
    name: str | None,
    namespace: str | None,
    since: int | None,
    upto: int | None,
    ended: bool,
    cause: str | None,
) -> list[Activation]:
    """Newest first, the table's rows merged with ``overlay`` (a snapshot, see :func:`read_one`)."""
    found: dict[str, Activation] = {}
    if db is not None:
        where, args = _where(name, namespace, since, upto, ended, cause)
        sql = f"{_SELECT}{where} ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?"
        # records in the overlay may belong in the page, or have left it: read enough to merge them in
        rows = db.execute(sql, [*args, limit + skip + len(overlay), 0]).fetchall()
        found = {act.activation_id: act for act in map(_from_row, rows)}
    for aid, act in overlay.items():
        if _matches(act, name, namespace, since, upto, ended, cause):
            found[aid] = act
        else:
            found.pop(aid, None)  # its table row is older than the record (e.g. running then, ended now)
    ordered = sorted(found.values(), key=lambda a: a.start or a.accepted, reverse=True)
    return ordered[skip : skip + limit]


def read_count(
    db: sqlite3.Connection | None,
    overlay: Mapping[str, Activation],
    name: str | None,
    namespace: str | None,
    since: int | None,
    upto: int | None,
    ended: bool,
    cause: str | None,
) -> int:
    """How many records match, the table's rows counted with ``overlay`` (a snapshot, see :func:`read_one`)."""
    fresh = sum(1 for act in overlay.values() if _matches(act, name, namespace, since, upto, ended, cause))
    if db is None:
        return fresh
    where, args = _where(name, namespace, since, upto, ended, cause)
    n = int(db.execute(f"SELECT COUNT(*) FROM records{where}", args).fetchone()[0])
    if not overlay:
        return n
    # the table's rows of records in the overlay are stale: count those records as they are there
    ids = list(overlay)
    marks = ", ".join("?" * len(ids))
    clause = f"{where} AND activation_id IN ({marks})" if where else f" WHERE activation_id IN ({marks})"
    stale = int(db.execute(f"SELECT COUNT(*) FROM records{clause}", [*args, *ids]).fetchone()[0])
    return n - stale + fresh


def _fallback(obj: Any) -> Any:
    # records hold what functions returned; anything msgpack cannot store is kept as its JSON-ish text, and an
    # array as its summary (the caller got the data; the record is not a second copy of it)
    summary = summarize_value(obj)
    return summary if summary is not None else json.dumps(obj, default=repr)


def open_store(state_dir: Path | None, max_records: int = MEMORY_STORE_MAX_RECORDS) -> ActivationStore:
    if state_dir is None:
        return MemoryStore(max_records)
    return SQLiteStore(state_dir / DB_FILE_NAME)
