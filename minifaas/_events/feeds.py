"""Feeds: event sources that fire a trigger by themselves.

Three kinds, all polling (no inotify or bucket notifications, so they behave the same on every platform):

- ``folder``: a local folder, the stand-in for a storage bucket. A file fires once it is completely written.
- ``fsspec``: any fsspec URL (``s3://bucket/prefix/``, ``gs://...``, ``file:///...``); objects fire once.
- ``alarm``: an interval (``interval_s``) or a 5-field cron expression (``cron``).

Once-only delivery rests on a cursor: for every handled file the feed keeps its ``(size, version)`` key
(version = ``mtime_ns`` locally, the ETag or modification time remotely) and writes it atomically to a JSON
file under the state dir after each batch. A restart reloads it, so a file handled before a stop does not fire
again, and a file that arrived meanwhile does. A file whose key changes later (rewritten) fires again, like an
overwritten object in a bucket. Across a crash (not a clean stop) the files of the unfinished batch may fire
twice: at-least-once there, exactly-once across clean restarts.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread

from .._errors import RateLimited, TriggerError

if TYPE_CHECKING:
    from .clock import Clock

__all__ = (
    "FEED_KINDS",
    "AlarmFeed",
    "CronSchedule",
    "Feed",
    "FeedContext",
    "FeedInfo",
    "PollingFeed",
    "is_temporary_name",
    "make_feed",
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
CURSOR_VERSION = 1
TEMP_PREFIXES = (".",)
TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", "~")

logger = logging.getLogger("minifaas.feeds")

FireFn = Callable[[str, dict[str, Any]], Awaitable[list[str]]]
RetryAfterFn = Callable[[str], float]
Key = tuple[int, str]


def is_temporary_name(name: str) -> bool:
    """True for names that writers use while a file is incomplete (hidden, .tmp, .part, .crdownload, ~)."""
    lower = name.lower()
    return lower.startswith(TEMP_PREFIXES) or lower.endswith(TEMP_SUFFIXES)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON so that a reader (or a crash) sees either the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"), sort_keys=True)
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
        """The first due minute strictly after ``dt``, in ``dt``'s time zone (wall clock)."""
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
    """A feed task: ``run`` in the owner's task group, ``stop`` to end it."""

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
        self._done = anyio.Event()
        self._started = False
        self._removed = False

    def info(self) -> FeedInfo:
        return FeedInfo(self.feed_id, self.trigger, self.kind, dict(self.options), self.fires, 0, self.last_error)

    async def prime(self) -> None:
        """Check the source and take its first look; raise TriggerError if it is unusable."""

    async def run(self) -> None:
        self._started = True
        with self._scope:
            try:
                await self._run()
            finally:
                self._done.set()

    async def _run(self) -> None:
        raise NotImplementedError

    def cancel(self, *, removed: bool = False) -> None:
        """Stop at the next checkpoint; ``removed`` also stops every later write of the feed's state."""
        self._removed = self._removed or removed
        self._scope.cancel()

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
                await self._ctx.fire(self.trigger, payload)
            except RateLimited:
                await self._ctx.clock.sleep(max(self._ctx.retry_after_s(self.trigger), MIN_RETRY_S))
            else:
                self.fires += 1
                return

    def _note_error(self, exc: BaseException, what: str) -> None:
        message = f"{type(exc).__name__}: {exc}"
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

    def list(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        with os.scandir(self.path) as it:
            for de in it:
                if is_temporary_name(de.name) or not fnmatch.fnmatchcase(de.name, self.pattern):
                    continue
                try:
                    if not de.is_file(follow_symlinks=False):
                        continue
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                # A write sets mtime and ctime together; a later rename (or copy2's copystat) moves ctime
                # only. So ctime > mtime means the last data write is over: renamed or copied in whole.
                # (Renamed within one clock tick, both stay equal: then the two-poll rule applies.)
                out[de.name] = Entry(
                    key=(st.st_size, str(st.st_mtime_ns)),
                    mtime=st.st_mtime,
                    complete_on_sight=st.st_ctime_ns > st.st_mtime_ns,
                )
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
    """The handled ``name -> key`` map of a polling feed, persisted atomically (or kept in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handled: dict[str, Key] = {}

    def load(self) -> bool:
        """Load the saved cursor; False if there is none (the feed never ran)."""
        if self.path is None or not self.path.exists():
            return False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.handled = {name: (int(k[0]), str(k[1])) for name, k in data["handled"].items()}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise TriggerError(f"feed cursor {self.path} is unreadable: {exc}") from exc
        return True

    def save(self) -> None:
        if self.path is not None:
            data = {"version": CURSOR_VERSION, "handled": {n: list(k) for n, k in self.handled.items()}}
            write_json_atomic(self.path, data)

    def delete(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class PollingFeed(Feed):
    """Polls a source; fires each new file once complete (stable across two polls, or whole on sight)."""

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
    ) -> None:
        self.kind = kind
        super().__init__(trigger, options, ctx)
        self.source = source
        self.interval_s = interval_s
        self.fire_existing = fire_existing
        name = hashlib.sha256(self.feed_id.encode()).hexdigest()[:24] + ".json"
        self.cursor = Cursor(None if cursor_dir is None else cursor_dir / name)
        self._primed = False
        self._prev: dict[str, Key] = {}
        self._pending = 0

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

    async def prime(self) -> None:
        await anyio.to_thread.run_sync(self.source.check)
        existed = await anyio.to_thread.run_sync(self.cursor.load)
        listing = await anyio.to_thread.run_sync(self.source.list)
        if not existed:
            if not self.fire_existing:
                self.cursor.handled = {name: e.key for name, e in listing.items()}
            # Saved even when empty: on restart, a cursor file means "files not in it are new".
            if not self._removed:
                await anyio.to_thread.run_sync(self.cursor.save)
        self._prev = {name: e.key for name, e in listing.items()}
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
            await self._ctx.clock.sleep(wait)

    async def _poll(self) -> float:
        listing = await anyio.to_thread.run_sync(self.source.list)
        handled = self.cursor.handled
        dirty = False
        for gone in handled.keys() - listing.keys():
            del handled[gone]  # so a later file of the same name is new
            dirty = True
        ready = [
            (name, e)
            for name, e in listing.items()
            if handled.get(name) != e.key and (e.complete_on_sight or self._prev.get(name) == e.key)
        ]
        self._prev = {name: e.key for name, e in listing.items()}
        ready.sort(key=lambda item: (item[1].mtime or 0.0, item[0]))
        wait = self.interval_s
        unreadable = False
        try:
            for name, entry in ready:
                try:
                    payload = await anyio.to_thread.run_sync(self.source.payload, name, entry)
                except Exception as exc:  # one unreadable file must not hold up the others
                    self._note_error(exc, f"reading {name!r}")
                    unreadable = True
                    continue
                if payload is None:
                    continue
                try:
                    await self._ctx.fire(self.trigger, payload)
                except RateLimited:
                    # Left unhandled, so the next poll offers it again: late, not lost.
                    wait = max(wait, self._ctx.retry_after_s(self.trigger), MIN_RETRY_S)
                    break
                handled[name] = entry.key
                self.fires += 1
                dirty = True
        finally:
            self._pending = sum(1 for name, e in listing.items() if handled.get(name) != e.key)
            if dirty and not self._removed:
                # Synchronous on purpose: even when cancelled mid-batch, what fired is recorded.
                self.cursor.save()
        if not unreadable:
            self.last_error = None
        return wait

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
    ) -> None:
        super().__init__(trigger, options, ctx)
        self.interval_s = interval_s
        self.cron = cron
        self.tz = tz
        self.payload = payload

    def next_due(self, now: float, last: float | None) -> float:
        if self.interval_s is not None:
            if last is None:
                return now + self.interval_s
            due = last + self.interval_s
            if due <= now:
                due += math.floor((now - due) / self.interval_s + 1) * self.interval_s
            return due
        assert self.cron is not None
        return self.cron.next_after(datetime.fromtimestamp(now, self.tz)).timestamp()

    async def _run(self) -> None:
        clock = self._ctx.clock
        due = self.next_due(clock.now(), None)
        while True:
            while (left := due - clock.now()) > 0:
                await clock.sleep(left)
            scheduled = datetime.fromtimestamp(due, self.tz).isoformat()
            try:
                await self._fire_retrying({**self.payload, "scheduled": scheduled})
            except Exception as exc:  # e.g. the trigger was deleted under us; the alarm keeps its schedule
                self._note_error(exc, "fire")
            due = self.next_due(clock.now(), due)


# -------------------------------------------------------------------------------------------- factory


_KIND_OPTIONS = {
    "folder": {"path", "interval_s", "pattern", "fire_existing"},
    "fsspec": {"url", "interval_s", "pattern", "recursive", "fire_existing", "storage_options", "atomic"},
    "alarm": {"interval_s", "cron", "payload", "tz"},
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
        return PollingFeed(
            kind,
            trigger,
            norm,
            ctx,
            source=FolderSource(path, pattern),
            interval_s=interval,
            fire_existing=fire_existing,
            cursor_dir=cursor_dir,
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
        return PollingFeed(
            kind,
            trigger,
            norm,
            ctx,
            source=FsspecSource(url, pattern, recursive, storage_options, atomic),
            interval_s=interval,
            fire_existing=fire_existing,
            cursor_dir=cursor_dir,
        )
    interval = _interval(options, None)
    cron_text = _opt(options, "cron", str, None)
    if (interval is None) == (cron_text is None):
        raise TriggerError("alarm feed: give exactly one of interval_s and cron")
    cron = None if cron_text is None else CronSchedule.parse(cron_text)
    tz_name = _opt(options, "tz", str, "UTC")
    payload = dict(_opt(options, "payload", dict, {}))
    norm = {"interval_s": interval, "cron": cron_text, "payload": payload, "tz": tz_name}
    return AlarmFeed(trigger, norm, ctx, interval_s=interval, cron=cron, tz=_timezone(tz_name), payload=payload)
