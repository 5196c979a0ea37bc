"""Triggers and rules: OpenWhisk's event model.

A trigger is a named channel of events. Firing it with a payload creates a trigger activation (recorded even
when no rule is enabled) and submits, for each enabled rule bound to the trigger, the rule's function or
composition with ``{**trigger.params, **payload}`` and ``cause`` = the trigger activation id. Rules make the
graph many-to-many: one trigger can drive many targets, one target can hang off many triggers.

Each trigger has a fire rate limit (OpenWhisk's default: 60 per minute) enforced over a sliding 60 s window.
Feeds (``_feeds``) fire triggers by themselves and wait out that limit instead of dropping events.

Feeds saved in the state dir do not resume when the manager is built: the application has not redeployed its
functions and compositions yet. A saved feed starts once every active rule of its trigger names a target that
exists (``exists``, checked again on ``targets_changed()``), or when the application calls ``start()``.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc

from .._errors import EngineClosed, InvalidPayload, RateLimited, TriggerError
from .clock import Clock, SystemClock
from .feeds import Feed, FeedContext, FeedInfo, WaitFn, make_feed, monotonic_of, write_json_atomic

__all__ = (
    "Clock",
    "Rule",
    "RuleOutcome",
    "Submit",
    "SystemClock",
    "Trigger",
    "TriggerActivation",
    "TriggerManager",
    "monotonic_of",
)

TRIGGER_RATE_PER_MINUTE = 60
RATE_WINDOW_S = 60.0
MAX_FIRE_RECORDS = 1000
MAX_NAME_CHARS = 256
STATE_SUBDIR = "triggers"
STATE_FILE_NAME = "state.json"
CURSOR_SUBDIR = "cursors"
STATE_VERSION = 1

# OpenWhisk's entity name rule, minus spaces (they only make shell quoting harder).
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_@.-]*")

logger = logging.getLogger("minifaas.triggers")

RuleStatus = Literal["active", "inactive"]


class Submit(Protocol):
    """The engine's ``submit(name, args, *, cause)``: accept an invocation, return its activation id."""

    def __call__(self, name: str, args: dict[str, Any], /, *, cause: str | None) -> Awaitable[str]: ...


@dataclass(frozen=True)
class Trigger:
    """A named event channel. ``rate_per_minute=None`` means unlimited."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    rate_per_minute: int | None = TRIGGER_RATE_PER_MINUTE
    annotations: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


@dataclass(frozen=True)
class Rule:
    """Binds a trigger to a function or composition (``action``, by name); only active rules fire."""

    name: str
    trigger: str
    action: str
    status: RuleStatus = "active"
    created: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class RuleOutcome:
    """What one rule did in a fire: the activation it caused, or why it caused none."""

    rule: str
    action: str
    activation_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class TriggerActivation:
    """The record of one fire (OpenWhisk's trigger activation), kept even when no rule was enabled."""

    activation_id: str
    trigger: str
    start: float
    args: dict[str, Any]
    outcomes: tuple[RuleOutcome, ...]

    @property
    def activation_ids(self) -> list[str]:
        return [o.activation_id for o in self.outcomes if o.activation_id is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME_RE.fullmatch(name):
        raise TriggerError(
            f"invalid {kind} name {name!r}: use letters, digits, _ @ . - (first a letter, digit or _),"
            f" at most {MAX_NAME_CHARS} characters"
        )
    return name


def _check_json(what: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidPayload(f"{what} must be a dict, not {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"{what} must hold JSON values only: {exc}") from exc
    return dict(value)


class TriggerManager:
    """Owns triggers, rules and feeds; fires rules' targets through ``submit(name, args, cause=...)``.

    ``submit`` is the engine's non-blocking submit returning an activation id. Feed tasks run in
    ``task_group`` (the engine's); ``aclose`` ends them. With a ``state_dir``, triggers, rules, feeds and feed
    cursors live under ``state_dir/triggers/``. ``wait(activation_id)`` (the engine's) tells a feed when the
    activation its event started has ended, so that the event counts as handled only then; without it an
    event is handled once submitted. ``exists(name)`` says whether a rule's target is deployed: saved feeds
    start once their targets exist (or on ``start()``); without it they start at once.
    """

    def __init__(
        self,
        submit: Submit,
        *,
        state_dir: Path | None,
        task_group: anyio.abc.TaskGroup,
        clock: Clock | None = None,
        on_fire: Callable[[TriggerActivation], object] | None = None,
        wait: WaitFn | None = None,
        exists: Callable[[str], bool] | None = None,
    ) -> None:
        self._submit = submit
        self._tg = task_group
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._mono = monotonic_of(self._clock)
        self._on_fire = on_fire
        self._dir = None if state_dir is None else Path(state_dir) / STATE_SUBDIR
        self._triggers: dict[str, Trigger] = {}
        self._rules: dict[str, Rule] = {}
        self._feeds: dict[str, Feed] = {}
        self._fire_times: dict[str, deque[float]] = {}
        self._fires: deque[TriggerActivation] = deque(maxlen=MAX_FIRE_RECORDS)
        self._exists = exists
        self._ctx = FeedContext(fire=self._fire, retry_after_s=self.retry_after_s, clock=self._clock, wait=wait)
        self._closed = False
        if self._dir is not None:
            self._load()
        if exists is None:
            self.start()
        else:
            self.targets_changed()

    # ------------------------------------------------------------------------------------- persistence

    @property
    def _cursor_dir(self) -> Path | None:
        return None if self._dir is None else self._dir / CURSOR_SUBDIR

    def _load(self) -> None:
        assert self._dir is not None
        path = self._dir / STATE_FILE_NAME
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            triggers = [Trigger(**t) for t in data["triggers"]]
            rules = [Rule(**r) for r in data["rules"]]
            feeds = [(f["trigger"], f["kind"], f["options"]) for f in data["feeds"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise TriggerError(f"trigger state {path} is unreadable: {exc}") from exc
        self._triggers = {t.name: t for t in triggers}
        self._rules = {r.name: r for r in rules}
        for trigger, kind, options in feeds:
            try:
                feed = make_feed(trigger, kind, options, self._ctx, self._cursor_dir)
            except TriggerError as exc:  # e.g. s3fs no longer installed: keep the others running
                logger.error("cannot resume %s feed of trigger %s: %s", kind, trigger, exc)
                continue
            self._feeds[feed.feed_id] = feed

    def _start_feed(self, feed: Feed) -> None:
        if not feed.started and not self._closed:
            feed.scheduled = True  # at once, so that two calls in one tick start it once
            self._tg.start_soon(feed.run, name=f"minifaas feed {feed.feed_id}")

    def start(self) -> None:
        """Start every feed that is not running yet (saved feeds wait for this or for their targets)."""
        for feed in list(self._feeds.values()):
            self._start_feed(feed)

    def targets_changed(self) -> None:
        """Start the waiting feeds whose trigger's active rules all name an existing target (call after deploys)."""
        if self._exists is None:
            return
        for feed in list(self._feeds.values()):
            if feed.started:
                continue
            rules = [r for r in self._rules.values() if r.trigger == feed.trigger and r.enabled]
            if rules and all(self._exists(r.action) for r in rules):
                self._start_feed(feed)

    def _save(self) -> None:
        if self._dir is None:
            return
        data = {
            "version": STATE_VERSION,
            "triggers": [asdict(t) for t in self._triggers.values()],
            "rules": [asdict(r) for r in self._rules.values()],
            "feeds": [{"trigger": f.trigger, "kind": f.kind, "options": f.options} for f in self._feeds.values()],
        }
        write_json_atomic(self._dir / STATE_FILE_NAME, data)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the trigger manager is closed")

    # ----------------------------------------------------------------------------------------- triggers

    def create_trigger(
        self,
        name: str,
        *,
        params: dict[str, Any] | None = None,
        rate_per_minute: int | None = TRIGGER_RATE_PER_MINUTE,
        annotations: dict[str, Any] | None = None,
    ) -> Trigger:
        """Create a trigger; ``params`` are defaults that each fire's payload overrides."""
        self._check_open()
        _check_name("trigger", name)
        if name in self._triggers:
            raise TriggerError(f"trigger {name!r} already exists")
        if rate_per_minute is not None and (
            isinstance(rate_per_minute, bool) or not isinstance(rate_per_minute, int) or rate_per_minute < 1
        ):
            raise TriggerError(f"rate_per_minute must be a positive int or None, not {rate_per_minute!r}")
        trigger = Trigger(
            name=name,
            params=_check_json("trigger params", params),
            rate_per_minute=rate_per_minute,
            annotations=_check_json("trigger annotations", annotations),
            created=self._clock.now(),
        )
        self._triggers[name] = trigger
        self._save()
        return trigger

    def get_trigger(self, name: str) -> Trigger:
        try:
            return self._triggers[name]
        except KeyError:
            raise TriggerError(f"no trigger named {name!r}") from None

    def list_triggers(self) -> list[Trigger]:
        return sorted(self._triggers.values(), key=lambda t: t.name)

    def delete_trigger(self, name: str, *, keep_rules: bool = False) -> Trigger:
        """Delete a trigger, the rules bound to it, and its feeds (stopped at once, their cursors dropped).

        ``keep_rules``: its rules stay, naming a trigger that does not exist (OpenWhisk's REST semantics); they
        fire again if a trigger of that name is created."""
        self._check_open()
        trigger = self.get_trigger(name)
        del self._triggers[name]
        self._fire_times.pop(name, None)
        for rule in [r for r in self._rules.values() if r.trigger == name and not keep_rules]:
            del self._rules[rule.name]
        for feed in [f for f in self._feeds.values() if f.trigger == name]:
            del self._feeds[feed.feed_id]
            feed.cancel(removed=True)
            self._tg.start_soon(self._forget_feed, feed)
        self._save()
        return trigger

    # ------------------------------------------------------------------------------------------- firing

    def retry_after_s(self, name: str) -> float:
        """Seconds until ``name`` may fire again under its rate limit (0.0 if it may fire now)."""
        trigger = self._triggers.get(name)
        times = self._fire_times.get(name)
        if trigger is None or trigger.rate_per_minute is None or not times:
            return 0.0
        now = self._mono()  # a wall clock stepped back an hour must not block a trigger for an hour
        while times and times[0] <= now - RATE_WINDOW_S:
            times.popleft()
        if len(times) < trigger.rate_per_minute:
            return 0.0
        return times[len(times) - trigger.rate_per_minute] + RATE_WINDOW_S - now

    def _take_rate_token(self, trigger: Trigger) -> None:
        if trigger.rate_per_minute is None:
            return
        wait = self.retry_after_s(trigger.name)
        if wait > 0:
            raise RateLimited(
                f"trigger {trigger.name!r} exceeded its rate limit of {trigger.rate_per_minute} fires per"
                f" minute; retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        self._fire_times.setdefault(trigger.name, deque()).append(self._mono())

    async def fire(self, name: str, payload: dict[str, Any] | None = None) -> list[str]:
        """Fire trigger ``name``; return the activation ids of the enabled rules' targets (maybe none).

        Raises TriggerError for an unknown trigger, InvalidPayload for a non-dict payload, RateLimited when
        the trigger's rate limit is exceeded (nothing is recorded or submitted then), EngineClosed when the
        engine is shutting down. A rule whose submit fails otherwise (unknown function, overload) is recorded
        in the trigger activation and does not stop the others.
        """
        record = await self._fire(name, payload, None)
        return record.activation_ids

    async def _fire(self, name: str, payload: dict[str, Any] | None, only: frozenset[str] | None) -> TriggerActivation:
        """Fire ``name`` to its enabled rules (only those named in ``only``, if given); return the record."""
        self._check_open()
        trigger = self.get_trigger(name)
        args = {**trigger.params, **_check_json("trigger payload", payload)}
        self._take_rate_token(trigger)
        fire_id = uuid.uuid4().hex
        start = self._clock.now()
        rules = sorted(
            (r for r in self._rules.values() if r.trigger == name and r.enabled and (only is None or r.name in only)),
            key=lambda r: r.name,
        )
        outcomes: list[RuleOutcome] = []
        for rule in rules:
            try:
                activation_id = await self._submit(rule.action, dict(args), cause=fire_id)
            except EngineClosed:
                raise  # shutting down: a feed must keep its event for the next run, not record it as done
            except Exception as exc:  # one failing rule must not stop the others; the record says why
                logger.warning("trigger %s: rule %s -> %s failed: %s", name, rule.name, rule.action, exc)
                outcomes.append(RuleOutcome(rule.name, rule.action, None, f"{type(exc).__name__}: {exc}"))
            else:
                outcomes.append(RuleOutcome(rule.name, rule.action, activation_id))
        record = TriggerActivation(fire_id, name, start, args, tuple(outcomes))
        self._fires.append(record)
        if self._on_fire is not None:
            try:
                self._on_fire(record)
            except Exception:  # an observer must not turn a done fire into a failed (and re-fired) one
                logger.exception("trigger %s: on_fire hook failed", name)
        return record

    def get_fire(self, activation_id: str) -> TriggerActivation:
        """The record of one fire (of the last ``MAX_FIRE_RECORDS``)."""
        for record in reversed(self._fires):
            if record.activation_id == activation_id:
                return record
        raise TriggerError(f"no trigger activation {activation_id!r}")

    def list_fires(self, trigger: str | None = None, *, limit: int = 30) -> list[TriggerActivation]:
        """The most recent fires first, optionally of one trigger."""
        out: list[TriggerActivation] = []
        for record in reversed(self._fires):
            if trigger is None or record.trigger == trigger:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    # -------------------------------------------------------------------------------------------- rules

    def create_rule(self, name: str, trigger: str, action: str, *, enabled: bool = True) -> Rule:
        """Bind ``trigger`` to the function or composition named ``action``."""
        self._check_open()
        _check_name("rule", name)
        if name in self._rules:
            raise TriggerError(f"rule {name!r} already exists")
        self.get_trigger(trigger)
        if not isinstance(action, str) or not action or len(action) > MAX_NAME_CHARS:
            raise TriggerError(f"invalid rule target {action!r}: expected a function or composition name")
        rule = Rule(name, trigger, action, "active" if enabled else "inactive", self._clock.now())
        self._rules[name] = rule
        self._save()
        self.targets_changed()
        return rule

    def get_rule(self, name: str) -> Rule:
        try:
            return self._rules[name]
        except KeyError:
            raise TriggerError(f"no rule named {name!r}") from None

    def list_rules(self, trigger: str | None = None) -> list[Rule]:
        rules = (r for r in self._rules.values() if trigger is None or r.trigger == trigger)
        return sorted(rules, key=lambda r: r.name)

    def _set_rule_status(self, name: str, status: RuleStatus) -> Rule:
        self._check_open()
        rule = replace(self.get_rule(name), status=status)
        self._rules[name] = rule
        self._save()
        return rule

    def enable_rule(self, name: str) -> Rule:
        return self._set_rule_status(name, "active")

    def disable_rule(self, name: str) -> Rule:
        return self._set_rule_status(name, "inactive")

    def delete_rule(self, name: str) -> Rule:
        self._check_open()
        rule = self.get_rule(name)
        del self._rules[name]
        self._save()
        return rule

    # -------------------------------------------------------------------------------------------- feeds

    async def add_feed(self, trigger: str, kind: str, **options: Any) -> str:
        """Start a feed (``"folder"``, ``"fsspec"`` or ``"alarm"``) firing ``trigger``; return its id.

        Adding the same feed (same trigger, kind and options) again returns the running one's id.
        Folder: ``path``, ``interval_s=0.5``, ``pattern="*"``, ``fire_existing=False``, ``settle_s=2.0`` (quiet
        time before a file written in place fires), ``events=True`` (inotify where available).
        fsspec: ``url``, ``interval_s=5.0``, ``pattern``, ``recursive=True``, ``fire_existing``,
        ``storage_options={}``, ``atomic=None`` (auto: True unless local), ``settle_s``.
        Alarm: ``interval_s`` or ``cron`` (5 fields or @hourly...), ``payload={}``, ``tz="UTC"``.
        """
        self._check_open()
        self.get_trigger(trigger)
        feed = make_feed(trigger, kind, options, self._ctx, self._cursor_dir)
        if feed.feed_id in self._feeds:
            self._start_feed(self._feeds[feed.feed_id])  # a saved feed the application asks for again: resume it
            return feed.feed_id
        try:
            await feed.prime()
        except TriggerError:
            raise
        except Exception as exc:  # credentials, permissions, network: say which feed could not start
            raise TriggerError(f"cannot start {kind} feed of trigger {trigger!r}: {exc}") from exc
        if self._closed or trigger not in self._triggers:
            raise TriggerError(f"trigger {trigger!r} went away while its feed was starting")
        if feed.feed_id in self._feeds:  # added concurrently while this one primed
            return feed.feed_id
        self._feeds[feed.feed_id] = feed
        self._save()
        self._start_feed(feed)
        return feed.feed_id

    async def remove_feed(self, feed_id: str) -> None:
        """Stop a feed, wait until it has, and drop its cursor."""
        self._check_open()
        feed = self._feeds.pop(feed_id, None)
        if feed is None:
            raise TriggerError(f"no feed {feed_id!r}")
        self._save()
        await self._forget_feed(feed)

    async def _forget_feed(self, feed: Feed) -> None:
        await feed.stop(removed=True)
        feed.forget()

    def list_feeds(self, trigger: str | None = None) -> list[FeedInfo]:
        feeds = (f.info() for f in self._feeds.values() if trigger is None or f.trigger == trigger)
        return sorted(feeds, key=lambda f: f.feed_id)

    def get_feed(self, feed_id: str) -> FeedInfo:
        try:
            return self._feeds[feed_id].info()
        except KeyError:
            raise TriggerError(f"no feed {feed_id!r}") from None

    def stop_polling(self) -> None:
        """No more fires (``fire`` raises EngineClosed); feeds keep waiting for the ends of what they started.

        An engine calls this before it drains its in-flight work, then ``aclose``: a session that ends while
        the engine drains marks its file handled; one the close aborts leaves it in flight for the next run.
        """
        self._closed = True
        for feed in self._feeds.values():
            feed.stop_polling()

    async def aclose(self) -> None:
        """Stop every feed (they resume from their cursors with the next manager on the same state dir)."""
        self.stop_polling()
        feeds = list(self._feeds.values())
        for feed in feeds:
            feed.cancel()
        with anyio.CancelScope(shield=True):
            for feed in feeds:
                await feed.stop()
