"""/whisk.system/utils/cat: the lines, and them joined with newlines as ``payload`` (as JavaScript joins)."""

from __future__ import annotations

from typing import Any


def js_string(v: Any) -> str:
    """What JavaScript's ``Array.join`` writes for a JSON value (the catalog's actions are JavaScript)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, list):
        return ",".join(js_string(x) for x in v)
    if isinstance(v, dict):
        return "[object Object]"
    return str(v)


def main(args: dict[str, Any]) -> dict[str, Any]:
    lines = args.get("lines") or []
    out = {"lines": lines, "payload": "\n".join(js_string(x) for x in lines)}
    print("cat: returning", out)
    return out
