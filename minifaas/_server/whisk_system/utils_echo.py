"""/whisk.system/utils/echo: returns its input."""

from __future__ import annotations

from typing import Any


def main(args: dict[str, Any]) -> dict[str, Any]:
    return args
