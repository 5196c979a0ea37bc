"""A function's ``resources`` (``deploy(..., resources={...})``), checked the same way for every backend."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from .._errors import DeployError

__all__ = ("validate_resources",)

#: Ray's names of its predefined resources, reserved: a custom resource cannot be called that
RESERVED_NAMES: Final = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def validate_resources(resources: Mapping[str, Any] | None) -> dict[str, float]:
    """``resources`` of a deploy, checked: ``num_cpus``, ``num_gpus`` and custom Ray resources, each >= 0."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise DeployError(f"resources must be a dict such as {{'num_gpus': 1}}, not {type(resources).__name__}")
    out: dict[str, float] = {}
    for name, value in resources.items():
        if not isinstance(name, str) or not name:
            raise DeployError(f"resources: {name!r} is not a resource name")
        if name in RESERVED_NAMES:
            raise DeployError(f"resources: {name!r} is Ray's own name; ask for num_cpus, num_gpus or memory_mb")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise DeployError(f"resources[{name!r}] must be a number >= 0, got {value!r}")
        if name == "num_cpus" and value <= 0:
            raise DeployError(f"resources['num_cpus'] must be > 0 (a fraction is fine), got {value!r}")
        out[name] = float(value)
    return out
