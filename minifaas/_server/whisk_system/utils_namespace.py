"""/whisk.system/utils/namespace: the namespace of the caller that invoked it."""

from __future__ import annotations

import os
from typing import Any


def main(args: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": os.environ.get("__OW_NAMESPACE")}
