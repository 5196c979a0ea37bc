"""Triggers, rules and feeds: real files, real timing, a real S3-compatible server and the real Engine.

Most TriggerManagers here get ``Submissions`` as ``submit``: an in-test implementation of the engine's
submit interface that records each call (the interface itself, not a stand-in for a named part); the
end-to-end test at the bottom drives the real ``minifaas.Engine``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

import minifaas
from minifaas._events.feeds import CronSchedule, is_temporary_name
from minifaas._events.triggers import TriggerManager
from minifaas.testing import FakeClock

pytestmark = pytest.mark.anyio

POLL_S = 0.1
WAIT_S = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Submissions:
    """The engine's submit interface, recording every call; names in ``missing`` are not deployed."""

    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None, float]] = []
        self.missing = missing

    async def __call__(self, name: str, args: dict[str, Any], /, *, cause: str | None) -> str:
        if name in self.missing:
            raise minifaas.FunctionNotFound(f"no function named {name!r} is deployed")
        self.calls.append((name, args, cause, time.monotonic()))
        return uuid.uuid4().hex

    def names(self) -> list[str]:
        return [args["name"] for _, args, _, _ in self.calls]


class ScaledClock:
    """Real time running ``factor`` times faster, so a 60 s rate window passes in 60/factor real seconds."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._t0 = time.monotonic()

    def now(self) -> float:
        return 1_700_000_000.0 + (time.monotonic() - self._t0) * self.factor

    def monotonic(self) -> float:
        return (time.monotonic() - self._t0) * self.factor

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds / self.factor)


class SteppedClock(FakeClock):
    """A FakeClock whose wall clock (``now``) an operator or NTP can step; ``monotonic`` and ``sleep`` go on."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        super().__init__(start)
        self.wall_offset_s = 0.0

    def now(self) -> float:
        return super().now() + self.wall_offset_s

    def monotonic(self) -> float:
        return super().now()


@contextlib.asynccontextmanager
async def manager(submit: Submissions, state_dir: Path | None = None, **kwargs: Any) -> AsyncIterator[TriggerManager]:
    # The task group only exits once every feed task has ended: a leaked task would hang the test.
    async with anyio.create_task_group() as tg:
        tm = TriggerManager(submit, state_dir=state_dir, task_group=tg, **kwargs)
        try:
            yield tm
        finally:
            await tm.aclose()


async def advance(clock: FakeClock, seconds: float, step: float = 0.5) -> None:
    """Move the fake clock in steps, letting every task it wakes run (and sleep again) after each step."""
    await anyio.wait_all_tasks_blocked()
    for _ in range(round(seconds / step)):
        clock.advance(step)
        await anyio.wait_all_tasks_blocked()


async def wait_until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    with anyio.fail_after(timeout_s):
        while not cond():
            await anyio.sleep(0.01)


def drop(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ triggers and rules


async def test_fire_without_enabled_rule_is_recorded() -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t", params={"k": 1})
        assert await tm.fire("t", {"x": 2}) == []
        tm.create_rule("r", "t", "f", enabled=False)
        assert await tm.fire("t") == []
        fires = tm.list_fires("t")
        assert len(fires) == 2 and all(f.outcomes == () for f in fires)
        assert fires[1].args == {"k": 1, "x": 2}
        assert tm.get_fire(fires[0].activation_id) is fires[0]
        assert sub.calls == []


async def test_rules_many_to_many_enable_disable_and_params() -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("uploads", params={"bucket": "b", "size": 0})
        tm.create_trigger("nightly")
        tm.create_rule("thumb", "uploads", "make_thumbnail")
        tm.create_rule("index", "uploads", "index_file")
        tm.create_rule("sweep", "nightly", "make_thumbnail")
        ids = await tm.fire("uploads", {"size": 7})
        assert len(ids) == 2
        record = tm.list_fires("uploads")[0]
        assert record.activation_ids == ids
        assert sorted((n, a["size"], a["bucket"], c) for n, a, c, _ in sub.calls) == [
            ("index_file", 7, "b", record.activation_id),
            ("make_thumbnail", 7, "b", record.activation_id),
        ]
        assert tm.disable_rule("index").status == "inactive"
        assert len(await tm.fire("uploads")) == 1
        assert sub.calls[-1][0] == "make_thumbnail"
        tm.enable_rule("index")
        assert len(await tm.fire("uploads")) == 2
        assert len(await tm.fire("nightly")) == 1
        assert [r.name for r in tm.list_rules("uploads")] == ["index", "thumb"]
        tm.delete_rule("thumb")
        assert [o.action for o in tm.list_fires("uploads")[0].outcomes] == ["index_file", "make_thumbnail"]
        assert len(await tm.fire("uploads")) == 1
        tm.delete_trigger("uploads")
        assert [r.name for r in tm.list_rules()] == ["sweep"]
        with pytest.raises(minifaas.TriggerError, match="no trigger"):
            await tm.fire("uploads")


async def test_failing_rule_is_recorded_and_others_still_fire() -> None:
    sub = Submissions(missing=("gone",))
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("a", "t", "gone")
        tm.create_rule("b", "t", "here")
        ids = await tm.fire("t")
        assert len(ids) == 1 and [c[0] for c in sub.calls] == ["here"]
        failed = tm.list_fires()[0].outcomes[0]
        assert failed.activation_id is None and failed.error is not None and "FunctionNotFound" in failed.error


async def test_fire_into_a_closed_engine_raises_so_feeds_keep_the_event() -> None:
    async def closed_engine_submit(name: str, args: dict[str, Any], /, *, cause: str | None) -> str:
        raise minifaas.EngineClosed("the engine is not running")

    async with anyio.create_task_group() as tg:
        tm = TriggerManager(closed_engine_submit, state_dir=None, task_group=tg)
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        with pytest.raises(minifaas.EngineClosed):
            await tm.fire("t")
        assert tm.list_fires() == []
        await tm.aclose()


async def test_invalid_entities_and_closed_manager() -> None:
    async with manager(Submissions()) as tm:
        tm.create_trigger("t")
        with pytest.raises(minifaas.TriggerError, match="already exists"):
            tm.create_trigger("t")
        for bad in ("", "a/b", "-x", "a b", "x" * 300):
            with pytest.raises(minifaas.TriggerError, match="invalid trigger name"):
                tm.create_trigger(bad)
        with pytest.raises(minifaas.TriggerError, match="rate_per_minute"):
            tm.create_trigger("r", rate_per_minute=0)
        with pytest.raises(minifaas.TriggerError, match="no trigger"):
            tm.create_rule("r", "nope", "f")
        with pytest.raises(minifaas.TriggerError, match="no rule"):
            tm.enable_rule("nope")
        with pytest.raises(minifaas.InvalidPayload):
            await tm.fire("t", ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(minifaas.InvalidPayload):
            await tm.fire("t", {"not json": object()})
        with pytest.raises(minifaas.TriggerError, match="unknown feed kind"):
            await tm.add_feed("t", "kafka")
        with pytest.raises(minifaas.TriggerError, match="unknown option"):
            await tm.add_feed("t", "folder", path="/tmp", recurse=True)
        with pytest.raises(minifaas.TriggerError, match="not a directory"):
            await tm.add_feed("t", "folder", path="/nonexistent/minifaas")
        with pytest.raises(minifaas.TriggerError, match="exactly one"):
            await tm.add_feed("t", "alarm", interval_s=1, cron="* * * * *")
        with pytest.raises(minifaas.TriggerError, match="interval_s"):
            await tm.add_feed("t", "alarm", interval_s=0)
        assert tm.list_feeds() == []
    with pytest.raises(minifaas.EngineClosed):
        await tm.fire("t")
    with pytest.raises(minifaas.EngineClosed):
        tm.create_trigger("u")


async def test_triggers_and_rules_persist(tmp_path: Path) -> None:
    async with manager(Submissions(), tmp_path) as tm:
        tm.create_trigger("t", params={"a": 1}, rate_per_minute=5, annotations={"feed": "folder"})
        tm.create_rule("on", "t", "f")
        tm.create_rule("off", "t", "g")
        tm.disable_rule("off")
    sub = Submissions()
    async with manager(sub, tmp_path) as tm:
        t = tm.get_trigger("t")
        assert (t.params, t.rate_per_minute, t.annotations) == ({"a": 1}, 5, {"feed": "folder"})
        assert [(r.name, r.enabled) for r in tm.list_rules()] == [("off", False), ("on", True)]
        assert len(await tm.fire("t")) == 1 and sub.calls[0][:2] == ("f", {"a": 1})


# ------------------------------------------------------------------------------------------- rate limit


async def test_rate_limit_default_60_per_minute_sliding_window() -> None:
    clock = FakeClock()
    async with manager(Submissions(), clock=clock) as tm:
        tm.create_trigger("t")
        tm.create_trigger("other", rate_per_minute=None)
        for _ in range(60):
            await tm.fire("t")
            clock.advance(0.5)  # 60 fires spread over 30 s
        with pytest.raises(minifaas.RateLimited, match=r"'t' exceeded its rate limit of 60 fires per minute"):
            await tm.fire("t")
        assert tm.retry_after_s("t") == pytest.approx(30.0)
        for _ in range(100):
            await tm.fire("other")  # unlimited, and limits are per trigger
        clock.advance(29.5)
        with pytest.raises(minifaas.RateLimited, match=r"retry in 0\.5 s"):
            await tm.fire("t")
        clock.advance(0.5)
        await tm.fire("t")  # the first fire of the window has expired, one slot is free again
        with pytest.raises(minifaas.RateLimited):
            await tm.fire("t")
        assert len(tm.list_fires("t", limit=1000)) == 61  # a refused fire leaves no record


async def test_rate_limit_is_configurable_per_trigger() -> None:
    clock = FakeClock()
    async with manager(Submissions(), clock=clock) as tm:
        tm.create_trigger("t", rate_per_minute=3)
        for _ in range(3):
            await tm.fire("t")
        with pytest.raises(minifaas.RateLimited, match="3 fires per minute") as info:
            await tm.fire("t")
        assert isinstance(info.value, minifaas.Overloaded)
        clock.advance(60)
        assert tm.retry_after_s("t") == 0.0
        await tm.fire("t")


async def test_rate_limited_folder_feed_delays_but_loses_nothing(tmp_path: Path) -> None:
    # 60x time: a minute of rate window passes in one real second, polls stay ~0.1 s apart in real time.
    clock = ScaledClock(60.0)
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        tm.create_trigger("t", rate_per_minute=5)
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=tmp_path, interval_s=POLL_S * 60)
        for i in range(12):
            drop(tmp_path, f"f{i:02d}.txt", b"x" * i)
        await wait_until(lambda: len(sub.calls) >= 12)
        await anyio.sleep(0.5)
        assert sorted(sub.names()) == [f"f{i:02d}.txt" for i in range(12)]
        starts = sorted(f.start for f in tm.list_fires("t"))
        # No 60 s window (of the scaled clock) holds more than 5 fires; small slack for timer jitter.
        assert all(b - a >= 59.0 for a, b in zip(starts, starts[5:], strict=False)), starts
        assert tm.list_feeds()[0].pending == 0


# ------------------------------------------------------------------------------------------------- cron


CRON_NEXT = [
    ("*/15 * * * *", "2024-03-10T10:07", "2024-03-10T10:15"),
    ("0 9 * * mon-fri", "2024-03-08T09:00", "2024-03-11T09:00"),  # Friday 09:00 -> Monday
    ("0,30 8-10 * * *", "2024-03-10T10:30", "2024-03-11T08:00"),
    ("5/20 * * * *", "2024-03-10T10:46", "2024-03-10T11:05"),
    ("0 0 29 2 *", "2024-03-01T00:00", "2028-02-29T00:00"),
    ("0 12 1 jan,jul *", "2024-03-01T00:00", "2024-07-01T12:00"),
    ("0 0 * * 7", "2024-03-10T00:00", "2024-03-17T00:00"),  # 7 is Sunday, like 0
    (
        "0 0 13 * 5",
        "2024-03-01T00:00",
        "2024-03-08T00:00",
    ),  # both restricted: 13th OR Friday (1 Mar is a Fri)
    (
        "0 0 */10 * 1",
        "2024-03-01T00:00",
        "2024-03-11T00:00",
    ),  # day field starts with *: 1/11/21/31 AND Monday
    ("@hourly", "2024-12-31T23:59", "2025-01-01T00:00"),
    ("30 2 * 12 *", "2024-12-31T03:00", "2025-12-01T02:30"),
]


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("expr", "after", "expected"), CRON_NEXT, ids=[c[0] for c in CRON_NEXT])
def test_cron_next_after(expr: str, after: str, expected: str) -> None:
    schedule = CronSchedule.parse(expr)
    due = schedule.next_after(_dt(after))
    assert due == _dt(expected)
    assert schedule.matches(due)


CRON_INVALID = [
    ("60 * * * *", "out of range"),
    ("* 24 * * *", "out of range"),
    ("* * 0 * *", "out of range"),
    ("* * * 13 *", "out of range"),
    ("* * * * 8", "out of range"),
    ("* * * *", "5 fields"),
    ("*/0 * * * *", "step"),
    ("5-1 * * * *", "backwards"),
    ("x * * * *", "not a number"),
    ("0 0 31 2 *", "never due"),
    ("0 0 30 feb *", "never due"),
]


@pytest.mark.parametrize(("expr", "error"), CRON_INVALID, ids=[c[0] for c in CRON_INVALID])
def test_cron_rejects(expr: str, error: str) -> None:
    with pytest.raises(minifaas.TriggerError, match=error):
        CronSchedule.parse(expr)


def test_cron_fields_expand() -> None:
    s = CronSchedule.parse("1-10/3,59 */6 1,15 jan-mar sun,wed")
    assert s.minutes == {1, 4, 7, 10, 59}
    assert s.hours == {0, 6, 12, 18}
    assert s.days == {1, 15} and s.months == {1, 2, 3} and s.weekdays == {0, 3}


# ------------------------------------------------------------------------------------------------ alarms


async def test_interval_alarm_with_fake_clock() -> None:
    clock = FakeClock()
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        tm.create_trigger("tick")
        tm.create_rule("r", "tick", "f")
        await tm.add_feed("tick", "alarm", interval_s=10, payload={"job": "sweep"})
        await advance(clock, 35)
        assert len(sub.calls) == 3
        assert all(args["job"] == "sweep" for _, args, _, _ in sub.calls)
        scheduled = [datetime.fromisoformat(args["scheduled"]).timestamp() for _, args, _, _ in sub.calls]
        start = clock.now() - 35
        assert scheduled == [start + 10, start + 20, start + 30]


async def test_cron_alarm_with_fake_clock() -> None:
    clock = FakeClock(datetime(2024, 3, 10, 10, 2, 30, tzinfo=UTC).timestamp())
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        tm.create_trigger("tick")
        tm.create_rule("r", "tick", "f")
        await tm.add_feed("tick", "alarm", cron="*/5 * * * *")
        await advance(clock, 15 * 60, step=30)
        assert [args["scheduled"] for _, args, _, _ in sub.calls] == [
            "2024-03-10T10:05:00+00:00",
            "2024-03-10T10:10:00+00:00",
            "2024-03-10T10:15:00+00:00",
        ]


async def test_rate_limited_alarm_fires_late_not_never() -> None:
    clock = FakeClock()
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        t0 = clock.now()
        tm.create_trigger("tick", rate_per_minute=2)
        tm.create_rule("r", "tick", "f")
        await tm.add_feed("tick", "alarm", interval_s=10)
        await advance(clock, 69)
        assert len(sub.calls) == 2  # ticks at 10 and 20 s; the 30 s tick waits for the window
        await advance(clock, 1)
        assert len(sub.calls) == 3
        late = sub.calls[2][1]["scheduled"]
        assert datetime.fromisoformat(late).timestamp() == t0 + 30  # the limited tick, fired at 70 s


# ----------------------------------------------------------------------------------------- folder feeds


def test_temporary_names() -> None:
    for name in (".hidden", "a.tmp", "a.TMP", "b.part", "c.crdownload", "d~"):
        assert is_temporary_name(name), name
    for name in ("photo.jpg", "tmp.txt", "a.partial", "x~y"):
        assert not is_temporary_name(name), name


async def test_folder_200_files_at_once_fire_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sub = Submissions()
    async with manager(sub, tmp_path / "state") as tm:
        tm.create_trigger("uploads", rate_per_minute=None)
        tm.create_rule("r", "uploads", "f")
        await tm.add_feed("uploads", "folder", path=folder, interval_s=POLL_S)
        blobs = {f"img{i:03d}.bin": os.urandom(100 + i) for i in range(200)}
        t0 = time.monotonic()
        for name, data in blobs.items():
            drop(folder, name, data)
        for name in (".hidden", "a.tmp", "b.part", "c.crdownload", "d~"):
            drop(folder, name, b"partial")
        await wait_until(lambda: len(sub.calls) >= 200)
        elapsed = time.monotonic() - t0
        await anyio.sleep(5 * POLL_S)  # a few more polls: nothing fires twice
        assert sorted(sub.names()) == sorted(blobs)
        for _, args, cause, _ in sub.calls:
            data = blobs[args["name"]]
            assert args["size"] == len(data)
            assert args["sha256"] == hashlib.sha256(data).hexdigest()
            assert args["path"] == str(folder / args["name"])
            assert args["mtime"] == pytest.approx(os.stat(args["path"]).st_mtime)
            assert cause is not None and tm.get_fire(cause).trigger == "uploads"
        assert elapsed < 10, elapsed
        assert tm.list_feeds()[0].fires == 200


async def test_folder_slow_writer_fires_once_when_complete(tmp_path: Path) -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=tmp_path, interval_s=0.3)
        chunks = [os.urandom(4096) for _ in range(20)]
        with open(tmp_path / "video.bin", "wb") as f:
            for chunk in chunks:  # ~1 s of writing, a chunk every 50 ms
                f.write(chunk)
                f.flush()
                await anyio.sleep(0.05)
        done = time.monotonic()
        assert sub.calls == []  # nothing fired while the file grew
        await wait_until(lambda: len(sub.calls) >= 1, 5)
        await anyio.sleep(0.6)
        assert len(sub.calls) == 1
        _, args, _, fired = sub.calls[0]
        data = b"".join(chunks)
        assert (args["size"], args["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert fired >= done


@pytest.mark.parametrize("events", [True, False], ids=["inotify", "polling"])
async def test_folder_renamed_in_file_fires_on_first_sight(tmp_path: Path, events: bool) -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=tmp_path, interval_s=0.5, events=events)
        tmp = drop(tmp_path, ".upload.jpg.part", b"jpeg bytes")
        await anyio.sleep(0.05)  # the rename lands on a later clock tick than the last write
        with open(tmp_path / "direct.jpg", "wb") as f:
            f.write(b"written in place")
            f.flush()
            os.replace(tmp, tmp_path / "upload.jpg")
            await wait_until(lambda: len(sub.calls) >= 1, 5)
            await anyio.sleep(0.6)
            assert sub.names() == ["upload.jpg"]  # the open file is not whole yet, on either path
        await wait_until(lambda: len(sub.calls) >= 2, 5)
    fired = {args["name"]: t for _, args, _, t in sub.calls}
    # Renamed in (ctime > mtime, or IN_MOVED_TO): whole on first sight. Written in place: once its writer
    # closed it (IN_CLOSE_WRITE), or else after the quiet period.
    assert fired["direct.jpg"] - fired["upload.jpg"] >= 0.5


async def test_folder_events_wake_the_feed_between_polls(tmp_path: Path) -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=tmp_path, interval_s=60.0)  # a poll a minute
        await anyio.sleep(0.2)
        drop(tmp_path, "closed.jpg", b"written and closed")
        tmp = drop(tmp_path, ".renamed.jpg.part", b"staged")
        os.replace(tmp, tmp_path / "renamed.jpg")
        await wait_until(lambda: len(sub.calls) >= 2, 10)  # long before the next poll
    assert sorted(sub.names()) == ["closed.jpg", "renamed.jpg"]


async def test_folder_restart_neither_refires_nor_misses(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    drop(folder, "before-feed.txt", b"old")  # present before the feed existed: not an arrival
    first = Submissions()
    async with manager(first, state) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        feed_id = await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S)
        for i in range(5):
            drop(folder, f"a{i}.txt", b"a" * i)
        await wait_until(lambda: len(first.calls) >= 5)
    assert sorted(first.names()) == [f"a{i}.txt" for i in range(5)]
    for i in range(5):  # arrive while nothing watches
        drop(folder, f"b{i}.txt", b"b" * i)
    a0 = os.stat(folder / "a0.txt")
    (folder / "a0.txt").unlink()
    drop(folder, "a1.txt", b"rewritten")  # a new version is a new event
    second = Submissions()
    async with manager(second, state) as tm:
        assert [f.feed_id for f in tm.list_feeds()] == [feed_id]  # resumed from the state dir
        assert await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S) == feed_id
        await wait_until(lambda: len(second.calls) >= 6)
        await anyio.sleep(5 * POLL_S)
        # Deleted while stopped, then back with the same size and mtime (a copy2 of it): a new arrival.
        drop(folder, "a0.txt", b"")
        os.utime(folder / "a0.txt", ns=(a0.st_atime_ns, a0.st_mtime_ns))
        await wait_until(lambda: len(second.calls) >= 7)
        await anyio.sleep(3 * POLL_S)
    assert sorted(second.names()) == ["a0.txt", "a1.txt"] + [f"b{i}.txt" for i in range(5)]


async def test_fire_existing_and_remove_feed(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    drop(folder, "old.txt", b"old")
    sub = Submissions()
    async with manager(sub, state) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        feed_id = await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S, fire_existing=True)
        await wait_until(lambda: len(sub.calls) >= 1)
        assert sub.names() == ["old.txt"]
        cursors = list((state / "triggers" / "cursors").iterdir())
        assert len({c.name.split(".")[0] for c in cursors}) == 1  # one feed: its snapshot and its log
        await tm.remove_feed(feed_id)
        assert tm.list_feeds() == [] and not any(c.exists() for c in cursors)
        drop(folder, "new.txt", b"new")
        await anyio.sleep(4 * POLL_S)
        assert sub.names() == ["old.txt"]
        await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S)
        tm.delete_trigger("t")  # stops its feed too
        drop(folder, "later.txt", b"later")
        await anyio.sleep(4 * POLL_S)
        assert sub.names() == ["old.txt"] and tm.list_feeds() == []
    async with manager(Submissions(), state) as tm:
        assert tm.list_triggers() == [] and tm.list_feeds() == []


async def test_folder_feed_survives_its_folder_vanishing(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        feed_id = await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S)
        folder.rmdir()
        await wait_until(lambda: tm.get_feed(feed_id).last_error is not None, 5)
        assert "FileNotFoundError" in str(tm.get_feed(feed_id).last_error)
        folder.mkdir()
        drop(folder, "after.txt", b"x")
        await wait_until(lambda: len(sub.calls) >= 1, 10)
        assert sub.names() == ["after.txt"] and tm.get_feed(feed_id).last_error is None


# ---------------------------------------------------------------------------------- fsspec (S3 on moto)


@pytest.fixture(scope="module")
def s3_endpoint() -> Any:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="inbox")
    yield endpoint, client
    server.stop()


async def test_fsspec_s3_feed_once_only_across_restart(s3_endpoint: Any, tmp_path: Path) -> None:
    endpoint, client = s3_endpoint
    options = {
        "url": "s3://inbox/photos/",
        "interval_s": 0.2,
        "storage_options": {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        },
    }

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket="inbox", Key=key, Body=body)

    first = Submissions()
    async with manager(first, tmp_path) as tm:
        tm.create_trigger("s3")
        tm.create_rule("r", "s3", "f")
        await tm.add_feed("s3", "fsspec", **options)
        await anyio.to_thread.run_sync(put, "photos/a.jpg", b"aaa")
        await anyio.to_thread.run_sync(put, "photos/day1/b.jpg", b"bbbb")
        await anyio.to_thread.run_sync(put, "photos/.c.jpg.part", b"partial")
        await anyio.to_thread.run_sync(put, "photos/.staging/f.jpg", b"staged")
        await anyio.to_thread.run_sync(put, "elsewhere/d.jpg", b"d")
        await wait_until(lambda: len(first.calls) >= 2)
        await anyio.sleep(0.6)
    assert sorted(first.names()) == ["a.jpg", "day1/b.jpg"]
    args = next(a for _, a, _, _ in first.calls if a["name"] == "a.jpg")
    assert args["path"] == "s3://inbox/photos/a.jpg"
    # the ETag names the version: no object is downloaded to hash it
    etag = client.head_object(Bucket="inbox", Key="photos/a.jpg")["ETag"]
    assert (args["size"], args["etag"]) == (3, etag) and "sha256" not in args
    assert args["idempotency_key"] and isinstance(args["mtime"], float)

    await anyio.to_thread.run_sync(put, "photos/e.jpg", b"eeeee")  # while stopped
    second = Submissions()
    async with manager(second, tmp_path) as tm:
        await wait_until(lambda: len(second.calls) >= 1)
        await anyio.sleep(0.6)
    assert second.names() == ["e.jpg"]


# -------------------------------------------------------------------------------- end to end, real Engine


async def test_file_drop_runs_function_through_real_engine(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    code = "def main(args):\n    return {'got': args['name'], 'sha': args['sha256'], 'size': args['size']}\n"
    async with minifaas.Engine(state_dir=tmp_path / "state") as engine:
        await engine.deploy("on_upload", code=code)
        async with anyio.create_task_group() as tg:
            tm = TriggerManager(engine.submit, state_dir=engine.state_dir, task_group=tg)
            try:
                tm.create_trigger("uploads")
                tm.create_rule("process", "uploads", "on_upload")
                await tm.add_feed("uploads", "folder", path=folder, interval_s=POLL_S)
                data = os.urandom(2048)
                drop(folder, "scan.png", data)
                await wait_until(lambda: bool(tm.list_fires("uploads")))
                record = tm.list_fires("uploads")[0]
                assert [o.error for o in record.outcomes] == [None]
                act = await engine.activations.wait(record.activation_ids[0], timeout_s=60)
            finally:
                await tm.aclose()
    assert act.status == "success", act.result
    assert act.result == {"got": "scan.png", "sha": hashlib.sha256(data).hexdigest(), "size": 2048}
    assert act.cause == record.activation_id


# ------------------------------------------------------------------------- delivery: neither lost nor twice

FAILURES: list[dict[str, Any]] = []


def record_failure(params: dict[str, Any]) -> dict[str, Any]:
    """A ``try_`` handler that files the photo as failed (what the catalog's write_failed does)."""
    FAILURES.append(params)
    return params


ECHO = "def main(args):\n    return {'got': args['name'], 'key': args['idempotency_key']}\n"
NAP = "import time\ndef main(args):\n    time.sleep(args.get('nap_s', 1.0))\n    return {'n': 1}\n"
INC = "def main(args):\n    return {'n': args.get('n', 0) + 1}\n"


async def test_failed_submit_is_not_handled_but_retried_with_backoff(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sub = Submissions(missing=("f",))
    async with manager(sub, tmp_path / "state") as tm:
        tm.create_trigger("t", rate_per_minute=None)
        tm.create_rule("r", "t", "f")
        feed_id = await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S, settle_s=0.2)
        drop(folder, "a.jpg", b"a")
        await wait_until(lambda: tm.get_feed(feed_id).last_error is not None)
        error = str(tm.get_feed(feed_id).last_error)
        assert "FunctionNotFound" in error and "a.jpg" in error and "r -> f" in error
        assert tm.get_feed(feed_id).pending == 1
        before = len(tm.list_fires("t"))
        await anyio.sleep(10 * POLL_S)
        # backoff: ten polls went by, the failing fire was not repeated at each
        assert len(tm.list_fires("t")) - before <= 3
        sub.missing = ()  # deployed at last
        await wait_until(lambda: len(sub.calls) == 1)
        await wait_until(lambda: tm.get_feed(feed_id).last_error is None)
        assert tm.get_feed(feed_id).pending == 0
        await anyio.sleep(5 * POLL_S)
        assert sub.names() == ["a.jpg"]
    again = Submissions()
    async with manager(again, tmp_path / "state") as tm:
        await anyio.sleep(5 * POLL_S)
    assert again.calls == []  # handled once it reached its rule, and only then


async def test_saved_feeds_wait_for_their_targets_or_start(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    async with manager(Submissions(), state) as tm:
        tm.create_trigger("t", rate_per_minute=None)
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S, settle_s=0.0)
    drop(folder, "while_down.jpg", b"x")
    deployed: set[str] = set()
    sub = Submissions()
    async with manager(sub, state, exists=deployed.__contains__) as tm:
        await anyio.sleep(5 * POLL_S)
        assert sub.calls == [] and tm.list_fires() == []  # "f" is not deployed: the feed has not started
        deployed.add("f")
        tm.targets_changed()
        await wait_until(lambda: len(sub.calls) == 1)
    drop(folder, "second.jpg", b"y")
    sub = Submissions()
    async with manager(sub, state, exists=lambda name: False) as tm:
        await anyio.sleep(3 * POLL_S)
        assert sub.calls == []
        tm.start()  # the application says so
        await wait_until(lambda: len(sub.calls) == 1)
    assert sub.names() == ["second.jpg"]


@pytest.mark.parametrize("events", [True, False], ids=["inotify", "polling"])
async def test_stalled_writer_fires_once_after_the_quiet_period(tmp_path: Path, events: bool) -> None:
    sub = Submissions()
    async with manager(sub) as tm:
        tm.create_trigger("t")
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=tmp_path, interval_s=POLL_S, events=events)  # default settle_s
        half = os.urandom(8192)
        with open(tmp_path / "photo.jpg", "wb") as f:
            f.write(half)
            f.flush()
            await anyio.sleep(1.2)  # the writer stalls (a slow upload, a network hiccup)
            f.write(half)
        await wait_until(lambda: len(sub.calls) >= 1, 10)
        await anyio.sleep(5 * POLL_S)
    assert len(sub.calls) == 1
    args = sub.calls[0][1]
    assert (args["size"], args["sha256"]) == (2 * len(half), hashlib.sha256(half + half).hexdigest())


def test_cursor_log_replays_after_a_torn_line_and_compacts(tmp_path: Path) -> None:
    from minifaas._events.feeds import CURSOR_COMPACT_LINES, Cursor

    path = tmp_path / "c.json"
    cur = Cursor(path)
    assert not cur.load()
    cur.save()
    cur.record("fired", "a", (1, "10"))
    cur.record("done", "a", (1, "10"))
    cur.record("fired", "b", (2, "20"))
    cur.record("fired", "c", (3, "30"))
    cur.record("gone", "c")
    cur.close()
    with open(path.with_suffix(".log"), "a") as f:
        f.write('{"op":"done","n":"b","k":[2,')  # a kill -9 in the middle of a line
    again = Cursor(path)
    assert again.load()
    assert again.handled == {"a": (1, "10")} and again.inflight == {"b": (2, "20")}
    for i in range(CURSOR_COMPACT_LINES + 5):
        again.record("done", f"f{i}", (i, str(i)))
    assert again.needs_compaction
    again.save()
    assert not path.with_suffix(".log").exists() or path.with_suffix(".log").stat().st_size == 0
    again.record("done", "b", (2, "20"))
    again.close()
    third = Cursor(path)
    third.load()
    assert third.inflight == {} and third.handled["b"] == (2, "20") and len(third.handled) == CURSOR_COMPACT_LINES + 7


async def test_restart_with_files_waiting_fires_them_once_the_targets_are_back(tmp_path: Path) -> None:
    from minifaas import composer as cmp

    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("f", code=ECHO)
        await engine.deploy_composition("wf", cmp.sequence("f"))
        tm = engine.triggers
        assert tm is not None
        tm.create_trigger("up")
        tm.create_rule("r", "up", "wf")
        await tm.add_feed("up", "folder", path=str(folder), interval_s=POLL_S, settle_s=0.2)
    drop(folder, "while_down.jpg", b"x" * 100)
    async with minifaas.Engine(state_dir=state) as engine:
        tm = engine.triggers
        assert tm is not None
        await anyio.sleep(1.0)  # the application is still deploying (pip, models, ...)
        assert tm.list_fires("up") == []
        await engine.deploy_composition("wf", cmp.sequence("f"))
        await anyio.sleep(0.5)
        assert tm.list_fires("up") == []  # the rule's target "wf" is back, but not the function it calls
        await engine.deploy("f", code=ECHO)
        await wait_until(lambda: bool(tm.list_fires("up")))
        record = tm.list_fires("up")[0]
        assert [o.error for o in record.outcomes] == [None]
        act = await engine.activations.wait(record.activation_ids[0], timeout_s=60)
        assert act.status == "success" and act.result["got"] == "while_down.jpg"
        await wait_until(lambda: tm.list_feeds()[0].pending == 0)
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("f", code=ECHO)
        await engine.deploy_composition("wf", cmp.sequence("f"))
        await anyio.sleep(1.0)
        assert engine.triggers is not None and engine.triggers.list_fires("up") == []


async def test_clean_close_mid_session_aborts_it_and_the_file_fires_again(tmp_path: Path) -> None:
    from minifaas import composer as cmp
    from minifaas._workflows.conductor import SESSION_ABORTED_MESSAGE
    from minifaas._workflows.sessions import SessionStore

    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    FAILURES.clear()
    comp = cmp.try_(cmp.sequence("nap", "inc"), cmp.function(record_failure))
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("nap", code=NAP)
        await engine.deploy("inc", code=INC)
        await engine.deploy_composition("wf", comp)
        tm = engine.triggers
        assert tm is not None
        tm.create_trigger("up")
        tm.create_rule("r", "up", "wf")
        await tm.add_feed("up", "folder", path=str(folder), interval_s=POLL_S, settle_s=0.1)
        drop(folder, "photo.jpg", b"x" * 100)
        await wait_until(lambda: bool(tm.list_fires("up")))
        record = tm.list_fires("up")[0]
        sid = record.activation_ids[0]
        key = record.args["idempotency_key"]
        await wait_until(lambda: len(engine.sessions.get(sid).steps) == 1)
        live = engine.sessions.get(sid)
        assert live.status == "running" and live.steps[0].name == "nap"  # the live record, mid-run
    assert FAILURES == []  # the close is no error of the photo's: the handler did not run
    with SessionStore(state / "sessions.sqlite3") as store:
        ended = store.get(sid)
    assert (ended.status, ended.result) == ("internal_error", {"error": SESSION_ABORTED_MESSAGE})
    # "inc" was refused by the closing engine: aborted, with no activation (no handler saw an error object)
    assert [(s.name, s.status, s.activation_id is None) for s in ended.steps] == [
        ("nap", "success", False),
        ("inc", "internal_error", True),
    ]
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("nap", code=NAP)
        await engine.deploy("inc", code=INC)
        await engine.deploy_composition("wf", comp)
        tm = engine.triggers
        assert tm is not None
        await wait_until(lambda: bool(tm.list_fires("up")))
        again = tm.list_fires("up")[0]
        assert again.args["idempotency_key"] == key  # the workflow can tell it is the same photo
        act = await engine.activations.wait(again.activation_ids[0], timeout_s=60)
        assert act.status == "success" and act.result == {"n": 2}
        await wait_until(lambda: tm.list_feeds()[0].pending == 0)
        first = await engine.activations.get(sid)
        assert first.status == "internal_error"
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("nap", code=NAP)
        await engine.deploy("inc", code=INC)
        await engine.deploy_composition("wf", comp)
        await anyio.sleep(1.0)
        assert engine.triggers is not None and engine.triggers.list_fires("up") == []
    assert FAILURES == []


DUP_CHILD = """
import os, sys, anyio
from pathlib import Path
from minifaas._events.triggers import TriggerManager

state, folder, log, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

async def submit(name, args, *, cause):
    with open(log, "a") as f:
        f.write(args["name"] + " " + args["idempotency_key"] + "\\n")
        f.flush()
        os.fsync(f.fileno())
    await anyio.sleep(0.02)  # the engine's submit, a little work
    return cause

async def main():
    async with anyio.create_task_group() as tg:
        tm = TriggerManager(submit, state_dir=state, task_group=tg)
        if mode == "setup":
            tm.create_trigger("t", rate_per_minute=None)
            tm.create_rule("r", "t", "wf")
            await tm.add_feed("t", "folder", path=folder, interval_s=0.2, settle_s=0.0)
            await tm.aclose()
            return
        await anyio.sleep(60)

anyio.run(main)
"""


def _log_lines(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.count(" ") == 1]  # type: ignore[misc]


def test_kill_9_mid_batch_fires_nothing_twice(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    child = tmp_path / "child.py"
    child.write_text(DUP_CHILD)
    logs = [tmp_path / "log1", tmp_path / "log2"]
    subprocess.run([sys.executable, str(child), str(state), str(folder), str(logs[0]), "setup"], check=True)
    for i in range(100):
        (folder / f"img{i:03}.jpg").write_bytes(os.urandom(1000))
    for log, until in ((logs[0], 40), (logs[1], 100)):
        proc = subprocess.Popen([sys.executable, str(child), str(state), str(folder), str(log), "run"])
        try:
            deadline = time.monotonic() + WAIT_S
            done = len({n for lg in logs for n, _ in _log_lines(lg)})
            while done < until and time.monotonic() < deadline:
                time.sleep(0.005)
                done = len({n for lg in logs for n, _ in _log_lines(lg)})
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    first, second = _log_lines(logs[0]), _log_lines(logs[1])
    names = {n for n, _ in first} | {n for n, _ in second}
    assert len(names) == 100  # none lost
    twice = {n for n, _ in first} & {n for n, _ in second}
    # At most the fire the kill cut between its submit and its cursor line, and that one with the same key.
    assert len(twice) <= 1, sorted(twice)
    assert {(n, k) for n, k in first if n in twice} == {(n, k) for n, k in second if n in twice}


KILL_CHILD = """
import sys, anyio
import minifaas
from minifaas import composer as cmp

NAP = "import time\\ndef main(args):\\n    time.sleep(60)\\n    return {}\\n"

async def main():
    async with minifaas.Engine(state_dir=sys.argv[1]) as engine:
        await engine.deploy("nap", code=NAP)
        await engine.deploy_composition("wf", cmp.sequence("nap"))
        tm = engine.triggers
        tm.create_trigger("up")
        tm.create_rule("r", "up", "wf")
        await tm.add_feed("up", "folder", path=sys.argv[2], interval_s=0.1, settle_s=0.0)
        with open(sys.argv[2] + "/photo.jpg", "wb") as f:
            f.write(b"p" * 100)
        while not tm.list_fires("up"):
            await anyio.sleep(0.01)
        sid = tm.list_fires("up")[0].activation_ids[0]
        while not engine.sessions.get(sid).steps:
            await anyio.sleep(0.01)
        print(sid, tm.list_fires("up")[0].args["idempotency_key"], flush=True)
        await anyio.sleep(120)

anyio.run(main)
"""


async def test_kill_9_mid_session_recovers_it_as_failed_and_fires_the_file_again(tmp_path: Path) -> None:
    import sys

    from minifaas import composer as cmp

    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    child = tmp_path / "child.py"
    child.write_text(KILL_CHILD)
    proc = await anyio.open_process([sys.executable, str(child), str(state), str(folder)])
    try:
        assert proc.stdout is not None
        with anyio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive()
    finally:
        proc.kill()  # SIGKILL: no clean close, no cursor save
        await proc.wait()
        await proc.aclose()
    sid, key = line.decode().split()
    async with minifaas.Engine(state_dir=state) as engine:
        session = engine.sessions.get(sid)
        assert session.status == "internal_error" and "stopped" in str(session.result["error"])
        await engine.deploy("nap", code=INC)  # fixed: no more 60 s naps
        await engine.deploy_composition("wf", cmp.sequence("nap"))
        tm = engine.triggers
        assert tm is not None
        await wait_until(lambda: bool(tm.list_fires("up")))
        record = tm.list_fires("up")[0]
        assert record.args["name"] == "photo.jpg" and record.args["idempotency_key"] == key
        act = await engine.activations.wait(record.activation_ids[0], timeout_s=60)
        assert act.status == "success"
        await wait_until(lambda: tm.list_feeds()[0].pending == 0)


# ------------------------------------------------------------------------------------------------ clocks


def _cron_instants(expr: str, tz: str, start: datetime, hours: float) -> list[str]:
    """Every due instant of ``expr`` in ``tz`` from ``start`` for ``hours``, as UTC HH:MM."""
    from minifaas._events.feeds import _timezone

    schedule, zone = CronSchedule.parse(expr), _timezone(tz)
    t, end, out = start.astimezone(zone), start.timestamp() + hours * 3600, []
    while (t := schedule.next_after(t)).timestamp() < end:
        out.append(t.astimezone(UTC).strftime("%H:%M"))
    return out


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        # Europe/Berlin falls back at 01:00 UTC: 02:00-02:59 local comes twice. "*" jobs run in both passes.
        (
            "*/10 * * * *",
            datetime(2025, 10, 25, 23, 0, tzinfo=UTC),
            [f"{h:02}:{m:02}" for h in (23, 0, 1, 2) for m in range(0, 60, 10)][1:],
        ),
        ("0 * * * *", datetime(2025, 10, 25, 23, 0, tzinfo=UTC), ["00:00", "01:00", "02:00"]),
        # a fixed-time job runs once in the repeated hour, in its first pass
        ("30 2 * * *", datetime(2025, 10, 25, 23, 0, tzinfo=UTC), ["00:30"]),
        # spring forward at 01:00 UTC: 02:00-02:59 local never happens; a fixed-time job runs right after the gap
        ("30 2 * * *", datetime(2025, 3, 29, 23, 0, tzinfo=UTC), ["01:00"]),
        ("15 * * * *", datetime(2025, 3, 29, 23, 0, tzinfo=UTC), ["23:15", "00:15", "01:15", "02:15"]),
    ],
    ids=[
        "every-10-min-fall-back",
        "hourly-fall-back",
        "fixed-fall-back",
        "fixed-spring-forward",
        "hourly-spring-forward",
    ],
)
def test_cron_across_dst_in_europe_berlin(expr: str, start: datetime, expected: list[str]) -> None:
    assert _cron_instants(expr, "Europe/Berlin", start, 4) == expected


async def test_interval_alarm_and_rate_window_ignore_wall_clock_steps() -> None:
    clock = SteppedClock()
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        tm.create_trigger("tick", rate_per_minute=None)
        tm.create_rule("r", "tick", "f")
        await tm.add_feed("tick", "alarm", interval_s=10)
        await advance(clock, 25)
        assert len(sub.calls) == 2
        clock.wall_offset_s = -3600.0  # NTP steps the wall clock back an hour
        await advance(clock, 20)
        assert len(sub.calls) == 4  # still every 10 s
        clock.wall_offset_s = 0.0
        tm.create_trigger("hook")  # 60 a minute
        for _ in range(60):
            await tm.fire("hook")
        clock.wall_offset_s = -3600.0
        assert 0 < tm.retry_after_s("hook") <= 60  # not 3660 s
        with pytest.raises(minifaas.RateLimited) as info:
            await tm.fire("hook")
        assert info.value.retry_after_s == pytest.approx(tm.retry_after_s("hook"))
        await advance(clock, 60, step=5)
        await tm.fire("hook")


async def test_cron_alarm_notices_a_forward_wall_clock_step_within_a_slice() -> None:
    from minifaas._events.feeds import CRON_SLICE_S

    clock = SteppedClock(datetime(2024, 3, 10, 10, 0, 30, tzinfo=UTC).timestamp())
    sub = Submissions()
    async with manager(sub, clock=clock) as tm:
        tm.create_trigger("tick")
        tm.create_rule("r", "tick", "f")
        await tm.add_feed("tick", "alarm", cron="0 * * * *")  # due at 11:00, 59.5 min away
        await advance(clock, 10)
        clock.wall_offset_s = 3600.0  # a suspended laptop wakes up an hour later
        await advance(clock, CRON_SLICE_S, step=CRON_SLICE_S / 6)
        assert [args["scheduled"] for _, args, _, _ in sub.calls] == ["2024-03-10T11:00:00+00:00"]


@pytest.mark.parametrize("events", [True, False], ids=["inotify", "polling"])
async def test_a_quiet_folder_is_not_listed_again_at_every_poll(
    tmp_path: Path, events: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minifaas._events.feeds import FolderSource

    listings: list[float] = []
    real_list = FolderSource.list

    def counted(self: FolderSource) -> Any:
        listings.append(time.monotonic())
        return real_list(self)

    monkeypatch.setattr(FolderSource, "list", counted)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(50):
        drop(folder, f"old{i}.jpg", b"x")
    await anyio.sleep(1.1)  # the folder's mtime is now old enough to be trusted
    sub = Submissions()
    async with manager(sub, tmp_path / "state") as tm:
        tm.create_trigger("t", rate_per_minute=None)
        tm.create_rule("r", "t", "f")
        await tm.add_feed("t", "folder", path=folder, interval_s=POLL_S, events=events)
        await anyio.sleep(20 * POLL_S)
        assert len(listings) <= 3  # the start, the first poll: not twenty
        tmp = drop(folder, ".new.jpg.part", b"new")
        await anyio.sleep(0.02)
        os.replace(tmp, folder / "new.jpg")
        await wait_until(lambda: sub.names() == ["new.jpg"])
