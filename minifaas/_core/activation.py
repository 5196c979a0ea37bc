"""The activation record: OpenWhisk's record, in Python names."""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = ("STATUS_CODES", "Activation", "Status", "log_line", "new_activation_id", "now_ms")

Status = Literal["pending", "running", "success", "application_error", "developer_error", "internal_error"]

#: OpenWhisk's response.statusCode for each final status.
STATUS_CODES: Final[dict[str, int]] = {
    "success": 0,
    "application_error": 1,
    "developer_error": 2,
    "internal_error": 3,
}
FINAL_STATUSES: Final[frozenset[str]] = frozenset(STATUS_CODES)


def summarize_value(obj: Any) -> str | None:
    """A record's text for a value that is data, not JSON (a numpy array): ``ndarray float32 (224, 224, 3)``.

    The caller still gets the array itself; records, the REST API and the UI show this instead of the data.
    """
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return f"ndarray {obj.dtype} {tuple(obj.shape)}"
    return None


#: an activation id is the time in milliseconds (12 hex digits, so records of one host land in the database's
#: indexes in order: a commit touches their last pages, not random ones) and 80 random bits (20 hex digits)
_ID_RANDOM_HEX: Final = 20
#: random digits are drawn from the OS this many ids at a time (one ``os.urandom`` call per id costs ~1 us)
_ID_BUFFERED: Final = 256
_id_random = ""
_id_next = 0
_id_ms = -1
_id_prefix = ""


def _drop_buffered_ids() -> None:
    # a forked child must not hand out the same random digits as its parent
    global _id_random, _id_next
    _id_random, _id_next = "", 0


os.register_at_fork(after_in_child=_drop_buffered_ids)


def new_activation_id() -> str:
    """32 lowercase hex characters, like OpenWhisk's activation ids."""
    global _id_random, _id_next, _id_ms, _id_prefix
    at = _id_next
    if at >= len(_id_random):
        _id_random, at = os.urandom(_ID_RANDOM_HEX // 2 * _ID_BUFFERED).hex(), 0
    _id_next = at + _ID_RANDOM_HEX
    ms = time.time_ns() // 1_000_000
    if ms != _id_ms:
        _id_ms, _id_prefix = ms, f"{ms:012x}"
    return _id_prefix + _id_random[at : at + _ID_RANDOM_HEX]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def log_line(stream: str, text: str, ts: float | None = None) -> str:
    """Format one log line the way OpenWhisk does: ``<ISO-8601 time> stdout|stderr: <line>``."""
    t = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return f"{t.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z {stream}: {text}"


@dataclasses.dataclass(slots=True)
class Activation:
    """One invocation's record. Times are epoch milliseconds, durations milliseconds."""

    activation_id: str
    name: str
    version: str = "0.0.1"
    namespace: str = "guest"
    start: int = 0
    end: int | None = None
    duration: int | None = None
    wait_time: int | None = None
    init_time: int | None = None
    status: Status = "pending"
    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    logs: list[str] = dataclasses.field(default_factory=list)
    annotations: dict[str, Any] = dataclasses.field(default_factory=dict)
    cause: str | None = None
    #: when the engine accepted the invocation (epoch ms); ``start`` is when a sandbox began running it
    accepted: int = 0

    def _repr_html_(self) -> str:
        """A card for Jupyter: status, times, cold or warm, the result (arrays summarised) and the last logs."""
        return activation_html(self)

    @property
    def status_code(self) -> int | None:
        """OpenWhisk's statusCode (0..3), ``None`` while the activation has not ended."""
        return STATUS_CODES.get(self.status)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def success(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status_code"] = self.status_code
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Activation:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_openwhisk(self) -> dict[str, Any]:
        """The record in OpenWhisk's REST shape (camelCase, ``response`` object, annotations as a key/value list)."""
        ann = dict(self.annotations)
        if self.wait_time is not None:
            ann["waitTime"] = self.wait_time
        if self.init_time is not None:
            ann["initTime"] = self.init_time
        if self.cause is not None:
            ann.setdefault("causedBy", self.cause)  # a nested sequence says ``sequence``, as OpenWhisk's does
        # ``pkg/action`` is OpenWhisk's action ``action`` at path ``ns/pkg/action``; ``whisk.system/pkg/action``
        # (the dev server's system catalog) names its namespace itself
        ann.setdefault("path", self.name if self.name.count("/") == 2 else f"{self.namespace}/{self.name}")
        return {
            "activationId": self.activation_id,
            "namespace": self.namespace,
            "name": self.name.rpartition("/")[2],
            "version": self.version,
            "subject": self.namespace,
            "publish": False,
            "start": self.start or self.accepted,
            "end": self.end or 0,
            "duration": self.duration or 0,
            "logs": list(self.logs),
            "annotations": [{"key": k, "value": v} for k, v in ann.items()],
            "response": {
                "status": self.status,
                "statusCode": self.status_code if self.status_code is not None else 0,
                "success": self.success,
                "result": self.result,
            },
            "cause": self.cause,
        }


#: how many log lines and result characters an activation's card in a notebook shows
HTML_MAX_LOG_LINES: Final = 20
HTML_MAX_RESULT_CHARS: Final = 2000
STATUS_COLOURS: Final = {"success": "#1a7f37", "pending": "#9a6700", "running": "#9a6700"}


def activation_html(act: Activation) -> str:
    import html
    import json

    colour = STATUS_COLOURS.get(act.status, "#d12f2f")
    cold = act.annotations.get("cold")
    start = "cold start" if cold else "warm" if cold is not None else ""
    times = [
        f"duration {act.duration} ms" if act.duration is not None else "",
        f"wait {act.wait_time} ms" if act.wait_time is not None else "",
        f"init {act.init_time} ms" if act.init_time is not None else "",
        start,
    ]
    result = json.dumps(act.result, default=lambda o: summarize_value(o) or repr(o), indent=1)
    if len(result) > HTML_MAX_RESULT_CHARS:
        result = result[:HTML_MAX_RESULT_CHARS] + " …"
    logs = act.logs[-HTML_MAX_LOG_LINES:]
    more = f"<div>… {len(act.logs) - len(logs)} earlier lines</div>" if len(act.logs) > len(logs) else ""
    return (
        f"<div class='minifaas-activation' style='border:1px solid #d0d7de;border-radius:6px;padding:6px 10px'>"
        f"<b>{html.escape(act.name)}@{html.escape(act.version)}</b> "
        f"<span style='color:{colour};font-weight:600'>{html.escape(act.status)}</span> "
        f"<code>{html.escape(act.activation_id)}</code><br>"
        f"<small>{html.escape(' · '.join(x for x in times if x))}</small>"
        f"<pre style='margin:4px 0'>{html.escape(result)}</pre>"
        + (
            f"<details><summary>logs ({len(act.logs)})</summary>{more}<pre>{html.escape(chr(10).join(logs))}</pre>"
            "</details>"
            if act.logs
            else ""
        )
        + "</div>"
    )
