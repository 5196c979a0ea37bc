"""Activation stores: bounded in memory by default, SQLite (WAL) under a ``state_dir``.

Records are written when an invocation is accepted (status ``pending``) and again when it ends, so a host that dies
leaves its in-flight records behind; the next engine on the same ``state_dir`` marks them failed instead of losing them.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack

from .activation import Activation, now_ms, summarize_value

__all__ = ("ActivationStore", "MemoryStore", "SQLiteStore", "open_store")

MEMORY_STORE_MAX_RECORDS: Final = 10_000
#: statuses of records whose activation has not ended (every other status is final)
UNENDED_STATUSES: Final = ("pending", "running")
HOST_DIED_MESSAGE: Final = "the host process ended while this activation was in flight"


class ActivationStore(Protocol):
    def put(self, act: Activation) -> None: ...

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

    def put(self, act: Activation) -> None:
        records = self._records
        if act.activation_id not in records:
            records[act.activation_id] = act
            while len(records) > self.max_records:
                records.popitem(last=False)
        else:
            records[act.activation_id] = act

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

    def close(self) -> None:
        self._records.clear()


class SQLiteStore:
    """Records and logs in ``<state_dir>/activations.sqlite3``; survives a restart (or a kill -9) of the host."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # a commit reaches the OS before put() returns, so a killed host loses nothing; fsync per record is not
        # needed for that and would cost milliseconds
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS activations ("
            " activation_id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL,"
            " ts INTEGER NOT NULL, status TEXT NOT NULL, record BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS activations_ts ON activations (ts)")
        self._db.execute("CREATE INDEX IF NOT EXISTS activations_name_ts ON activations (name, ts)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(activations)")}
        if "cause" not in columns:  # a state dir from before maps filtered their items by cause
            self._db.execute("ALTER TABLE activations ADD COLUMN cause TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS activations_cause ON activations (cause)")

    def put(self, act: Activation) -> None:
        blob = msgpack.packb(act.to_dict(), use_bin_type=True, default=_fallback)
        self._db.execute(
            "INSERT OR REPLACE INTO activations (activation_id, name, namespace, ts, status, record, cause)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (act.activation_id, act.name, act.namespace, act.start or act.accepted, act.status, blob, act.cause),
        )

    def get(self, activation_id: str, *, namespace: str | None = None) -> Activation | None:
        sql = "SELECT record FROM activations WHERE activation_id = ?"
        args: tuple[str, ...] = (activation_id,)
        if namespace is not None:
            sql += " AND namespace = ?"
            args += (namespace,)
        row = self._db.execute(sql, args).fetchone()
        return _load(row[0]) if row else None

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
        where, args = _where(name, namespace, since, upto, ended, cause)
        sql = f"SELECT record FROM activations{where} ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?"
        return [_load(r[0]) for r in self._db.execute(sql, [*args, limit, skip]).fetchall()]

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
        where, args = _where(name, namespace, since, upto, ended, cause)
        row = self._db.execute(f"SELECT COUNT(*) FROM activations{where}", args).fetchone()
        return int(row[0])

    def recover(self) -> int:
        rows = self._db.execute("SELECT record FROM activations WHERE status IN ('pending', 'running')").fetchall()
        end = now_ms()
        for (blob,) in rows:
            act = _load(blob)
            act.status = "internal_error"
            act.result = {"error": HOST_DIED_MESSAGE}
            act.end = end
            act.annotations["recovered"] = True
            self.put(act)
        return len(rows)

    def close(self) -> None:
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


def _fallback(obj: Any) -> Any:
    # records hold what functions returned; anything msgpack cannot store is kept as its JSON-ish text, and an
    # array as its summary (the caller got the data; the record is not a second copy of it)
    summary = summarize_value(obj)
    return summary if summary is not None else json.dumps(obj, default=repr)


def _load(blob: bytes) -> Activation:
    return Activation.from_dict(msgpack.unpackb(blob, raw=False, strict_map_key=False))


def open_store(state_dir: Path | None, max_records: int = MEMORY_STORE_MAX_RECORDS) -> ActivationStore:
    if state_dir is None:
        return MemoryStore(max_records)
    return SQLiteStore(state_dir / "activations.sqlite3")
