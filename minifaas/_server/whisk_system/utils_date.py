"""/whisk.system/utils/date: the current date and time, as JavaScript's ``JSON.stringify(new Date())``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def main(args: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    print("It is now", now)
    return {"date": now.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
