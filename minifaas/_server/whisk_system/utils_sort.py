"""/whisk.system/utils/sort: the lines sorted as JavaScript's ``Array.sort()`` does, and their count.

JavaScript compares the string forms: ``[10, 9, 1]`` sorts to ``[1, 10, 9]``, null as ``"null"``.
"""

from __future__ import annotations

from typing import Any


def js_string(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, list):
        return ",".join("" if x is None else js_string(x) for x in v)
    if isinstance(v, dict):
        return "[object Object]"
    return str(v)


def main(args: dict[str, Any]) -> dict[str, Any]:
    lines = sorted(args.get("lines") or [], key=lambda v: "null" if v is None else js_string(v))
    return {"lines": lines, "length": len(lines)}
