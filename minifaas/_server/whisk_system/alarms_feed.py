"""/whisk.system/alarms/{alarm,interval,once}: feed actions speaking OpenWhisk's feed protocol.

Invoked with ``lifecycleEvent`` (CREATE, READ, UPDATE, DELETE, PAUSE, UNPAUSE), ``triggerName``
(``/namespace/name``), ``authKey`` and the feed's own parameters; the host's ``whisk.alarms`` service runs the
engine's alarm feed that fires the trigger. ``FEED_KIND`` is set when the catalog deploys this code (empty for
the backend action, which takes ``feedKind`` from its arguments).
"""

from __future__ import annotations

from typing import Any

import minifaas_sandbox

FEED_KIND = "interval"


def main(args: dict[str, Any]) -> dict[str, Any]:
    try:
        result: dict[str, Any] = minifaas_sandbox.host_call(
            "whisk.alarms", {**args, "feedKind": FEED_KIND or args.get("feedKind")}
        )
    except RuntimeError as exc:
        # the host's message, without the call's wrapping: what was wrong with the request
        return {"error": str(exc).partition("failed: ")[2] or str(exc)}
    return result
