"""Feeds: event sources that fire a trigger by themselves.

Three kinds, polling at ``interval_s``; a folder feed on Linux also listens to inotify (``events=True``):

- ``folder``: a local folder, the stand-in for a storage bucket. A file fires once it is completely written:
  renamed in, or closed by its writer (inotify), or else unchanged for ``settle_s``. With inotify a poll
  looks only at the names events touched (a full listing every ``FULL_RESCAN_S`` as a safety net).
- ``fsspec``: any fsspec URL (``s3://bucket/prefix/``, ``gs://...``, ``file:///...``); objects fire once. On
  an object store the event carries the object's ``etag`` (no download); local files carry their ``sha256``.
- ``alarm``: an interval (``interval_s``), a 5-field cron expression (``cron``) or once, at a time (``at``).

Delivery rests on a cursor: for every file the feed keeps its ``(size, version)`` key (version = ``mtime_ns``
locally, the ETag or modification time remotely), as *in flight* from the moment its rules' targets were
submitted and as *handled* once the activations they started have ended. The cursor is a JSON snapshot plus an
append-only log under the state dir, one line per fire and per end, so a ``kill -9`` at any point loses at most
the line being written. A restart reloads it: a handled file does not fire again, a file that arrived meanwhile
does, and an in-flight one (its session never ended) fires again with the same ``idempotency_key`` (a hash of
its path and content) so that the workflow can tell a repeat from a new photo. A rule whose submit fails (its
target is not deployed yet, the engine is overloaded) leaves the file unhandled: the feed retries it with
backoff and shows the error as ``last_error``. A file whose key changes later (rewritten) fires again, like an
overwritten object in a bucket. Whole files only: a file renamed in (or closed after writing, where inotify
tells) fires on sight; otherwise once its key has not changed for ``settle_s`` (a writer that pauses shorter
than that is not cut in half).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from .._errors import EngineClosed, RateLimited, TriggerError
from .inotify import DirWatch

if TYPE_CHECKING:
    from .clock import Clock
    from .triggers import TriggerActivation

__all__ = (
    "FEED_KINDS",
    "AlarmFeed",
    "CronSchedule",
    "Feed",
    "FeedContext",
    "FeedInfo",
    "PollingFeed",
    "WaitFn",
    "idempotency_key",
    "is_temporary_name",
    "make_feed",
    "monotonic_of",
    "write_json_atomic",
)

FEED_KINDS = ("folder", "fsspec", "alarm")
FOLDER_POLL_INTERVAL_S = 0.5
FSSPEC_POLL_INTERVAL_S = 5.0
MIN_POLL_INTERVAL_S = 0.01
HASH_CHUNK_BYTES = 1 << 20
ERROR_BACKOFF_MAX_S = 30.0
MIN_RETRY_S = 0.05
CRON_SEARCH_YEARS = 30
#: a cron alarm re-reads the wall clock at least this often (a suspend, an NTP step)
CRON_SLICE_S = 30.0
#: a one-shot alarm (``at``) found this much past its time when it starts (a restart much later) does not fire
ONCE_LATE_S = 60.0
#: daylight-saving shifts are smaller than this (the search for a zone's instants looks this far around)
MAX_DST_SHIFT = timedelta(hours=3)
CURSOR_VERSION = 2
#: how long a file written in place must stay unchanged before it fires (a renamed-in file fires on sight)
FOLDER_SETTLE_S = 2.0
#: with inotify, or polling a folder whose mtime did not change, a full listing this often anyway
FULL_RESCAN_S = 60.0
#: a folder mtime this much older than the listing that read it cannot hide a change in the same clock tick
DIR_MTIME_QUIET_NS = 1_000_000_000
#: the cursor log is folded into the snapshot once it has more lines than this and than the snapshot has entries
CURSOR_COMPACT_LINES = 1000
#: cursor snapshot entries encoded per call (the encoder holds the GIL while it runs)
SNAPSHOT_CHUNK_ENTRIES = 500
TEMP_PREFIXES = (".",)
TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", "~")

logger = logging.getLogger("minifaas.feeds")

#: ``(trigger, payload, rules or None for all) -> the fire's record``
FireFn = Callable[[str, dict[str, Any], "frozenset[str] | None"], Awaitable["TriggerActivation"]]
RetryAfterFn = Callable[[str], float]
#: ``activation id -> True once it ended, False if the engine closed under it (the event is not done)``
WaitFn = Callable[[str], Awaitable[bool]]
Key = tuple[int, str]


def monotonic_of(clock: Clock) -> Callable[[], float]:
    """The clock's monotonic time (``time.monotonic`` for a clock without one, which sleeps in real time)."""
    mono = getattr(clock, "monotonic", None)
    return mono if callable(mono) else time.monotonic


def is_temporary_name(name: str) -> bool:
    """True for names that writers use while a file is incomplete (hidden, .tmp, .part, .crdownload, ~)."""
    lower = name.lower()
    return lower.startswith(TEMP_PREFIXES) or lower.endswith(TEMP_SUFFIXES)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON so that a reader (or a crash) sees either the old file or the new one, whole."""
    _write_chunks_atomic(path, [json.dumps(obj, separators=(",", ":"), sort_keys=True)])


def _write_chunks_atomic(path: Path, chunks: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------------- cron


_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("weekday", 0, 7),
)
_MONTH_NAMES = {
    m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))
}
_DAY_NAMES = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _cron_value(text: str, field: str, lo: int, hi: int, names: Mapping[str, int]) -> int:
    value = names.get(text.lower())
    if value is None:
        if not text.isdigit():
            raise TriggerError(f"cron {field}: {text!r} is not a number")
        value = int(text)
    if not lo <= value <= hi:
        raise TriggerError(f"cron {field}: {value} is out of range {lo}-{hi}")
    return value


def _cron_field(text: str, field: str, lo: int, hi: int, names: Mapping[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise TriggerError(f"cron {field}: step {step_text!r} must be a positive integer")
            step = int(step_text)
        if base == "*":
            start, stop = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            start, stop = _cron_value(a, field, lo, hi, names), _cron_value(b, field, lo, hi, names)
            if start > stop:
                raise TriggerError(f"cron {field}: range {base!r} runs backwards")
        else:
            start = _cron_value(base, field, lo, hi, names)
            # "5/15" means "from 5 to the end, every 15" (Vixie cron); a bare "5" is just 5.
            stop = hi if slash else start
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed 5-field cron expression (minute hour day-of-month month weekday), Vixie cron semantics.

    Fields take ``*``, numbers, ``a-b`` ranges, ``,`` lists and ``/n`` steps; months and weekdays also take
    names (``jan``, ``mon``); weekday 0 and 7 are Sunday. As in Vixie cron, when both day fields are
    restricted (neither starts with ``*``) a day matches if either matches; otherwise both must.
    """

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    day_star: bool
    weekday_star: bool
    #: the minute or hour field starts with ``*`` (Vixie's wildcard job, which DST changes treat differently)
    wildcard: bool = False

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse ``expression`` (or a macro like ``@hourly``); raise TriggerError if invalid or never due."""
        text = _CRON_MACROS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise TriggerError(
                f"cron expression {expression!r} must have 5 fields (minute hour day month weekday), not {len(parts)}"
            )
        names: list[Mapping[str, int]] = [{}, {}, {}, _MONTH_NAMES, _DAY_NAMES]
        fields = [
            _cron_field(part, field, lo, hi, nm)
            for part, (field, lo, hi), nm in zip(parts, _CRON_FIELDS, names, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in fields[4])
        schedule = cls(
            expression=expression,
            minutes=fields[0],
            hours=fields[1],
            days=fields[2],
            months=fields[3],
            weekdays=weekdays,
            day_star=parts[2].startswith("*"),
            weekday_star=parts[4].startswith("*"),
            wildcard=parts[0].startswith("*") or parts[1].startswith("*"),
        )
        # Catches "0 0 31 2 *" and the like at parse time rather than in a feed task years later.
        schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))
        return schedule

    def _day_matches(self, dt: datetime) -> bool:
        day_ok = dt.day in self.days
        weekday_ok = dt.isoweekday() % 7 in self.weekdays
        if self.day_star or self.weekday_star:
            return day_ok and weekday_ok
        return day_ok or weekday_ok

    def matches(self, dt: datetime) -> bool:
        """True if the minute holding ``dt`` is due."""
        return dt.minute in self.minutes and dt.hour in self.hours and dt.month in self.months and self._day_matches(dt)

    def next_after(self, dt: datetime) -> datetime:
        """The first due instant strictly after ``dt``, in ``dt``'s time zone.

        Across daylight-saving changes (a ``ZoneInfo`` zone), as Vixie cron: in the hour repeated when DST
        ends, a job whose minute or hour field is ``*`` runs in both passes, a fixed-time job once; a time
        skipped when DST starts runs right after the gap for a fixed-time job, not at all for a ``*`` one.
        """
        tz = dt.tzinfo
        if tz is None or tz is UTC or not hasattr(tz, "key"):  # UTC or a fixed offset: wall time is linear
            return self._next_wall(dt)
        after = dt.timestamp()
        wall = dt.astimezone(tz).replace(tzinfo=None) - MAX_DST_SHIFT
        best: tuple[float, datetime] | None = None
        while True:
            wall = self._next_wall(wall)
            if best is not None and wall > best[1] + MAX_DST_SHIFT:
                return datetime.fromtimestamp(best[0], tz)
            for instant in self._instants(wall, tz):
                if instant > after and (best is None or instant < best[0]):
                    best = (instant, wall)

    def _instants(self, wall: datetime, tz: tzinfo) -> list[float]:
        """The instants at which the zone's clocks show ``wall`` and the job should run."""
        first, second = wall.replace(tzinfo=tz, fold=0).timestamp(), wall.replace(tzinfo=tz, fold=1).timestamp()
        if first == second:
            return [first]

        def shows(t: float) -> bool:
            return datetime.fromtimestamp(t, tz).replace(tzinfo=None) == wall

        if shows(first) and shows(second):  # the repeated hour
            return sorted((first, second)) if self.wildcard else [min(first, second)]
        if self.wildcard:
            return []  # skipped by the clocks: a "*" job has other minutes to run at
        # skipped: run at the first instant after the gap (clocks change on a whole minute)
        lo, hi = min(first, second), max(first, second)
        offset = datetime.fromtimestamp(lo, tz).utcoffset()
        t = lo - lo % 60
        while t < hi and datetime.fromtimestamp(t, tz).utcoffset() == offset:
            t += 60
        return [t]

    def _next_wall(self, dt: datetime) -> datetime:
        """The first due minute strictly after ``dt`` in wall-clock arithmetic (no DST)."""
        t = dt.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit_year = t.year + CRON_SEARCH_YEARS
        while t.year <= limit_year:
            if t.month not in self.months:
                t = t.replace(day=1, hour=0, minute=0)
                t = t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        raise TriggerError(f"cron expression {self.expression!r} is never due")


# -------------------------------------------------------------------------------------------- feed base


@dataclass(frozen=True)
class FeedContext:
    """What a feed needs from its trigger manager."""

    fire: FireFn
    retry_after_s: RetryAfterFn
    clock: Clock
    #: None: an event is done once submitted (nothing to wait for)
    wait: WaitFn | None = None


@dataclass(frozen=True)
class FeedInfo:
    """A feed's identity and health, as listed by ``TriggerManager.list_feeds``."""

    feed_id: str
    trigger: str
    kind: str
    options: dict[str, Any]
    fires: int
    pending: int
    last_error: str | None


class Feed:
    """A feed task: ``run`` in the owner's task group, ``cancel``/``stop`` to end it.

    ``stop_polling`` ends the search for new events but lets the feed keep waiting for the activations it
    started (an engine drains them before it closes); ``cancel``/``stop`` end both.
    """

    kind = ""

    def __init__(self, trigger: str, options: dict[str, Any], ctx: FeedContext) -> None:
        self.trigger = trigger
        self.options = options
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
        self.feed_id = f"{trigger}/{self.kind}/{digest}"
        self.fires = 0
        self.last_error: str | None = None
        self._ctx = ctx
        self._scope = anyio.CancelScope()
        self._outer = anyio.CancelScope()
        self._tg: anyio.abc.TaskGroup | None = None
        self._done = anyio.Event()
        self._started = False
        #: handed to a task group (its owner sets this; ``run`` may not have begun yet)
        self.scheduled = False
        self._removed = False

    @property
    def started(self) -> bool:
        """Running, or handed to a task group to run."""
        return self._started or self.scheduled

    def info(self) -> FeedInfo:
        return FeedInfo(self.feed_id, self.trigger, self.kind, dict(self.options), self.fires, 0, self.last_error)

    async def prime(self) -> None:
        """Check the source and take its first look; raise TriggerError if it is unusable."""

    async def run(self) -> None:
        self._started = True
        try:
            with self._outer:
                # owns the tasks waiting for the ends of the activations this feed started
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    with self._scope:
                        await self._run()
        finally:
            self._release()
            self._done.set()

    def _release(self) -> None:
        """Close what the feed holds open, once it and its waiters have ended."""

    async def _run(self) -> None:
        raise NotImplementedError

    def stop_polling(self) -> None:
        """Look for no more events; keep waiting for the ends of the activations already started."""
        self._scope.cancel()

    def cancel(self, *, removed: bool = False) -> None:
        """Stop at the next checkpoint; ``removed`` also stops every later write of the feed's state."""
        self._removed = self._removed or removed
        self._scope.cancel()
        self._outer.cancel()

    def forget(self) -> None:
        """Delete the feed's persisted state (after ``cancel(removed=True)``)."""

    async def stop(self, *, removed: bool = False) -> None:
        self.cancel(removed=removed)
        if self._started:
            await self._done.wait()

    async def _fire_retrying(self, payload: dict[str, Any]) -> None:
        """Fire, waiting out the trigger's rate limit: a limited event is late, not lost."""
        while True:
            try:
                record = await self._ctx.fire(self.trigger, payload, None)
            except RateLimited:
                await self._ctx.clock.sleep(max(self._ctx.retry_after_s(self.trigger), MIN_RETRY_S))
            else:
                self.fires += 1
                failed = [o for o in record.outcomes if o.error is not None]
                if failed:
                    self.last_error = f"rule {failed[0].rule} -> {failed[0].action}: {failed[0].error}"
                return

    def _note_error(self, exc: BaseException | str, what: str) -> None:
        message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        if message != self.last_error:
            logger.warning("feed %s: %s failed: %s", self.feed_id, what, message)
        self.last_error = message


# ------------------------------------------------------------------------------------- polling sources


@dataclass(frozen=True)
class Entry:
    """One listed file: its once-only key, modification time, and whether it is known to be whole."""

    key: Key
    mtime: float | None
    complete_on_sight: bool


class Source(Protocol):
    def check(self) -> None: ...
    def list(self) -> dict[str, Entry]: ...
    def payload(self, name: str, entry: Entry) -> dict[str, Any] | None: ...


class FolderSource:
    """Regular files directly in one local folder (not recursive)."""

    def __init__(self, path: Path, pattern: str) -> None:
        self.path = path
        self.pattern = pattern

    def check(self) -> None:
        if not self.path.is_dir():
            raise TriggerError(f"folder feed: {self.path} is not a directory")

    def _entry(self, st: os.stat_result) -> Entry:
        # A write sets mtime and ctime together; a later rename (or copy2's copystat) moves ctime
        # only. So ctime > mtime means the last data write is over: renamed or copied in whole.
        # (Renamed within one clock tick, both stay equal: then the quiet period applies.)
        return Entry(
            key=(st.st_size, str(st.st_mtime_ns)),
            mtime=st.st_mtime,
            complete_on_sight=st.st_ctime_ns > st.st_mtime_ns,
        )

    def wanted(self, name: str) -> bool:
        return not is_temporary_name(name) and fnmatch.fnmatchcase(name, self.pattern)

    def list(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        with os.scandir(self.path) as it:
            for de in it:
                if not self.wanted(de.name):
                    continue
                try:
                    if not de.is_file(follow_symlinks=False):
                        continue
                    out[de.name] = self._entry(de.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue
        return out

    def stat_names(self, names: Iterable[str]) -> dict[str, Entry]:
        """The entries of just ``names`` (those that exist and are wanted regular files)."""
        out: dict[str, Entry] = {}
        for name in names:
            if not self.wanted(name):
                continue
            try:
                st = os.stat(self.path / name, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                out[name] = self._entry(st)
        return out

    def payload(self, name: str, entry: Entry) -> dict[str, Any] | None:
        full = self.path / name
        digest = hashlib.sha256()
        try:
            with open(full, "rb") as f:
                while chunk := f.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
            st = os.stat(full)
        except FileNotFoundError:
            return None
        if (st.st_size, str(st.st_mtime_ns)) != entry.key:
            return None  # written to while hashing: not complete after all
        return {
            "path": str(full),
            "name": name,
            "size": st.st_size,
            "mtime": st.st_mtime,
            "sha256": digest.hexdigest(),
        }


def _info_mtime(info: Mapping[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


def _info_key(info: Mapping[str, Any]) -> Key:
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return (int(info.get("size") or 0), str(version))


class FsspecSource:
    """Files under an fsspec URL; on object stores an object is whole as soon as it is listed."""

    def __init__(
        self, url: str, pattern: str, recursive: bool, storage_options: dict[str, Any], atomic: bool | None
    ) -> None:
        import fsspec.core  # lazy: fsspec pulls in a lot, and only this feed needs it

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise TriggerError(f"fsspec feed: cannot open {url!r}: {exc}") from exc
        self.url = url
        self.pattern = pattern
        self.recursive = recursive
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.atomic = (not self.local) if atomic is None else atomic

    def check(self) -> None:
        if self.local:
            if not self.fs.isdir(self.root):
                raise TriggerError(f"fsspec feed: {self.url} is not a directory")
            return
        try:
            self.list()
        except FileNotFoundError as exc:
            raise TriggerError(f"fsspec feed: {self.url}: {exc}") from exc

    def list(self) -> dict[str, Entry]:
        self.fs.invalidate_cache()  # s3fs and friends cache listings; a feed must see new objects
        infos = self.fs.find(self.root, detail=True, withdirs=False, maxdepth=None if self.recursive else 1)
        out: dict[str, Entry] = {}
        prefix = self.root.rstrip("/") + "/"
        for path, info in infos.items():
            if info.get("type") != "file":
                continue
            name = path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]
            base = name.rsplit("/", 1)[-1]
            # A hidden or temporary "folder" (a staging prefix) hides what is under it too.
            temporary = any(is_temporary_name(part) for part in name.split("/"))
            if temporary or not fnmatch.fnmatchcase(base, self.pattern):
                continue
            out[name] = Entry(key=_info_key(info), mtime=_info_mtime(info), complete_on_sight=self.atomic)
        return out

    def payload(self, name: str, entry: Entry) -> dict[str, Any] | None:
        path = self.root.rstrip("/") + "/" + name
        if not self.local:
            # An object store names each version by its ETag: a HEAD says the object is still that version,
            # with no download (the event carries the ETag; a workflow that wants a hash computes it).
            try:
                self.fs.invalidate_cache(path)
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            etag = info.get("ETag") or info.get("etag")
            if etag:
                if _info_key(info) != entry.key:
                    return None  # replaced since the listing; the new version fires on a later poll
                return {
                    "path": self.fs.unstrip_protocol(path),
                    "name": name,
                    "size": entry.key[0],
                    "mtime": entry.mtime,
                    "etag": str(etag),
                }
        digest = hashlib.sha256()
        try:
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if _info_key(info) != entry.key:
            return None  # replaced while hashing; the new version fires on a later poll
        return {
            "path": self.fs.unstrip_protocol(path),
            "name": name,
            "size": entry.key[0],
            "mtime": entry.mtime,
            "sha256": digest.hexdigest(),
        }


class Cursor:
    """A polling feed's ``name -> key`` maps of handled and in-flight files, persisted (or kept in memory).

    On disk: a JSON snapshot (``<id>.json``) and an append-only log beside it (``<id>.log``, one JSON line per
    change). A change costs one short ``write`` (no fsync: a killed process loses nothing the kernel has; a
    power cut may lose the last lines, and those files then fire again with the same idempotency key). The log
    is folded into the snapshot when it grows past the snapshot's size: renamed to ``.log.old`` first, so that
    whatever a crash interrupts, snapshot + old log + log replays to the same maps (each line sets a value).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handled: dict[str, Key] = {}
        self.inflight: dict[str, Key] = {}
        self._log: Any = None
        self._lines = 0
        self._lock = threading.Lock()

    @property
    def _log_path(self) -> Path:
        assert self.path is not None
        return self.path.with_suffix(".log")

    @property
    def _old_log_path(self) -> Path:
        assert self.path is not None
        return self.path.with_suffix(".log.old")

    def load(self) -> bool:
        """Load the saved cursor; False if there is none (the feed never ran)."""
        if self.path is None:
            return False
        found = False
        if self.path.exists():
            found = True
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.handled = {name: (int(k[0]), str(k[1])) for name, k in data["handled"].items()}
                self.inflight = {name: (int(k[0]), str(k[1])) for name, k in data.get("inflight", {}).items()}
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise TriggerError(f"feed cursor {self.path} is unreadable: {exc}") from exc
        for log in (self._old_log_path, self._log_path):
            if log.exists():
                found = True
                self._replay(log)
        return found

    def _replay(self, log: Path) -> None:
        with open(log, encoding="utf-8") as f:
            for line in f:
                try:
                    op = json.loads(line)
                    self._apply(op["op"], op["n"], None if op.get("k") is None else (int(op["k"][0]), str(op["k"][1])))
                except (ValueError, KeyError, TypeError, IndexError):
                    # only the last line can be torn (a kill mid-write); its change never happened
                    continue
                self._lines += 1

    def _apply(self, op: str, name: str, key: Key | None) -> None:
        if op == "fired" and key is not None:
            self.inflight[name] = key
        elif op == "done" and key is not None:
            self.handled[name] = key
            if self.inflight.get(name) == key:
                del self.inflight[name]
        elif op == "gone":
            self.handled.pop(name, None)
            self.inflight.pop(name, None)

    def record(self, op: str, name: str, key: Key | None = None) -> None:
        """Apply a change (``fired``, ``done`` or ``gone``) and append it to the log."""
        with self._lock:
            self._apply(op, name, key)
            if self.path is None:
                return
            if self._log is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open, closed in close()
            line = {"op": op, "n": name} if key is None else {"op": op, "n": name, "k": list(key)}
            self._log.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._log.flush()
            self._lines += 1

    @property
    def needs_compaction(self) -> bool:
        return self.path is not None and self._lines > max(CURSOR_COMPACT_LINES, len(self.handled) + len(self.inflight))

    def save(self) -> None:
        """Write the snapshot and start an empty log (blocking: call it from a worker thread when large)."""
        if self.path is None:
            return
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._log_path.exists():
                os.replace(self._log_path, self._old_log_path)
            handled, inflight = dict(self.handled), dict(self.inflight)  # copies: the loop keeps recording
            self._lines = 0
        _write_chunks_atomic(self.path, _snapshot_chunks(handled, inflight))
        self._old_log_path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def delete(self) -> None:
        self.close()
        if self.path is not None:
            for p in (self.path, self._log_path, self._old_log_path):
                p.unlink(missing_ok=True)


def _snapshot_chunks(handled: dict[str, Key], inflight: dict[str, Key]) -> Iterator[str]:
    """The cursor snapshot's JSON text in pieces: one C-encoded call for 50k entries would hold the GIL (and
    so stall the event loop) for the whole encoding."""
    yield f'{{"version":{CURSOR_VERSION}'
    for field, entries in (("handled", handled), ("inflight", inflight)):
        yield f',"{field}":{{'
        items = list(entries.items())
        for i in range(0, len(items), SNAPSHOT_CHUNK_ENTRIES):
            part = json.dumps({n: list(k) for n, k in items[i : i + SNAPSHOT_CHUNK_ENTRIES]}, separators=(",", ":"))
            yield ("," if i else "") + part[1:-1]
        yield "}"
    yield "}"


def idempotency_key(path: str, digest: str | None, key: Key) -> str:
    """The same for every fire of one version of one file: its path and content hash (or version key)."""
    content = digest if digest else f"{key[0]}:{key[1]}"
    return hashlib.sha256(f"{path}\0{content}".encode()).hexdigest()[:32]


@dataclass
class _Retry:
    """A file whose fire did not reach every rule: which rules are left, and when to try again."""

    key: Key
    rules: frozenset[str] | None
    ids: list[str]
    attempts: int
    next_at: float


class PollingFeed(Feed):
    """Polls a source; fires each new file once complete (renamed in, or unchanged for ``settle_s``)."""

    def __init__(
        self,
        kind: str,
        trigger: str,
        options: dict[str, Any],
        ctx: FeedContext,
        *,
        source: Source,
        interval_s: float,
        fire_existing: bool,
        cursor_dir: Path | None,
        settle_s: float = 0.0,
        events: bool = False,
    ) -> None:
        self.kind = kind
        super().__init__(trigger, options, ctx)
        self.source = source
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.events = events
        self.fire_existing = fire_existing
        name = hashlib.sha256(self.feed_id.encode()).hexdigest()[:24] + ".json"
        self.cursor = Cursor(None if cursor_dir is None else cursor_dir / name)
        self._primed = False
        #: name -> (key, monotonic time it was first seen with that key)
        self._seen: dict[str, tuple[Key, float]] = {}
        #: files fired by this run whose activations have not all ended yet
        self._active: dict[str, Key] = {}
        self._retry: dict[str, _Retry] = {}
        self._pending = 0
        #: inotify on a local folder (None: poll only); with it, a poll lists only the names events touched
        self._watch: DirWatch | None = None
        self._listing: dict[str, Entry] = {}
        self._last_full = -math.inf
        #: listed names not handled yet (still settling, retrying or in flight): looked at on every poll
        self._unsettled: set[str] = set()
        #: polling a folder: its mtime at the last full listing, and whether it was old enough to trust
        self._dir_mtime: int | None = None
        self._dir_quiet = False

    def info(self) -> FeedInfo:
        return FeedInfo(
            self.feed_id,
            self.trigger,
            self.kind,
            dict(self.options),
            self.fires,
            self._pending,
            self.last_error,
        )

    def _open_watch(self) -> None:
        if self.events and isinstance(self.source, FolderSource) and self._watch is None:
            self._watch = DirWatch.open(self.source.path)  # before listing: no event falls in between

    async def prime(self) -> None:
        await anyio.to_thread.run_sync(self.source.check)
        existed = await anyio.to_thread.run_sync(self.cursor.load)
        self._open_watch()
        listing = await anyio.to_thread.run_sync(self.source.list)
        # the first poll lists in full: files deleted while the feed was stopped leave the cursor there
        self._listing, self._last_full = listing, -math.inf
        if not existed:
            if not self.fire_existing:
                self.cursor.handled = await anyio.to_thread.run_sync(lambda: {n: e.key for n, e in listing.items()})
            # Saved even when empty: on restart, a cursor file means "files not in it are new".
            if not self._removed:
                await anyio.to_thread.run_sync(self.cursor.save)
        elif self.cursor.needs_compaction and not self._removed:
            await anyio.to_thread.run_sync(self.cursor.save)
        # handled files need no settling record: one rewritten later is seen afresh then
        self._seen = {}
        self._primed = True

    async def _run(self) -> None:
        failures = 0
        while True:
            wait = self.interval_s
            try:
                if self._primed:
                    wait = await self._poll()
                else:
                    await self.prime()
                failures = 0
            except Exception as exc:  # a feed outlives a flaky source: log, back off, try again
                failures += 1
                wait = min(self.interval_s * 2**failures, ERROR_BACKOFF_MAX_S)
                self._note_error(exc, "poll")
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        """The poll interval, cut short by a folder event."""
        watch = self._watch
        if watch is None or watch.lost:
            await self._ctx.clock.sleep(seconds)
            return
        async with anyio.create_task_group() as tg:

            async def sleep() -> None:
                await self._ctx.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            async def event() -> None:
                await watch.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(sleep)
            tg.start_soon(event)
        watch.read()

    async def _list(self) -> tuple[dict[str, Entry], set[str] | None]:
        """This poll's view of the source and the names that may have changed (None: all of them).

        Without inotify, or after a lost event, or every FULL_RESCAN_S: a full listing. Otherwise the last
        listing updated with a stat of the names events touched and of those still settling.
        """
        watch = self._watch
        now = time.monotonic()
        if watch is not None and watch.lost:
            watch.close()
            self._watch = watch = None
        if watch is None:
            self._open_watch()
        elif not watch.overflow and now - self._last_full < FULL_RESCAN_S:
            watch.read()
            names = watch.touched | self._unsettled
            watch.touched = set()
            if names:
                assert isinstance(self.source, FolderSource)
                fresh = await anyio.to_thread.run_sync(self.source.stat_names, names)
                for name in names:
                    if name in fresh:
                        self._listing[name] = fresh[name]
                    else:
                        self._listing.pop(name, None)
            return self._listing, names
        dir_mtime: int | None = None
        if self._watch is not None:
            self._watch.read()
            self._watch.touched, self._watch.overflow = set(), False
        elif isinstance(self.source, FolderSource):
            # Polling a folder: a file created, renamed or deleted changes the folder's mtime. If it has not
            # changed since a listing that began well after it (a change within the same clock tick would
            # hide), and nothing is settling or retrying, the listing still holds. A handled file rewritten in
            # place shows at the next full listing (FULL_RESCAN_S).
            with contextlib.suppress(OSError):
                dir_mtime = os.stat(self.source.path).st_mtime_ns
            if (
                dir_mtime is not None
                and dir_mtime == self._dir_mtime
                and self._dir_quiet
                and not self._unsettled
                and not self._retry
                and now - self._last_full < FULL_RESCAN_S
            ):
                return self._listing, set()
        self._listing = await anyio.to_thread.run_sync(self.source.list)
        self._last_full = now
        self._dir_mtime = dir_mtime
        self._dir_quiet = dir_mtime is not None and time.time_ns() - dir_mtime > DIR_MTIME_QUIET_NS
        return self._listing, None

    def _release(self) -> None:
        self.cursor.close()
        if self._watch is not None:
            self._watch.close()

    def _settled(self, name: str, entry: Entry, now: float) -> bool:
        """Whole: renamed in, or unchanged since the last poll and quiet for ``settle_s``."""
        seen = self._seen.get(name)
        if seen is None or seen[0] != entry.key:
            self._seen[name] = (entry.key, now)
            return entry.complete_on_sight or (self._watch is not None and name in self._watch.whole)
        if entry.complete_on_sight or (self._watch is not None and name in self._watch.whole):
            return True  # renamed in, or closed by its writer (and not written since)
        quiet = now - seen[1]
        if entry.mtime is not None:
            quiet = max(quiet, time.time() - entry.mtime)
        return quiet >= self.settle_s

    async def _poll(self) -> float:
        listing, changed = await self._list()
        cursor = self.cursor
        now = time.monotonic()
        names: Iterable[str]
        if changed is None:  # a full listing: compare it all, in a worker thread (50k names take a while)
            handled, inflight, seen_before = dict(cursor.handled), set(cursor.inflight), set(self._seen)

            def compare() -> tuple[list[str], set[str], set[str]]:
                new = [n for n, e in listing.items() if handled.get(n) != e.key]
                return new, handled.keys() | inflight, seen_before

            names, known, seen = await anyio.to_thread.run_sync(compare)
        else:  # events: only the names they touched and those still settling matter
            names = changed
            known = {n for n in changed if n in cursor.handled or n in cursor.inflight}
            seen = {n for n in changed if n in self._seen}
        for gone in known.difference(listing):
            if gone not in self._active:
                cursor.record("gone", gone)  # so a later file of the same name is new
        for gone in seen.difference(listing):
            del self._seen[gone]
            self._retry.pop(gone, None)
        ready = [
            (name, e)
            for name in names
            if (e := listing.get(name)) is not None
            and cursor.handled.get(name) != e.key
            and self._active.get(name) != e.key
            and self._settled(name, e, now)
        ]
        ready.sort(key=lambda item: (item[1].mtime or 0.0, item[0]))
        wait = self.interval_s
        problems = 0
        try:
            for name, entry in ready:
                retry = self._retry.get(name)
                if retry is not None and retry.key != entry.key:
                    retry = None  # a new version starts afresh
                    del self._retry[name]
                if retry is not None and retry.next_at > now:
                    problems += 1
                    wait = min(wait, max(retry.next_at - now, MIN_RETRY_S))
                    continue
                try:
                    payload = await anyio.to_thread.run_sync(self.source.payload, name, entry)
                except Exception as exc:  # one unreadable file must not hold up the others
                    self._note_error(exc, f"reading {name!r}")
                    problems += 1
                    continue
                if payload is None:
                    continue
                payload["idempotency_key"] = idempotency_key(str(payload["path"]), payload.get("sha256"), entry.key)
                try:
                    record = await self._ctx.fire(self.trigger, payload, None if retry is None else retry.rules)
                except RateLimited:
                    # Left unhandled, so the next poll offers it again: late, not lost.
                    wait = max(wait, self._ctx.retry_after_s(self.trigger), MIN_RETRY_S)
                    break
                ids = (retry.ids if retry is not None else []) + record.activation_ids
                failed = [o for o in record.outcomes if o.error is not None]
                if failed:
                    # Not handled: the target may simply not be deployed yet (a restart). Try again, later each time.
                    attempts = 1 if retry is None else retry.attempts + 1
                    delay = min(self.interval_s * 2**attempts, ERROR_BACKOFF_MAX_S)
                    self._retry[name] = _Retry(entry.key, frozenset(o.rule for o in failed), ids, attempts, now + delay)
                    o = failed[0]
                    self._note_error(f"{name}: rule {o.rule} -> {o.action}: {o.error}", "fire")
                    problems += 1
                    wait = min(wait, delay)
                    continue
                self._retry.pop(name, None)
                self.fires += 1
                if self._ctx.wait is None or not ids or self._removed:
                    cursor.record("done", name, entry.key)
                else:
                    cursor.record("fired", name, entry.key)
                    self._active[name] = entry.key
                    assert self._tg is not None
                    self._tg.start_soon(self._await_end, name, entry.key, ids)
        finally:
            looked = names  # the others were handled when this poll began
            self._unsettled = {
                n for n in looked if (e := listing.get(n)) is not None and cursor.handled.get(n) != e.key
            }
            self._pending = len(self._unsettled)
        if cursor.needs_compaction and not self._removed:
            await anyio.to_thread.run_sync(cursor.save)
        if not problems:
            self.last_error = None
        return wait

    async def _await_end(self, name: str, key: Key, ids: list[str]) -> None:
        """Mark a file handled once every activation its fire started has ended (not when the engine closed)."""
        wait = self._ctx.wait
        assert wait is not None
        try:
            for aid in ids:
                if not await wait(aid):
                    return  # aborted by a closing engine: stays in flight, fires again after a restart
        except EngineClosed:
            return
        except Exception as exc:  # a lost record must not stop the feed; firing again is the safe side
            self._note_error(exc, f"waiting for the end of {name!r}")
            return
        if self._active.get(name) == key:
            del self._active[name]
        if not self._removed:
            self.cursor.record("done", name, key)

    def forget(self) -> None:
        self.cursor.delete()


# --------------------------------------------------------------------------------------------- alarms


class AlarmFeed(Feed):
    """Fires every ``interval_s`` or on a cron schedule, with ``{**payload, "scheduled": ISO time}``.

    Ticks that fall due while the alarm waits out its trigger's rate limit are coalesced into the late fire,
    as cron does with missed runs; ticks while the process is stopped are not replayed.
    """

    kind = "alarm"

    def __init__(
        self,
        trigger: str,
        options: dict[str, Any],
        ctx: FeedContext,
        *,
        interval_s: float | None,
        cron: CronSchedule | None,
        tz: tzinfo,
        payload: dict[str, Any],
        at: float | None = None,
    ) -> None:
        super().__init__(trigger, options, ctx)
        self.interval_s = interval_s
        self.at = at
        self.cron = cron
        self.tz = tz
        self.payload = payload

    def next_due(self, now: float, last: float | None) -> float:
        """The next due time after ``now``: monotonic seconds for an interval, wall-clock seconds for cron."""
        if self.interval_s is not None:
            if last is None:
                return now + self.interval_s
            due = last + self.interval_s
            if due <= now:
                due += math.floor((now - due) / self.interval_s + 1) * self.interval_s
            return due
        assert self.cron is not None
        start = now if last is None else max(now, last)
        return self.cron.next_after(datetime.fromtimestamp(start, self.tz)).timestamp()

    async def _run(self) -> None:
        clock = self._ctx.clock
        if self.at is not None:
            await self._run_once(clock, self.at)
        elif self.interval_s is not None:
            await self._run_interval(clock)
        else:
            await self._run_cron(clock)

    async def _run_once(self, clock: Clock, at: float) -> None:
        if clock.now() > at + ONCE_LATE_S:
            self._note_error(f"its time {datetime.fromtimestamp(at, self.tz).isoformat()} passed while stopped", "fire")
            return
        while (left := at - clock.now()) > 0:
            await clock.sleep(min(left, CRON_SLICE_S))
        await self._fire_tick(datetime.fromtimestamp(at, self.tz).isoformat())

    async def _run_interval(self, clock: Clock) -> None:
        # On the monotonic clock: stepping the wall clock (NTP, an operator) neither stalls nor rushes it.
        mono = monotonic_of(clock)
        due = self.next_due(mono(), None)
        while True:
            while (left := due - mono()) > 0:
                await clock.sleep(left)
            scheduled = datetime.fromtimestamp(clock.now() - (mono() - due), self.tz).isoformat()
            await self._fire_tick(scheduled)
            due = self.next_due(mono(), due)

    async def _run_cron(self, clock: Clock) -> None:
        # Wall-clock schedule, slept in slices: after a suspend or a forward step the next slice sees the new
        # time and fires (once, for every tick missed); after a backward step it waits for the clock to catch
        # up, so no tick runs twice.
        due = self.next_due(clock.now(), None)
        while True:
            while (left := due - clock.now()) > 0:
                await clock.sleep(min(left, CRON_SLICE_S))
            await self._fire_tick(datetime.fromtimestamp(due, self.tz).isoformat())
            due = self.next_due(clock.now(), due)

    async def _fire_tick(self, scheduled: str) -> None:
        try:
            await self._fire_retrying({**self.payload, "scheduled": scheduled})
        except Exception as exc:  # e.g. the trigger was deleted under us; the alarm keeps its schedule
            self._note_error(exc, "fire")


# -------------------------------------------------------------------------------------------- factory


_KIND_OPTIONS = {
    "folder": {"path", "interval_s", "pattern", "fire_existing", "settle_s", "events"},
    "fsspec": {"url", "interval_s", "pattern", "recursive", "fire_existing", "storage_options", "atomic", "settle_s"},
    "alarm": {"interval_s", "cron", "payload", "tz", "at"},
}


def _opt(options: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any) -> Any:
    value = options.get(name, default)
    if value is not default and not isinstance(value, types):
        raise TriggerError(f"feed option {name}={value!r} has the wrong type")
    return value


def _interval(options: Mapping[str, Any], default: float | None) -> float | None:
    value = _opt(options, "interval_s", (int, float), default)
    if value is not None and (isinstance(value, bool) or not value >= MIN_POLL_INTERVAL_S):
        raise TriggerError(f"feed option interval_s={value!r} must be a number >= {MIN_POLL_INTERVAL_S}")
    return None if value is None else float(value)


def _settle(options: Mapping[str, Any], norm: dict[str, Any]) -> float:
    value = _opt(options, "settle_s", (int, float), None)
    if value is None:
        return FOLDER_SETTLE_S
    if isinstance(value, bool) or not value >= 0:
        raise TriggerError(f"feed option settle_s={value!r} must be a number >= 0")
    # only when given: the options make the feed's id, and a feed saved before settle_s existed keeps its cursor
    norm["settle_s"] = float(value)
    return float(value)


def _timezone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise TriggerError(f"alarm feed: unknown time zone {name!r}") from exc


def make_feed(trigger: str, kind: str, options: Mapping[str, Any], ctx: FeedContext, cursor_dir: Path | None) -> Feed:
    """Validate ``options`` for ``kind`` and build the feed (not started); raise TriggerError if invalid."""
    if kind not in _KIND_OPTIONS:
        raise TriggerError(f"unknown feed kind {kind!r}; expected one of {', '.join(FEED_KINDS)}")
    unknown = set(options) - _KIND_OPTIONS[kind]
    if unknown:
        raise TriggerError(
            f"{kind} feed: unknown option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(_KIND_OPTIONS[kind]))}"
        )
    try:
        json.dumps(dict(options), default=os.fspath)
    except (TypeError, ValueError) as exc:
        raise TriggerError(f"{kind} feed: options must be JSON values (they are persisted): {exc}") from exc
    pattern = _opt(options, "pattern", str, "*")
    fire_existing = _opt(options, "fire_existing", bool, False)
    if kind == "folder":
        raw = _opt(options, "path", (str, os.PathLike), None)
        if raw is None:
            raise TriggerError("folder feed: option path is required")
        path = Path(raw).expanduser().resolve()
        interval = _interval(options, FOLDER_POLL_INTERVAL_S)
        assert interval is not None
        norm = {"path": str(path), "interval_s": interval, "pattern": pattern, "fire_existing": fire_existing}
        settle = _settle(options, norm)
        events = _opt(options, "events", bool, True)
        if "events" in options:
            norm["events"] = events
        return PollingFeed(
            kind,
            trigger,
            norm,
            ctx,
            source=FolderSource(path, pattern),
            interval_s=interval,
            fire_existing=fire_existing,
            cursor_dir=cursor_dir,
            settle_s=settle,
            events=events,
        )
    if kind == "fsspec":
        url = _opt(options, "url", str, None)
        if url is None:
            raise TriggerError("fsspec feed: option url is required")
        interval = _interval(options, FSSPEC_POLL_INTERVAL_S)
        assert interval is not None
        recursive = _opt(options, "recursive", bool, True)
        storage_options = dict(_opt(options, "storage_options", dict, {}))
        atomic = _opt(options, "atomic", (bool, type(None)), None)
        norm = {
            "url": url,
            "interval_s": interval,
            "pattern": pattern,
            "recursive": recursive,
            "fire_existing": fire_existing,
            "storage_options": storage_options,
            "atomic": atomic,
        }
        settle = _settle(options, norm)
        return PollingFeed(
            kind,
            trigger,
            norm,
            ctx,
            source=FsspecSource(url, pattern, recursive, storage_options, atomic),
            interval_s=interval,
            fire_existing=fire_existing,
            cursor_dir=cursor_dir,
            settle_s=settle,
        )
    interval = _interval(options, None)
    cron_text = _opt(options, "cron", str, None)
    at = _opt(options, "at", (int, float), None)
    if sum(x is not None for x in (interval, cron_text, at)) != 1:
        raise TriggerError("alarm feed: give exactly one of interval_s, cron and at")
    cron = None if cron_text is None else CronSchedule.parse(cron_text)
    tz_name = _opt(options, "tz", str, "UTC")
    payload = dict(_opt(options, "payload", dict, {}))
    norm = {"interval_s": interval, "cron": cron_text, "payload": payload, "tz": tz_name}
    if at is not None:
        norm["at"] = float(at)  # only when given: feeds saved before ``at`` existed keep their ids
    return AlarmFeed(
        trigger, norm, ctx, interval_s=interval, cron=cron, tz=_timezone(tz_name), payload=payload, at=norm.get("at")
    )
