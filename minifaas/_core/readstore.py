"""Reading the records of a state dir another engine holds (an engine opened with ``read_only=True``).

The database is opened read-only (SQLite ``mode=ro``): the engine holding the dir keeps writing through its WAL and
this connection sees each commit. Nothing here recovers, migrates or writes; records this engine would make stay
in memory (it refuses to run functions, so there are none in practice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from .activation import Activation
from .store import DB_FILE_NAME, OnDurable, read_count, read_one, read_page

__all__ = ("ReadOnlyStore",)

#: how long a read waits for the holder's checkpoint (it blocks readers only for an instant)
READ_BUSY_TIMEOUT_S: Final = 5.0


class ReadOnlyStore:
    """An :class:`~minifaas._core.store.ActivationStore` over ``<state_dir>/activations.sqlite3``, read-only."""

    def __init__(self, state_dir: Path) -> None:
        import sqlite3

        path = state_dir / DB_FILE_NAME
        self.path = path
        self._memory: dict[str, Activation] = {}
        if path.exists():
            uri = f"{path.resolve().as_uri()}?mode=ro"
            self._db: Any = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=READ_BUSY_TIMEOUT_S
            )
            exists = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'")
            if exists.fetchone() is None:
                self._db.close()
                self._db = None
        else:
            self._db = None  # a state dir with no records yet

    def put(self, act: Activation, on_durable: OnDurable | None = None) -> None:
        self._memory[act.activation_id] = act
        if on_durable is not None:
            on_durable()

    def get(self, activation_id: str, *, namespace: str | None = None) -> Activation | None:
        return read_one(self._db, self._memory, activation_id, namespace)

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
        return read_page(self._db, self._memory, limit, skip, name, namespace, since, upto, ended, cause)

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
        return read_count(self._db, self._memory, name, namespace, since, upto, ended, cause)

    def recover(self) -> int:
        return 0  # the records' owner is alive: its pending records are its own

    def stats(self) -> dict[str, Any]:
        return {"kind": "sqlite-read-only", "path": str(self.path)}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
