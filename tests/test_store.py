"""The durable activation store under faults: the database locked by another connection, writes that fail, and
the promise that an accepted record is stored before ``submit`` returns and a final one before the caller sees it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

import minifaas
from minifaas._core.store import DB_FILE_NAME, SQLiteStore

pytestmark = pytest.mark.anyio

SLOW = "import time\ndef main(a):\n    time.sleep(a.get('s', 0.3))\n    return {'ok': 1}\n"
CRASH = "import os, time\ndef main(a):\n    time.sleep(0.3)\n    os._exit(3)\n"
#: a heartbeat late by more than this means something blocked the event loop
MAX_LOOP_STALL_S = 0.5
#: how long the records may take to reach the database once the lock is gone (the writer's back-off is capped)
UNLOCKED_WRITE_S = 10.0


@contextmanager
def locked(db: Path) -> Iterator[sqlite3.Connection]:
    """A write lock on the database, held by another connection (a backup, a CLI, a second process)."""
    other = sqlite3.connect(str(db), isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("COMMIT")
        other.close()


def _row_status(db: Path, aid: str) -> str | None:
    with sqlite3.connect(str(db)) as conn:
        row = conn.execute("SELECT status FROM records WHERE activation_id = ?", (aid,)).fetchone()
    return None if row is None else str(row[0])


async def _wait_row(db: Path, aid: str, status: str) -> None:
    with anyio.fail_after(UNLOCKED_WRITE_S):
        while _row_status(db, aid) != status:
            await anyio.sleep(0.05)


async def test_a_sequence_submitted_is_on_record_before_submit_returns(tmp_path: Path) -> None:
    """Its record is put with nobody waiting on it, which the store writes only at its end or its turn: submit waits
    for it as for a function's."""
    async with minifaas.Engine(tmp_path) as engine:
        await engine.deploy("slow", code=SLOW)
        await engine.deploy_sequence("seq", ["slow", "slow"])
        aid = await engine.submit("seq", {"s": 0.2})
        assert _row_status(tmp_path / DB_FILE_NAME, aid) == "pending"
        assert (await engine.activations.wait(aid, timeout_s=10)).status == "success"


async def test_locked_database_neither_loses_nor_hangs_an_activation(tmp_path: Path) -> None:
    """sqlite_lock2.py: the job ended, the loop did not stall, the store reports, the row follows the lock."""
    db = tmp_path / DB_FILE_NAME
    stall = 0.0

    async def heartbeat() -> None:
        nonlocal stall
        while True:
            t = time.monotonic()
            await anyio.sleep(0.01)
            stall = max(stall, time.monotonic() - t - 0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        async with minifaas.Engine(tmp_path, close_timeout_s=1) as engine:
            await engine.deploy("slow", code=SLOW)
            await engine.invoke("slow", {"s": 0})
            aid = await engine.submit("slow", {})
            assert _row_status(db, aid) == "pending"  # on record before submit returned
            with locked(db):
                with anyio.fail_after(5):
                    act = await engine.activations.wait(aid, timeout_s=None)
                assert act.status == "success"
                assert (await engine.activations.get(aid)).status == "success"  # from memory: not written yet
                assert _row_status(db, aid) == "pending"
                store = engine.stats()["store"]
                assert store["failing"] and store["write_errors"] >= 1 and "locked" in store["last_error"]
                # and the engine keeps serving while the database is locked
                assert await engine.invoke("slow", {"s": 0}) == {"ok": 1}
            await _wait_row(db, aid, "success")
            assert not engine.stats()["store"]["failing"]
        tg.cancel_scope.cancel()
    assert stall < MAX_LOOP_STALL_S, f"the event loop stalled {stall:.2f} s"


async def test_sandbox_death_while_database_locked_keeps_engine_up(tmp_path: Path) -> None:
    """sqlite_death.py: the death's record fails to write; before, that error ended the engine's task group."""
    db = tmp_path / DB_FILE_NAME
    async with minifaas.Engine(tmp_path, close_timeout_s=1) as engine:
        await engine.deploy("crash", code=CRASH)
        await engine.deploy("ok", code="def main(a):\n    return {}\n")
        aid = await engine.submit("crash", {})
        await anyio.sleep(0.1)
        with locked(db):
            with anyio.fail_after(10):
                act = await engine.activations.wait(aid, timeout_s=None)
            assert act.status == "developer_error" and "exited with code 3" in act.result["error"]
        assert await engine.invoke("ok", {}) == {}
        await _wait_row(db, aid, "developer_error")


async def test_records_locked_at_close_are_written_when_the_lock_goes(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE_NAME
    other = sqlite3.connect(str(db), isolation_level=None, timeout=0, check_same_thread=False)
    unlock = threading.Timer(0.5, other.execute, ("COMMIT",))
    async with minifaas.Engine(tmp_path, close_timeout_s=1) as engine:
        await engine.deploy("slow", code=SLOW)
        other.execute("BEGIN IMMEDIATE")
        act = await engine.call("slow", {"s": 0})
        assert act.status == "success"
        unlock.start()  # while the engine closes
    unlock.join()
    # the close waited for the lock (within its flush time) instead of dropping the record
    assert _row_status(db, act.activation_id) == "success"
    other.close()


async def test_final_record_is_stored_before_the_caller_sees_it(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE_NAME
    ended: list[str] = []
    async with minifaas.Engine(tmp_path) as engine:
        engine.add_end_hook(lambda act: ended.append(str(_row_status(db, act.activation_id))))
        await engine.deploy("slow", code=SLOW)
        acts = [await engine.call("slow", {"s": 0}) for _ in range(20)]
        for act in acts:
            assert _row_status(db, act.activation_id) == "success"
        ids = [await engine.submit("slow", {"s": 0}) for _ in range(20)]
        for aid in ids:
            assert _row_status(db, aid) in ("pending", "running", "success")
        for aid in ids:
            await engine.activations.wait(aid)
    assert ended == ["success"] * 40  # end hooks run once the record is stored


def test_old_single_blob_databases_are_migrated(tmp_path: Path) -> None:
    import msgpack

    db = tmp_path / DB_FILE_NAME
    act = minifaas.Activation(activation_id="a" * 32, name="f", status="success", result={"x": 1}, accepted=5)
    with sqlite3.connect(str(db)) as conn:
        conn.execute(
            "CREATE TABLE activations (activation_id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL,"
            " ts INTEGER NOT NULL, status TEXT NOT NULL, record BLOB NOT NULL)"
        )
        blob = msgpack.packb(act.to_dict(), use_bin_type=True)
        conn.execute(
            "INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?)", (act.activation_id, "f", "guest", 5, "success", blob)
        )
    store = SQLiteStore(db)
    try:
        assert store.get(act.activation_id) == act
        assert store.list() == [act]
    finally:
        store.close()


def _act(aid: str, status: str = "pending") -> minifaas.Activation:
    return minifaas.Activation(activation_id=aid, name="f", status=status, accepted=1)  # type: ignore[arg-type]


def test_a_record_that_ends_before_its_turn_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accepted record of a call nobody waits for waits for its final record: one row write, not two."""
    from minifaas._core import store as store_module

    monkeypatch.setattr(store_module, "LAZY_ROW_DELAY_S", 30.0)
    db = tmp_path / DB_FILE_NAME
    store = SQLiteStore(db)
    written = threading.Event()
    try:
        store.put(_act("a" * 32))
        assert store.get("a" * 32) is not None  # readable from memory meanwhile
        assert store.stats()["queued"] == 1
        store.put(_act("a" * 32, "success"), written.set)
        assert written.wait(5)
        assert _row_status(db, "a" * 32) == "success"
        assert store.stats()["rows_written"] == 1
        assert store.stats()["queued"] == 0
    finally:
        store.close()


def test_a_record_not_ended_is_written_when_its_turn_comes_or_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minifaas._core import store as store_module

    db = tmp_path / DB_FILE_NAME
    store = SQLiteStore(db)
    try:
        store.put(_act("b" * 32))  # due after LAZY_ROW_DELAY_S: the writer sleeps until then, not for ever
        deadline = time.monotonic() + 5
        while _row_status(db, "b" * 32) is None:
            assert time.monotonic() < deadline, "a lazy row was never written"
            time.sleep(0.01)
        monkeypatch.setattr(store_module, "LAZY_ROW_DELAY_S", 30.0)
        store.put(_act("c" * 32))
    finally:
        store.close()
    assert _row_status(db, "c" * 32) == "pending"  # the close writes what waited for its turn


async def test_a_long_call_is_on_record_while_it_runs(tmp_path: Path) -> None:
    """Crash insurance: a call still running after its record's turn has a row the next engine can mark failed."""
    db = tmp_path / DB_FILE_NAME
    async with minifaas.Engine(tmp_path) as engine:
        await engine.deploy("slow", code=SLOW)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, "slow", {"s": 1.0})
            with anyio.fail_after(5):
                while not (rows := engine.stats()["store"]["rows_written"]):
                    await anyio.sleep(0.01)
            assert rows == 1
            with sqlite3.connect(str(db)) as conn:
                assert conn.execute("SELECT status FROM records").fetchall() == [("pending",)]


def test_activation_ids_are_unique_and_ordered_by_time() -> None:
    """Ids begin with the time, so a host's records go to the end of the database's indexes."""
    import re

    from minifaas._core.activation import new_activation_id

    first = [new_activation_id() for _ in range(2000)]
    time.sleep(0.002)
    later = new_activation_id()
    assert len(set(first)) == len(first)
    assert all(re.fullmatch(r"[0-9a-f]{32}", aid) for aid in first)
    assert later > max(first)
    assert int(later[:12], 16) <= time.time_ns() // 1_000_000


def test_checkpoints_run_beside_the_writer_and_bound_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits do not checkpoint (two fsyncs inside a commit held up its callers); a thread beside the writer does,
    and a log a steady load keeps growing is cut down by the writer past WAL_MAX_BYTES."""
    from minifaas._core import store as store_module

    monkeypatch.setattr(store_module, "WAL_MAX_BYTES", 4 << 20)
    db = tmp_path / DB_FILE_NAME
    store = SQLiteStore(db)
    logs = ["x" * 200] * 100  # ~20 KB a record: without checkpoints 1,000 commits leave a log of over 20 MB
    try:
        assert store._wdb.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for i in range(1000):
            written = threading.Event()
            act = _act(f"{i:032x}", "success")
            act.logs = logs
            store.put(act, written.set)
            assert written.wait(5)
        deadline = time.monotonic() + 10
        while store.stats()["checkpoints"] < 1:
            assert time.monotonic() < deadline, store.stats()
            time.sleep(0.05)
        # at most the limit plus what CHECKPOINT_EVERY_COMMITS commits add (~6 MB here)
        assert (tmp_path / f"{DB_FILE_NAME}-wal").stat().st_size < 12 << 20
    finally:
        store.close()
    with sqlite3.connect(str(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM records").fetchone() == (1000,)


async def test_the_host_polls_for_a_final_record_only_until_it_is_written(tmp_path: Path) -> None:
    """With a durable store the host polls for the writer's callback (not sleeping through it); the window goes
    with the callback, so nothing is left polling once the calls are done."""
    async with minifaas.Engine(tmp_path, poll_us=200) as engine:
        await engine.deploy("noop", code="def main(a):\n    return {}\n")
        sched = engine._sched
        assert sched is not None
        windows: list[bool] = []
        real_put = sched.store.put

        def put(act: minifaas.Activation, on_durable: object = None) -> None:
            if act.done:
                windows.append(sched.jobs[act.activation_id] in sched.polled)
            real_put(act, on_durable)  # type: ignore[arg-type]

        sched.store.put = put  # type: ignore[method-assign]
        for _ in range(30):
            assert (await engine.call("noop")).status == "success"
        assert all(windows) and len(windows) == 30
        assert not sched.polled


def test_a_commit_is_one_statement_into_sqlite(tmp_path: Path) -> None:
    """The writer hands a transaction's rows to SQLite in one statement (its own transaction): each call into SQLite
    gives the GIL away and takes it back from the event loop, so BEGIN, a statement per row and COMMIT cost the loop
    as many round trips. Past UPSERT_MAX_ROWS rows, a few statements in one transaction."""
    from minifaas._core import store as store_module

    db = tmp_path / DB_FILE_NAME
    store = SQLiteStore(db)
    statements: list[str] = []
    store._wdb.set_trace_callback(statements.append)
    try:
        for n_rows, expected in ((1, 1), (20, 1), (store_module.UPSERT_MAX_ROWS * 2 + 1, 5)):
            statements.clear()
            start = len(_all_ids(db))
            store._commit([store_module._row(_act(f"{start + i:032x}", "success")) for i in range(n_rows)])
            assert len(statements) == expected, statements
            assert len(_all_ids(db)) == start + n_rows
    finally:
        store.close()


def _all_ids(db: Path) -> list[str]:
    with sqlite3.connect(str(db)) as conn:
        return [aid for (aid,) in conn.execute("SELECT activation_id FROM records")]


def test_a_busy_writer_gathers_rows_between_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once rows come faster than one a transaction, the writer waits COMMIT_GATHER_S after a commit before the next:
    a steady stream (a record a millisecond here) is written in a few large transactions, not one per record."""
    from minifaas._core import store as store_module

    monkeypatch.setattr(store_module, "COMMIT_GATHER_S", 0.05)
    db = tmp_path / DB_FILE_NAME
    store = SQLiteStore(db)
    durable = threading.Semaphore(0)
    total = 0
    try:
        for _ in range(50):  # a burst: the rows after the first pile up while it commits
            store.put(_act(f"{total:032x}", "success"), durable.release)
            total += 1
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            store.put(_act(f"{total:032x}", "success"), durable.release)
            total += 1
            time.sleep(0.001)
        for _ in range(total):
            assert durable.acquire(timeout=5)
        stats = store.stats()
        assert stats["rows_written"] == total
        # one row a commit would be ~total commits; gathering for 50 ms, about a dozen
        assert stats["commits"] < total // 5, stats
    finally:
        store.close()
    assert len(_all_ids(db)) == total


async def test_a_durable_host_asks_the_sandbox_to_poll_through_the_store_wait(tmp_path: Path) -> None:
    """A caller in a loop sends its next RUN only once the last record is written: with a durable store the RUN asks
    the sandbox to poll that much longer (capped), so the sandbox is found awake; in memory, the default poll."""
    from minifaas._core import scheduler as scheduler_module
    from minifaas._core.sandbox import Sandbox

    spins: list[object] = []
    real_send = Sandbox.send

    def send(self: Sandbox, kind: int, fields: dict[str, object]) -> None:
        if "aid" in fields and "spin" in fields:
            spins.append(fields["spin"])
        real_send(self, kind, fields)  # type: ignore[arg-type]

    Sandbox.send = send  # type: ignore[method-assign]
    try:
        for state_dir in (None, tmp_path):
            spins.clear()
            async with minifaas.Engine(state_dir) as engine:
                await engine.deploy("noop", code="def main(a):\n    return {}\n")
                for _ in range(20):
                    assert (await engine.call("noop")).status == "success"
                sched = engine._sched
                assert sched is not None
                if state_dir is None:
                    assert spins == [True] * 20
                    assert sched.store_wait_us == 0
                else:
                    assert 0 < sched.store_wait_us <= scheduler_module.STORE_WAIT_MAX_US
                    late = spins[-1]
                    assert isinstance(late, int) and not isinstance(late, bool)
                    assert late > scheduler_module.SANDBOX_SPIN_US
                    assert late <= scheduler_module.SANDBOX_SPIN_US + scheduler_module.STORE_WAIT_MAX_US
    finally:
        Sandbox.send = real_send  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("spin", "seconds"),
    [(True, 100e-6), (False, 0.0), (None, 0.0), (350, 350e-6), (10_000_000, 0.001), (-5, 0.0)],
    ids=["default", "none", "absent", "microseconds", "capped", "negative"],
)
def test_the_sandbox_polls_as_long_as_the_run_asks_within_its_cap(spin: object, seconds: float) -> None:
    from minifaas_sandbox.runtime import _spin_s

    assert _spin_s(spin) == pytest.approx(seconds)


def test_rows_bind_as_types_sqlite_takes_without_adapter_lookups(tmp_path: Path) -> None:
    """Python's sqlite3 looks for an adapter (a failed attribute look-up that formats an error message) before it
    binds a None or a bytes value, with the GIL held by the writer thread the event loop waits for: a row holds only
    int, str and bytearray values, and the NULLs and blobs still read back as they were."""
    from minifaas._core import store as store_module

    pending = _act("d" * 32)
    ended = _act("e" * 32, "success")
    ended.end, ended.duration, ended.wait_time, ended.init_time, ended.cause = 5, 4, 0, 3, "f" * 32
    ended.result, ended.logs, ended.annotations = {"x": b"\x00\xff"}, ["line"], {"cold": True}
    rows = [store_module._row(pending), store_module._row(ended)]
    assert {type(value) for row in rows for value in row} <= {int, str, bytearray}
    store = SQLiteStore(tmp_path / DB_FILE_NAME)
    try:
        store._commit(rows)
        for act in (pending, ended):
            (row,) = store._db.execute(store_module._SELECT + " WHERE activation_id = ?", (act.activation_id,))
            assert store_module._from_row(row) == act
    finally:
        store.close()


def test_put_takes_no_lock_while_the_writer_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``put`` runs on the event loop for every record: it hands the row over through a queue, and takes the
    writer's lock only to wake a sleeping writer, so a writer busy committing (or anyone holding that lock) never
    holds up the loop."""
    store = SQLiteStore(tmp_path / DB_FILE_NAME)
    committing, go_on, holding, release = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    real_commit = store._commit

    def slow_commit(rows: list[tuple[object, ...]]) -> None:
        committing.set()
        go_on.wait(10)
        real_commit(rows)

    monkeypatch.setattr(store, "_commit", slow_commit)

    def hold_lock() -> None:
        with store._cond:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    written = threading.Semaphore(0)
    try:
        store.put(_act("1" * 32, "success"), written.release)
        assert committing.wait(5)  # the writer is inside its commit, not asleep
        holder.start()
        assert holding.wait(5)
        begun = time.monotonic()
        store.put(_act("2" * 32, "success"), written.release)
        store.put(_act("3" * 32))  # lazy: waits for its turn
        took = time.monotonic() - begun
        release.set()
        go_on.set()
        assert took < 1.0, f"put waited {took:.2f} s for the writer's lock"
        assert written.acquire(timeout=5) and written.acquire(timeout=5)
        assert _row_status(tmp_path / DB_FILE_NAME, "2" * 32) == "success"
    finally:
        release.set()
        go_on.set()
        holder.join(5)
        store.close()
    assert _row_status(tmp_path / DB_FILE_NAME, "3" * 32) == "pending"


async def test_a_call_that_ends_before_its_turn_is_encoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the event loop the accepted record of a call waits for its turn there, not encoded: a warm call that ends
    sooner costs the loop one row (its final record), not two, and the database one write."""
    from minifaas._core import store as store_module

    encoded: list[str] = []
    real_row = store_module._row

    def row(act: minifaas.Activation) -> tuple[object, ...]:
        encoded.append(act.status)
        return real_row(act)

    async with minifaas.Engine(tmp_path) as engine:
        await engine.deploy("noop", code="def main(a):\n    return {}\n")
        await engine.call("noop")
        monkeypatch.setattr(store_module, "_row", row)
        monkeypatch.setattr(store_module, "LAZY_ROW_DELAY_S", 30.0)
        before = engine.stats()["store"]["rows_written"]
        for _ in range(20):
            assert (await engine.call("noop")).status == "success"
        assert encoded == ["success"] * 20
        assert engine.stats()["store"]["rows_written"] - before == 20


async def test_a_record_waiting_for_its_turn_on_the_loop_is_written_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minifaas._core import store as store_module

    monkeypatch.setattr(store_module, "LAZY_ROW_DELAY_S", 30.0)
    store = SQLiteStore(tmp_path / DB_FILE_NAME)
    store.put(_act("4" * 32))  # on the loop: it waits there
    assert store.get("4" * 32) is not None
    assert store.stats()["queued"] == 1
    await anyio.to_thread.run_sync(store.close)  # as the engine closes it
    assert _row_status(tmp_path / DB_FILE_NAME, "4" * 32) == "pending"
