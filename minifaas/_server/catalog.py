"""The system catalog in the read-only ``whisk.system`` namespace: what every OpenWhisk tutorial reaches for.

Packages (published, so any namespace may read, invoke and bind them):

- ``utils``: echo, cat, sort, head, split, date, namespace; Python twins of openwhisk-catalog's actions, same
  arguments and results.
- ``alarms``: the feed actions alarm (``cron``), interval (``minutes``) and once (``date``), speaking OpenWhisk's
  feed protocol: ``lifecycleEvent`` CREATE / READ / UPDATE / DELETE / PAUSE / UNPAUSE with ``triggerName``
  and ``authKey`` (``wsk trigger create t --feed /whisk.system/alarms/interval -p minutes 1`` PUTs the trigger,
  then invokes the feed with CREATE). They run in sandboxes like any action and ask the host's ``whisk.alarms``
  service (only catalog actions may call it) to run the engine's own alarm feed for the trigger.
- ``alarmsWeb`` (not published, as in OpenWhisk): the feeds' backend action, not for users.

The actions are deployed from ``whisk_system/*.py`` when the server starts (``install_catalog``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._core.statedir import PRIVATE_DIR_MODE, write_private
from .._errors import TriggerError
from .names import SYSTEM_NS
from .packages import Package, PackageStore

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ("ALARMS_SERVICE", "AlarmFeeds", "install_catalog")

SOURCES_DIR: Final = Path(__file__).with_name("whisk_system")
ALARMS_SERVICE: Final = "whisk.alarms"
LIFECYCLE_EVENTS: Final = ("CREATE", "READ", "UPDATE", "DELETE", "PAUSE", "UNPAUSE")
FEED_KINDS: Final = ("alarm", "interval", "once")
#: feed parameters of openwhisk-package-alarms that minifaas's alarms do not take (refused, never ignored)
UNSUPPORTED: Final = ("startDate", "stopDate", "deleteAfterFire", "maxTriggers", "limitCronFields", "fireOnce")
FEED_SOURCE: Final = "alarms_feed.py"
#: paused alarm feeds (their options), kept so that UNPAUSE works after a restart too
PAUSED_FILE: Final = "server/paused_feeds.json"
FEED_KIND_LINE: Final = 'FEED_KIND = "interval"'

#: package -> (published, description, {action: (source file, feed kind or None, description)})
CATALOG: Final[dict[str, tuple[bool, str, dict[str, tuple[str, str | None, str]]]]] = {
    "utils": (
        True,
        "Building blocks that format and assemble data",
        {
            "echo": ("utils_echo.py", None, "Returns the input"),
            "cat": ("utils_cat.py", None, "Concatenates input into a string"),
            "sort": ("utils_sort.py", None, "Sorts an array"),
            "head": ("utils_head.py", None, "Extract prefix of an array"),
            "split": ("utils_split.py", None, "Split a string into an array"),
            "date": ("utils_date.py", None, "Current date and time"),
            "namespace": ("utils_namespace.py", None, "Returns namespace for the authorization key used"),
        },
    ),
    "alarms": (
        True,
        "Alarms and periodic utility",
        {
            "alarm": (FEED_SOURCE, "alarm", "Fire trigger when alarm occurs (cron)"),
            "interval": (FEED_SOURCE, "interval", "Fire trigger at specified interval (minutes)"),
            "once": (FEED_SOURCE, "once", "Fire trigger once when alarm occurs (date)"),
        },
    ),
    "alarmsWeb": (False, "The alarms feeds' backend", {"alarmWebAction": (FEED_SOURCE, "", "Alarms backend")}),
}

logger = logging.getLogger("minifaas.server")


async def install_catalog(engine: Engine, store: PackageStore, auth: str | None) -> AlarmFeeds:
    """Create the catalog's packages and deploy its actions; returns the alarms' host service."""
    state_dir = getattr(engine, "state_dir", None)
    paused = Path(state_dir) / PAUSED_FILE if state_dir is not None else None
    feeds = AlarmFeeds(engine, store.namespace, auth, paused_file=paused)
    engine.add_host_service(ALARMS_SERVICE, feeds, callers=_is_alarms_action)
    for pkg_name, (publish, description, actions) in CATALOG.items():
        store.put(Package(SYSTEM_NS, pkg_name, {}, {"description": description}, publish, None, 1, _now_ms()))
        for action, (source, kind, about) in actions.items():
            code = (SOURCES_DIR / source).read_text("utf-8")
            annotations: dict[str, Any] = {"description": about}
            if kind is not None:
                code = code.replace(FEED_KIND_LINE, f"FEED_KIND = {kind!r}")
                if kind:
                    annotations["feed"] = True
            await engine.deploy(f"{SYSTEM_NS}/{pkg_name}/{action}", code=code, annotations=annotations)
    return feeds


def _is_alarms_action(name: str) -> bool:
    return name.startswith((f"{SYSTEM_NS}/alarms/", f"{SYSTEM_NS}/alarmsWeb/"))


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class AlarmFeeds:
    """The ``whisk.alarms`` host service: one lifecycle event of an alarm feed of a trigger of the server."""

    def __init__(self, engine: Engine, namespace: str, auth: str | None, *, paused_file: Path | None = None) -> None:
        self.engine = engine
        self.namespace = namespace
        self.auth = auth
        self.paused_file = paused_file
        #: trigger -> the feed options of a paused feed (UNPAUSE starts it again)
        self.paused: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, int] = {}
        if paused_file is not None and paused_file.is_file():
            try:
                self.paused = dict(json.loads(paused_file.read_text("utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                logger.error("paused alarm feeds in %s are unreadable: %s", paused_file, exc)

    def forget(self, trigger: str) -> None:
        """The trigger was deleted: a paused feed of it goes too (the running ones went with the trigger)."""
        if self.paused.pop(trigger, None) is not None:
            self._save_paused()
        self.changed.pop(trigger, None)

    def _save_paused(self) -> None:
        if self.paused_file is None:
            return
        self.paused_file.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        write_private(self.paused_file, json.dumps(self.paused).encode("utf-8"))

    def _tm(self) -> Any:
        tm = getattr(self.engine, "triggers", None)
        if tm is None:
            raise RuntimeError("triggers are not available on this server")
        return tm

    async def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        event = args.get("lifecycleEvent")
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"lifecycleEvent must be one of {', '.join(LIFECYCLE_EVENTS)}, got {event!r}")
        kind = args.get("feedKind")
        if kind not in FEED_KINDS:
            raise ValueError(f"feedKind must be one of {', '.join(FEED_KINDS)}, got {kind!r}")
        trigger = self._trigger(args.get("triggerName"))
        if self.auth is not None and args.get("authKey") != self.auth:
            raise PermissionError("authKey is not the key of this server's namespace")
        tm = self._tm()
        handler: dict[str, Callable[[Any, str, str, dict[str, Any]], Any]] = {
            "CREATE": self._create,
            "READ": self._read,
            "UPDATE": self._update,
            "DELETE": self._delete,
            "PAUSE": self._pause,
            "UNPAUSE": self._unpause,
        }
        result: dict[str, Any] = await handler[event](tm, trigger, kind, args)
        if event in ("UPDATE", "DELETE", "PAUSE", "UNPAUSE"):
            self._save_paused()
        return result

    def _trigger(self, name: object) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"triggerName must be /namespace/name, got {name!r}")
        parts = name.split("/")
        if name.startswith("/"):
            if len(parts) != 3 or parts[1] not in ("_", self.namespace) or not parts[2]:
                raise ValueError(f"triggerName {name!r} is not a trigger of namespace {self.namespace!r}")
            return parts[2]
        if len(parts) != 1:
            raise ValueError(f"triggerName must be /namespace/name, got {name!r}")
        return name

    def _options(self, kind: str, args: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """The engine alarm feed's options for the feed parameters in ``args`` (over ``old`` for UPDATE)."""
        for key in UNSUPPORTED:
            if args.get(key) not in (None, "", False):
                raise ValueError(f"the alarms feed parameter {key!r} is not supported by minifaas")
        opts: dict[str, Any] = dict(old or {})
        payload = args.get("trigger_payload")
        if isinstance(payload, str) and payload.strip():
            try:
                payload = json.loads(payload)
            except ValueError:
                raise ValueError("trigger_payload must be a JSON object") from None
        if payload is not None:
            if not isinstance(payload, dict):
                raise ValueError(f"trigger_payload must be a JSON object, got {payload!r}")
            opts["payload"] = payload
        opts.setdefault("payload", {})
        if kind == "interval":
            minutes = args.get("minutes", _minutes(opts))
            if isinstance(minutes, str) and minutes.strip().isdigit():
                minutes = int(minutes)
            if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
                raise ValueError(f"minutes must be a whole number of minutes, at least 1; got {minutes!r}")
            opts["interval_s"] = float(minutes * 60)
        elif kind == "alarm":
            cron = args.get("cron", opts.get("cron"))
            if not isinstance(cron, str) or len(cron.split()) != 5:
                raise ValueError(
                    f"cron must be a 5-field cron expression (minute hour day month weekday), got {cron!r}"
                )
            opts["cron"] = cron
            tz = args.get("timezone")
            if tz is not None:
                opts["tz"] = str(tz)
        else:
            date = args.get("date")
            opts["at"] = float(opts["at"]) if date is None and "at" in opts else _epoch_s(date)
        return opts

    def _feeds(self, tm: Any, trigger: str) -> list[Any]:
        return [f for f in tm.list_feeds(trigger) if f.kind == "alarm"]

    async def _create(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            tm.get_trigger(trigger)
        except TriggerError:
            raise ValueError(f"trigger {trigger!r} does not exist: create it before its feed") from None
        if self._feeds(tm, trigger) or trigger in self.paused:
            raise ValueError(f"trigger {trigger!r} already has an alarm feed")
        feed_id = await tm.add_feed(trigger, "alarm", **self._options(kind, args))
        self.changed[trigger] = _now_ms()
        return {"lifecycleEvent": "CREATE", "triggerName": f"/{self.namespace}/{trigger}", "feed": feed_id}

    async def _read(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        feeds = self._feeds(tm, trigger)
        if feeds:
            opts, active, info = feeds[0].options, True, feeds[0]
        elif trigger in self.paused:
            opts, active, info = self.paused[trigger], False, None
        else:
            raise ValueError(f"trigger {trigger!r} has no alarm feed")
        config: dict[str, Any] = {"name": trigger, "namespace": self.namespace, "payload": opts.get("payload", {})}
        if opts.get("interval_s") is not None:
            config["minutes"] = _minutes(opts)
        if opts.get("cron") is not None:
            config["cron"] = opts["cron"]
            config["timezone"] = opts.get("tz", "UTC")
        if opts.get("at") is not None:
            config["date"] = datetime.fromtimestamp(float(opts["at"]), UTC).isoformat().replace("+00:00", "Z")
        status: dict[str, Any] = {"active": active, "dateChanged": self.changed.get(trigger)}
        if info is not None:
            status["fires"] = info.fires
            if info.last_error:
                status["reason"] = {"kind": "AUTO", "message": info.last_error}
        return {"config": config, "status": status}

    async def _update(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        feeds = self._feeds(tm, trigger)
        if not feeds:
            if trigger not in self.paused:
                raise ValueError(f"trigger {trigger!r} has no alarm feed")
            self.paused[trigger] = self._options(kind, args, self.paused[trigger])
        else:
            opts = self._options(kind, args, dict(feeds[0].options))
            for f in feeds:
                await tm.remove_feed(f.feed_id)
            await tm.add_feed(trigger, "alarm", **{k: v for k, v in opts.items() if v is not None})
        self.changed[trigger] = _now_ms()
        return {"lifecycleEvent": "UPDATE", "triggerName": f"/{self.namespace}/{trigger}"}

    async def _delete(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        feeds = self._feeds(tm, trigger)
        if not feeds and self.paused.pop(trigger, None) is None:
            raise ValueError(f"trigger {trigger!r} has no alarm feed")
        for f in feeds:
            await tm.remove_feed(f.feed_id)
        self.changed.pop(trigger, None)
        return {"lifecycleEvent": "DELETE", "triggerName": f"/{self.namespace}/{trigger}"}

    async def _pause(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        feeds = self._feeds(tm, trigger)
        if not feeds:
            raise ValueError(f"trigger {trigger!r} has no active alarm feed")
        self.paused[trigger] = {k: v for k, v in feeds[0].options.items() if v is not None}
        for f in feeds:
            await tm.remove_feed(f.feed_id)
        self.changed[trigger] = _now_ms()
        return {"lifecycleEvent": "PAUSE", "triggerName": f"/{self.namespace}/{trigger}"}

    async def _unpause(self, tm: Any, trigger: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        opts = self.paused.pop(trigger, None)
        if opts is None:
            raise ValueError(f"trigger {trigger!r} has no paused alarm feed")
        await tm.add_feed(trigger, "alarm", **opts)
        self.changed[trigger] = _now_ms()
        return {"lifecycleEvent": "UNPAUSE", "triggerName": f"/{self.namespace}/{trigger}"}


def _minutes(opts: dict[str, Any]) -> int | None:
    interval = opts.get("interval_s")
    return None if interval is None else round(float(interval) / 60)


def _epoch_s(date: object) -> float:
    """``date`` of the once feed: an ISO 8601 time (UTC unless it says) or epoch milliseconds."""
    if isinstance(date, bool) or date is None:
        raise ValueError(f"date must be an ISO 8601 time or epoch milliseconds, got {date!r}")
    if isinstance(date, int | float):
        return float(date) / 1000
    if isinstance(date, str):
        text = date.strip()
        if text.isdigit():
            return int(text) / 1000
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"date must be an ISO 8601 time or epoch milliseconds, got {date!r}") from None
        return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    raise ValueError(f"date must be an ISO 8601 time or epoch milliseconds, got {date!r}")
