"""The parameters both body-crop functions take (``body_crop`` v1 and ``smart_body_crop``), validated alike."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_UPPER = "eyes"
DEFAULT_LOWER = "hips"
DEFAULT_PADDING = 0.1
MAX_PADDING = 2.0
FORMATS = ("png", "jpeg", "jpg")


def parse(args: dict, part_order: Sequence[str]) -> tuple[str, str, float, str]:
    """(upper, lower, padding, format), with the body parts taken from ``part_order`` (top to bottom);
    ValueError naming the parameter otherwise."""
    parts = {}
    for name, default in (("upper", DEFAULT_UPPER), ("lower", DEFAULT_LOWER)):
        value = args.get(name, default)
        if value not in part_order:
            raise ValueError(f"unknown body part {name}={value!r}; expected one of {list(part_order)}")
        parts[name] = value
    upper, lower = parts["upper"], parts["lower"]
    if list(part_order).index(upper) > list(part_order).index(lower):
        raise ValueError(f"upper={upper!r} is below lower={lower!r}; order is {list(part_order)}")
    padding = args.get("padding", DEFAULT_PADDING)
    if isinstance(padding, bool) or not isinstance(padding, int | float) or not 0 <= padding <= MAX_PADDING:
        raise ValueError(f"padding must be a fraction in [0, {MAX_PADDING}], got {padding!r}")
    fmt = args.get("format", "png")
    if fmt not in FORMATS:
        raise ValueError(f"format must be 'png' or 'jpeg', got {fmt!r}")
    return upper, lower, float(padding), fmt
