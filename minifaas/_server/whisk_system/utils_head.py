"""/whisk.system/utils/head: the first ``num`` lines (1 when ``num`` is missing or 0)."""

from __future__ import annotations

from typing import Any


def main(args: dict[str, Any]) -> dict[str, Any]:
    lines = args.get("lines") or []
    num = args.get("num") or 1
    return {"lines": lines[: int(num)], "num": num}
