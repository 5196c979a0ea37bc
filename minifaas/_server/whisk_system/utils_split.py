"""/whisk.system/utils/split: ``payload`` split at ``separator`` (default: line breaks) into ``lines``."""

from __future__ import annotations

import re
from typing import Any


def main(args: dict[str, Any]) -> dict[str, Any]:
    payload = args.get("payload")
    if payload is None:
        return {"error": "split: the parameter payload is required"}
    text = payload if isinstance(payload, str) else str(payload)
    separator = args.get("separator")
    lines = text.split(separator) if separator else re.split(r"\r?\n", text)
    return {"lines": lines, "payload": payload}
